"""Centring the values before normalised attention (book chapter 8, section 10).

Each row of the normalised mask sums to one, so for any constant ``m`` per sequence and value
column, ``Scale(Q K^T ⊙ M) V = m + Scale(Q K^T ⊙ M) (V - m)``. The kernels compute with the
centred values ``V - m``: without that, when the values share a large common part, the
backward pass's cancellations (``dN_i . v_j + dc_i``, :mod:`.autograd`) happen between
numbers that carry the common part and were stored in the inputs' dtype (the states between
chunks, ``dN``, the saved output), and the gradients of ``q``, ``k`` and the decays lose most
of their digits: with values ``1 + 0.02 u`` at L = 4096, bfloat16's dq missed by 1.3 to 23
relative, float32's by up to 2e-3 (dev runs §41).

``m`` is each sequence's mean value per column, moved to the nearest multiple of the spacing
of the dtype's numbers at the column's largest ``|v|`` (``2^(e - p + 1)`` for ``2^e <=
max |v| < 2^(e+1)`` and ``p`` significant bits). Then ``v - m`` is exact for every ``v`` that
stays in its binade, and where it is rounded (a result in a larger binade), the rounding
depends on ``v``'s last bits. With the mean itself, the subtraction would round every value
of a binade the same way: a bias that every output averages instead of cancelling (measured:
LIT's forward error in bfloat16 went from 2.5e-3 to 5e-2 with values ``u ~ U[-1, 1]``, whose
outputs are close to their small mean).

``m`` comes from the whole sequence, also for causal attention: an output does not depend on
later positions, but its last bits may (through ``m``). The column sums are added in a fixed order,
so a call gives the same bits every time. Where ``v - m`` leaves ``v``'s
binade by more than one, or ``v`` is far below the column's largest magnitude, the difference is
rounded, as any number of the format is.

Two kernels: :func:`value_stats_kernel` sums each column and finds its largest ``|v|`` over
blocks of rows (a grid over rows as well as sequences, so that a few sequences still fill the
GPU); :func:`shift_kernel` adds up the blocks, in order, and turns the totals into ``m``. (The
first form joined the blocks with float32 atomic adds and maxima: the sums' last bits then
depended on the order in which programs finished, and the atomics needed a zeroed buffer, one
more launch.) The centred values
are never stored: the states and output kernels subtract ``m`` as they load the values (a
stored copy took a read and a write of ``V`` more, +22 µs of the forward's 140 at L = 4096).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher

__all__ = ["value_shift", "shifted_rows", "centred_copy", "format_grid"]

ROWS = 32  # rows per block of the stats kernel
STATS_BLOCKS = 16  # blocks per program of the stats kernel (512 rows)



def format_grid(dtype: torch.dtype) -> tuple:
    """``(bits, finest)`` of a floating-point dtype: its significant bits, the leading one
    counted (24, 8, 11 for float32, bfloat16, float16), and the log2 of the finest spacing the
    shift may have: the dtype's subnormals' (float16: -24), but no finer than 2^-126, the
    smallest normal float32, which :func:`_shift` writes into a float32's exponent bits."""
    info = torch.finfo(dtype)
    bits = 1 - round(math.log2(info.eps))  # eps = 2^(1 - bits)
    return bits, max(round(math.log2(info.smallest_normal * info.eps)), -126)


@triton.jit
def value_stats_kernel(
    v_ptr,  # values [BH, L, DV], contiguous
    stats_ptr,  # out: [BH, P, 2, DV] float32, P = the grid's first axis: each block's column sums,
    # then its largest |v| per column
    L,
    DV: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    block_of_rows = tl.program_id(0)
    first = block_of_rows * (ROWS * BLOCKS)  # this program's first row
    cols = tl.arange(0, DV)
    # Element-wise running sums and maxima of the blocks, reduced over rows once at the end:
    # the loop is loads and adds only, so the loads of the next blocks can be in flight
    # (a reduction in every step made it 2.4 times slower on the H200, dev runs §41).
    total = tl.zeros([ROWS, DV], dtype=tl.float32)
    largest = tl.zeros([ROWS, DV], dtype=tl.float32)
    for block in range(BLOCKS):
        rows = first + block * ROWS + tl.arange(0, ROWS)
        x = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + cols[None, :], mask=(rows < L)[:, None], other=0.0)
        x = x.to(tl.float32)
        total += x
        largest = tl.maximum(largest, tl.abs(x))
    at = (bh * tl.num_programs(0) + block_of_rows) * 2 * DV
    tl.store(stats_ptr + at + cols, tl.sum(total, axis=0))
    tl.store(stats_ptr + at + DV + cols, tl.max(largest, axis=0))


