"""Kernel 2 of 2: the output of every chunk, all chunks in parallel (book chapter 6).

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

Normalised attention runs on centred values (:mod:`.centring`): ``SHIFT`` names the input
that holds them, as loaded less the shift ``m`` (the values in the forward pass; in the
backward's operators, where the values play the keys or the queries, those), and ``SHIFTED``
also stores ``out + m`` to a second tensor: the caller's output, while the first, centred, is
kept for the backward pass.

For the backward pass (book chapter 7, :mod:`.autograd`) the scores may carry a float32
offset, ``q_i . k_j + a_i`` (``ROW_OFFSET``) or ``q_i . k_j + b_j`` (``COL_OFFSET``), and with
``SPLIT`` the kernel also returns, for a ``partner`` tensor ``P``, the row dots
``P_i . (keys before i)`` and ``P_i . (keys after i)``: the decay gradient is built from them.
With ``DOT_MOMENTS`` it stores, instead of the dots of every row, each chunk's sums ``sum_i x_i``
and ``sum_i i x_i`` of them: all that a decay shared by a head's positions (LION-D) needs
(:mod:`.decay_gradient`).
With ``NORMALISER_GRADIENT`` (the dQ operator of normalised attention) the kernel makes its own
queries and row offsets from the output gradient as it loads them, ``dN_i = dy_i / c_i`` and
``dc_i = -(dy_i . y_i) / c_i`` (:mod:`.normaliser` is the same step as a kernel of its own), and
stores both for the backward's later launches: one launch and one pass over ``dN`` fewer.

The inputs are flat contiguous ``[BH, L, .]`` tensors. The outputs may also lie in the caller's
own ``[B, H, L, .]`` layout (:mod:`.layout`): ``out``, and the second output (``shifted``, or the
twin's ``out2``), each with its strides, so that an attention layer gets its output, and the
values their gradient, without a copy.

The chunks are independent, so the grid is free: one program per chunk, or (``PERSISTENT``)
a few programs per multiprocessor that each loop over many chunks, which lets Triton's
pipeliner load the next chunk while this one is computed. The backward pass uses the second
where :func:`.launch.persistent_outputs` says so (measured faster there; results/NOTES.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .centring import shifted_rows
from .decays import chunk_log_decays
from .layout import row_offsets


@triton.jit
def _segment_start(at, N, seg_chunks, gamma_ptr, HAS_DECAY: tl.constexpr):
    """``(start, scale)`` for the state ``at``: the index of its segment's ``C_p`` and
    ``exp(γ_n)``, its decay from the segment's edge (:mod:`.carries`)."""
    start = (at // N) * tl.cdiv(N, seg_chunks) + (at % N) // seg_chunks
    scale = 1.0
    if HAS_DECAY:
        scale = tl.exp(tl.load(gamma_ptr + at))
    return start, scale


@triton.jit
def _state_share(q, read_scale, S_ptr, at, dk, dv, N,
                 DK: tl.constexpr, DV: tl.constexpr, HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr,
                 TRANSPOSED_STATE: tl.constexpr,
                 offset, u_ptr, w_ptr, ROW_OFFSET: tl.constexpr, COL_OFFSET: tl.constexpr,
                 start_ptr, gamma_ptr, seg_chunks, CARRIES: tl.constexpr):
    """One stored state's share of a chunk's output, ``read_scale_i (q_i^T S + a_i u + w)``,
    for the value columns ``dv``: ``[C, BLOCK_DV]`` float32. ``at`` indexes the state.

    With ``TRANSPOSED_STATE`` the state was stored as ``S^T`` (``[DV, DK]``): another operator
    with keys and values swapped computed it, and it is read in transposed order. With
    ``CARRIES`` the walk ran in segments and the state holds its own segment's keys only: what
    the earlier segments owe it, ``exp(γ_n) C_p``, is added here, in float32 and rounded to the
    states' format once, as :mod:`.carries` would have added it in memory."""
    if TRANSPOSED_STATE:
        state = tl.load(S_ptr + at * DK * DV + dv[None, :] * DK + dk[:, None])
    else:
        state = tl.load(S_ptr + at * DK * DV + dk[:, None] * DV + dv[None, :])
    if CARRIES:
        start, scale = _segment_start(at, N, seg_chunks, gamma_ptr, HAS_DECAY)
        carried = tl.load(start_ptr + start * DK * DV + dk[:, None] * DV + dv[None, :])
        state = (state.to(tl.float32) + scale * carried).to(S_ptr.dtype.element_ty)
    share = tl.dot(q, state.to(q.dtype), input_precision=PRECISION)
    if ROW_OFFSET:
        share += offset[:, None] * tl.load(u_ptr + at * DV + dv)[None, :]
    if COL_OFFSET:
        share += tl.load(w_ptr + at * DV + dv)[None, :]
    return read_scale[:, None] * share


@triton.jit
def _key_sums(z_ptr, at, dk, start_z_ptr, gamma_ptr, N, seg_chunks, DK: tl.constexpr, HAS_DECAY: tl.constexpr,
              CARRIES: tl.constexpr):
    """The key sums ``z`` [DK] float32 kept beside the state ``at`` (with ``CARRIES``, plus what
    the earlier segments owe them, as in :func:`_state_share`)."""
    z = tl.load(z_ptr + at * DK + dk)
    if CARRIES:
        start, scale = _segment_start(at, N, seg_chunks, gamma_ptr, HAS_DECAY)
        z += scale * tl.load(start_z_ptr + start * DK + dk)
    return z


@triton.jit
def _normaliser_gradient_rows(dy_ptr, y_ptr, c_ptr, dn_ptr, dc_ptr, bh, L, rows, row_ok, dk, DK: tl.constexpr,
                              H, dy_sb, dy_sh, dy_sl):
    """``(dN, dc)`` of the rows ``rows`` of sequence ``bh``: ``dN_i = dy_i / c_i`` ``[C, DK]`` in the
    inputs' dtype and ``dc_i = -(dy_i . y_i) / c_i`` ``[C]`` float32, from the output gradient ``dy``
    (in its layout, :mod:`.layout`), the saved (centred) output ``y`` and the normaliser ``c``; both
    also stored (``dn_ptr``, ``dc_ptr``, contiguous) for the launches after this one. The arithmetic
    of :func:`.normaliser.normaliser_gradient_kernel`, row by row."""
    at = (bh * L + rows[:, None]) * DK + dk[None, :]
    dy_at = row_offsets(bh, rows, H, dy_sb, dy_sh, dy_sl)[:, None] + dk[None, :]
    dy = tl.load(dy_ptr + dy_at, mask=row_ok[:, None], other=0.0).to(tl.float32)
    y = tl.load(y_ptr + at, mask=row_ok[:, None], other=0.0).to(tl.float32)
    c = tl.load(c_ptr + bh * L + rows, mask=row_ok, other=1.0)
    dn = (dy / c[:, None]).to(dn_ptr.dtype.element_ty)
    dc = -tl.sum(dy * y, axis=1) / c
    tl.store(dn_ptr + at, dn, mask=row_ok[:, None])
    tl.store(dc_ptr + bh * L + rows, dc, mask=row_ok)
    return dn, dc


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add_quads(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _store_moments(before_ptr, after_ptr, at, dot_before, dot_after, rows, LOWER: tl.constexpr, UPPER: tl.constexpr):
    """A chunk's moments of its two row dots ``x`` ``[C]`` (at the positions ``rows``; rows past
    the sequence hold 0), ``sum_i x_i`` and ``sum_i i x_i`` in float64, to ``ptr + at`` and
    ``ptr + at + 1`` of each dot's pointer. The sums are reduced together, in one reduction: the
    rows are spread over the warps, so each reduction over them meets at a barrier. A causal
    operator's dot of the triangle it leaves out is 0, and so are its moments."""
    i = rows.to(tl.float64)
    xb, xa = dot_before.to(tl.float64), dot_after.to(tl.float64)
    if LOWER and UPPER:
        b0, b1, a0, a1 = tl.reduce((xb, xb * i, xa, xa * i), 0, _add_quads)
    elif LOWER:
        b0, b1 = tl.reduce((xb, xb * i), 0, _add_pairs)
        a0, a1 = 0.0, 0.0
    else:
        a0, a1 = tl.reduce((xa, xa * i), 0, _add_pairs)
        b0, b1 = 0.0, 0.0
    tl.store(before_ptr + at, b0)
    tl.store(before_ptr + at + 1, b1)
    tl.store(after_ptr + at, a0)
    tl.store(after_ptr + at + 1, a1)


@triton.jit
def _chunk_output(
    n, bh, BH, L, N,  # chunk n of sequence bh (int64), of BH sequences of L positions in N chunks
    decay_heads,  # SCALAR_DECAY: entries of g (decays.py)
    q_ptr, k_ptr, v_ptr, g_ptr, S_ptr, z_ptr, out_ptr,
    H, out_sb, out_sh, out_sl,  # out's layout: its rows as layout.row_offsets finds them
    LOWER: tl.constexpr, UPPER: tl.constexpr, HAS_DECAY: tl.constexpr, SCALAR_DECAY: tl.constexpr,
    CHUNK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    TRANSPOSED_STATE: tl.constexpr = False,
    # The optional parts, off unless asked for; a part's pointers are read only when it is on.
    den_ptr=None, WITH_DEN: tl.constexpr = False, NORMALIZE: tl.constexpr = False,
    offset_ptr=None, u_ptr=None, w_ptr=None, ROW_OFFSET: tl.constexpr = False, COL_OFFSET: tl.constexpr = False,
    partner_ptr=None, dot_before_ptr=None, dot_after_ptr=None, SPLIT: tl.constexpr = False,
    DOT_MOMENTS: tl.constexpr = False,
    shift_ptr=None, SHIFT: tl.constexpr = 0, shifted_ptr=None,
    second_sb=0, second_sh=0, second_sl=0,  # the layout of shifted_ptr, or of dy (NORMALISER_GRADIENT)
    SHIFTED: tl.constexpr = False,
    start_ptr=None, start_z_ptr=None, gamma_ptr=None, seg_chunks=1, CARRIES: tl.constexpr = False,
    y_ptr=None, c_ptr=None, dn_ptr=None, dc_ptr=None, NORMALISER_GRADIENT: tl.constexpr = False,
):
    """The output of chunk ``n`` of sequence ``bh``, all value columns, a tile of ``BLOCK_DV``
    at a time, so the ``C x C`` scores are computed once. Arguments: :func:`chunk_output_kernel`."""
    dk = tl.arange(0, DK)
    pos = tl.arange(0, CHUNK)
    rows = n * CHUNK + pos
    row_ok = rows < L  # the last chunk may be shorter: its tail reads as 0 and is not stored

    # ---- Load the chunk: Q_n, K_n [C, DK] ------------------------------------------------------
    if NORMALISER_GRADIENT:  # the queries dN and the row offsets dc, made from dy as loaded
        q, offset = _normaliser_gradient_rows(q_ptr, y_ptr, c_ptr, dn_ptr, dc_ptr, bh, L, rows, row_ok, dk, DK,
                                              H, second_sb, second_sh, second_sl)
    else:
        q = tl.load(q_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=row_ok[:, None], other=0.0)
        offset = tl.zeros([CHUNK], dtype=tl.float32)
        if ROW_OFFSET or COL_OFFSET:
            offset = tl.load(offset_ptr + bh * L + rows, mask=row_ok, other=0.0)
    k = tl.load(k_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=row_ok[:, None], other=0.0)
    if SHIFT == 1:  # the queries are the centred values (dK's operator)
        q = shifted_rows(q, tl.load(shift_ptr + bh * DK + dk), row_ok)
    if SHIFT == 2:  # the keys are (dQ's operator)
        k = shifted_rows(k, tl.load(shift_ptr + bh * DK + dk), row_ok)

    # ---- Scores of the C x C block, with the optional float32 offset ------------------------
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [C, C] float32
    if ROW_OFFSET:
        scores += offset[:, None]
    if COL_OFFSET:
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
        g, G = chunk_log_decays(g_ptr, bh, n, N, decay_heads, CHUNK, SCALAR_DECAY)
        diff = g[:, None] - g[None, :]
        scores = scores * tl.exp(tl.where(before, diff, -diff))
        # How a state is read: forward exp(g_i) q_i^T H_n, backward exp(G - g_i) q_i^T R_n.
        scale_before, scale_after = tl.exp(g), tl.exp(G - g)
    else:
        scale_before = tl.full([CHUNK], 1.0, tl.float32)
        scale_after = scale_before
    scores = tl.where(keep, scores, 0.0)  # masked scores W_ij = (q_i . k_j + offset) M_ij
    # Where each direction's states are: slot 0 holds the first direction kept.
    at_before = bh * N + n
    at_after = ((1 if LOWER else 0) * BH + bh) * N + n

    # ---- The normaliser: the same three sums with every v_j = 1 -------------------------------
    if WITH_DEN:
        den = tl.sum(scores, axis=1)
        if LOWER:
            z = _key_sums(z_ptr, at_before, dk, start_z_ptr, gamma_ptr, N, seg_chunks, DK, HAS_DECAY, CARRIES)
            den += scale_before * tl.sum(q.to(tl.float32) * z[None, :], axis=1)
        if UPPER:
            z = _key_sums(z_ptr, at_after, dk, start_z_ptr, gamma_ptr, N, seg_chunks, DK, HAS_DECAY, CARRIES)
            den += scale_after * tl.sum(q.to(tl.float32) * z[None, :], axis=1)
        tl.store(den_ptr + bh * L + rows, den, mask=row_ok)
        den = tl.where(row_ok, den, 1.0)  # padded rows: avoid 0 / 0 below (never stored)
    if SPLIT:
        # Keys before i, keys after i and the diagonal apart (the diagonal is in neither
        # partner dot: its decay is 1, so it does not enter the decay gradient).
        scores_before = tl.where(before, scores, 0.0)
        scores_after = tl.where(after, scores, 0.0)
        diagonal = tl.sum(tl.where(before | after, 0.0, scores), axis=1)
        dot_before = tl.zeros([CHUNK], dtype=tl.float32)
        dot_after = tl.zeros([CHUNK], dtype=tl.float32)

    # ---- One tile of value columns at a time --------------------------------------------------
    # The inputs are flat [BH, L, .] tensors; the outputs may lie in the caller's layout (layout.py).
    out_rows = row_offsets(bh, rows, H, out_sb, out_sh, out_sl)
    if SHIFTED:
        shifted_rows_at = row_offsets(bh, rows, H, second_sb, second_sh, second_sl)
    for tile in range(0, DV // BLOCK_DV):
        dv = tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
        out_at = (bh * L + rows[:, None]) * DV + dv[None, :]
        v = tl.load(v_ptr + out_at, mask=row_ok[:, None], other=0.0)  # V_n [C, BLOCK_DV]
        if SHIFT == 3:  # the values are (the forward)
            # (Subtracting (sum_j W_ij) m after the product instead, the row sums of the rounded
            # weights by a product with ones, was slower: +0-6 % forward; dev runs §42.)
            shift = tl.load(shift_ptr + bh * DV + dv)
            v = shifted_rows(v, shift, row_ok)

        # Intra-chunk part W V_n, then the states' shares (keys before / after the chunk).
        if SPLIT:
            # A causal operator keeps one triangle: the other's part is zero, its products skipped.
            out_before = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)
            out_after = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)
            if LOWER:
                out_before = tl.dot(scores_before.to(v.dtype), v, input_precision=PRECISION)
                out_before += _state_share(q, scale_before, S_ptr, at_before, dk, dv, N, DK, DV, HAS_DECAY, PRECISION,
                                           TRANSPOSED_STATE, offset, u_ptr, w_ptr, ROW_OFFSET, COL_OFFSET,
                                           start_ptr, gamma_ptr, seg_chunks, CARRIES)
            if UPPER:
                out_after = tl.dot(scores_after.to(v.dtype), v, input_precision=PRECISION)
                out_after += _state_share(q, scale_after, S_ptr, at_after, dk, dv, N, DK, DV, HAS_DECAY, PRECISION,
                                          TRANSPOSED_STATE, offset, u_ptr, w_ptr, ROW_OFFSET, COL_OFFSET,
                                          start_ptr, gamma_ptr, seg_chunks, CARRIES)
            out = out_before + out_after + diagonal[:, None] * v.to(tl.float32)
            p = tl.load(partner_ptr + out_at, mask=row_ok[:, None], other=0.0).to(tl.float32)
            if LOWER:
                dot_before += tl.sum(p * out_before, axis=1)
            if UPPER:
                dot_after += tl.sum(p * out_after, axis=1)
        else:
            out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
            if LOWER:
                out += _state_share(q, scale_before, S_ptr, at_before, dk, dv, N, DK, DV, HAS_DECAY, PRECISION,
                                    TRANSPOSED_STATE, offset, u_ptr, w_ptr, ROW_OFFSET, COL_OFFSET,
                                    start_ptr, gamma_ptr, seg_chunks, CARRIES)
            if UPPER:
                out += _state_share(q, scale_after, S_ptr, at_after, dk, dv, N, DK, DV, HAS_DECAY, PRECISION,
                                    TRANSPOSED_STATE, offset, u_ptr, w_ptr, ROW_OFFSET, COL_OFFSET,
                                    start_ptr, gamma_ptr, seg_chunks, CARRIES)
        if NORMALIZE:
            out = out / den[:, None]
        tl.store(out_ptr + out_rows[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if SHIFTED:  # the caller's output: the shift added in float32, then rounded once
            tl.store(shifted_ptr + shifted_rows_at[:, None] + dv[None, :],
                     (out + shift[None, :]).to(shifted_ptr.dtype.element_ty), mask=row_ok[:, None])

    if SPLIT:
        if DOT_MOMENTS:  # [BH, N, 2] float64: the chunk's sums of x_i and i x_i
            _store_moments(dot_before_ptr, dot_after_ptr, (bh * N + n) * 2, dot_before, dot_after, rows, LOWER, UPPER)
        else:
            tl.store(dot_before_ptr + bh * L + rows, dot_before, mask=row_ok)
            tl.store(dot_after_ptr + bh * L + rows, dot_after, mask=row_ok)


@triton.jit
def chunk_output_kernel(
    q_ptr, k_ptr, v_ptr,  # q, k [BH, L, DK], v [BH, L, DV], one dtype, contiguous
    g_ptr,  # chunk-local sums of the log decays [BH, N*C] float32, or [decay_heads] (SCALAR_DECAY)
    offset_ptr,  # score offsets a_i or b_j [BH, L] float32 (ROW_OFFSET / COL_OFFSET; unused with
    # NORMALISER_GRADIENT, which makes them: dc_ptr)
    S_ptr, z_ptr, u_ptr, w_ptr,  # from chunk_states_kernel: [slots, BH, N, ...]
    partner_ptr,  # P [BH, L, DV] (SPLIT only)
    out_ptr,  # out [BH, L, DV] in v's dtype (or another layout: out_sb, ...)
    den_ptr,  # normaliser [BH, L] float32 (WITH_DEN)
    dot_before_ptr, dot_after_ptr,  # out: the partner row dots [BH, L] float32 (SPLIT), or their moments
    # [BH, N, 2] float64 (DOT_MOMENTS)
    shift_ptr,  # the values' shift m [BH, width of the input it shifts] float32 (SHIFT)
    shifted_ptr,  # out: out + m [BH, L, DV] in v's dtype, in the second output's layout (SHIFTED)
    q2_ptr,  # TWIN: the second operator's queries [BH, L, DV] (its keys are v, its values k)
    out2_ptr,  # TWIN: its output [BH, L, DK] in k's dtype, in the second output's layout
    start_ptr, start_z_ptr,  # CARRIES: each segment's C_p [slots, BH, P, DK, DV] and key sums [.., DK], float32
    gamma_ptr,  # CARRIES with decays: each state's log decay from its segment's edge [slots, BH, N] float32
    y_ptr,  # NORMALISER_GRADIENT: the saved (centred) output [BH, L, DK], contiguous
    c_ptr,  # NORMALISER_GRADIENT: the normaliser c [BH, L] float32
    dn_ptr,  # NORMALISER_GRADIENT, out: dN [BH, L, DK] in q's dtype, contiguous
    dc_ptr,  # NORMALISER_GRADIENT, out: the row offsets dc [BH, L] float32
    L, N, BH,  # sequence length, chunks per sequence, sequences
    seg_chunks,  # CARRIES: chunks per segment of the walk that made the states
    H, out_sb, out_sh, out_sl,  # out's layout (layout.py): [BH, L, DV] contiguous, or the caller's [B, H, L, DV]
    second_sb, second_sh, second_sl,  # the same for the second output, shifted (SHIFTED) or out2 (TWIN), or for dy
    # (NORMALISER_GRADIENT)
    decay_heads,  # SCALAR_DECAY: entries of g, sequence bh taking g[bh % decay_heads] (decays.py)
    LOWER: tl.constexpr,  # keys j < i count (forward state in slot 0)
    UPPER: tl.constexpr,  # keys j > i count (backward state in the next slot)
    HAS_DECAY: tl.constexpr,  # False for LIT: no exponentials
    SCALAR_DECAY: tl.constexpr,  # LION-D: one decay per head, g computed (decays.py)
    WITH_DEN: tl.constexpr,  # compute (and store) the normaliser
    NORMALIZE: tl.constexpr,  # divide by the normaliser before storing
    ROW_OFFSET: tl.constexpr, COL_OFFSET: tl.constexpr,  # scores q_i . k_j + a_i  /  + b_j
    SPLIT: tl.constexpr,  # also compute the partner row dots
    DOT_MOMENTS: tl.constexpr,  # with SPLIT: store each chunk's sums of the dots and of the dots times positions
    TRANSPOSED_STATE: tl.constexpr,  # the states are stored transposed, [DV, DK] (see _state_share)
    SHIFT: tl.constexpr,  # which input is centred as loaded: 0 none, 1 q, 2 k, 3 v (module docstring)
    SHIFTED: tl.constexpr,  # also store out + m (SHIFT == 3)
    TWIN: tl.constexpr,  # also the plain operator A(q2, v, k), the same states read the other way (not PERSISTENT)
    CARRIES: tl.constexpr,  # the states are a segmented walk's own: add the segments' carries (carries.py) as read
    NORMALISER_GRADIENT: tl.constexpr,  # q_ptr holds dy: the queries are dN = dy / c and the row offsets (ROW_OFFSET)
    # dc = -(dy . y) / c, both made as loaded (y_ptr, c_ptr) and stored (dn_ptr, dc_ptr) as well as used
    CHUNK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # value columns per step of the tile loop
    BLOCK_DV2: tl.constexpr,  # the same for the twin operator's values (DK wide)
    PRECISION: tl.constexpr,  # float32 inputs: launch.float32_dot_precision; ignored for 16-bit
    PERSISTENT: tl.constexpr,  # a grid of a few programs per SM, each looping over chunks
    LOOP_STAGES: tl.constexpr,  # with PERSISTENT: how many chunks' loads are in flight at once
):
    # ---- Which pieces of work are ours -------------------------------------------------------
    # One chunk n of sequence bh per program (grid (N, BH)), or, PERSISTENT, a grid of a few
    # programs per SM in which program p takes chunks p, p + P, p + 2P, ... of the N * BH
    # (chunk fastest, so neighbouring programs read neighbouring memory). In the loop Triton's
    # pipeliner issues the next chunk's loads while this chunk is computed (LOOP_STAGES
    # buffers in shared memory): latency that one program per chunk can only hide by having
    # other programs on the SM.
    tl.static_assert(not (TWIN and PERSISTENT), "the twin operator runs on one program per chunk")
    tl.static_assert(not (CARRIES and (TRANSPOSED_STATE or ROW_OFFSET or COL_OFFSET or TWIN)),
                     "a segmented walk's carries are added to states read as stored, without offsets or a twin")
    tl.static_assert(not NORMALISER_GRADIENT or (ROW_OFFSET and not (WITH_DEN or SHIFTED or TWIN)),
                     "the normaliser's gradient makes the row offsets and takes the second layout for dy")
    tl.static_assert(SPLIT or not DOT_MOMENTS, "the moments are the partner dots'")
    if PERSISTENT:
        for t in tl.range(tl.program_id(0), N * BH, tl.num_programs(0), num_stages=LOOP_STAGES):
            _chunk_output(t % N, (t // N).to(tl.int64), BH, L, N, decay_heads, q_ptr, k_ptr, v_ptr, g_ptr, S_ptr, z_ptr,
                          out_ptr, H, out_sb, out_sh, out_sl,
                          LOWER, UPPER, HAS_DECAY, SCALAR_DECAY, CHUNK, DK, DV, BLOCK_DV, PRECISION, TRANSPOSED_STATE,
                          den_ptr, WITH_DEN, NORMALIZE, offset_ptr, u_ptr, w_ptr, ROW_OFFSET, COL_OFFSET,
                          partner_ptr, dot_before_ptr, dot_after_ptr, SPLIT, DOT_MOMENTS, shift_ptr, SHIFT,
                          shifted_ptr, second_sb, second_sh, second_sl, SHIFTED,
                          start_ptr, start_z_ptr, gamma_ptr, seg_chunks, CARRIES, y_ptr, c_ptr, dn_ptr, dc_ptr,
                          NORMALISER_GRADIENT)
    else:
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        _chunk_output(n, bh, BH, L, N, decay_heads, q_ptr, k_ptr, v_ptr, g_ptr, S_ptr, z_ptr, out_ptr,
                      H, out_sb, out_sh, out_sl,
                      LOWER, UPPER, HAS_DECAY, SCALAR_DECAY, CHUNK, DK, DV, BLOCK_DV, PRECISION, TRANSPOSED_STATE,
                      den_ptr, WITH_DEN, NORMALIZE, offset_ptr, u_ptr, w_ptr, ROW_OFFSET, COL_OFFSET,
                      partner_ptr, dot_before_ptr, dot_after_ptr, SPLIT, DOT_MOMENTS, shift_ptr, SHIFT,
                      shifted_ptr, second_sb, second_sh, second_sl, SHIFTED,
                      start_ptr, start_z_ptr, gamma_ptr, seg_chunks, CARRIES, y_ptr, c_ptr, dn_ptr, dc_ptr,
                      NORMALISER_GRADIENT)
        if TWIN:
            # The states hold sum_j k_j v_j^T; read transposed, sum_j v_j k_j^T, they are the
            # states of the operator with keys v and values k, for any queries q2: the backward's
            # dV beside its dK (autograd.py). This chunk's v and k were just loaded, so their
            # second load is served by the caches. Plain (the optional parts left off): no offset,
            # normaliser, dots or shift; its keys are DV wide and its values DK.
            # (Not on the persistent grid: there the pair was slower than two launches; NOTES 1c.)
            _chunk_output(n, bh, BH, L, N, decay_heads, q2_ptr, v_ptr, k_ptr, g_ptr, S_ptr, z_ptr, out2_ptr,
                          H, second_sb, second_sh, second_sl,
                          LOWER, UPPER, HAS_DECAY, SCALAR_DECAY, CHUNK, DV, DK, BLOCK_DV2, PRECISION,
                          TRANSPOSED_STATE=not TRANSPOSED_STATE)
