"""Inference forward, kernels 1 and 2 of 3: states kept at span edges only (book chapter 8).

The training forward (:mod:`.states`, :mod:`.output`) stores a state per chunk and direction,
because the backward pass reads them again. A forward that needs no gradient can store far
fewer: cut the ``N`` chunks of a sequence into *spans* of ``SPAN`` chunks, keep only the
states at the spans' edges (checkpoints), and let each chunk's output program rebuild its
own two states from its span's checkpoints (:mod:`.span_output`). With spans of four chunks
the states written and read shrink fourfold, and the keys and values are read once for both
directions instead of once per direction.

With chunk-local sums ``g`` and totals ``G`` (:mod:`.decays`), a span ``p`` of chunks
``m = 0 .. M-1`` has its own keys' sums, decayed to its far edge in each direction:

    forward   F_p = sum_m exp(G_{m+1} + ... + G_{M-1}) sum_{j in m} exp(G_m - g_j) k_j v_j^T
    backward  B_p = sum_m exp(G_0 + ... + G_{m-1})     sum_{j in m} exp(g_j) k_j v_j^T

and its total log decay ``Γ_p = G_0 + ... + G_{M-1}``. Every exponent is ``<= 0``.
:func:`span_sums_kernel` computes them with all spans in parallel (one program per span).
The checkpoints are then one scan over spans, :func:`span_carries_kernel`:

    forward   C_0 = 0,          C_{p+1} = exp(Γ_p) C_p + F_p     (every key before span p)
    backward  D_{P-1} = 0,      D_{p-1} = exp(Γ_p) D_p + B_p     (every key after span p)

written over the sums in place. The key sums ``z`` (the normaliser's state) ride along as
extra rows of each record: ``[state (DK x DV, row-major) | z (DK)]``, float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decays import chunk_log_decays

__all__ = ["span_sums_kernel", "span_carries_kernel", "span_record_size", "absorb_chunk"]


def span_record_size(dk: int, dv: int) -> int:
    """Numbers in one span's record: the ``[dk, dv]`` state, then the ``dk`` key sums."""
    return dk * dv + dk


@triton.jit
def absorb_chunk(S, z, k, v, key_scale, carry, PRECISION: tl.constexpr):
    """One step of a walk over chunks: ``(carry S + (k ⊙ key_scale)^T v, carry z + sum_j k_j key_scale_j)``.

    ``S [DK, BLOCK_DV]`` and ``z [DK]`` float32, ``k [C, DK]`` and ``v [C, BLOCK_DV]`` in the
    inputs' dtype, ``key_scale [C]`` each key's decay to the edge the state is kept at,
    ``carry`` the decay of the old state across the chunk (a scalar)."""
    k_scaled = k.to(tl.float32) * key_scale[:, None]
    S = carry * S + tl.dot(tl.trans(k_scaled.to(v.dtype)), v, input_precision=PRECISION)
    z = carry * z + tl.sum(k_scaled, axis=0)
    return S, z


