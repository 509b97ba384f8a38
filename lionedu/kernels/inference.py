"""The forward pass without gradients: states kept at span edges only (book chapter 8).

:func:`inference_forward` computes what :func:`.autograd.attention_forward` computes, but
keeps no state for a backward pass: :mod:`.spans` sums each span of ``span_chunks`` chunks
(keys and values read once for both directions) and scans the sums into checkpoints, and
:mod:`.span_output` rebuilds every chunk's states from its span's checkpoints and writes its
output. :func:`lionedu.kernels.chunkwise` takes this path when no input needs a gradient.
"""
from __future__ import annotations

import torch

from .autograd import _flatten, _unflatten, chunk_log_decay_sums, padded_width
from .fast_launch import Launcher
from .launch import ceil_div, kernel_flags
from .span_output import span_output_kernel
from .spans import span_carries_kernel, span_record_size, span_sums_kernel

__all__ = ["inference_forward", "span_forward", "takes_span_forward", "SPAN_CHUNKS", "MAX_SPAN_HEAD_DIM"]

_launch_sums = Launcher(span_sums_kernel)
_launch_carries = Launcher(span_carries_kernel)
_launch_output = Launcher(span_output_kernel)

SPAN_CHUNKS = 4  # chunks per span (results/NOTES.md, "Inference forward")
MAX_SPAN_HEAD_DIM = 128  # wider (padded) heads take the training forward: a state tile would not fit in registers
CARRY_BLOCK = 1024  # numbers of a span's record per program of the scan


def span_forward(q, k, v, g, *, causal: bool, normalize: bool, chunk_size: int, span_chunks: int = SPAN_CHUNKS,
                 out=None):
    """``y [BH, L, DV]`` (``v``'s dtype) for flattened, padded ``q, k [BH, L, DK]``, ``v [BH, L, DV]``
    and the decays ``g`` in the kernels' form (:func:`.launch.masked_operator`); ``out``: where to
    write it (contiguous, ``v``'s dtype), or ``None`` for a new tensor. Three launches:
    span sums, checkpoints, outputs."""
    BH, L, DK = q.shape
    DV = v.shape[-1]
    N = ceil_div(L, chunk_size)
    P = ceil_div(N, span_chunks)
    slots = 1 if causal else 2
    record = span_record_size(DK, DV)
    f32 = dict(device=q.device, dtype=torch.float32)
    sums = torch.empty(slots, BH, P, record, **f32)
    span_decay = torch.empty(BH, P, **f32) if g is not None else sums
    block_dv = min(DV, 64)
    grid_rows = BH * (DV // block_dv)
    flags = kernel_flags(q, g, chunk_size)
    g_arg = q if g is None else g
    warps = 8 if max(DK, DV) > 64 else 4
    _launch_sums((P, grid_rows), k, v, g_arg, sums, span_decay, L, N, P, BIDIRECTIONAL=not causal, SPAN=span_chunks,
                 DK=DK, DV=DV, BLOCK_DV=block_dv, num_warps=warps, num_stages=2, **flags)
    _launch_carries((BH, slots, ceil_div(record, CARRY_BLOCK)), sums, span_decay, P, RECORD=record,
                    HAS_DECAY=g is not None, BLOCK=CARRY_BLOCK, num_warps=4, num_stages=2)
    if out is None:
        out = torch.empty(BH, L, DV, device=v.device, dtype=v.dtype)
    _launch_output((N, grid_rows), q, k, v, g_arg, sums, out, L, N, P, BIDIRECTIONAL=not causal,
                   NORMALIZE=normalize, SPAN=span_chunks, DK=DK, DV=DV, BLOCK_DV=block_dv, num_warps=warps,
                   num_stages=2, **flags)
    return out


def inference_forward(q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int, least: int,
                      span_chunks: int = SPAN_CHUNKS):
    """Masked linear attention ``[B, H, L, Dv]`` on the caller's ``[B, H, L, .]`` tensors, with no
    autograd node and no saved states; the arguments as :class:`.autograd.ChunkwiseAttention`'s.
    Heads padded wider than :data:`MAX_SPAN_HEAD_DIM` raise ``ValueError`` (callers check
    :func:`takes_span_forward`)."""
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    q_, k_, v_ = (_flatten(t, least) for t in (q, k, v))
    if max(q_.shape[-1], v_.shape[-1]) > MAX_SPAN_HEAD_DIM:
        raise ValueError(f"the span forward takes head dims up to {MAX_SPAN_HEAD_DIM}, got D={D}, Dv={Dv}")
    g = chunk_log_decay_sums(log_decay, B, H, L, chunk_size)
    y = span_forward(q_, k_, v_, g, causal=causal, normalize=normalize, chunk_size=chunk_size,
                     span_chunks=span_chunks)
    y = _unflatten(y, B, H, Dv)
    return y if y.is_contiguous() else y.contiguous()  # padded value columns cut off: a tensor of its own


def takes_span_forward(q, k, v, log_decay, least: int) -> bool:
    """Whether :func:`lionedu.kernels.chunkwise` runs :func:`inference_forward` for these inputs:
    none of them needs a gradient, and the padded heads are at most :data:`MAX_SPAN_HEAD_DIM` wide."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, log_decay)):
        return False
    return max(padded_width(q.shape[-1], least), padded_width(v.shape[-1], least)) <= MAX_SPAN_HEAD_DIM
