"""The forward pass alone, for calls that need no gradients (``torch.no_grad()``, inference).

:class:`.autograd.ChunkwiseAttention`'s forward does work for the backward pass: normalised, it
centres the values (:mod:`.centring`: a pass over ``V`` for their block sums, the shift ``m``
subtracted in the states kernel) and writes the output twice, centred (saved) and shifted back.
The centring is there for the gradients' cancellations (book chapter 8, section 10); the output
itself is as accurate without it, since ``y`` is rounded to the input dtype at the end either way.
So a call that builds no autograd graph runs the two kernels as one plain masked operator
(:func:`.launch.masked_operator`): the states, then the outputs, no centring, one store, no
autograd node. LIT's bidirectional attention, whose mask is all ones, needs no walk at all: it
takes the global form of :mod:`.global_lit`.
"""
from __future__ import annotations

from .autograd import _flatten, _unflatten, chunk_log_decay_sums
from .global_lit import lit_forward
from .launch import masked_operator

__all__ = ["inference_forward"]


def inference_forward(q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int, least: int):
    """``y [B, H, L, Dv]`` (contiguous, ``v``'s dtype) for ``q, k [B, H, L, D]``,
    ``v [B, H, L, Dv]`` and ``log_decay`` (``None``, ``[H]`` or ``[B, H, L]``); the arguments
    as for :class:`.autograd.ChunkwiseAttention`. Builds no autograd graph."""
    B, H, L, _ = q.shape
    Dv = v.shape[-1]
    q_, k_, v_ = (_flatten(t, least) for t in (q, k, v))  # [BH, L, D'], [BH, L, D'], [BH, L, Dv']
    if log_decay is None and not causal:  # LIT, bidirectional: every position sees the same sums
        y = lit_forward(q_, k_, v_, normalize)
    else:
        g = chunk_log_decay_sums(log_decay, B, H, L, chunk_size)
        y, _, _ = masked_operator(q_, k_, v_, g, lower=True, upper=not causal, chunk_size=chunk_size,
                                  normalize=normalize, with_den=normalize)
    y = _unflatten(y, B, H, Dv)
    return y if y.is_contiguous() else y.contiguous()
