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
of the dtype's numbers at the column's largest ``|v|`` (``2^(e - p + 1)`` for ``2^e <= max |v| <
2^(e+1)`` and ``p`` significant bits). Then ``v - m`` is exact for every ``v`` that stays in its
binade, and where it is rounded (a result in a larger binade), the rounding depends on ``v``'s
last bits. With the mean itself, the subtraction would round every value of a binade the same
way: a bias that every output averages instead of cancelling (measured: LIT's forward error in
bfloat16 went from 2.5e-3 to 5e-2 with values ``u ~ U[-1, 1]``, whose outputs are close to their
small mean).

Any constant ``m`` keeps the identity exact, but it must be the whole sequence's mean, up to the
grid: what is left of the common part, ``mean - m``, adds up along a walk without decay, to
``L (mean - m)`` in LIT's states against the ``sqrt(L)``-sized sums of the centred values. (A
mean of 128 rows spread along the sequence, tried because it needs no pass of its own, made
LIT's bidirectional bfloat16 dq error 2.6e-2 at L = 4096 against 4.4e-3 with the whole mean,
on values without a common part; dev runs §42.) ``m`` comes from the whole sequence, also for
causal attention: an output does not depend on later positions, but its last bits may
(through ``m``).

:func:`value_stats_kernel` sums each column and finds its largest ``|v|`` over blocks of rows,
one program per block (so that the pass, a read of ``V``, is bound by memory, not by a long
loop per program), and :func:`shift_from_stats` adds up a sequence's blocks in a fixed order and
turns the totals into ``m``: the states kernel (:mod:`.states`), which needs ``m`` first, calls
it before its walk and stores ``m`` for the later kernels. A call gives the same bits every
time. (v12's first form had a shift kernel of its own between the two, which looped over the
blocks one load at a time, and a stats kernel whose programs looped over 16 tiles each: the two
took 23-63 µs at L = 1024-16384 on an H200; dev runs §42.)

