"""Kernel 2 of 2: the output of every chunk, all chunks in parallel (MATH.md section 5).

For position ``i`` of chunk ``n`` (chunk-local sums ``g``, total ``G``) and the states of
:mod:`.states`, masked linear attention is three sums:

    out_i = sum_{j in n} (q_i . k_j) M_ij v_j       the C x C block, M_ij = exp(-|g_i - g_j|)
          + exp(g_i)     q_i^T H_n                   keys before the chunk (forward state)
          + exp(G - g_i) q_i^T R_n                   keys after the chunk (backward state)

``LOWER`` / ``UPPER`` choose which keys count besides ``j = i``: both for bidirectional
attention (the full mask: no diagonal is counted twice, nothing to subtract), ``LOWER``
alone for causal attention, ``UPPER`` alone for the transposed (causal) operator of the
backward pass. The normaliser is the same sum with every ``v_j = 1``; ``NORMALIZE`` divides
by it in the epilogue.

For the backward pass (MATH.md section 6, :mod:`.autograd`) the scores may carry a float32
offset, ``q_i . k_j + a_i`` (``ROW_OFFSET``) or ``q_i . k_j + b_j`` (``COL_OFFSET``), and with
``SPLIT`` the kernel also returns, for a ``partner`` tensor ``P``, the row dots
``P_i . (keys before i)`` and ``P_i . (keys after i)``: the decay gradient is built from them.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _read_state(q, offset, read_scale, S_ptr, z_ptr, u_ptr, w_ptr, at, dk, dv, DK: tl.constexpr, DV: tl.constexpr,
                WITH_DEN: tl.constexpr, ROW_OFFSET: tl.constexpr, COL_OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """One state's share of a chunk: ``read_scale_i (q_i^T S + a_i u + w)`` ``[C, BLOCK_DV]``
    and of the normaliser ``read_scale_i (q_i . z)`` ``[C]``; ``at`` indexes the stored state."""
    state = tl.load(S_ptr + at * DK * DV + dk[:, None] * DV + dv[None, :])
    inter = tl.dot(q, state.to(q.dtype), input_precision=PRECISION)
    if ROW_OFFSET:
        inter += offset[:, None] * tl.load(u_ptr + at * DV + dv)[None, :]
    if COL_OFFSET:
        inter += tl.load(w_ptr + at * DV + dv)[None, :]
    inter_den = tl.zeros_like(read_scale)
    if WITH_DEN:
        inter_den = read_scale * tl.sum(q.to(tl.float32) * tl.load(z_ptr + at * DK + dk)[None, :], axis=1)
    return read_scale[:, None] * inter, inter_den


@triton.jit
def chunk_output_kernel(
    q_ptr, k_ptr, v_ptr,  # q, k [BH, L, DK], v [BH, L, DV], one dtype, contiguous
    g_ptr,  # chunk-local sums of the log decays [BH, N*C] float32
    offset_ptr,  # score offsets a_i or b_j [BH, L] float32 (ROW_OFFSET / COL_OFFSET)
    S_ptr, z_ptr, u_ptr, w_ptr,  # from chunk_states_kernel: [slots, BH, N, ...]
    partner_ptr,  # P [BH, L, DV] (SPLIT only)
    out_ptr,  # out [BH, L, DV] in v's dtype
    den_ptr,  # normaliser [BH, L] float32 (WITH_DEN)
    dot_before_ptr, dot_after_ptr,  # [BH, L] float32, zero-filled, accumulated (SPLIT)
    L, N,
    LOWER: tl.constexpr,  # keys j < i count (forward state in slot 0)
    UPPER: tl.constexpr,  # keys j > i count (backward state in the next slot)
    HAS_DECAY: tl.constexpr,  # False for LIT: no exponentials
    WITH_DEN: tl.constexpr,  # compute the normaliser (store it from value tile 0)
    NORMALIZE: tl.constexpr,  # divide by the normaliser before storing
    ROW_OFFSET: tl.constexpr, COL_OFFSET: tl.constexpr,  # scores q_i . k_j + a_i  /  + b_j
    SPLIT: tl.constexpr,  # also accumulate the partner row dots
    CHUNK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32); ignored for 16-bit
):
    # ---- Which piece of work is ours: chunk n of sequence bh, one tile of value columns ----
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    v_tile = tl.program_id(2)
    BH = tl.num_programs(1)
    dk = tl.arange(0, DK)
    dv = v_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    pos = tl.arange(0, CHUNK)
    rows = n * CHUNK + pos
    row_ok = rows < L  # the last chunk may be shorter: its tail reads as 0 and is not stored

    # ---- Load the chunk: Q_n, K_n [C, DK], V_n [C, BLOCK_DV] --------------------------------
    q = tl.load(q_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=row_ok[:, None], other=0.0)
    k = tl.load(k_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=row_ok[:, None], other=0.0)
    v = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + dv[None, :], mask=row_ok[:, None], other=0.0)

    # ---- Scores of the C x C block, with the optional float32 offset ------------------------
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [C, C] float32
    offset = tl.zeros([CHUNK], dtype=tl.float32)
    if ROW_OFFSET or COL_OFFSET:
        offset = tl.load(offset_ptr + bh * L + rows, mask=row_ok, other=0.0)
        if ROW_OFFSET:
            scores += offset[:, None]
        else:
            scores += offset[None, :]

    # ---- The C x C block of the mask -----------------------------------------------------------
    # below (j < i): exp(g_i - g_j); above (j > i): exp(g_j - g_i); both exponents are <= 0.
    before = pos[None, :] < pos[:, None]
    after = pos[None, :] > pos[:, None]
    keep = pos[None, :] == pos[:, None]
    if LOWER:
        keep = keep | before
    if UPPER:
        keep = keep | after
    if HAS_DECAY:
        g = tl.load(g_ptr + (bh * N + n) * CHUNK + pos)
        G = tl.load(g_ptr + (bh * N + n) * CHUNK + CHUNK - 1)
        diff = g[:, None] - g[None, :]
        scores = scores * tl.exp(tl.where(before, diff, -diff))
    scores = tl.where(keep, scores, 0.0)  # masked scores W_ij = (q_i . k_j + offset) M_ij

    # ---- Intra-chunk part: W V_n ------------------------------------------------------------
    if SPLIT:
        # Keys before i, keys after i and the diagonal apart (the diagonal is in neither
        # partner dot: its decay is 1, so it does not enter the decay gradient).
        out_before = tl.dot(tl.where(before, scores, 0.0).to(v.dtype), v, input_precision=PRECISION)
        out_after = tl.dot(tl.where(after, scores, 0.0).to(v.dtype), v, input_precision=PRECISION)
        diagonal = tl.sum(tl.where(before | after, 0.0, scores), axis=1)
        out = diagonal[:, None] * v.to(tl.float32)
    else:
        out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
    if WITH_DEN:
        den = tl.sum(scores, axis=1)

    # ---- Inter-chunk parts: read the forward state H_n and the backward state R_n ------------
    # forward: exp(g_i) q_i^T H_n;  backward: exp(G - g_i) q_i^T R_n (slot 0 holds the first
    # direction kept, the backward states follow the forward ones).
    if HAS_DECAY:
        scale_before, scale_after = tl.exp(g), tl.exp(G - g)
    else:
        scale_before = tl.full([CHUNK], 1.0, tl.float32)
        scale_after = scale_before
    if LOWER:
        inter, inter_den = _read_state(q, offset, scale_before, S_ptr, z_ptr, u_ptr, w_ptr, bh * N + n,
                                       dk, dv, DK, DV, WITH_DEN, ROW_OFFSET, COL_OFFSET, PRECISION)
        if SPLIT:
            out_before += inter
        else:
            out += inter
        if WITH_DEN:
            den += inter_den
    if UPPER:
        slot = 1 if LOWER else 0
        inter, inter_den = _read_state(q, offset, scale_after, S_ptr, z_ptr, u_ptr, w_ptr, (slot * BH + bh) * N + n,
                                       dk, dv, DK, DV, WITH_DEN, ROW_OFFSET, COL_OFFSET, PRECISION)
        if SPLIT:
            out_after += inter
        else:
            out += inter
        if WITH_DEN:
            den += inter_den

    # ---- Epilogue: the partner row dots, the division by the normaliser, the store ----------
    out_at = (bh * L + rows[:, None]) * DV + dv[None, :]
    if SPLIT:
        out += out_before + out_after
        # Each value tile holds a slice of the row: tiles add their share atomically.
        p = tl.load(partner_ptr + out_at, mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.atomic_add(dot_before_ptr + bh * L + rows, tl.sum(p * out_before, axis=1), mask=row_ok)
        tl.atomic_add(dot_after_ptr + bh * L + rows, tl.sum(p * out_after, axis=1), mask=row_ok)
    if NORMALIZE:
        den = tl.where(row_ok, den, 1.0)  # padded rows: avoid 0 / 0 (never stored)
        out = out / den[:, None]
    tl.store(out_ptr + out_at, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if WITH_DEN:
        if v_tile == 0:  # every value tile computed the normaliser; one stores it
            tl.store(den_ptr + bh * L + rows, den, mask=row_ok)
