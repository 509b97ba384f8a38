"""``ChunkwiseAttention``: the autograd.Function that makes attention and its gradients out
of masked operators (chunk states, then chunk outputs; :mod:`.launch`).

Forward (MATH.md sections 3-5): one operator with the full mask (its lower triangle when
causal) gives ``N = (Q K^T ⊙ M) V`` and the normaliser ``c`` together; ``y = N / c``.

Backward (MATH.md section 6): with ``V~ = [V, 1]`` and ``dO~ = [dN, dc]``,
``dN = dY / c``, ``dc = -(dY . Y) / c``, and because ``M`` is symmetric each gradient is the
same masked operator with other arguments:

- ``dQ = (dO~ V~^T ⊙ M) K``  = operator(dN, V, K) with the row offset ``dc_i`` in the scores
- ``dK = (V~ dO~^T ⊙ M) Q``  = operator(V, dN, Q) with the column offset ``dc_j``
- ``dV = (K Q^T ⊙ M) dN``    = operator(K, Q, dN)

(``dO~_i . V~_j = dN_i . v_j + dc_i``: the ones column becomes a float32 offset, which keeps
the near-cancellation of ``dN_i . v_j`` and ``dc_i`` in float32.) In the causal case the
mask of dK and dV is transposed: their operators take the keys *after* each query.

The decay gradient needs ``W_ij = M_ij (q_i . k_j) (dO~_i . V~_j)`` summed over the pairs
that straddle each position. With the row sums of ``W`` over keys before / after ``i``
(``q_i . dQ`` restricted to those keys) and the column sums (``k_j . dK`` restricted), which
the dQ and dK operators return as partner row dots:
``dl_t = sum_{i>=t} (r^<_i - c^>_i) + sum_{i<t} (r^>_i - c^<_i)``.
Nothing from the forward pass is kept but the inputs, ``y``, the normaliser and ``g``.
"""
from __future__ import annotations

import torch

from .launch import masked_operator, padded_chunk_sums
from .normaliser import normaliser_gradient

__all__ = ["ChunkwiseAttention"]


class ChunkwiseAttention(torch.autograd.Function):
    """``y = Scale(Q K^T ⊙ M) V`` on ``[BH, L, .]`` tensors; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, causal: bool, normalize: bool, chunk_size: int):
        # q, k: [BH, L, D]; v: [BH, L, Dv]; log_decay: [BH, L] float32 or None.
        g = padded_chunk_sums(log_decay, chunk_size)
        y, den, _ = masked_operator(q, k, v, g, lower=True, upper=not causal, chunk_size=chunk_size,
                                    with_den=normalize, normalize=normalize)
        ctx.save_for_backward(q, k, v, g, y, den)
        ctx.causal, ctx.normalize, ctx.chunk_size = causal, normalize, chunk_size
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, g, y, den = ctx.saved_tensors
        causal = ctx.causal
        if ctx.normalize:
            dn, dc = normaliser_gradient(dy, y, den)  # dN = dY / c, dc = -(dY . Y) / c
        else:
            dn, dc = dy.to(q.dtype).contiguous(), None
        want_decay = g is not None and ctx.needs_input_grad[3]
        # Keys before the query (forward), after it (backward): for dQ as for attention;
        # dK and dV see the transposed mask, so in the causal case they take the keys after.
        before, after = (True, not causal)
        t_before, t_after = (not causal, True)
        opts = dict(chunk_size=ctx.chunk_size)
        dq, _, r = masked_operator(dn, v, k, g, lower=before, upper=after, row_offset=dc,
                                   partner=q if want_decay else None, **opts)
        dk, _, c = masked_operator(v, dn, q, g, lower=t_before, upper=t_after, col_offset=dc,
                                   partner=k if want_decay else None, **opts)
        dv, _, _ = masked_operator(k, q, dn, g, lower=t_before, upper=t_after, **opts)

        d_log_decay = None
        if want_decay:
            # r = (r^<, r^>) from dQ; in dK's operator i and j trade places, so its
            # "before" dot is c^> and its "after" dot c^<. Pairs straddling t: lower ones
            # through the suffix sums of a = r^< - c^<, upper ones through the exclusive
            # prefix sums of b = r^> - c^> (zero when causal).
            (r_before, r_after), (c_after, c_before) = r, c
            # dl_t = sum_{i>=t} a_i + sum_{i<t} b_i = sum_i a_i + sum_{i<t} (b_i - a_i):
            # one exclusive prefix sum, in float64.
            a = (r_before - c_before).double()
            d = (r_after - c_after).double() - a
            d_log_decay = (a.sum(-1, keepdim=True) + d.cumsum(-1) - d).float()
        return dq, dk, dv, d_log_decay, None, None, None
