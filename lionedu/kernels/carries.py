"""A walk in segments: what each segment's states owe the segments before them (book chapter 6).

The states kernel (:mod:`.states`) walks the chunks of a sequence one after another, so a
sequence of ``N`` chunks costs ``N`` dependent steps however many multiprocessors are idle.
With few sequences (a batch of one, a few heads) and long ones, the walk can be split: cut
each walk into ``P`` segments of ``seg_chunks`` chunks, let one program walk each segment
from an empty state, and add afterwards what every earlier segment contributes. The
recurrence is linear, so that is exact. In the forward direction, with ``E_s`` the state a
segment leaves past its last chunk (its own keys only) and ``Γ_s`` the sum of its chunks'
log decays ``G``, the state entering segment ``p`` is

    C_0 = 0,    C_{p+1} = exp(Γ_p) C_p + E_p,

and chunk ``n`` of segment ``p`` reads ``H_n = (its segment's own state) + exp(γ_n) C_p``,
``γ_n`` being the log decay between the segment's first edge and chunk ``n`` (the walk stores
it). The backward direction is the mirror image, the segments taken from the last. The key,
value and offset-weighted value sums ``z``, ``u``, ``w`` follow the same rule.

Each program here takes one segment of one walk: it scans the end records of the segments
before it into ``C_p`` (``P`` is small: a few loads from the L2 cache) and adds
``exp(γ_n) C_p`` to every state its segment stored. That is one more read and write of the
states, worth it only where the walk, not memory, is the limit (the launch rule in
:mod:`.launch` decides). A forward without gradients reads each state once, so there
(``STARTS_ONLY``) the program only writes ``C_p`` and its key sums, and the output kernel adds
``exp(γ_n) C_p`` to the state it loads, in the same float32 operations (:mod:`.output`,
``CARRIES``): the same numbers without that pass over the states (the same bits under Triton's
interpreter; compiled, each kernel may fuse the multiply-add its own way, so a state may round to
the neighbouring number of its format).

End record of a segment, float32, ``RECORD = DK*DV + DK + 2*DV + 1`` numbers:
``[E (DK x DV, row-major) | E_z (DK) | E_u (DV) | E_w (DV) | Γ]``.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["segment_carries_kernel", "end_record_size"]


def end_record_size(dk: int, dv: int) -> int:
    """Numbers in one segment's end record (module docstring); both kernels compute the same."""
    return dk * dv + dk + 2 * dv + 1


@triton.jit
def segment_carries_kernel(
    S_ptr,  # in/out: states [slots, BH, N, DK, DV] in the inputs' dtype (each segment's own)
    z_ptr, u_ptr, w_ptr,  # in/out: [slots, BH, N, DK], [slots, BH, N, DV] x 2, float32 (when kept)
    ends_ptr,  # the segments' end records [slots, BH, P, RECORD] float32 (module docstring)
    gamma_ptr,  # log decay from each chunk to its segment's edge [slots, BH, N] float32 (HAS_DECAY)
    start_ptr, start_z_ptr,  # out (STARTS_ONLY): C_p [slots, BH, P, DK, DV] and its key sums [slots, BH, P, DK], float32
    N, seg_chunks,  # chunks per walk, chunks per segment
    FIRST_DIRECTION: tl.constexpr,  # direction of slot 0: 0 forward, 1 backward
    HAS_DECAY: tl.constexpr,
    WITH_Z: tl.constexpr, WITH_U: tl.constexpr, WITH_W: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # value columns per step of the tile loop
    STARTS_ONLY: tl.constexpr,  # write C_p (and C_z) instead of adding them to the states (WITH_U, WITH_W: no)
):
    tl.static_assert(not (STARTS_ONLY and (WITH_U or WITH_W)), "C_p is written with the key sums only")
    # ---- Which piece of work is ours: segment p of one (direction, sequence) walk ------------
    bh = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    slot = tl.program_id(2)
    BH = tl.num_programs(0)
    seq = slot * BH + bh
    P = tl.cdiv(N, seg_chunks)
    backward = (FIRST_DIRECTION + slot) == 1
    RECORD: tl.constexpr = DK * DV + DK + 2 * DV + 1  # end_record_size(DK, DV)
    # Segments that come before ours in the walk's order: 0..p-1 forward, P-1..p+1 backward.
    earlier = tl.where(backward, P - 1 - p, p)
    first = p * seg_chunks
    count = tl.minimum(seg_chunks, N - first)
    dk = tl.arange(0, DK)

    for tile in range(0, DV // BLOCK_DV):
        dv = tile * BLOCK_DV + tl.arange(0, BLOCK_DV)

        # ---- C_p: scan the earlier segments' end records, nearest last (none: C_p = 0) ---------
        C = tl.zeros([DK, BLOCK_DV], dtype=tl.float32)
        Cz = tl.zeros([DK], dtype=tl.float32)
        Cu = tl.zeros([BLOCK_DV], dtype=tl.float32)
        Cw = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for i in range(0, earlier):
            s = tl.where(backward, P - 1 - i, i)
            end = (seq * P + s) * RECORD
            decay = 1.0
            if HAS_DECAY:
                decay = tl.exp(tl.load(ends_ptr + end + RECORD - 1))  # exp(Γ_s)
            C = decay * C + tl.load(ends_ptr + end + dk[:, None] * DV + dv[None, :])
            if WITH_Z:
                Cz = decay * Cz + tl.load(ends_ptr + end + DK * DV + dk)
            if WITH_U:
                Cu = decay * Cu + tl.load(ends_ptr + end + DK * DV + DK + dv)
            if WITH_W:
                Cw = decay * Cw + tl.load(ends_ptr + end + DK * DV + DK + DV + dv)

        if STARTS_ONLY:  # C_p itself, for the output kernel to add as it reads each state
            start = seq * P + p
            tl.store(start_ptr + start * DK * DV + dk[:, None] * DV + dv[None, :], C)
            if WITH_Z:
                if tile == 0:
                    tl.store(start_z_ptr + start * DK + dk, Cz)
        elif earlier > 0:  # the first segment of a walk starts at the sequence's edge: nothing to add
            # ---- Every state of our segment gets exp(γ_n) C_p -----------------------------------
            for step in range(0, count):
                at = seq * N + first + step
                scale = 1.0
                if HAS_DECAY:
                    scale = tl.exp(tl.load(gamma_ptr + at))
                state_at = S_ptr + at * DK * DV + dk[:, None] * DV + dv[None, :]
                tl.store(state_at, (tl.load(state_at).to(tl.float32) + scale * C).to(S_ptr.dtype.element_ty))
                if WITH_Z:
                    if tile == 0:  # z has no value columns: the first tile updates it
                        tl.store(z_ptr + at * DK + dk, tl.load(z_ptr + at * DK + dk) + scale * Cz)
                if WITH_U:
                    tl.store(u_ptr + at * DV + dv, tl.load(u_ptr + at * DV + dv) + scale * Cu)
                if WITH_W:
                    tl.store(w_ptr + at * DV + dv, tl.load(w_ptr + at * DV + dv) + scale * Cw)
