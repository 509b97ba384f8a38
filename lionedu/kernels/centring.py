"""Centring the values before normalised attention (book chapter 8, section 10).

Each row of the normalised mask sums to one, so for any constant ``m`` per sequence and value
column, ``Scale(Q K^T ⊙ M) V = m + Scale(Q K^T ⊙ M) (V - m)``. The kernels compute with the
centred values ``V - m``: without that, when the values share a large common part, the
backward pass's cancellations (``dN_i . v_j + dc_i``, :mod:`.autograd`) happen between 16-bit
numbers that carry the common part, and the gradients of ``q``, ``k`` and the decays lose
most of their digits.

``m`` is each sequence's mean value per column, moved to the nearest multiple of the spacing
of the dtype's numbers at the column's largest ``|v|`` (``2^(e - p + 1)`` for ``2^e <=
max |v| < 2^(e+1)`` and ``p`` significant bits). Then ``v - m`` is exact for every ``v`` that
stays in its binade, and where it is rounded (a result in a larger binade), the rounding
depends on ``v``'s last bits. With the mean itself, the subtraction would round every value
of a binade the same way: a bias that every output averages instead of cancelling (measured:
LIT's forward error in bfloat16 went from 2.5e-3 to 5e-2 with values ``u ~ U[-1, 1]``, whose
outputs are close to their small mean).

Two kernels: :func:`value_stats_kernel` sums each column and finds its largest ``|v|``
(a grid over rows as well as sequences, joined with atomic adds and maxima, so that a few
sequences still fill the GPU); :func:`centre_kernel` writes ``v - m`` and ``m``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher
from .launch import ceil_div

__all__ = ["centre_values", "SIGNIFICANT_BITS"]

ROWS = 32  # rows per block of either kernel
STATS_BLOCKS = 8  # blocks per program of the stats kernel (256 rows)

# Significant bits (the leading one included) of each dtype the kernels take.
SIGNIFICANT_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


@triton.jit
def value_stats_kernel(
    v_ptr,  # values [BH, L, DV], contiguous
    stats_ptr,  # out: [BH, 2, DV] float32, zero on entry: each column's sum, then its largest |v|
    L,
    DV: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * (ROWS * BLOCKS)  # this program's first row
    cols = tl.arange(0, DV)
    total = tl.zeros([DV], dtype=tl.float32)
    largest = tl.zeros([DV], dtype=tl.float32)
    for block in range(BLOCKS):
        rows = first + block * ROWS + tl.arange(0, ROWS)
        x = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + cols[None, :], mask=(rows < L)[:, None], other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x, axis=0)
        largest = tl.maximum(largest, tl.max(tl.abs(x), axis=0))
    # Programs of one sequence meet here: the sums add up, the maxima are kept (all >= 0).
    tl.atomic_add(stats_ptr + bh * 2 * DV + cols, total)
    tl.atomic_max(stats_ptr + (bh * 2 + 1) * DV + cols, largest)


@triton.jit
def _shift(stats_ptr, bh, L, cols, DV: tl.constexpr, BITS: tl.constexpr, LIMIT: tl.constexpr):
    """Each column's shift ``m`` ``[DV]`` float32: the mean on the grid of the dtype's numbers
    at the column's largest ``|v|`` (module docstring)."""
    mean = tl.load(stats_ptr + bh * 2 * DV + cols) / L
    largest = tl.load(stats_ptr + (bh * 2 + 1) * DV + cols)
    # The biased exponent of `largest` (float32 bits 23-30): floor(log2 |v|) + 127, exactly.
    exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # The spacing 2^(e - BITS + 1), written straight into a float32's exponent bits (kept >= 1:
    # the smallest normal float32, for columns of tiny values).
    spacing = (tl.maximum(exponent - (BITS - 1), 1) << 23).to(tl.float32, bitcast=True)
    m = tl.floor(mean / spacing + 0.5) * spacing
    # No shift for an all-zero column, nor where v - m could overflow the dtype.
    return tl.where((largest > 0) & (largest <= LIMIT), m, 0.0)


@triton.jit
def centre_kernel(
    v_ptr,  # values [BH, L, DV], contiguous
    stats_ptr,  # [BH, 2, DV] float32 from value_stats_kernel
    centred_ptr,  # out: v - m [BH, L, DV] in v's dtype
    shift_ptr,  # out: m [BH, DV] float32
    L,
    DV: tl.constexpr, ROWS: tl.constexpr,
    BITS: tl.constexpr,  # significant bits of v's dtype
    LIMIT: tl.constexpr,  # half the dtype's largest number: columns past it are not shifted
):
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, DV)
    shift = _shift(stats_ptr, bh, L, cols, DV, BITS, LIMIT)  # every program works it out: DV numbers
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    at = (bh * L + rows[:, None]) * DV + cols[None, :]
    x = tl.load(v_ptr + at, mask=(rows < L)[:, None], other=0.0).to(tl.float32)
    tl.store(centred_ptr + at, (x - shift[None, :]).to(centred_ptr.dtype.element_ty), mask=(rows < L)[:, None])
    if tl.program_id(0) == 0:
        tl.store(shift_ptr + bh * DV + cols, shift)


_launch_stats = Launcher(value_stats_kernel)
_launch_centre = Launcher(centre_kernel)


def centre_values(v: torch.Tensor):
    """``(v - m, m)`` for values ``v [BH, L, DV]`` (contiguous, ``DV`` a power of two):
    the centred values in ``v``'s dtype and the shift ``m [BH, DV]`` float32 (module docstring)."""
    BH, L, DV = v.shape
    stats = torch.zeros(BH, 2, DV, device=v.device, dtype=torch.float32)
    _launch_stats((ceil_div(L, ROWS * STATS_BLOCKS), BH), v, stats, L, DV=DV, ROWS=ROWS, BLOCKS=STATS_BLOCKS,
                  num_warps=4, num_stages=2)
    centred = torch.empty_like(v)
    shift = torch.empty(BH, DV, device=v.device, dtype=torch.float32)
    _launch_centre((ceil_div(L, ROWS), BH), v, stats, centred, shift, L, DV=DV, ROWS=ROWS,
                   BITS=SIGNIFICANT_BITS[v.dtype], LIMIT=torch.finfo(v.dtype).max / 2, num_warps=4, num_stages=2)
    return centred, shift
