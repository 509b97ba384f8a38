"""The forward pass alone, for calls that need no gradients (``torch.no_grad()``, inference).

:class:`.autograd.ChunkwiseAttention`'s forward does work for the backward pass: normalised, it
centres the values (:mod:`.centring`: a pass over ``V`` for their block sums, the shift ``m``
subtracted in the states kernel) and writes the output twice, centred (saved) and shifted back.
The centring is there for the gradients' cancellations (book chapter 8, section 10). The forward
subtracts nothing of the common part, so in bfloat16 its output is about as accurate without it
(within a few tens of per cent of the training forward's error, both near the rounding of ``y``
itself; book chapter 8, section 12). In float32 it stays within float32's tolerance, but at
several times the centred forward's error, which can sit at the rounding of ``y`` (dev runs §45).
So a call that builds no autograd graph runs the two kernels as one plain masked operator
(:func:`.launch.masked_operator`): no centring, one store, no autograd node, and where the states
walk runs in segments (causal passes, few sequences), their carries added by the output kernel as
it reads each state instead of in a pass of their own (:mod:`.carries`); and LIT's
bidirectional attention, whose mask is all ones, needs no walk at all: it takes the global form
of :mod:`.global_lit`.

Reentrant activation checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``)
runs a forward under ``torch.no_grad()`` and recomputes it with gradients for the backward pass, so
there the two passes differ in the last bits (the non-reentrant default runs the training forward
both times).

Normalised float16 keeps the training forward: its states are stored in float16, whose largest
number is 65504, and uncentred states grow with the values' common part times the length (LIT:
``sum_j k_j v_j^T`` over the sequence), past that range where the centred ones stay small.
"""
from __future__ import annotations

import torch

from .autograd import _flatten, _rows, attention_forward, chunk_log_decay_sums, output_like
from .global_lit import lit_forward
from .launch import masked_operator

__all__ = ["inference_forward"]


def inference_forward(q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int, least: int,
                      layout_of_v: bool = False):
    """``y [B, H, L, Dv]`` (a tensor of its own, ``v``'s dtype: contiguous, or with ``layout_of_v``
    in ``v``'s layout where the kernels can write it, :func:`.autograd.output_like`) for
    ``q, k [B, H, L, D]``, ``v [B, H, L, Dv]`` and ``log_decay`` (``None``, ``[H]`` or ``[B, H, L]``);
    the arguments as for :class:`.autograd.ChunkwiseAttention`. Builds no autograd graph."""
    if normalize and v.dtype == torch.float16:  # float16's range needs the centring (module docstring)
        return attention_forward(q, k, v, log_decay, causal, normalize, chunk_size, least, layout_of_v)[0]
    B, H, L, _ = q.shape
    Dv = v.shape[-1]
    q_, k_, v_ = (_flatten(t, least) for t in (q, k, v))  # [BH, L, D'], [BH, L, D'], [BH, L, Dv']
    # The output is written straight into a [B, H, L, Dv'] tensor, not returned as a view of the
    # kernels' [BH, L, Dv'] one: a view made under no_grad could not be changed in place later with
    # grad mode on.
    y = output_like(v, v_.shape[-1]) if layout_of_v else v.new_empty(B, H, L, v_.shape[-1])
    if log_decay is None and not causal:  # LIT, bidirectional: every position sees the same sums
        lit_forward(q_, k_, v_, normalize, out=_rows(y))
    else:
        g = chunk_log_decay_sums(log_decay, B, H, L, chunk_size)
        # Each state is read once, so a walk in segments leaves its carries to the output kernel.
        masked_operator(q_, k_, v_, g, lower=True, upper=not causal, chunk_size=chunk_size, normalize=normalize,
                        with_den=normalize, out=_rows(y), fold_carries=True)
    return y if y.shape[-1] == Dv else y[..., :Dv].clone()