@triton.jit
def _shift(total, largest, L, BITS: tl.constexpr, FINEST: tl.constexpr, LIMIT: tl.constexpr):
    """Each column's shift ``m`` float32 from its sum ``total`` and largest magnitude ``largest``
    (both ``[DV]``): the mean on the grid of the dtype's numbers at ``largest`` (module docstring)."""
    mean = total / L
    # The biased exponent of `largest` (float32 bits 23-30): floor(log2 |v|) + 127, exactly.
    exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # The spacing 2^(e - BITS + 1), written straight into a float32's exponent bits, at least
    # 2^FINEST (columns of tiny values: the dtype's subnormals have that spacing).
    spacing = (tl.maximum(exponent - (BITS - 1), FINEST + 127) << 23).to(tl.float32, bitcast=True)
    m = tl.floor(mean / spacing + 0.5) * spacing
    # No shift for an all-zero column, nor where v - m could overflow the dtype, nor where the
    # sum overflowed or met a NaN (a shift taken from it would spread to every position).
    return tl.where((largest > 0) & (largest <= LIMIT) & (m == m) & (tl.abs(m) <= LIMIT), m, 0.0)


@triton.jit
def shift_kernel(
    stats_ptr,  # [BH, P, 2, DV] float32 from value_stats_kernel
    shift_ptr,  # out: m [BH, DV] float32
    L, P,  # sequence length, blocks of rows
    DV: tl.constexpr,
    BITS: tl.constexpr,  # significant bits of the values' dtype
    FINEST: tl.constexpr,  # log2 of the finest spacing allowed (format_grid)
    LIMIT: tl.constexpr,  # half the dtype's largest number: columns past it are not shifted
):
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, DV)
    total = tl.zeros([DV], dtype=tl.float32)
    largest = tl.zeros([DV], dtype=tl.float32)
    for p in range(0, P):  # the blocks in order: the same sum on every call
        at = (bh * P + p) * 2 * DV
        total += tl.load(stats_ptr + at + cols)
        largest = tl.maximum(largest, tl.load(stats_ptr + at + DV + cols))
    tl.store(shift_ptr + bh * DV + cols, _shift(total, largest, L, BITS, FINEST, LIMIT))


@triton.jit
def shifted_rows(x, shift_ptrs, row_ok):
    """Loaded rows ``x [R, W]`` less the shift at ``shift_ptrs [W]``, in ``x``'s dtype: the
    difference in float32 (exact where ``x`` is within 2^16 of the column's largest magnitude in
    bfloat16, 2^13 in float16), then rounded once. Rows past the sequence (``row_ok``
    False) stay 0, as the kernels' masked loads leave them."""
    shift = tl.load(shift_ptrs)
    return tl.where(row_ok[:, None], x.to(tl.float32) - shift[None, :], 0.0).to(x.dtype)


_launch_stats = Launcher(value_stats_kernel)
_launch_shift = Launcher(shift_kernel)


def value_shift(v: torch.Tensor) -> torch.Tensor:
    """The shift ``m [BH, DV]`` float32 for values ``v [BH, L, DV]`` (contiguous, ``DV`` a power
    of two): module docstring. The kernels subtract it as they load the values
    (``(v - m)`` in float32, rounded to ``v``'s dtype: exact wherever it stays in ``v``'s binade)."""
    from .launch import ceil_div  # (launch imports the kernels, which import this module)

    BH, L, DV = v.shape
    P = ceil_div(L, ROWS * STATS_BLOCKS)  # blocks of rows
    stats = torch.empty(BH, P, 2, DV, device=v.device, dtype=torch.float32)
    _launch_stats((P, BH), v, stats, L, DV=DV, ROWS=ROWS, BLOCKS=STATS_BLOCKS,
                  num_warps=4 if DV <= 64 else 8, num_stages=2)
    shift = torch.empty(BH, DV, device=v.device, dtype=torch.float32)
    bits, finest = format_grid(v.dtype)
    _launch_shift((BH,), stats, shift, L, P, DV=DV, BITS=bits, FINEST=finest, LIMIT=torch.finfo(v.dtype).max / 2,
                  num_warps=1 if DV <= 64 else 2, num_stages=1)
    return shift


def centred_copy(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``v - m`` as a tensor, for a launch that cannot centre as it loads (:mod:`.autograd`):
    the same arithmetic as :func:`shifted_rows` (float32 difference, rounded once)."""
    return (v.float() - shift[:, None, :]).to(v.dtype)