The centred values are never stored (a stored copy took a read and a write of ``V`` more, +22
µs of the forward's 140 at L = 4096): the output kernel subtracts ``m`` as it loads the
values, and so does the states kernel for float32 values; for 16-bit ones it subtracts each
chunk's ``(sum_j k_j) m^T`` from the chunk's product, which takes ``V`` as it is (:mod:`.states`;
in tiles up to 64 x 64, the measured ones).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .decays import store_chunk_sums
from .fast_launch import Launcher

__all__ = ["value_stats", "value_stats_and_chunk_sums", "value_shift", "shift_from_stats", "shifted_rows",
           "centred_copy", "format_grid", "shift_constants", "stats_rows"]

TILES = 8  # tiles per program of the stats kernel: each program sums stats_rows(DV) * TILES rows
STATS_BLOCK = 64  # blocks of rows shift_from_stats adds per step


def format_grid(dtype: torch.dtype) -> tuple:
    """``(bits, finest)`` of a floating-point dtype: its significant bits, the leading one
    counted (24, 8, 11 for float32, bfloat16, float16), and the log2 of the finest spacing the
    shift may have: the dtype's subnormals' (float16: -24), but no finer than 2^-126, the
    smallest normal float32, which :func:`_shift` writes into a float32's exponent bits."""
    info = torch.finfo(dtype)
    bits = 1 - round(math.log2(info.eps))  # eps = 2^(1 - bits)
    return bits, max(round(math.log2(info.smallest_normal * info.eps)), -126)


def stats_rows(dv: int) -> int:
    """The rows of one tile of :func:`value_stats_kernel` for ``dv`` value columns: 128, fewer
    for wide heads (a tile's two float32 accumulators stay at 2 * 8192 numbers, 64 a thread of
    its 8 warps). 128 x 8 rows a program with 8 warps read V fastest, or within 2 % of the fastest,
    at Dv = 64 in all four shapes swept (B*H = 64 and 8, L = 4096 to 65536; dev runs §42)."""
    return min(128, 8192 // dv)


def shift_constants(dtype: torch.dtype) -> dict:
    """The compile-time constants of :func:`shift_from_stats` for values of ``dtype``."""
    bits, finest = format_grid(dtype)
    return dict(STATS_BLOCK=STATS_BLOCK, BITS=bits, FINEST=finest, LIMIT=torch.finfo(dtype).max / 2)


@triton.jit
def value_stats_kernel(
    v_ptr,  # values [BH, L, DV], contiguous
    stats_ptr,  # out: [BH, P, 2, DV] float32, P = the grid's first axis: each block's column sums,
    # then its largest |v| per column
    log_decay_ptr,  # CHUNK_SUMS: one log decay per token [B, H, L], in the layout of ld_sb, ld_sh, ld_sl
    g_ptr,  # CHUNK_SUMS, out: their chunk-local sums [BH, N*C] float32 (decays.store_chunk_sums)
    L, N, H, ld_sb, ld_sh, ld_sl,
    DV: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr,
    CHUNK_SUMS: tl.constexpr,  # also the log decays' chunk sums of this block's rows (LION-S)
    CHUNK: tl.constexpr,  # C, with CHUNK_SUMS
):
    bh = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    cols = tl.arange(0, DV)
    total = tl.zeros([ROWS, DV], dtype=tl.float32)
    largest = tl.zeros([ROWS, DV], dtype=tl.float32)
    # A few tiles per program, unrolled (their loads all in flight at once), reduced over rows
    # once at the end. (A loop over 16 tiles of 32 rows in 512 programs was bound by the loop's
    # latency: 23-63 µs where the read takes 8-32; dev runs §42.)
    for tile in tl.static_range(TILES):
        rows = (block * TILES + tile) * ROWS + tl.arange(0, ROWS)
        x = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + cols[None, :], mask=(rows < L)[:, None], other=0.0)
        x = x.to(tl.float32)
        total += x
        largest = tl.maximum(largest, tl.abs(x))
    at = (bh * tl.num_programs(0) + block) * 2 * DV
    tl.store(stats_ptr + at + cols, tl.sum(total, axis=0))
    tl.store(stats_ptr + at + DV + cols, tl.max(largest, axis=0))
    if CHUNK_SUMS:
        # The log decays' chunk sums ride along: the training forward's first pass is then one
        # launch, not this one and PyTorch's cumsum (each a few µs of host time; v19).
        store_chunk_sums(log_decay_ptr, g_ptr, bh, block * TILES * ROWS, L, N, H, ld_sb, ld_sh, ld_sl, TILES * ROWS,
                         CHUNK)


@triton.jit
def _shift(total, largest, L, BITS: tl.constexpr, FINEST: tl.constexpr, LIMIT: tl.constexpr):
    """Each column's shift ``m`` float32 from its sum ``total`` and largest magnitude ``largest``
    (both ``[W]``): the mean on the grid of the dtype's numbers at ``largest`` (module docstring)."""
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
def shift_from_stats(stats_ptr, bh, P, L, cols, DV: tl.constexpr, STATS_BLOCK: tl.constexpr, BITS: tl.constexpr,
                     FINEST: tl.constexpr, LIMIT: tl.constexpr):
    """The shift ``m`` float32 of the value columns ``cols [W]`` of sequence ``bh``, from the
    ``P`` blocks of :func:`value_stats_kernel` (``stats_ptr``: ``[BH, P, 2, DV]``), added
    ``STATS_BLOCK`` blocks at a time, in order. ``BITS``, ``FINEST``, ``LIMIT``:
    :func:`shift_constants`."""
    total = tl.zeros_like(cols).to(tl.float32)
    largest = tl.zeros_like(cols).to(tl.float32)
    for first in range(0, P, STATS_BLOCK):
        blocks = first + tl.arange(0, STATS_BLOCK)
        at = ((bh * P + blocks[:, None]) * 2) * DV + cols[None, :]
        ok = (blocks < P)[:, None]
        total += tl.sum(tl.load(stats_ptr + at, mask=ok, other=0.0), axis=0)
        largest = tl.maximum(largest, tl.max(tl.load(stats_ptr + at + DV, mask=ok, other=0.0), axis=0))
    return _shift(total, largest, L, BITS, FINEST, LIMIT)


@triton.jit
def shift_kernel(
    stats_ptr,  # [BH, P, 2, DV] float32 from value_stats_kernel
    shift_ptr,  # out: m [BH, DV] float32
    L, P,  # sequence length, blocks of rows
    DV: tl.constexpr, STATS_BLOCK: tl.constexpr, BITS: tl.constexpr, FINEST: tl.constexpr, LIMIT: tl.constexpr,
):
    """The shift alone, one program per sequence (:func:`value_shift`); attention takes it from
    the states kernel, which computes it with the same :func:`shift_from_stats`."""
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, DV)
    tl.store(shift_ptr + bh * DV + cols, shift_from_stats(stats_ptr, bh, P, L, cols, DV, STATS_BLOCK, BITS, FINEST,
                                                          LIMIT))


@triton.jit
def shifted_rows(x, shift, row_ok):
    """Loaded rows ``x [R, W]`` less the shift ``shift [W]`` float32, in ``x``'s dtype: the
    difference in float32 (exact where ``x`` is within 2^16 of the column's largest magnitude in
    bfloat16, 2^13 in float16), then rounded once. Rows past the sequence (``row_ok``
    False) stay 0, as the kernels' masked loads leave them."""
    return tl.where(row_ok[:, None], x.to(tl.float32) - shift[None, :], 0.0).to(x.dtype)


