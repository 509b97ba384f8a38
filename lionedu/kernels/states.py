"""Kernel 1 of 2: the chunk states (book chapter 6).

For one (batch, head) the sequence is cut into ``N`` chunks of ``C`` tokens. Chunk ``n``
holds positions ``s..e``; ``g_i = l_s + ... + l_i`` are its chunk-local sums of the log
decays and ``G = g_e`` its total. The two states every chunk needs are

    forward   H_0 = 0,      H_{n+1} = exp(G) H_n + sum_{j in n} exp(G - g_j) k_j v_j^T
    backward  R_{N-1} = 0,  R_{n-1} = exp(G) R_n + sum_{j in n} exp(g_j) k_j v_j^T

``H_n`` holds every key before chunk ``n`` and ``R_n`` every key after it, each decayed to
the chunk's edge; every exponent is ``<= 0``. The recurrence is sequential, so one program
walks the chunks of one sequence in order, but a step is only a load of ``K_n`` and
``V_n``, one ``[D, C] x [C, Dv]`` product and a store: the expensive per-chunk work (the
``C x C`` block and the output) is left to :mod:`.output`, which runs all chunks at once.

A program owns a tile of the state (some of its rows, some of its columns: they are
independent) and, when there are too few sequences to keep the GPU busy, one segment of a
walk: it then starts from an empty state at the segment's edge, and :mod:`.carries` adds
what the earlier segments contribute (``SEGMENTED``). :func:`.launch.states_plan` chooses.

Three vectors ride along when the caller needs them:
``z = sum_j (decay) k_j`` (the state of an all-ones value column: the normaliser),
``u = sum_j (decay) v_j`` (for scores with a row offset ``a_i``) and
``w = sum_j (decay) b_j v_j`` (for scores with a column offset ``b_j``).

With ``SHIFT_VALUES`` the states are those of the centred values ``v_j - m``: each program
computes the shift ``m`` of its value columns from the values' block sums before it walks,
and the programs of the first slot and segment store it for the later kernels
(:mod:`.centring`). For 16-bit values in tiles up to 64 x 64, each chunk's product takes ``V_n``
as it is and ``(sum_j k_j) m^T`` is subtracted from it; float32 values and wider tiles are
centred as they are loaded.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .centring import shift_from_stats, shifted_rows
from .decays import chunk_log_decays


@triton.jit
def _weighted_value_sum(weights, x, BY_PRODUCT: tl.constexpr):
    """``sum_j weights_j x_j`` over a chunk, for ``weights [C]`` float32 and ``x [C, W]``.

    Without ``BY_PRODUCT``: the ``[W]`` sum, in float32, a reduction across warps. With it
    (16-bit ``x``): the tensor cores add along the chunk instead, and the result is a
    ``[16, W]`` block whose rows add up to the sum (:func:`_rows_total`). The weights enter the
    product as two rows in ``x``'s format, ``hi`` (the weights rounded) and ``lo`` (what
    rounding lost, rounded): ``hi + lo`` keeps about twice the significant bits of one rounding
    (16 in bfloat16, 22 in float16). The tensor cores multiply those exactly and add in
    float32; measured against float64 the sums stay within ~1e-6 relative, where the weights
    rounded once miss by up to ~3e-4 (dev runs §39). Only for bfloat16 (the launcher's rule):
    a float16 row cannot hold a weight past 65504 or below ~6e-8, and chapter 7's offsets
    have no such bound.
    """
    if BY_PRODUCT:
        hi = weights.to(x.dtype)
        lo = (weights - hi.to(tl.float32)).to(x.dtype)
        row = tl.arange(0, 16)[:, None]
        split = tl.where(row == 0, hi[None, :], tl.where(row == 1, lo[None, :], tl.zeros_like(lo)[None, :]))
        total = tl.dot(split, x)  # [16, C] x [C, W]: rows 0 and 1 hold the two parts, the rest 0
    else:
        total = tl.sum(weights[:, None] * x.to(tl.float32), axis=0)
    return total


@triton.jit
def _rows_total(sums, BY_PRODUCT: tl.constexpr):
    """The ``[W]`` vector a running sum of :func:`_weighted_value_sum` stands for."""
    if BY_PRODUCT:
        total = tl.sum(sums, axis=0)
    else:
        total = sums
    return total


@triton.jit
def chunk_states_kernel(
    k_ptr, v_ptr,  # keys [BH, L, DK], values [BH, L, DV], one dtype, contiguous
    g_ptr,  # chunk-local sums of the log decays [BH, N*C] float32 (tail padded with 0),
    # or with SCALAR_DECAY one log decay per head [decay_heads] (decays.py)
    col_offset_ptr,  # column offsets b_j [BH, L] float32 (only read with COL_OFFSET)
    S_ptr,  # out: states [slots, BH, N, DK, DV] in the inputs' dtype
    z_ptr, u_ptr, w_ptr,  # out: [slots, BH, N, DK], [slots, BH, N, DV], [slots, BH, N, DV] float32
    ends_ptr,  # out (SEGMENTED): each segment's end record [slots, BH, P, RECORD] float32 (carries.py)
    gamma_ptr,  # out (SEGMENTED with decays): log decay from each chunk to its segment's edge [slots, BH, N]
    stats_ptr,  # the values' block sums and largest magnitudes [BH, P_stats, 2, DV] float32 (SHIFT_VALUES;
    # centring.value_stats)
    shift_ptr,  # out (SHIFT_VALUES): the values' shift m [BH, DV] float32
    L, N,  # sequence length, number of chunks
    stats_blocks,  # P_stats, blocks of rows in stats (SHIFT_VALUES)
    seg_chunks,  # chunks per segment (N when the walk is not split)
    decay_heads,  # SCALAR_DECAY: entries of g, sequence bh taking g[bh % decay_heads] (decays.py)
    FIRST_DIRECTION: tl.constexpr,  # direction of slot 0: 0 forward (H), 1 backward (R)
    HAS_DECAY: tl.constexpr,  # False for LIT: every decay is 1, no exponentials at all
    SCALAR_DECAY: tl.constexpr,  # LION-D: one decay per head, g computed, not loaded
    WITH_Z: tl.constexpr, WITH_U: tl.constexpr, WITH_W: tl.constexpr,  # which vectors to keep
    SEGMENTED: tl.constexpr,  # the walk is split into segments (carries.py adds what comes before each)
    CHUNK: tl.constexpr,  # C, tokens per chunk
    DK: tl.constexpr, DV: tl.constexpr,  # head dims (powers of two: the wrapper pads them)
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,  # the tile of the state this program owns
    PRECISION: tl.constexpr,  # float32 inputs: launch.float32_dot_precision; ignored for 16-bit
    WEIGHTS_BY_PRODUCT: tl.constexpr,  # u and w by _weighted_value_sum's product (launch: bfloat16 only)
    SHIFT_VALUES: tl.constexpr,  # the states of the centred values v_j - m (centring.py; needs WITH_Z, not u or w)
    STATS_BLOCK: tl.constexpr, BITS: tl.constexpr, FINEST: tl.constexpr, LIMIT: tl.constexpr,  # the shift's
    # constants (centring.shift_constants)
):
    # ---- Which piece of work is ours ----------------------------------------------------
    # Axis 0: the (batch, head) sequence; axis 1: a tile of the state, BLOCK_DK key features
    # by BLOCK_DV value columns; axis 2: the slot, i.e. the direction (forward states H or
    # backward states R), times the segment of the walk. Rows of the state (key features)
    # are independent like its columns are: a program that owns some rows loads and scales
    # only those features of the keys, so splitting the rows gives more programs without
    # repeating the key work. int64 offsets: B*H*L*D can pass 2^31.
    bh = tl.program_id(0).to(tl.int64)
    k_tile = tl.program_id(1) // (DV // BLOCK_DV)
    v_tile = tl.program_id(1) % (DV // BLOCK_DV)
    P = tl.cdiv(N, seg_chunks)  # segments per walk (1 unless SEGMENTED)
    slot = tl.program_id(2) // P
    segment = tl.program_id(2) % P
    BH = tl.num_programs(0)
    backward = (FIRST_DIRECTION + slot) == 1
    dk = k_tile * BLOCK_DK + tl.arange(0, BLOCK_DK)
    dv = v_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    pos = tl.arange(0, CHUNK)
    seq = slot * BH + bh  # index of this (direction, sequence) in the outputs

    # The running state (one [BLOCK_DK, BLOCK_DV] tile of it) and the optional vectors, float32.
    # z is kept as BLOCK_DK x 16 equal columns, of which column 0 is stored: for 16-bit inputs
    # the tensor cores sum it, as the scaled keys' product with a block of ones (below). Float32
    # inputs sum it by a reduction and carry the same 16 columns, for one store path (their
    # benchmark did not move, dev runs §37). Stores of z address row dk in every column
    # (dk[:, None] + 0 * z_column, the pointer in z's shape) and keep column 0.
    Z_BY_PRODUCT: tl.constexpr = v_ptr.dtype.element_ty != tl.float32  # z on the tensor cores
    # Centring 16-bit values in tiles up to 64 x 64 (the measured ones), the states subtract the
    # shift's share after each chunk's product (below), and z is as wide as the tile: its product
    # is then also each chunk's key sums in S's shape. Wider tiles, and float32, centre the values
    # as loaded (a 256 x 32 tile with a tile-wide z spilled registers).
    tl.static_assert(WITH_Z or not SHIFT_VALUES, "centring needs the key sums z")
    CENTRE_AFTER: tl.constexpr = SHIFT_VALUES and Z_BY_PRODUCT and BLOCK_DK * BLOCK_DV <= 64 * 64
    Z_WIDTH: tl.constexpr = BLOCK_DV if CENTRE_AFTER else 16
    S = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_DK, Z_WIDTH], dtype=tl.float32)
    z_column = tl.arange(0, Z_WIDTH)[None, :]
    if Z_BY_PRODUCT:
        ones = tl.full([CHUNK, Z_WIDTH], 1.0, v_ptr.dtype.element_ty)
    # u and w likewise where the launcher says so: [16, BLOCK_DV] blocks whose rows add up to
    # them (_weighted_value_sum), else the [BLOCK_DV] vectors themselves.
    if WEIGHTS_BY_PRODUCT:
        u = tl.zeros([16, BLOCK_DV], dtype=tl.float32)
        w = tl.zeros([16, BLOCK_DV], dtype=tl.float32)
    else:
        u = tl.zeros([BLOCK_DV], dtype=tl.float32)
        w = tl.zeros([BLOCK_DV], dtype=tl.float32)

    # Normalised attention: the shift of our value columns, from the values' block sums (every
    # program of the sequence computes the same bits; the first slot's first segment stores
    # them, for the output kernel and the backward pass).
    if SHIFT_VALUES:
        shift = shift_from_stats(stats_ptr, bh, stats_blocks, L, dv, DV, STATS_BLOCK, BITS, FINEST, LIMIT)
        if k_tile == 0 and tl.program_id(2) == 0:
            tl.store(shift_ptr + bh * DV + dv, shift)

    # Our segment: chunks first, ..., first + count - 1. The state starts empty at its edge
    # (the chunks before it are another program's, added afterwards by carries.py).
    first = segment * seg_chunks
    count = tl.minimum(seg_chunks, N - first)
    gamma = 0.0  # log decay from the segment's edge to the chunk (SEGMENTED)

    for step in range(0, count):
        # forward: chunks first, first + 1, ...;  backward: the same chunks from the last one
        n = tl.where(backward, first + count - 1 - step, first + step)

        # ---- Store the state chunk n reads: every key strictly before (after) it ----------
        at = seq * N + n
        tl.store(S_ptr + at * DK * DV + dk[:, None] * DV + dv[None, :], S.to(S_ptr.dtype.element_ty))
        if WITH_Z:
            if v_tile == 0:  # z has no value columns: one tile stores it
                tl.store(z_ptr + at * DK + dk[:, None] + 0 * z_column, z, mask=z_column == 0)
        if WITH_U:
            if k_tile == 0:  # u and w have no key features: the first row tile stores them
                tl.store(u_ptr + at * DV + dv, _rows_total(u, WEIGHTS_BY_PRODUCT))
        if WITH_W:
            if k_tile == 0:
                tl.store(w_ptr + at * DV + dv, _rows_total(w, WEIGHTS_BY_PRODUCT))

        # ---- Load chunk n: K_n [C, BLOCK_DK], V_n [C, BLOCK_DV]; the tail past L reads as 0 -
        rows = n * CHUNK + pos
        row_ok = rows < L
        k = tl.load(k_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=row_ok[:, None], other=0.0)
        v = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + dv[None, :], mask=row_ok[:, None], other=0.0)
        if SHIFT_VALUES:
            if not CENTRE_AFTER:  # centred as loaded (else after the product, below)
                v = shifted_rows(v, shift, row_ok)

        # ---- Decay each key to the chunk's edge, and the state across the whole chunk ------
        # forward: k_j exp(G - g_j) and H exp(G);  backward: k_j exp(g_j) and R exp(G).
        if HAS_DECAY:
            g, G = chunk_log_decays(g_ptr, bh, n, N, decay_heads, CHUNK, SCALAR_DECAY)
            key_scale = tl.exp(tl.where(backward, g, G - g))
            carry = tl.exp(G)
            if SEGMENTED:  # how far chunk n is from the segment's edge, for the carries
                if tl.program_id(1) == 0:
                    tl.store(gamma_ptr + at, gamma)
                gamma += G
        else:
            key_scale = tl.full([CHUNK], 1.0, tl.float32)
            carry = 1.0

        # ---- S <- carry * S + (scaled K_n)^T V_n: one tensor-core product per chunk --------
        k_scaled = k.to(tl.float32) * key_scale[:, None]  # [C, BLOCK_DK]
        k_scaled_t = tl.trans(k_scaled.to(v.dtype))  # [BLOCK_DK, C], the dot's operand
        S = carry * S + tl.dot(k_scaled_t, v, input_precision=PRECISION)
        if WITH_Z:
            if Z_BY_PRODUCT:
                # sum_j (scaled k_j) as a product with ones: the tensor cores add along the chunk,
                # where tl.sum over it is a reduction across warps (states kernel -10 %; dev runs §37).
                # It sums the scaled keys as rounded for the tensor cores, as S uses them.
                key_sums = tl.dot(k_scaled_t, ones)  # [BLOCK_DK, Z_WIDTH], every column the same
                z = carry * z + key_sums
                if CENTRE_AFTER:
                    # sum_j k_j (v_j - m)^T = sum_j k_j v_j^T - (sum_j k_j) m^T, in float32 (the
                    # keys as rounded for both products). Subtracting m from V_n as it is loaded
                    # puts that work between the load and the product, on the walk's chain:
                    # the forward was 0-6 % slower that way (dev runs §42).
                    S -= key_sums * shift[None, :]
            else:
                # float32: the product would be three TF32 products ("tf32x3"), slower than the
                # reduction (float32 forward +5 to +11 %, dev runs §37)
                z = carry * z + tl.sum(k_scaled, axis=0)[:, None]
        # (every row tile computes u and w, the first stores them: with the offsets' load under
        # a branch here, most likely not pipelined, the backward's states pass took 23 % longer)
        if WITH_U:
            u = carry * u + _weighted_value_sum(key_scale, v, WEIGHTS_BY_PRODUCT)
        if WITH_W:
            b = tl.load(col_offset_ptr + bh * L + rows, mask=row_ok, other=0.0)
            w = carry * w + _weighted_value_sum(key_scale * b, v, WEIGHTS_BY_PRODUCT)

    # ---- A segment leaves its end record: the state past its last chunk and its total decay
    if SEGMENTED:
        end = (seq * P + segment) * (DK * DV + DK + 2 * DV + 1)  # carries.end_record_size: the layout
        tl.store(ends_ptr + end + dk[:, None] * DV + dv[None, :], S)
        if WITH_Z:
            if v_tile == 0:
                tl.store(ends_ptr + end + DK * DV + dk[:, None] + 0 * z_column, z, mask=z_column == 0)
        if WITH_U:
            if k_tile == 0:
                tl.store(ends_ptr + end + DK * DV + DK + dv, _rows_total(u, WEIGHTS_BY_PRODUCT))
        if WITH_W:
            if k_tile == 0:
                tl.store(ends_ptr + end + DK * DV + DK + DV + dv, _rows_total(w, WEIGHTS_BY_PRODUCT))
        if tl.program_id(1) == 0:
            tl.store(ends_ptr + end + DK * DV + DK + 2 * DV, gamma)
