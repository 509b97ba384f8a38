"""The last step of the backward pass: the gradient of the log decays (book chapter 7).

The dQ and dK operators return, for every position ``i``, the row dots ``r^<_i, r^>_i``
(``q_i . dq_i`` restricted to the keys before / after ``i``) and ``c^<_i, c^>_i`` (the same
for ``k_i . dk_i``). A log decay ``l_t`` sits on every pair that straddles ``t``:

    dl_t = sum_{i >= t} a_i + sum_{i < t} b_i,     a = r^< - c^<,   b = r^> - c^>
         = sum_i a_i + sum_{i < t} d_i,            d = b - a

so one sequence needs its total of ``a`` and one exclusive prefix sum of ``d``. One program
walks one sequence twice in blocks of ``BLOCK`` positions; the sums are float64, because a
prefix sum over ``L`` terms that largely cancel loses digits in float32.

A decay shared by all positions of a head (LION-D) only needs ``sum_t dl_t`` per sequence,
``L sum_i a_i + sum_i (L - 1 - i) d_i``: one pass, and no ``[BH, L]`` result (``ROW_SUMS``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher
from .launch import next_power_of_2

__all__ = ["decay_gradient"]

BLOCK = 1024  # positions per step of a program's walk


@triton.jit
def _difference(x_ptr, y_ptr, at, ok):
    """``x - y`` at the offsets ``at`` (masked by ``ok``), in float64: one of ``a``, ``b``."""
    return (tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
            - tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float64))


@triton.jit
def decay_gradient_kernel(
    r_before_ptr, r_after_ptr, c_before_ptr, c_after_ptr,  # row dots [BH, L] float32
    out_ptr,  # out: dl [BH, L] float32, or with ROW_SUMS its sum over positions [BH]
    L,
    ROW_SUMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    row = seq * L  # this program's sequence
    steps = tl.arange(0, BLOCK)

    # ---- Pass 1: sum_i a_i, accumulated block by block (elementwise, then one reduction) ----
    # (with ROW_SUMS also sum_i (L - 1 - i) d_i, and that is all: sum_t dl_t needs no pass 2)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    weighted = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, L, BLOCK):
        t = start + steps
        ok = t < L
        a = _difference(r_before_ptr, c_before_ptr, row + t, ok)  # r^< - c^<
        acc += a
        if ROW_SUMS:
            b = _difference(r_after_ptr, c_after_ptr, row + t, ok)  # r^> - c^>
            weighted += (b - a) * (L - 1 - t).to(tl.float64)
    carry = tl.sum(acc, axis=0)
    if ROW_SUMS:
        tl.store(out_ptr + seq, (L * carry + tl.sum(weighted, axis=0)).to(tl.float32))
    else:
        # ---- Pass 2: dl_t = sum_i a_i + (prefix sum of d before t) --------------------------
        # Within a block the exclusive prefix sum is the inclusive one (tl.cumsum) minus the
        # term; ``carry`` brings in everything before the block.
        for start in range(0, L, BLOCK):
            t = start + steps
            ok = t < L
            a = _difference(r_before_ptr, c_before_ptr, row + t, ok)
            d = _difference(r_after_ptr, c_after_ptr, row + t, ok) - a  # b - a
            tl.store(out_ptr + row + t, (carry + tl.cumsum(d, axis=0) - d).to(tl.float32), mask=ok)
            carry += tl.sum(d, axis=0)


_launch = Launcher(decay_gradient_kernel)


@functools.lru_cache(maxsize=64)
def _options(row_sums: bool, block: int):
    """The launch options (fast_launch.LaunchOptions), made once per configuration."""
    return _launch.options(num_warps=4, ROW_SUMS=row_sums, BLOCK=block)


def decay_gradient(r_before, r_after, c_before, c_after, *, row_sums: bool = False):
    """The row dots ``[BH, L]`` float32 (contiguous) -> ``dl [BH, L]`` float32, or with
    ``row_sums`` its sum over positions, ``[BH]`` float32."""
    BH, L = r_before.shape
    out = torch.empty(BH, device=r_before.device, dtype=torch.float32) if row_sums else torch.empty_like(r_before)
    block = min(BLOCK, next_power_of_2(L))
    _launch.launch((BH,), _options(row_sums, block), (r_before, r_after, c_before, c_after, out), (L,))
    return out
