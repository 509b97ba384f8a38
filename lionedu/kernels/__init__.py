"""Triton kernels: the chunkwise form, forward and backward, causal and bidirectional.

``chunkwise(q, k, v, log_decay=None, *, causal=False, normalize=True, chunk_size=64)`` has the
signature and semantics of every other implementation (``lionedu.naive``,
``lionedu.vectorized``; the README's "Using the package"). It runs on CUDA tensors natively,
and on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
triton was first imported (float32 only there).

Layout (book chapter 6; the chunkwise form is derived in chapter 4): :mod:`.states` holds
kernel 1, the chunk states (a sequential walk over chunks that does nothing but update the
state), :mod:`.output` kernel 2, every chunk's output with all chunks in parallel;
:mod:`.carries` completes the states of walks split into segments (few, long sequences);
:mod:`.centring` makes the values' block sums, from which kernel 1 takes the values' shift, with
which normalised attention runs on centred values (book chapter 8, sections 10 and 11);
:mod:`.launch` runs the two kernels as one masked operator; :mod:`.autograd` the
``torch.autograd.Function`` that makes attention and its gradients out of operators (book
chapters 6 and 7); :mod:`.fast_launch` launches the compiled kernels without Triton's per-call
Python after their first call (book chapter 8; ``LIONEDU_FAST_LAUNCH=0`` turns it off), and
:mod:`.registers` decides where a build is squeezed into fewer registers;
:mod:`.compiled` the two passes as custom operators, which ``torch.compile`` can place in its
graphs; :mod:`.feature_maps` :class:`lionedu.nn.LionAttention`'s feature maps fused into one pass
each way; :mod:`.primer` the small teaching kernels of chapter 5.
"""
from __future__ import annotations

import torch
import triton

from ..validation import check_chunk_size, check_inputs, check_log_decay_values
from .autograd import ChunkwiseAttention
from .compiled import chunkwise_op
from .inference import inference_forward
from .output import chunk_output_kernel

__all__ = ["chunkwise", "interpreted", "MAX_HEAD_DIM", "CHUNK_SIZES"]

MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted() -> bool:
    """True if the kernels run through Triton's CPU interpreter (fixed when triton was imported)."""
    return _INTERPRETED


def _is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(chunk_output_kernel, InterpretedFunction)


_INTERPRETED = _is_interpreted()


def check_kernel_tensor(t, name: str) -> None:
    """Raise unless the Triton kernels can read tensor ``t`` (called ``name`` in the message):
    float32, bfloat16 or float16 on a CUDA device, or float32 on the CPU under the interpreter."""
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 for the Triton kernels, got {t.dtype} "
            "(use lionedu.vectorized for float64)"
        )
    if interpreted():
        if t.device.type != "cpu":
            raise ValueError(f"Triton runs in interpreter mode, which needs CPU tensors; {name} is on {t.device}")
        if t.dtype != torch.float32:
            raise TypeError(f"Triton's interpreter computes in float32 only; {name} has dtype {t.dtype}")
    elif t.device.type != "cuda":
        raise ValueError(
            f"the Triton kernels need CUDA tensors, {name} is on {t.device}; to run them on a CPU set "
            "TRITON_INTERPRET=1 before anything imports triton"
        )


def _check_kernel_inputs(q, v, chunk_size) -> None:
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} for the Triton kernels, got {chunk_size}")
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims D and Dv must be at most {MAX_HEAD_DIM} for the Triton kernels, got D={D}, Dv={Dv}")
    check_kernel_tensor(q, "q")  # k and v share its dtype and device (check_inputs)


