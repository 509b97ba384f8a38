"""``ChunkwiseAttention``: the autograd.Function that makes attention and its gradients out
of the two kernels (chunk states, then chunk outputs; :mod:`.launch`).

It takes the caller's ``[B, H, L, .]`` tensors and does all of its reshaping inside, so a
call adds a single node to the autograd graph (every extra node costs host time in the
backward pass, which at short lengths is what the GPU waits for).

Forward (book chapter 6; the maths in chapters 3 and 4): the states of the keys (``H``
before each chunk, ``R`` after it) and their key sums ``z``, then one pass of outputs with
the full mask (its lower triangle when causal) gives ``N = (Q K^T ⊙ M) V`` and the
normaliser ``c``; ``y = N / c``.

Normalised, the kernels see *centred* values ``V - m`` (``m`` about the mean of each
sequence's value columns, :mod:`.centring`; subtracted as the kernels load the values) and
the output gets ``m`` back:
``y = m + Scale(...)(V - m)`` holds exactly, because each row of the normalised mask sums to one. It changes no gradient
(``dV`` does not depend on ``V``, and ``m`` adds nothing to the others) but it keeps them
accurate: every cancellation of the backward pass (``dN_i . v_j + dc_i`` below) is
then between small numbers instead of values' common part, which bfloat16 states, ``dN`` and
``y`` would round away (book chapter 8, section 10).

Backward (book chapter 7): with ``V~ = [V, 1]`` and ``dO~ = [dN, dc]``,
``dN = dY / c``, ``dc = -(dY . Y) / c`` (made by dQ's launch as it loads ``dY``, and stored for the
others), and because ``M`` is symmetric each gradient is the same masked operator with other
arguments:

- ``dQ = (dO~ V~^T ⊙ M) K``  with the row offset ``dc_i`` in the scores
- ``dK = (V~ dO~^T ⊙ M) Q``  with the column offset ``dc_j``
- ``dV = (K Q^T ⊙ M) dN``

(``dO~_i . V~_j = dN_i . v_j + dc_i``: the ones column becomes a float32 offset, which keeps
the near-cancellation of ``dN_i . v_j`` and ``dc_i`` in float32.) In the causal case the
mask of dK and dV is transposed: their operators take the keys *after* each query.

Three operators, but only one new pass of states: dQ's states ``sum_j v_j k_j^T`` are the
transposes of the forward's ``sum_j k_j v_j^T`` (and its value sums ``sum_j k_j`` are the
forward's key sums ``z``), so the forward keeps them; dV's states ``sum_j q_j dN_j^T`` are the
transposes of dK's ``sum_j dN_j q_j^T``. The output kernel reads a state transposed when told.

The decay gradient needs ``W_ij = M_ij (q_i . k_j) (dO~_i . V~_j)`` summed over the pairs
that straddle each position. With the row sums of ``W`` over keys before / after ``i``
(``r^<_i``, ``r^>_i``: ``q_i . dQ`` restricted to those keys) and the column sums over the
queries after / before ``j`` (``c^<_j``, ``c^>_j``: ``k_j . dK`` restricted; the pairs of the
mask's lower / upper triangle again), which the dQ and dK operators return as partner row dots:
``dl_t = sum_{i>=t} (r^<_i - c^<_i) + sum_{i<t} (r^>_i - c^>_i)`` (:mod:`.decay_gradient`; for
one decay per head, only each chunk's moments of the dots).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .centring import centred_copy, value_stats, value_stats_and_chunk_sums
from .decay_gradient import decay_gradient, head_decay_gradient
from .launch import (States, chunk_outputs, chunk_outputs_and_twin, chunk_outputs_through_normaliser, chunk_states,
                     next_power_of_2, padded_chunk_sums, persistent_outputs, twin_outputs)

__all__ = ["ChunkwiseAttention", "Saved", "attention_forward", "attention_backward", "chunk_log_decay_sums"]


def padded_width(d: int, least: int) -> int:
    """The width a head dim ``d`` is zero-padded to: the next power of two, at least ``least``."""
    return max(least, next_power_of_2(d))


def _flatten(t, least: int):
    """``[B, H, L, d] -> [B*H, L, p]``, contiguous, ``d`` zero-padded to ``p = padded_width(d,
    least)`` (zero features leave ``q . k`` unchanged, zero value columns give zero outputs)."""
    B, H, L, d = t.shape
    p = padded_width(d, least)
    if p != d:
        t = F.pad(t, (0, p - d))
    return t.reshape(B * H, L, p).contiguous()


def _rows(t):
    """A ``[B, H, L, W]`` output as the launchers take it: the flat ``[BH, L, W]`` view where it is
    contiguous, else the tensor itself (:mod:`.layout`). Either is written right; the flat view
    passes ``H = 1``, which Triton specialises, so a contiguous output's addresses need no
    division by ``H``."""
    return t.view(-1, *t.shape[2:]) if t.is_contiguous() else t


def _unflatten(t, B: int, H: int, d: int):
    """``[B*H, L, p] -> [B, H, L, d]``: the inverse of :func:`_flatten` (a view)."""
    t = t.view(B, H, t.shape[1], t.shape[2])
    return t if t.shape[-1] == d else t[..., :d]


class Saved(NamedTuple):
    """What the backward pass needs from the forward: the flattened, padded inputs
    ``q, k [BH, L, D']``, ``v [BH, L, Dv']``, the decays in the kernels' form ``g`` (``None``
    for LIT, the caller's ``[H]`` decays as float32 for LION-D, the chunk sums for LION-S), the
    centred output ``y - m [B, H, L, Dv']`` (zero past ``Dv``; ``None`` unnormalised, whose
    backward does not read the output), the normaliser
    ``den [BH, L]`` and the forward's states ``S`` and key sums ``z`` (:class:`.launch.States`;
    ``den`` and ``z`` are ``None`` unnormalised) and the values' shift ``m [BH, Dv']`` float32
    (``None`` unnormalised)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    den: Optional[torch.Tensor]
    S: torch.Tensor
    z: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]


