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
``L sum_i a_i + sum_i (L - 1 - i) d_i``: one pass, and no ``[BH, L]`` result (``ROW_SUMS``); and
summed over the batch's sequences of that head, which one program per head adds up in float64 as
it goes, loading its sequences side by side (sequences are numbered ``b * H + h``), so no PyTorch
sum follows the launch.
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
    out_ptr,  # out: dl [BH, L] float32, or with ROW_SUMS its sum over positions and sequences [HEADS]
    L, BH,
    HEADS,  # ROW_SUMS: program h sums the sequences h, h + HEADS, h + 2 HEADS, ... (b * H + h)
    ROW_SUMS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,  # ROW_SUMS: sequences of one head loaded side by side
):
    steps = tl.arange(0, BLOCK)
    if ROW_SUMS:
        # ---- One walk over this head's sequences, BLOCK_B of them side by side (their loads in
        # flight together, as one program per sequence would have them): per sequence
        # L sum_i a_i + sum_i (L - 1 - i) d_i, all added elementwise until the end ----------------
        head = tl.program_id(0).to(tl.int64)
        batch = tl.arange(0, BLOCK_B)
        total = tl.zeros([BLOCK_B, BLOCK], dtype=tl.float64)
        for first in range(0, BH // HEADS, BLOCK_B):
            b = first + batch
            rows = (b.to(tl.int64) * HEADS + head) * L  # [BLOCK_B]: where each sequence starts
            for start in range(0, L, BLOCK):
                t = start + steps
                ok = (b < BH // HEADS)[:, None] & (t < L)[None, :]
                at = rows[:, None] + t[None, :]
                a = _difference(r_before_ptr, c_before_ptr, at, ok)  # r^< - c^<
                after = _difference(r_after_ptr, c_after_ptr, at, ok)  # r^> - c^>
                total += L * a + (after - a) * (L - 1 - t).to(tl.float64)[None, :]
        tl.store(out_ptr + head, tl.sum(tl.sum(total, axis=1), axis=0).to(tl.float32))
    else:
        seq = tl.program_id(0).to(tl.int64)
        row = seq * L  # this program's sequence
        # ---- Pass 1: sum_i a_i, accumulated block by block (elementwise, then one reduction) ----
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, L, BLOCK):
            t = start + steps
            acc += _difference(r_before_ptr, c_before_ptr, row + t, t < L)  # r^< - c^<
        carry = tl.sum(acc, axis=0)
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
def _options(row_sums: bool, block: int, block_b: int):
    """The launch options (fast_launch.LaunchOptions), made once per configuration."""
    return _launch.options(num_warps=4, ROW_SUMS=row_sums, BLOCK=block, BLOCK_B=block_b)


def decay_gradient(r_before, r_after, c_before, c_after, *, heads=None):
    """The row dots ``[BH, L]`` float32 (contiguous) -> ``dl [BH, L]`` float32, or with ``heads``
    (dividing ``BH``) its sums over positions and over the sequences of each head, ``[heads]``
    float32: entry ``h`` sums sequences ``h, h + heads, ...`` (``b * H + h``)."""
    BH, L = r_before.shape
    if heads is not None and (not isinstance(heads, int) or heads < 1 or BH % heads):
        raise ValueError(f"heads must be a positive integer that divides BH = {BH}, got {heads!r}")
    row_sums = heads is not None
    out = torch.empty(heads, device=r_before.device, dtype=torch.float32) if row_sums else torch.empty_like(r_before)
    # With row_sums, up to BLOCK positions in all: a head's sequences side by side, then positions.
    block_b = min(next_power_of_2(BH // heads), BLOCK) if row_sums else 1
    block = min(BLOCK // block_b, next_power_of_2(L))
    _launch.launch((heads if row_sums else BH,), _options(row_sums, block, block_b),
                   (r_before, r_after, c_before, c_after, out), (L, BH, heads if row_sums else 1))
    return out
