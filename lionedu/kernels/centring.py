"""Centring the values before normalised attention (book chapter 8, section 10).

Each row of the normalised mask sums to one, so for any constant ``m`` per sequence and value
column, ``Scale(Q K^T ⊙ M) V = m + Scale(Q K^T ⊙ M) (V - m)``. The kernels compute with the
centred values ``V - m``: without that, when the values share a large common part, the
backward pass's cancellations (``dN_i . v_j + dc_i``, :mod:`.autograd`) happen between
numbers that carry the common part and were stored in the inputs' dtype (the states between
chunks, ``dN``, the saved output), and the gradients of ``q``, ``k`` and the decays lose most
of their digits: with values ``1 + 0.02 u`` at L = 4096, bfloat16's dq missed by 1.3 to 23
relative, float32's by up to 2e-3 (dev runs §41).

``m`` is the mean of each value column over a sample of the sequence's rows (``SAMPLE_ROWS``
of them, spread evenly along it: all of them for shorter sequences), moved to the nearest
multiple of the spacing of the dtype's numbers at the sample's largest ``|v|`` (``2^(e - p + 1)``
for ``2^e <= max |v| < 2^(e+1)`` and ``p`` significant bits). Then ``v - m`` is exact for every
``v`` that stays in its binade (and is not in a binade above the sample's largest), and where it
is rounded (a result in a larger binade), the rounding depends on ``v``'s last bits. With the
mean itself, the subtraction would round every value of a binade the same way: a bias that
every output averages instead of cancelling (measured: LIT's forward error in bfloat16 went from
2.5e-3 to 5e-2 with values ``u ~ U[-1, 1]``, whose outputs are close to their small mean).

Any constant ``m`` keeps the identity exact; it only has to be close to the values' common part
for the cancellations to be between small numbers, and a sample's mean is within a small part
of the values' spread of the whole sequence's. The sample costs the same at every length and
needs no pass over the sequence of its own: the states kernel (:mod:`.states`), which needs
``m`` first, computes it from the sample before its walk (:func:`sampled_shift`) and stores it
for the later kernels. (v12's first form summed every row in two launches of their own, a
stats kernel over blocks of rows and a shift kernel: 23-63 µs per forward at L = 1024-16384 on
an H200; dev runs §42.) ``m`` comes from the whole sequence, also for causal
attention: an output does not depend on later positions, but its last bits may (through
``m``). The sample's rows are fixed, so a call gives the same bits every time.

The centred values are never stored: the states and output kernels subtract ``m`` as they load
the values (a stored copy took a read and a write of ``V`` more, +22 µs of the forward's 140 at
L = 4096).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher

__all__ = ["value_shift", "sampled_shift", "shifted_rows", "centred_copy", "format_grid", "shift_constants"]

SAMPLE_ROWS = 128  # rows of the sample the shift is taken from (a power of two)


def format_grid(dtype: torch.dtype) -> tuple:
    """``(bits, finest)`` of a floating-point dtype: its significant bits, the leading one
    counted (24, 8, 11 for float32, bfloat16, float16), and the log2 of the finest spacing the
    shift may have: the dtype's subnormals' (float16: -24), but no finer than 2^-126, the
    smallest normal float32, which :func:`_shift` writes into a float32's exponent bits."""
    info = torch.finfo(dtype)
    bits = 1 - round(math.log2(info.eps))  # eps = 2^(1 - bits)
    return bits, max(round(math.log2(info.smallest_normal * info.eps)), -126)


def shift_constants(dtype: torch.dtype) -> dict:
    """The compile-time constants of :func:`sampled_shift` for values of ``dtype``."""
    bits, finest = format_grid(dtype)
    return dict(SAMPLE=SAMPLE_ROWS, BITS=bits, FINEST=finest, LIMIT=torch.finfo(dtype).max / 2)


@triton.jit
def _shift(total, largest, count, BITS: tl.constexpr, FINEST: tl.constexpr, LIMIT: tl.constexpr):
    """Each column's shift ``m`` float32 from the sum ``total`` of ``count`` values and their
    largest magnitude ``largest`` (both ``[W]``): the mean on the grid of the dtype's numbers at
    ``largest`` (module docstring)."""
    mean = total / count
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
def sampled_shift(v_ptr, bh, L, cols, DV: tl.constexpr, SAMPLE: tl.constexpr, BITS: tl.constexpr,
                  FINEST: tl.constexpr, LIMIT: tl.constexpr):
    """The shift ``m`` float32 of the value columns ``cols [W]`` of sequence ``bh`` (values
    ``[BH, L, DV]``, contiguous), from ``SAMPLE`` rows spread evenly along it: rows
    ``floor(i L / SAMPLE)``, ``i = 0 .. SAMPLE - 1`` (each row once where ``L >= SAMPLE``, else
    some twice: any weights give a usable shift). ``BITS``, ``FINEST``, ``LIMIT``:
    :func:`shift_constants`."""
    rows = (tl.arange(0, SAMPLE).to(tl.int64) * L) // SAMPLE  # 0 <= row < L
    x = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + cols[None, :]).to(tl.float32)  # [SAMPLE, W]
    return _shift(tl.sum(x, axis=0), tl.max(tl.abs(x), axis=0), SAMPLE, BITS, FINEST, LIMIT)


@triton.jit
def shift_kernel(
    v_ptr,  # values [BH, L, DV], contiguous
    shift_ptr,  # out: m [BH, DV] float32
    L,
    DV: tl.constexpr, SAMPLE: tl.constexpr, BITS: tl.constexpr, FINEST: tl.constexpr, LIMIT: tl.constexpr,
):
    """The shift alone, one program per sequence (:func:`value_shift`); attention takes it from
    the states kernel, which computes it with the same :func:`sampled_shift`."""
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, DV)
    tl.store(shift_ptr + bh * DV + cols, sampled_shift(v_ptr, bh, L, cols, DV, SAMPLE, BITS, FINEST, LIMIT))


@triton.jit
def shifted_rows(x, shift, row_ok):
    """Loaded rows ``x [R, W]`` less the shift ``shift [W]`` float32, in ``x``'s dtype: the
    difference in float32 (exact where ``x`` is within 2^16 of the column's largest magnitude in
    bfloat16, 2^13 in float16), then rounded once. Rows past the sequence (``row_ok``
    False) stay 0, as the kernels' masked loads leave them."""
    return tl.where(row_ok[:, None], x.to(tl.float32) - shift[None, :], 0.0).to(x.dtype)


_launch_shift = Launcher(shift_kernel)


def value_shift(v: torch.Tensor) -> torch.Tensor:
    """The shift ``m [BH, DV]`` float32 for values ``v [BH, L, DV]`` (contiguous, ``DV`` a power
    of two): module docstring. The states kernel computes the same for attention; the kernels
    subtract it as they load the values (``(v - m)`` in float32, rounded to ``v``'s dtype:
    exact wherever it stays in ``v``'s binade)."""
    BH, L, DV = v.shape
    shift = torch.empty(BH, DV, device=v.device, dtype=torch.float32)
    _launch_shift((BH,), v, shift, L, DV=DV, **shift_constants(v.dtype), num_warps=4, num_stages=1)
    return shift


def centred_copy(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``v - m`` as a tensor, for a launch that cannot centre as it loads (:mod:`.autograd`):
    the same arithmetic as :func:`shifted_rows` (float32 difference, rounded once)."""
    return (v.float() - shift[:, None, :]).to(v.dtype)
