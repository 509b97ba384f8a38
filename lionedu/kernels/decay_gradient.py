"""The last step of the backward pass: the gradient of the log decays (book chapter 7).

The dQ and dK operators return, for every position ``i``, the row dots ``r^<_i, r^>_i``
(``q_i . dq_i`` restricted to the keys before / after ``i``) and ``c^<_i, c^>_i`` (the same
for ``k_i . dk_i``). A log decay ``l_t`` sits on every pair that straddles ``t``:

    dl_t = sum_{i >= t} a_i + sum_{i < t} b_i,     a = r^< - c^<,   b = r^> - c^>
         = sum_i a_i + sum_{i < t} d_i,            d = b - a

so one sequence needs its total of ``a`` and one exclusive prefix sum of ``d``
(:func:`decay_gradient`). One program walks one sequence twice in blocks of ``BLOCK`` positions;
the sums are float64, because a prefix sum over ``L`` terms that largely cancel loses digits in
float32.

A decay shared by all positions of a head (LION-D) only needs ``sum_t dl_t``, summed over the
head's sequences too. ``a_i`` counts in ``dl_t`` for the ``i + 1`` positions ``t <= i`` and ``b_i``
for the ``L - 1 - i`` after it, so

    sum_t dl_t = sum_i (i + 1) a_i + (L - 1 - i) b_i,

which the chunks' moments of the dots give, ``sum_i x_i`` and ``sum_i i x_i`` (the output kernel's
``DOT_MOMENTS``: two float64 numbers per chunk instead of ``C`` dots). :func:`head_decay_gradient`
adds them up, one program per head, over the head's sequences and chunks in a fixed order: no scan,
no ``[BH, L]`` dots, and no batch sum after the launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher
from .launch import next_power_of_2
from .layout import check_flat

__all__ = ["decay_gradient", "head_decay_gradient"]

BLOCK = 1024  # positions (per head: chunks) per step of a program's walk


@triton.jit
def _difference(x_ptr, y_ptr, at, ok):
    """``x - y`` at the offsets ``at`` (masked by ``ok``), in float64: one of ``a``, ``b``."""
    return (tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
            - tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float64))


@triton.jit
def decay_gradient_kernel(
    r_before_ptr, r_after_ptr, c_before_ptr, c_after_ptr,  # row dots [BH, L] float32
    out_ptr,  # out: dl [BH, L] float32
    L,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    row = seq * L  # this program's sequence
    steps = tl.arange(0, BLOCK)

    # ---- Pass 1: sum_i a_i, accumulated block by block (elementwise, then one reduction) ----
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, L, BLOCK):
        t = start + steps
        acc += _difference(r_before_ptr, c_before_ptr, row + t, t < L)  # r^< - c^<
    carry = tl.sum(acc, axis=0)
    # ---- Pass 2: dl_t = sum_i a_i + (prefix sum of d before t) ------------------------------
    # Within a block the exclusive prefix sum is the inclusive one (tl.cumsum) minus the
    # term; ``carry`` brings in everything before the block.
    for start in range(0, L, BLOCK):
        t = start + steps
        ok = t < L
        a = _difference(r_before_ptr, c_before_ptr, row + t, ok)
        d = _difference(r_after_ptr, c_after_ptr, row + t, ok) - a  # b - a
        tl.store(out_ptr + row + t, (carry + tl.cumsum(d, axis=0) - d).to(tl.float32), mask=ok)
        carry += tl.sum(d, axis=0)


@triton.jit
def head_decay_gradient_kernel(
    r_before_ptr, r_after_ptr, c_before_ptr, c_after_ptr,  # the dots' moments [BH, N, 2] float64
    out_ptr,  # out: sum_t dl_t over the head's sequences [H] float32
    L, N, B, H,  # positions and chunks per sequence, sequences per head (bh = b * H + h), heads
    BLOCK: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    steps = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    # The head's B * N chunks, BLOCK at a time, in order: chunk n of its b-th sequence is entry
    # j = b * N + n, whose two moments (sum x_i, sum i x_i) sit at ((b * H + h) * N + n) * 2.
    for first in range(0, B * N, BLOCK):
        j = first + steps
        ok = j < B * N
        at = (((j // N) * H + h) * N + j % N) * 2
        # sum_i (i + 1) a_i: the moments of a = r^< - c^<; sum_i (L - 1 - i) b_i: of b = r^> - c^>
        a0 = _difference(r_before_ptr, c_before_ptr, at, ok)
        a1 = _difference(r_before_ptr, c_before_ptr, at + 1, ok)
        b0 = _difference(r_after_ptr, c_after_ptr, at, ok)
        b1 = _difference(r_after_ptr, c_after_ptr, at + 1, ok)
        total += (a1 + a0) + ((L - 1) * b0 - b1)
    tl.store(out_ptr + h, tl.sum(total, axis=0).to(tl.float32))


_launch = Launcher(decay_gradient_kernel)
_launch_heads = Launcher(head_decay_gradient_kernel)


@functools.lru_cache(maxsize=64)
def _options(launcher: Launcher, block: int):
    """A launcher's options (fast_launch.LaunchOptions), made once per block size."""
    return launcher.options(num_warps=4, BLOCK=block)


def decay_gradient(r_before, r_after, c_before, c_after):
    """The row dots ``[BH, L]`` float32 (contiguous) -> ``dl [BH, L]`` float32."""
    BH, L = r_before.shape
    out = torch.empty_like(r_before)
    block = min(BLOCK, next_power_of_2(L))
    _launch.launch((BH,), _options(_launch, block), (r_before, r_after, c_before, c_after, out), (L,))
    return out


def head_decay_gradient(r_before, r_after, c_before, c_after, L: int, heads: int):
    """The dots' moments ``[BH, N, 2]`` float64 (contiguous; the output kernel's ``DOT_MOMENTS``)
    of sequences of ``L`` positions -> ``sum_t dl_t`` per head ``[heads]`` float32, summed over the
    ``BH / heads`` sequences ``b * heads + h`` of head ``h``: LION-D's decay gradient. (Any cut of
    the sequences into pieces gives the same sums: the moments weigh each dot by its position in
    the sequence, not in its piece.)"""
    if not isinstance(r_before, torch.Tensor):
        raise TypeError(f"r_before must be a tensor, got {type(r_before).__name__}")
    if r_before.dim() != 3:
        raise ValueError(f"r_before must be a [BH, N, 2] tensor of moments, got {list(r_before.shape)}")
    BH, N = r_before.shape[:2]
    for name, moments in (("r_before", r_before), ("r_after", r_after), ("c_before", c_before), ("c_after", c_after)):
        check_flat(moments, name, (BH, N, 2), torch.float64, r_before.device, "[BH, N, 2]")
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or BH % heads:
        raise ValueError(f"heads must be a positive int that divides BH = {BH} (sequences b * heads + h), got {heads!r}")
    out = torch.empty(heads, device=r_before.device, dtype=torch.float32)
    block = min(BLOCK, next_power_of_2(BH // heads * N))
    _launch_heads.launch((heads,), _options(_launch_heads, block), (r_before, r_after, c_before, c_after, out),
                         (L, N, BH // heads, heads))
    return out