def chunk_log_decay_sums(log_decay, B: int, H: int, L: int, chunk_size: int):
    """The kernels' form of the decays: ``None`` (LIT), the caller's one log decay per head ``[H]``
    float32 (D: sequence ``b * H + h`` takes entry ``h``, and the kernels make the sums) or the
    chunk-local sums ``[B*H, N*C]`` (S)."""
    if log_decay is None:
        return None
    if log_decay.dim() == 1:
        return log_decay.float().contiguous()  # (no copy for a float32 parameter)
    return padded_chunk_sums(log_decay.reshape(B * H, L), chunk_size)


def output_like(v: torch.Tensor, width: int) -> torch.Tensor:
    """A new tensor for an output shaped like ``v [B, H, L, Dv]`` and in its layout where the kernels
    can write that layout (``width == Dv``, no padding, and the new tensor's last stride 1: :mod:`.layout`),
    else a contiguous ``[B, H, L, width]``. ``torch.empty_like`` makes a dense tensor in ``v``'s order
    of dimensions, with ``v``'s own strides where ``v`` is dense, and dense strides in that order where
    it is not: the transposed view of ``[B, L, H, Dv]`` an attention layer splits its heads with, or
    the same view of a slice of a wider projection (``nn``'s fused projections), both give a
    ``[B, L, H, Dv]``-ordered output, which goes back to the projection's rows without a copy."""
    if width == v.shape[-1]:
        y = torch.empty_like(v)
        if y.stride(-1) == 1:
            return y
    return v.new_empty(*v.shape[:3], width)