_launch_stats = Launcher(value_stats_kernel)
_launch_shift = Launcher(shift_kernel)


@functools.lru_cache(maxsize=64)
def _stats_options(DV: int, rows: int, tiles: int, chunk_sums: bool, chunk: int):
    """The stats kernel's launch options (fast_launch.LaunchOptions), made once per configuration."""
    return _launch_stats.options(num_warps=8, num_stages=1, DV=DV, ROWS=rows, TILES=tiles, CHUNK_SUMS=chunk_sums,
                                 CHUNK=chunk)


def value_stats(v: torch.Tensor) -> torch.Tensor:
    """Column sums and largest magnitudes of ``v [BH, L, DV]`` (contiguous, ``DV`` a power of
    two) per block of ``stats_rows(DV) * TILES`` rows: ``[BH, P, 2, DV]`` float32, for
    :func:`shift_from_stats` (the states kernel, :func:`value_shift`)."""
    return _value_stats(v, None, 16)[0]


def value_stats_and_chunk_sums(v: torch.Tensor, log_decay: torch.Tensor, chunk_size: int):
    """``(stats, g)`` in one launch: :func:`value_stats` of ``v [BH, L, DV]``, and the chunk-local
    sums of ``log_decay`` (one per token, ``[B, H, L]`` with ``B * H = BH``, any float dtype and
    strides) for ``chunk_size`` (a power of two up to the stats kernel's block of rows), as
    :func:`lionedu.kernels.launch.padded_chunk_sums` makes them: ``[BH, N*C]`` float32."""
    BH, L, DV = v.shape
    if not isinstance(log_decay, torch.Tensor):
        raise TypeError(f"log_decay must be a tensor, got {type(log_decay).__name__}")
    if not log_decay.is_floating_point() or log_decay.device != v.device:
        raise ValueError(f"log_decay must be a floating-point tensor on v's device ({v.device}), got {log_decay.dtype} "
                         f"on {log_decay.device}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if log_decay.dim() != 3 or log_decay.shape[0] * log_decay.shape[1] != BH or log_decay.shape[2] != L:
        raise ValueError(f"log_decay must have shape [B, H, L] with B * H = {BH} and L = {L}, got "
                         f"{list(log_decay.shape)}")
    span = stats_rows(DV) * TILES
    if chunk_size < 1 or chunk_size & (chunk_size - 1) or chunk_size > span:
        raise ValueError(f"chunk_size must be a power of two up to {span}, got {chunk_size}")
    return _value_stats(v, log_decay, chunk_size)


def _value_stats(v, log_decay, chunk_size: int):
    """The launch behind :func:`value_stats` and :func:`value_stats_and_chunk_sums`: ``(stats, g or None)``."""
    from .launch import ceil_div  # (launch imports this module)

    BH, L, DV = v.shape
    rows = stats_rows(DV)
    P = ceil_div(L, rows * TILES)  # blocks of rows
    stats = torch.empty(BH, P, 2, DV, device=v.device, dtype=torch.float32)
    if log_decay is None:
        _launch_stats.launch((P, BH), _stats_options(DV, rows, TILES, False, chunk_size), (v, stats, None, None),
                             (L, 1, 1, 0, 0, 0))
        return stats, None
    N = ceil_div(L, chunk_size)
    g = torch.empty(BH, N * chunk_size, device=v.device, dtype=torch.float32)
    _launch_stats.launch((P, BH), _stats_options(DV, rows, TILES, True, chunk_size), (v, stats, log_decay, g),
                         (L, N, log_decay.shape[1], *log_decay.stride()))
    return stats, g


def value_shift(v: torch.Tensor) -> torch.Tensor:
    """The shift ``m [BH, DV]`` float32 for values ``v [BH, L, DV]`` (contiguous, ``DV`` a power
    of two): module docstring. The states kernel computes it for attention with the same
    :func:`value_stats` and :func:`shift_from_stats` (its tiles may add the blocks' sums in
    another order, so the last bit of the mean, and rarely ``m``, may differ); the kernels
    subtract it from the values (``v - m`` in float32, exact wherever it stays in ``v``'s binade)."""
    BH, L, DV = v.shape
    stats = value_stats(v)
    shift = torch.empty(BH, DV, device=v.device, dtype=torch.float32)
    _launch_shift((BH,), stats, shift, L, stats.shape[1], DV=DV, **shift_constants(v.dtype), num_warps=4,
                  num_stages=1)
    return shift


def centred_copy(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``v - m`` as a tensor, for a launch that cannot centre as it loads (:mod:`.autograd`):
    the same arithmetic as :func:`shifted_rows` (float32 difference, rounded once)."""
    return (v.float() - shift[:, None, :]).to(v.dtype)
