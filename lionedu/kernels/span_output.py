"""Inference forward, kernel 3 of 3: every chunk's output from its span's checkpoints (book chapter 8).

A chunk ``n`` needs two states (:mod:`.output`): ``H_n``, every key before it, and ``R_n``,
every key after it. The training forward stores both for every chunk; here only the
checkpoints at the edges of its span are stored (:mod:`.spans`), and the chunk's program
rebuilds its states by walking from those edges to itself:

    H = C_p  (decayed to the span's first edge);  for the chunks m of the span before n:
        H <- exp(G_m) H + sum_{j in m} exp(G_m - g_j) k_j v_j^T
    R = D_p  (decayed to the span's last edge);   for the chunks m after n, from the last:
        R <- exp(G_m) R + sum_{j in m} exp(g_j) k_j v_j^T

which is the training walk (:mod:`.states`) over at most ``SPAN - 1`` chunks. The span's keys
and values are read by all of its ``SPAN`` chunk programs, which run side by side, so after
the first the reads come from the L2 cache: memory is read about once, while the walk's
work is repeated (``SPAN - 1`` products per chunk instead of one per direction). Then, as in
the training kernel,

    out_i = exp(g_i) q_i^T H + exp(G - g_i) q_i^T R + sum_{j in n} (q_i . k_j) M_ij v_j,

and the normaliser is the same with every ``v_j = 1`` (the key sums ``z`` in place of the
states). Only one state is alive at a time: its share is added to the output before the
other is built.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decays import chunk_log_decays
from .output import masked_block
from .spans import absorb_chunk

__all__ = ["span_output_kernel"]


@triton.jit
def _load_chunk(ptr, bh, m, L, cols, width: tl.constexpr, CHUNK: tl.constexpr):
    """Rows of chunk ``m`` of sequence ``bh`` of a ``[BH, L, width]`` tensor, columns ``cols``:
    ``[C, len(cols)]``; rows past ``L`` read as 0."""
    rows = m * CHUNK + tl.arange(0, CHUNK)
    return tl.load(ptr + (bh * L + rows[:, None]) * width + cols[None, :], mask=(rows < L)[:, None], other=0.0)


@triton.jit
def span_output_kernel(
    q_ptr, k_ptr, v_ptr,  # q, k [BH, L, DK], v [BH, L, DV], one dtype, contiguous
    g_ptr,  # chunk-local sums of the log decays [BH, N*C] float32, or [BH] (SCALAR_DECAY)
    carries_ptr,  # checkpoints [slots, BH, P, RECORD] float32 (spans.py; slot 1: backward)
    out_ptr,  # out [BH, L, DV] in v's dtype
    L, N, P,  # sequence length, chunks, spans
    BIDIRECTIONAL: tl.constexpr,  # keys after the query count too (else causal)
    HAS_DECAY: tl.constexpr, SCALAR_DECAY: tl.constexpr,
    NORMALIZE: tl.constexpr,  # divide by the normaliser
    SPAN: tl.constexpr, CHUNK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # value columns this program owns
    PRECISION: tl.constexpr,  # float32 inputs: launch.float32_dot_precision; ignored for 16-bit
):
    # ---- Which piece of work is ours: chunk n of sequence bh, value columns dv -----------------
    n = tl.program_id(0)
    bh = (tl.program_id(1) // (DV // BLOCK_DV)).to(tl.int64)
    v_tile = tl.program_id(1) % (DV // BLOCK_DV)
    BH = tl.num_programs(1) // (DV // BLOCK_DV)
    dk = tl.arange(0, DK)
    dv = v_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    p = n // SPAN
    first = p * SPAN  # the span's chunks: first .. last
    last = tl.minimum(first + SPAN, N) - 1
    RECORD: tl.constexpr = DK * DV + DK  # spans.span_record_size(DK, DV)
    state_at = dk[:, None] * DV + dv[None, :]

    q = _load_chunk(q_ptr, bh, n, L, dk, DK, CHUNK)  # Q_n [C, DK]
    if HAS_DECAY:
        g, G = chunk_log_decays(g_ptr, bh, n, N, CHUNK, SCALAR_DECAY)
    else:
        g = tl.zeros([CHUNK], dtype=tl.float32)
        G = 0.0
    out = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([CHUNK], dtype=tl.float32)

    # ---- Keys before the chunk: H from the span's forward checkpoint ----------------------------
    record = carries_ptr + (bh * P + p) * RECORD
    H = tl.load(record + state_at)
    z = tl.load(record + DK * DV + dk)
    for m in range(first, n):
        k = _load_chunk(k_ptr, bh, m, L, dk, DK, CHUNK)
        v = _load_chunk(v_ptr, bh, m, L, dv, DV, CHUNK)
        if HAS_DECAY:
            gm, Gm = chunk_log_decays(g_ptr, bh, m, N, CHUNK, SCALAR_DECAY)
            H, z = absorb_chunk(H, z, k, v, tl.exp(Gm - gm), tl.exp(Gm), PRECISION)
        else:
            H, z = absorb_chunk(H, z, k, v, tl.full([CHUNK], 1.0, tl.float32), 1.0, PRECISION)
    read_scale = tl.exp(g)  # exp(g_i) q_i^T H
    out += read_scale[:, None] * tl.dot(q, H.to(q.dtype), input_precision=PRECISION)
    den += read_scale * tl.sum(q.to(tl.float32) * z[None, :], axis=1)

    # ---- Keys after the chunk: R from the span's backward checkpoint ----------------------------
    if BIDIRECTIONAL:
        record += BH * P * RECORD
        R = tl.load(record + state_at)
        z = tl.load(record + DK * DV + dk)
        for i in range(0, last - n):
            m = last - i
            k = _load_chunk(k_ptr, bh, m, L, dk, DK, CHUNK)
            v = _load_chunk(v_ptr, bh, m, L, dv, DV, CHUNK)
            if HAS_DECAY:
                gm, Gm = chunk_log_decays(g_ptr, bh, m, N, CHUNK, SCALAR_DECAY)
                R, z = absorb_chunk(R, z, k, v, tl.exp(gm), tl.exp(Gm), PRECISION)
            else:
                R, z = absorb_chunk(R, z, k, v, tl.full([CHUNK], 1.0, tl.float32), 1.0, PRECISION)
        read_scale = tl.exp(G - g)  # exp(G - g_i) q_i^T R
        out += read_scale[:, None] * tl.dot(q, R.to(q.dtype), input_precision=PRECISION)
        den += read_scale * tl.sum(q.to(tl.float32) * z[None, :], axis=1)

    # ---- The chunk itself: the C x C block of the mask ------------------------------------------
    k = _load_chunk(k_ptr, bh, n, L, dk, DK, CHUNK)
    v = _load_chunk(v_ptr, bh, n, L, dv, DV, CHUNK)
    scores = masked_block(tl.dot(q, tl.trans(k), input_precision=PRECISION), g, True, BIDIRECTIONAL, HAS_DECAY,
                          CHUNK)
    out += tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
    rows = n * CHUNK + tl.arange(0, CHUNK)
    row_ok = rows < L  # the last chunk may be shorter: its tail is not stored
    if NORMALIZE:
        den += tl.sum(scores, axis=1)
        out = out / tl.where(row_ok, den, 1.0)[:, None]  # padded rows: avoid 0 / 0
    tl.store(out_ptr + (bh * L + rows[:, None]) * DV + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
