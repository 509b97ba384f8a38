"""The first step of the backward pass, as a kernel of its own: the gradient through the
normaliser (book chapter 7). The library's backward makes the same numbers inside the launch that
makes dQ (:func:`.launch.chunk_outputs_through_normaliser`, one launch fewer); this kernel is the
step in isolation, for the book and as that launch's reference in the tests.

With ``y_i = N_i / c_i`` and the incoming gradient ``dy_i``:

    dN_i = dy_i / c_i                 (a row of Dv values, in the inputs' dtype)
    dc_i = -(dy_i . y_i) / c_i        (one float32 number per row)

One pass over ``dy`` and ``y``: every program takes ``ROWS`` rows of the flattened
``[BH * L, Dv]`` tensors. ``dy`` may also come in the caller's ``[B, H, L, Dv]`` layout
(:mod:`.layout`): the gradient an attention layer passes back through its heads' transpose.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher
from .launch import ceil_div
from .layout import check_rows, heads, row_offsets, row_strides

__all__ = ["normaliser_gradient"]

ROWS = 32  # rows per program


@triton.jit
def normaliser_gradient_kernel(
    dy_ptr,  # [R, DV] (R = BH * L rows) in the layout of dy_sb, dy_sh, dy_sl (layout.py)
    y_ptr,  # [R, DV], contiguous
    den_ptr,  # normaliser c [R] float32
    dn_ptr,  # out: dN [R, DV] in the inputs' dtype, contiguous
    dc_ptr,  # out: dc [R] float32
    R, L, H, dy_sb, dy_sh, dy_sl,
    DV: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, DV)
    ok = rows < R
    at = rows[:, None] * DV + cols[None, :]
    # row r is row r % L of sequence r // L (row_offsets takes one sequence and a vector of rows,
    # or, as here, a vector of both)
    dy_at = row_offsets(rows // L, rows % L, H, dy_sb, dy_sh, dy_sl)[:, None] + cols[None, :]
    dy = tl.load(dy_ptr + dy_at, mask=ok[:, None], other=0.0).to(tl.float32)
    y = tl.load(y_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    den = tl.load(den_ptr + rows, mask=ok, other=1.0)
    tl.store(dn_ptr + at, (dy / den[:, None]).to(dn_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(dc_ptr + rows, -tl.sum(dy * y, axis=1) / den, mask=ok)


_launch = Launcher(normaliser_gradient_kernel)


@functools.lru_cache(maxsize=64)
def _options(DV: int, rows: int):
    """The launch options (fast_launch.LaunchOptions), made once per configuration."""
    return _launch.options(num_warps=4, DV=DV, ROWS=rows)


def normaliser_gradient(dy: torch.Tensor, y: torch.Tensor, den: torch.Tensor):
    """``y: [BH, L, DV]`` contiguous (DV a power of two), ``dy`` of its dtype: ``[BH, L, DV]``
    contiguous or ``[B, H, L, DV]`` with ``B * H = BH`` and last stride 1 (:mod:`.layout`),
    ``den: [BH, L]`` float32 -> ``dN [BH, L, DV]`` in ``y``'s dtype and ``dc [BH, L]`` float32."""
    BH, L, DV = y.shape
    check_rows(dy, "dy", BH, L, DV, y.dtype, y.device)
    H = heads(dy)
    dn = torch.empty_like(y)
    dc = torch.empty(BH, L, device=y.device, dtype=torch.float32)
    _launch.launch((ceil_div(BH * L, ROWS),), _options(DV, ROWS), (dy, y, den, dn, dc),
                   (BH * L, L, H, *row_strides(dy, H)))
    return dn, dc