def attention_forward(q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int, least: int,
                      layout_of_v: bool = False):
    """``(y, saved)``: the output ``[B, H, L, Dv]`` (a tensor of its own) and :class:`Saved`.
    ``layout_of_v``: ``y`` in ``v``'s layout where it can be (:func:`output_like`), else contiguous."""
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    q_, k_, v_ = (_flatten(t, least) for t in (q, k, v))  # [BH, L, D'], [BH, L, D'], [BH, L, Dv']
    opts = dict(lower=True, upper=not causal, chunk_size=chunk_size)
    # Normalised: the states kernel centres the values, by their block sums, and writes their shift m.
    # The launch that makes the block sums also makes LION-S's chunk sums of the log decays.
    if normalize and log_decay is not None and log_decay.dim() == 3:
        stats, g = value_stats_and_chunk_sums(v_, log_decay, chunk_size)
    else:
        stats = value_stats(v_) if normalize else None
        g = chunk_log_decay_sums(log_decay, B, H, L, chunk_size)
    shift = v_.new_empty(B * H, v_.shape[-1], dtype=torch.float32) if normalize else None  # [BH, Dv']
    states = chunk_states(k_, v_, g, with_z=normalize, value_stats=stats, shift_out=shift, **opts)
    # The output is written straight into a [B, H, L, Dv'] tensor: an autograd.Function must not
    # return a view of something it made (autograd forbids in-place changes to those).
    p = v_.shape[-1]
    y_out = output_like(v, p) if layout_of_v else v.new_empty(B, H, L, p)
    # Normalised, the kernel writes the centred output (saved, contiguous) and, shifted back, the
    # caller's; unnormalised, the caller's is the only one.
    y = y_out if shift is None else v.new_empty(B, H, L, p)
    _, den, _ = chunk_outputs(q_, k_, v_, g, states, with_den=normalize, normalize=normalize,
                              out=_rows(y), shift=shift, shifted_out=None if shift is None else _rows(y_out), **opts)
    # Normalised, the backward reads the centred output, saved whole (a view made here, in no grad mode,
    # would turn an in-place change into an obscure error). Unnormalised it reads no output, so none is
    # saved, and the caller's output is free to change in place.
    saved = Saved(q_, k_, v_, g, None if shift is None else y, den, states.S, states.z, shift)
    return (y_out if y_out.shape[-1] == Dv else y_out[..., :Dv].clone()), saved


