"""Launching the two kernels: one masked operator = chunk states, then chunk outputs.

Everything here works on flattened, contiguous ``[BH, L, .]`` tensors whose head dims are
powers of two (the public wrapper pads them); :mod:`.autograd` composes operators into
attention and its gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from .output import chunk_output_kernel
from .states import chunk_states_kernel

__all__ = ["padded_chunk_sums", "masked_operator", "launch_config"]


def launch_config(dk: int, dv: int, chunk: int) -> dict:
    """Value-tile widths, warps and pipeline stages for head dims ``dk``, ``dv`` and chunk
    size ``chunk`` (results/NOTES.md, tuning).

    The states kernel walks chunks one after another, so it wants many small programs; the
    output kernel is parallel over chunks already and wants wide tiles (each value tile
    recomputes the ``C x C`` scores).
    """
    wide = dk > 128 or dv > 128
    return dict(states_block_dv=min(dv, 32), states_warps=4, states_stages=2 if wide else 3,
                output_block_dv=min(dv, 64), output_warps=8 if wide or chunk > 64 else 4,
                output_stages=1)


def padded_chunk_sums(log_decay, chunk_size: int):
    """``g``: running sums of ``log_decay [BH, L]`` restarted at every chunk, ``[BH, N*C]`` float32.

    The tail is padded with zero log decays (decay 1) to whole chunks, so the last entry of
    every chunk is its total ``G``. ``None`` (LIT) stays ``None``. O(L) work in PyTorch.
    """
    if log_decay is None:
        return None
    BH, L = log_decay.shape
    N = triton.cdiv(L, chunk_size)
    padded = F.pad(log_decay.float(), (0, N * chunk_size - L))
    return padded.view(BH, N, chunk_size).cumsum(-1).view(BH, N * chunk_size)


def masked_operator(q, k, v, g, *, lower: bool, upper: bool, chunk_size: int, normalize: bool = False,
                    with_den: bool = False, row_offset=None, col_offset=None, partner=None):
    """``out_i = sum_j M_ij (q_i . k_j + a_i + b_j) v_j`` over ``j = i`` and, with ``lower``
    / ``upper``, the keys before / after ``i``.

    ``q, k: [BH, L, DK]``, ``v: [BH, L, DV]`` (one dtype, contiguous, DK and DV powers of two
    >= 16); ``g`` from :func:`padded_chunk_sums` or ``None`` (LIT); ``row_offset`` ``a`` or
    ``col_offset`` ``b``: at most one, ``[BH, L]`` float32; ``normalize`` divides by the
    normaliser (needs ``with_den``); ``partner`` ``P [BH, L, DV]`` asks for the row dots
    ``P_i . (keys-before part of out_i)`` and ``P_i . (keys-after part)``, diagonal in neither.

    Returns ``out [BH, L, DV]`` in ``v``'s dtype, the normaliser ``[BH, L]`` float32 (or
    ``None``) and the pair of row dots ``[BH, L]`` float32 (or ``None``).
    """
    if row_offset is not None and col_offset is not None:
        raise ValueError("masked_operator takes a row offset or a column offset, not both")
    if normalize and not with_den:
        raise ValueError("normalize needs with_den")
    if not (lower or upper):
        raise ValueError("masked_operator needs lower, upper or both")
    BH, L, DK = q.shape
    DV = v.shape[-1]
    N = triton.cdiv(L, chunk_size)
    slots = int(lower) + int(upper)
    cfg = launch_config(DK, DV, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    offset = row_offset if row_offset is not None else col_offset
    dummy = q  # stands in for pointers a configuration never reads
    flags = dict(HAS_DECAY=g is not None, CHUNK=chunk_size, DK=DK, DV=DV,
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    # Kernel 1: the states each chunk reads, [slots, BH, N, DK, DV] (+ the vectors it needs).
    S = torch.empty(slots, BH, N, DK, DV, device=q.device, dtype=q.dtype)
    z = torch.empty(slots, BH, N, DK, **f32) if with_den else dummy
    u = torch.empty(slots, BH, N, DV, **f32) if row_offset is not None else dummy
    w = torch.empty(slots, BH, N, DV, **f32) if col_offset is not None else dummy
    chunk_states_kernel[(BH, DV // cfg["states_block_dv"], slots)](
        k, v, g if g is not None else dummy, col_offset if col_offset is not None else dummy,
        S, z, u, w, L, N,
        FIRST_DIRECTION=0 if lower else 1, WITH_Z=with_den, WITH_U=row_offset is not None,
        WITH_W=col_offset is not None, BLOCK_DV=cfg["states_block_dv"], num_warps=cfg["states_warps"], num_stages=cfg["states_stages"], **flags)

    # Kernel 2: every chunk's output, all chunks in parallel.
    out = torch.empty(BH, L, DV, device=q.device, dtype=v.dtype)
    den = torch.empty(BH, L, **f32) if with_den else None
    dots = (torch.empty(BH, L, **f32), torch.empty(BH, L, **f32)) if partner is not None else None
    chunk_output_kernel[(N, BH)](
        q, k, v, g if g is not None else dummy, offset if offset is not None else dummy,
        S, z, u, w, partner if partner is not None else dummy,
        out, den if den is not None else dummy, *(dots if dots is not None else (dummy, dummy)),
        L, N,
        LOWER=lower, UPPER=upper, WITH_DEN=with_den, NORMALIZE=normalize,
        ROW_OFFSET=row_offset is not None, COL_OFFSET=col_offset is not None, SPLIT=partner is not None,
        BLOCK_DV=cfg["output_block_dv"], num_warps=cfg["output_warps"], num_stages=cfg["output_stages"], **flags)
    return out, den, dots
