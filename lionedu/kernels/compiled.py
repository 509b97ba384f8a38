"""The kernels as PyTorch custom operators, for ``torch.compile``.

``torch.compile`` traces Python into a graph. It cannot trace into a Triton launcher, nor
into the kernels' Python glue, so :func:`lionedu.kernels.chunkwise` hands it opaque operators
instead of :class:`.autograd.ChunkwiseAttention`:

- ``lionedu::chunkwise_forward(q, k, v, log_decay, ...) -> (y, g, den, S, z, yc, shift)``,
- ``lionedu::chunkwise_backward(dy, q, k, v, g, y, den, S, z, shift, ...) -> (dq, dk, dv, d_log_decay)``,

joined by ``torch.library.register_autograd``; they run the same passes as the
``autograd.Function`` (:func:`.autograd.attention_forward`, :func:`.autograd.attention_backward`).
A call that needs no gradients gets ``lionedu::chunkwise_inference(q, k, v, log_decay, ...) -> y``
instead, the forward alone (:mod:`.inference`). Each operator has a *fake* implementation that states the shapes and dtypes of its outputs, which is all
the compiler needs to plan the graph around it; a compiled training step, including these
launches, can then be captured in a CUDA graph (``mode="reduce-overhead"``).

Custom operators may not return ``None``, nor a tensor that shares memory with an input or
another output, so the optional outputs come back as empty tensors and the backward pass
rebuilds the flattened, padded inputs from ``q, k, v`` (a view where no padding was needed)
instead of receiving them. Normalised, the forward also returns the centred output ``yc``
(:mod:`.centring`) and the values' shift, which the backward receives as its ``y`` and ``shift``;
unnormalised, ``yc`` is empty, since the backward reads no output.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .autograd import Saved, _flatten, attention_backward, attention_forward, padded_width
from .inference import inference_forward
from .launch import ceil_div

__all__ = ["chunkwise_op"]


def _or_empty(t, like):
    """An optional output: ``t``, or an empty tensor (custom operators cannot return None)."""
    return like.new_empty(0) if t is None else t


def _or_none(t):
    return None if t.numel() == 0 else t


@torch.library.custom_op("lionedu::chunkwise_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor], causal: bool,
             normalize: bool, chunk_size: int, least: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    y, saved = attention_forward(q, k, v, log_decay, causal, normalize, chunk_size, least)
    centred = y.new_empty(0) if saved.shift is None else saved.y  # (y itself may not be returned twice)
    # LION-D's g is the caller's float32 [H] decays themselves, and an operator's output may not be
    # one of its inputs: a copy of H numbers.
    g = saved.g.clone() if saved.g is not None and saved.g.dim() == 1 else saved.g
    return (y, _or_empty(g, y), _or_empty(saved.den, y), saved.S, _or_empty(saved.z, y), centred,
            _or_empty(saved.shift, y))


@_forward.register_fake
def _(q, k, v, log_decay, causal, normalize, chunk_size, least):
    B, H, L, D = q.shape
    dk, dv = padded_width(D, least), padded_width(v.shape[-1], least)
    N, slots = ceil_div(L, chunk_size), 1 if causal else 2
    f32 = dict(dtype=torch.float32, device=q.device)
    if log_decay is None:
        g = q.new_empty(0)
    elif log_decay.dim() == 1:  # the caller's [H] decays, as float32
        g = q.new_empty(H, **f32)
    else:
        g = q.new_empty(B * H, N * chunk_size, **f32)
    den = q.new_empty(B * H, L, **f32) if normalize else q.new_empty(0)
    z = q.new_empty(slots, B * H, N, dk, **f32) if normalize else q.new_empty(0)
    yc = v.new_empty(B, H, L, dv) if normalize else v.new_empty(0)
    shift = q.new_empty(B * H, dv, **f32) if normalize else q.new_empty(0)
    return v.new_empty(B, H, L, v.shape[-1]), g, den, k.new_empty(slots, B * H, N, dk, dv), z, yc, shift


@torch.library.custom_op("lionedu::chunkwise_backward", mutates_args=())
def _backward(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, y: torch.Tensor,
              den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, shift: torch.Tensor,
              decay_dtype: Optional[torch.dtype], causal: bool, normalize: bool, chunk_size: int, least: int,
              want_decay: bool) -> List[torch.Tensor]:
    """``y``: (normalised) the centred ``yc [B, H, L, Dv']`` that the forward returned, with its
    ``shift``; unnormalised, an empty tensor (the backward reads no output)."""
    saved = Saved(*(_flatten(t, least) for t in (q, k, v)), _or_none(g), _or_none(y), _or_none(den), S, _or_none(z),
                  _or_none(shift))
    shape = (*q.shape[:2], q.shape[-1], v.shape[-1])
    grads = attention_backward(dy, saved, shape, decay_dtype, causal, normalize, chunk_size, least, want_decay)
    # contiguous: where a head dim was padded the gradient is a view of a wider tensor, and an
    # operator's outputs must have the strides its fake implementation promises
    return [_or_empty(t, q).contiguous() for t in grads]


@_backward.register_fake
def _(dy, q, k, v, g, y, den, S, z, shift, decay_dtype, causal, normalize, chunk_size, least, want_decay):
    B, H = q.shape[:2]
    if not want_decay or g.numel() == 0:
        d_log_decay = q.new_empty(0)
    elif g.dim() == 1:  # LION-D: one decay per head
        d_log_decay = q.new_empty(H, dtype=decay_dtype)
    else:
        d_log_decay = q.new_empty(B, H, q.shape[2], dtype=decay_dtype)
    # contiguous whatever the inputs' strides (as the real operator returns them)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_log_decay]


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, causal, normalize, chunk_size, least = inputs
    y, g, den, S, z, yc, shift = output
    ctx.save_for_backward(q, k, v, g, yc, den, S, z, shift)  # the centred output (empty unnormalised)
    ctx.options = dict(decay_dtype=None if log_decay is None else log_decay.dtype, causal=causal,
                       normalize=normalize, chunk_size=chunk_size, least=least)


def _autograd_backward(ctx, dy, *_unused):
    q, k, v, g, y, den, S, z, shift = ctx.saved_tensors
    dq, dk, dv, d_log_decay = _backward(dy.contiguous(), q, k, v, g, y, den, S, z, shift,
                                        want_decay=ctx.needs_input_grad[3], **ctx.options)
    return dq, dk, dv, _or_none(d_log_decay), None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("lionedu::chunkwise_inference", mutates_args=())
def _inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor], causal: bool,
               normalize: bool, chunk_size: int, least: int) -> torch.Tensor:
    """``y [B, H, L, Dv]``, contiguous, from :func:`.inference.inference_forward` (a call without gradients)."""
    return inference_forward(q, k, v, log_decay, causal, normalize, chunk_size, least)


@_inference.register_fake
def _(q, k, v, log_decay, causal, normalize, chunk_size, least):
    return v.new_empty(*q.shape[:3], v.shape[-1])


def chunkwise_op(q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int, least: int,
                 gradients: bool = True) -> torch.Tensor:
    """``y [B, H, L, Dv]``: :class:`.autograd.ChunkwiseAttention` as custom operators (checked
    inputs, the same arguments); with ``gradients=False``, :func:`.inference.inference_forward`
    as one operator without an autograd registration."""
    if not gradients:
        return _inference(q, k, v, log_decay, causal, normalize, chunk_size, least)
    return _forward(q, k, v, log_decay, causal, normalize, chunk_size, least)[0]