def attention_backward(dy, saved: Saved, shape, decay_dtype, causal: bool, normalize: bool, chunk_size: int,
                       least: int, want_decay: bool, dv_strides=None):
    """``(dq, dk, dv, d_log_decay)`` for the output gradient ``dy [B, H, L, Dv]``; ``shape`` is
    ``(B, H, D, Dv)``, ``decay_dtype`` the dtype of the caller's ``log_decay`` (``None`` for
    LIT); ``d_log_decay`` (shaped like ``log_decay``) is ``None`` unless ``want_decay``.
    ``dv_strides``: the strides of a dense ``[B, H, L, Dv]`` layout, last stride 1, to write
    ``dv`` in (the values' own, :mod:`.layout`), else ``dv`` is contiguous."""
    q, k, v, g, y, den, S, z, shift = saved
    B, H, D, Dv = shape
    L, p = v.shape[1], v.shape[-1]
    dy = dy.to(v.dtype)
    want_decay = want_decay and g is not None
    # LION-D's one decay per head needs only each chunk's moments of the partner dots (decay_gradient.py).
    moments = want_decay and g.dim() == 1
    # Keys before the query (forward), after it (backward): for dQ as for attention;
    # dK and dV see the transposed mask, so in the causal case they take the keys after.
    plain = dict(lower=True, upper=not causal, chunk_size=chunk_size)
    flipped = dict(lower=not causal, upper=True, chunk_size=chunk_size)
    # The output launches' grid (launch.persistent_outputs): v is [BH, L, Dv'], q and k [BH, L, D'].
    persistent = persistent_outputs(v.dtype, k.shape[-1], v.shape[-1], chunk_size, g is not None)

    # dQ = A(dN, V, K) + row offset dc: the forward's states, read transposed (and V centred as
    # loaded, as in the forward, where normalised).
    dq_options = dict(transposed_state=True, partner=q if want_decay else None, dot_moments=moments,
                      persistent=persistent, shift=shift, shifted="k", **plain)
    if normalize:
        # The launch makes dN = dY / c and dc = -(dY . Y) / c as it loads its queries, reading dY in
        # the caller's layout where it can, and stores both for the launches below.
        # (a contiguous dy as its flat view, which Triton specialises: H = 1)
        dy = _rows(dy) if p == Dv and dy.stride(-1) == 1 else _flatten(dy, least)
        dq, r, dn, dc = chunk_outputs_through_normaliser(dy, y.view(B * H, L, p), den, v, k, g, States(S, u=z),
                                                         **dq_options)
    else:
        dn, dc = _flatten(dy, least), None
        dq, _, r = chunk_outputs(dn, v, k, g, States(S), **dq_options)
    # dV is written in the values' layout where asked (and not padded), so it needs no copy.
    dv_out = torch.empty_strided((B, H, L, Dv), dv_strides, dtype=v.dtype, device=v.device) \
        if dv_strides is not None and p == Dv else None
    # dK = A(V, dN, Q) + column offset dc (V centred likewise): one new pass of states (keys dN,
    # values Q) ...
    states = chunk_states(dn, q, g, col_offset=dc, **flipped)
    v_dk, shift_dk = v, shift
    if shift is not None and v.dtype == torch.float32 and max(q.shape[-1], v.shape[-1]) > 128:
        # The centred queries are a second copy of the tile in shared memory: float32 heads
        # wider than 128 would need 256 KiB there, more than an H100 / H200 block has. So this
        # launch reads a centred copy of V instead (a read and a write of V more).
        v_dk, shift_dk = centred_copy(v, shift), None
    # ... which dV = A(K, Q, dN) reads transposed: in dK's launch where that was measured faster.
    dk_options = dict(col_offset=dc, partner=k if want_decay else None, dot_moments=moments, shift=shift_dk, **flipped)
    if twin_outputs(v.dtype, k.shape[-1], v.shape[-1], chunk_size, g is not None):
        dk, c, dv = chunk_outputs_and_twin(v_dk, dn, q, g, states, k, out2=dv_out, **dk_options)
    else:
        dk, _, c = chunk_outputs(v_dk, dn, q, g, states, persistent=persistent, shifted="q", **dk_options)
        dv, _, _ = chunk_outputs(k, q, dn, g, States(states.S), transposed_state=True, persistent=persistent,
                                 out=dv_out, **flipped)

    d_log_decay = None
    if want_decay:
        # r = (r^<, r^>) from dQ; in dK's operator i and j trade places, so its
        # "before" dot is c^> and its "after" dot c^<.
        (r_before, r_after), (c_after, c_before) = r, c
        if moments:  # LION-D, one decay per head: summed over the head's positions and sequences
            d_log_decay = head_decay_gradient(r_before, r_after, c_before, c_after, L, H)
        else:
            d_log_decay = decay_gradient(r_before, r_after, c_before, c_after).view(B, H, -1)
        d_log_decay = d_log_decay.to(decay_dtype)
    dv = dv_out if dv_out is not None else _unflatten(dv, B, H, Dv)
    return _unflatten(dq, B, H, D), _unflatten(dk, B, H, D), dv, d_log_decay


class ChunkwiseAttention(torch.autograd.Function):
    """``y = Scale(Q K^T ⊙ M) V`` on ``[B, H, L, .]`` tensors; see the module docstring.

    ``least``: head dims are padded to a power of two at least this wide (:mod:`lionedu.kernels`).
    Under ``torch.compile`` the same two passes run as custom operators (:mod:`.compiled`).
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int, least: int):
        # The output in v's layout where it can be, and dv in it too: an attention layer's heads
        # are transposed views, which then need no copy either way (layout.py).
        y, saved = attention_forward(q, k, v, log_decay, causal, normalize, chunk_size, least, layout_of_v=True)
        ctx.save_for_backward(*saved)
        ctx.dv_strides = y.stride()  # y is a dense tensor of its own (used where dv is not padded)
        ctx.options = dict(causal=causal, normalize=normalize, chunk_size=chunk_size, least=least)
        ctx.shape = (*q.shape[:2], q.shape[-1], v.shape[-1])
        ctx.decay_dtype = None if log_decay is None else log_decay.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        dq, dk, dv, d_log_decay = attention_backward(
            dy, Saved(*ctx.saved_tensors), ctx.shape, ctx.decay_dtype, want_decay=ctx.needs_input_grad[3],
            dv_strides=ctx.dv_strides, **ctx.options)
        return dq, dk, dv, d_log_decay, None, None, None, None
