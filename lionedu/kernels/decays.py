"""Where both kernels get a chunk's log decays from (book chapter 6).

Chunk ``n`` of a sequence needs ``g_i``, the running sums of the log decays restarted at the
chunk's first token (the chunk-local sums of book chapter 4), and their total ``G`` (the
last ``g_i``). LION-S has one decay per token: the sums are computed once on the host side
(:func:`lionedu.kernels.launch.padded_chunk_sums`, or, in the training forward of normalised
attention, by :func:`store_chunk_sums` inside the launch that reads the values for their centring)
and loaded. LION-D has one decay ``λ_h`` per head, so every ``l_i = log λ_h`` and the sums
``g_i = (i + 1) log λ_h`` (``i`` counted from the chunk's start) are computed here, with
nothing to load but ``log λ_h``, straight from the caller's ``[H]`` decays. The last chunk may
end past the sequence; its total ``G`` then counts positions that do not exist, but that ``G``
is never used: the forward walk ends with it, the backward walk starts with it on an empty
state, and the outputs use it only to read the empty state after the last chunk.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layout import row_offsets

__all__ = ["chunk_log_decays", "store_chunk_sums"]


@triton.jit
def chunk_log_decays(g_ptr, bh, n, N, decay_heads, CHUNK: tl.constexpr, SCALAR_DECAY: tl.constexpr):
    """``(g [CHUNK], G)`` float32 for chunk ``n`` of sequence ``bh``.

    ``g_ptr``: the chunk-local sums ``[BH, N*C]``, or with ``SCALAR_DECAY`` one log decay per head
    ``[decay_heads]``, sequence ``bh`` taking entry ``bh % decay_heads`` (sequences are numbered
    ``b * H + h``; ``decay_heads = BH`` gives one decay per sequence).
    """
    pos = tl.arange(0, CHUNK)
    if SCALAR_DECAY:
        log_decay = tl.load(g_ptr + bh % decay_heads)
        g = (pos + 1).to(tl.float32) * log_decay
        G = CHUNK * log_decay
    else:
        g = tl.load(g_ptr + (bh * N + n) * CHUNK + pos)
        G = tl.load(g_ptr + (bh * N + n) * CHUNK + CHUNK - 1)
    return g, G


@triton.jit
def store_chunk_sums(log_decay_ptr, g_ptr, bh, first, L, N, H, s_b, s_h, s_l, SPAN: tl.constexpr,
                     CHUNK: tl.constexpr):
    """Store the chunk-local sums ``g`` of positions ``first .. first + SPAN - 1`` of sequence ``bh``
    (``first`` and ``SPAN`` multiples of ``CHUNK``): :func:`lionedu.kernels.launch.padded_chunk_sums`
    for one span. ``log_decay_ptr``: ``[B, H, L]`` in any float dtype, with strides ``s_b, s_h, s_l``
    (:mod:`.layout`); ``g_ptr``: ``[BH, N*C]`` float32. Positions past ``L`` count as log decay 0,
    so the last entry of every chunk is its total ``G``; nothing is stored past ``N*C``."""
    t = first + tl.arange(0, SPAN // CHUNK)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # [chunks, C]
    at = row_offsets(bh, t, H, s_b, s_h, s_l)
    log_decay = tl.load(log_decay_ptr + at, mask=t < L, other=0.0).to(tl.float32)
    tl.store(g_ptr + bh * N * CHUNK + t, tl.cumsum(log_decay, axis=1), mask=t < N * CHUNK)