@triton.jit
def span_sums_kernel(
    k_ptr, v_ptr,  # keys [BH, L, DK], values [BH, L, DV], one dtype, contiguous
    g_ptr,  # chunk-local sums of the log decays [BH, N*C] float32, or [BH] (SCALAR_DECAY)
    sums_ptr,  # out: [slots, BH, P, RECORD] float32; slot 0 forward F_p, slot 1 backward B_p
    span_decay_ptr,  # out: Γ_p [BH, P] float32 (HAS_DECAY)
    L, N, P,  # sequence length, chunks, spans
    BIDIRECTIONAL: tl.constexpr,  # also the backward sums (slot 1)
    HAS_DECAY: tl.constexpr, SCALAR_DECAY: tl.constexpr,  # LIT: no decays; LION-D: one per sequence
    SPAN: tl.constexpr,  # chunks per span
    CHUNK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # value columns this program owns
    PRECISION: tl.constexpr,  # float32 inputs: launch.float32_dot_precision; ignored for 16-bit
):
    # ---- Which piece of work is ours: span p of sequence bh, value columns dv ----------------
    p = tl.program_id(0)
    bh = (tl.program_id(1) // (DV // BLOCK_DV)).to(tl.int64)
    v_tile = tl.program_id(1) % (DV // BLOCK_DV)
    BH = tl.num_programs(1) // (DV // BLOCK_DV)
    dk = tl.arange(0, DK)
    dv = v_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    pos = tl.arange(0, CHUNK)
    first = p * SPAN
    count = tl.minimum(SPAN, N - first)

    F = tl.zeros([DK, BLOCK_DV], dtype=tl.float32)
    zF = tl.zeros([DK], dtype=tl.float32)
    Bw = tl.zeros([DK, BLOCK_DV], dtype=tl.float32)
    zB = tl.zeros([DK], dtype=tl.float32)
    behind = 0.0  # log decay from the span's first edge to chunk m's first edge: G_0 + ... + G_{m-1}

    for m in range(0, count):
        # ---- Load chunk n = first + m once: both directions use it --------------------------
        rows = (first + m) * CHUNK + pos
        row_ok = rows < L
        k = tl.load(k_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=row_ok[:, None], other=0.0)
        v = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + dv[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_DECAY:
            g, G = chunk_log_decays(g_ptr, bh, first + m, N, CHUNK, SCALAR_DECAY)
            # forward: the walk's recurrence (decay the sum across the chunk, add its keys
            # decayed to its far edge); backward: each key decayed straight to the span's first edge
            F, zF = absorb_chunk(F, zF, k, v, tl.exp(G - g), tl.exp(G), PRECISION)
            if BIDIRECTIONAL:
                Bw, zB = absorb_chunk(Bw, zB, k, v, tl.exp(behind + g), 1.0, PRECISION)
            behind += G
        else:  # LIT: no decays, both directions' sums are the same plain sum
            F, zF = absorb_chunk(F, zF, k, v, tl.full([CHUNK], 1.0, tl.float32), 1.0, PRECISION)

    # ---- Store the span's records and its total decay ------------------------------------------
    RECORD: tl.constexpr = DK * DV + DK  # span_record_size(DK, DV)
    forward_at = (bh * P + p) * RECORD
    tl.store(sums_ptr + forward_at + dk[:, None] * DV + dv[None, :], F)
    if v_tile == 0:  # z has no value columns: one tile stores it
        tl.store(sums_ptr + forward_at + DK * DV + dk, zF)
        if HAS_DECAY:
            tl.store(span_decay_ptr + bh * P + p, behind)
    if BIDIRECTIONAL:
        backward_at = forward_at + BH * P * RECORD
        if not HAS_DECAY:
            Bw, zB = F, zF
        tl.store(sums_ptr + backward_at + dk[:, None] * DV + dv[None, :], Bw)
        if v_tile == 0:
            tl.store(sums_ptr + backward_at + DK * DV + dk, zB)


@triton.jit
def span_carries_kernel(
    sums_ptr,  # in: the spans' own sums; out: their checkpoints [slots, BH, P, RECORD] float32
    span_decay_ptr,  # Γ_p [BH, P] float32 (HAS_DECAY)
    P,  # spans per sequence
    RECORD: tl.constexpr,  # span_record_size(DK, DV)
    HAS_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,  # numbers of a record per program
):
    # ---- Which piece of work is ours: BLOCK numbers of every record of one walk ---------------
    # Every number of a record follows the same scalar recurrence, so a walk over the spans is
    # cut into independent slices of its records; slot 0 walks forward, slot 1 backward.
    bh = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1)
    BH = tl.num_programs(0)
    at = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = at < RECORD
    walk = (slot * BH + bh) * P  # first record of this walk

    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, P):
        p = tl.where(slot == 1, P - 1 - i, i)  # the backward walk takes the spans from the last
        record = sums_ptr + (walk + p) * RECORD + at
        own = tl.load(record, mask=inside, other=0.0)
        tl.store(record, carry, mask=inside)  # the checkpoint: every key on the walk's near side
        decay = 1.0
        if HAS_DECAY:
            decay = tl.exp(tl.load(span_decay_ptr + bh * P + p))
        carry = decay * carry + own