def needs_gradients(*tensors) -> bool:
    """True if autograd records a call on ``tensors`` (``None`` entries skipped): grad mode is on
    and one of them requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def chunkwise(q, k, v, log_decay=None, *, causal=False, normalize=True, chunk_size=64, check_values=True):
    """Masked linear attention with the Triton chunkwise kernels; differentiable.

    ``q, k: [B, H, L, D]``, ``v: [B, H, L, Dv]`` (float32, bfloat16 or float16; D, Dv <= 256),
    ``log_decay``: ``None``, ``[H]`` or ``[B, H, L]``, finite and ``<= 0``.
    ``chunk_size`` is one of 16, 32, 64, 128. Returns ``[B, H, L, Dv]`` in ``v``'s dtype, laid out
    like ``v`` where the kernels can write that (a dense ``v`` with last stride 1 and a ``Dv`` they
    need not pad: a power of two, at least 64 on a GPU; such as an attention layer's transposed heads: no copy to or
    from the projections' ``[B, L, H, Dv]``; :mod:`.layout`), else contiguous; ``v``'s gradient
    likewise. Under ``torch.compile`` the result is contiguous.
    Accumulation is float32; float32 inputs keep float32 accuracy in the dot products (on
    GPUs with TF32 tensor cores as three TF32 products each, ``launch.float32_dot_precision``).
    Gradients flow to q, k, v and log_decay (for a ``[H]`` decay, summed over batch and
    positions).

    ``check_values`` reads ``log_decay`` to raise a ``ValueError`` for NaN, inf or positive
    entries. Reading values on the host waits for the GPU once per call, which serialises
    the host's launches with the device's work; pass ``False`` where the decays are valid by
    construction (``logsigmoid`` of a projection, as in :class:`lionedu.nn.LionAttention`)
    and the host overhead matters. Shapes, dtypes and devices are always checked.

    Speed: at short lengths a step is bound by the host, not the GPU: a step of normalised LION-S
    (16-bit, heads and chunks of 64) makes eight Triton launches from Python, three in the forward (the values' block sums for the
    centring with the decays' chunk sums, :mod:`.centring`; the states; the outputs) and five in
    the backward (three output launches, the first making the normaliser's gradient; one states
    pass; the decay gradient); more where few sequences have their walks split into segments
    (:mod:`.carries`). Capturing the training step in a CUDA graph removes that
    cost (results/NOTES.md): ``torch.cuda.graphs``, or ``torch.compile(mode="reduce-overhead")``,
    under which this call becomes two custom operators (:mod:`.compiled`; the value check is a
    host read, so compile with ``check_values=False``).

    Where autograd records nothing (``torch.no_grad()``, or no input requiring a gradient) the
    call runs the forward alone (:mod:`.inference`): the two kernels without the values' centring,
    which only the gradients need, and with one store of the output.
    """
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize, check_values=False)
    check_chunk_size(chunk_size)
    _check_kernel_inputs(q, v, chunk_size)
    # ChunkwiseAttention zero-pads the head dims to a power of two, at least `least` (64 on a
    # GPU, 16 under the interpreter), so no tile is partial and the output kernel's value tiles
    # are 64 wide. On an H100 with Triton 3.6, partial tiles gave invalid memory accesses and
    # 32-wide value tiles in the output kernel gave wrong values; the states kernel's 64- and
    # 32-wide tiles pass every GPU test (results/NOTES.md).
    least = 16 if interpreted() else 64
    gradients = needs_gradients(q, k, v, log_decay)
    if torch.compiler.is_compiling():  # the same passes as opaque custom operators (.compiled)
        y = chunkwise_op(q, k, v, log_decay, causal, normalize, chunk_size, least, gradients)
    elif gradients:
        y = ChunkwiseAttention.apply(q, k, v, log_decay, causal, normalize, chunk_size, least)
    else:  # no autograd graph: the forward alone, without the backward's preparations (.inference)
        y = inference_forward(q, k, v, log_decay, causal, normalize, chunk_size, least, layout_of_v=True)
    # The decay values are checked once the kernels are queued, so the device works while
    # the host waits for the check; on bad values the result is discarded.
    if check_values:
        check_log_decay_values(log_decay)
    return y
