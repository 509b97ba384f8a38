"""Vectorized level: the three representations as batched PyTorch tensor code.

All functions take ``q, k: [B, H, L, D]``, ``v: [B, H, L, Dv]`` and
``log_decay: None | [H] | [B, H, L]`` and return ``y: [B, H, L, Dv]`` in ``v``'s dtype.
They accumulate in float32 (float64 for float64 inputs) and are differentiable in
``q``, ``k``, ``v`` and ``log_decay``.

The normaliser is computed together with the output by appending a column of ones to
``V`` (the book, chapter 4: the normaliser is one more column):
``[N, c] = (Q K^T ⊙ M) [V, 1]`` and ``y = N / c``.

- :func:`attention` materialises the ``L x L`` mask: O(L^2) memory, the definition.
- :func:`recurrent` loops over time with a ``D x (Dv+1)`` state per direction.
- :func:`chunkwise` uses matmuls inside chunks and passes states between chunks:
  memory linear in ``L``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import accumulation_dtype, chunk_local_sums, decay_mask, per_token_log_decay
from .validation import check_chunk_size, check_inputs

__all__ = ["attention", "recurrent", "chunkwise"]


def _prepare(q, k, v, log_decay):
    """Cast to the accumulation dtype, append the ones column to ``v`` and expand the decays.

    Returns ``q, k: [B, H, L, D]``, ``v1 = [v, 1]: [B, H, L, Dv + 1]`` and
    ``l: [B, H, L]`` (zeros for LIT).
    """
    acc = accumulation_dtype(q.dtype)
    B, H, L, _ = q.shape
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    l = per_token_log_decay(log_decay, B, H, L, dtype=acc, device=q.device)
    return q, k, v1, l


def _finish(out1, normalize: bool, dtype):
    """Split ``[N, c]`` and return ``N / c`` (or ``N``) in the output dtype."""
    num, den = out1[..., :-1], out1[..., -1:]
    return (num / den if normalize else num).to(dtype)


def attention(q, k, v, log_decay=None, *, causal=False, normalize=True):
    """``y = Scale((Q K^T) ⊙ M) V`` with the full ``[B, H, L, L]`` mask materialised."""
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize)
    dtype = v.dtype
    q, k, v1, l = _prepare(q, k, v, log_decay)
    scores = (q @ k.transpose(-1, -2)) * decay_mask(l, causal=causal)
    return _finish(scores @ v1, normalize, dtype)


def recurrent(q, k, v, log_decay=None, *, causal=False, normalize=True):
    """Forward (and, unless ``causal``, backward) RNN with batched ``[B, H, D, Dv+1]`` states.

    ``S^F_i = lambda_i S^F_{i-1} + k_i v_i^T`` left to right,
    ``S^B_i = lambda_{i+1} S^B_{i+1} + k_i v_i^T`` right to left,
    ``y_i = q_i^T (S^F_i + S^B_i) - (q_i . k_i) v_i`` (the diagonal is in both states).
    """
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize)
    dtype = v.dtype
    q, k, v1, l = _prepare(q, k, v, log_decay)
    L = q.shape[2]
    lam = torch.exp(l)
    kv = k.unsqueeze(-1) * v1.unsqueeze(-2)  # k_i v_i^T for every i: [B, H, L, D, Dv+1]
    state = torch.zeros_like(kv[:, :, 0])
    forward = []
    for i in range(L):
        state = lam[:, :, i, None, None] * state + kv[:, :, i]
        forward.append(torch.einsum("bhd,bhde->bhe", q[:, :, i], state))
    out1 = torch.stack(forward, dim=2)
    if not causal:
        state = torch.zeros_like(kv[:, :, 0])
        backward = [None] * L
        for i in reversed(range(L)):
            if i + 1 < L:
                state = lam[:, :, i + 1, None, None] * state
            state = state + kv[:, :, i]
            backward[i] = torch.einsum("bhd,bhde->bhe", q[:, :, i], state)
        diagonal = (q * k).sum(-1, keepdim=True) * v1
        out1 = out1 + torch.stack(backward, dim=2) - diagonal
    return _finish(out1, normalize, dtype)


def chunkwise(q, k, v, log_decay=None, *, causal=False, normalize=True, chunk_size=64):
    """Chunkwise form (the book, chapter 4): matmuls inside chunks, states passed between them.

    The sequence is padded to ``N`` chunks of ``C = chunk_size`` tokens (padding keys are
    zero and padding decays are 1, so they change nothing) and reshaped to
    ``[B, H, N, C, .]``. With chunk-local sums ``g`` and chunk totals ``G``:

    - intra-chunk:  ``(Q_n K_n^T ⊙ exp(-|g_i - g_j|)) V_n``
    - forward:      ``H_{n+1} = exp(G_n) H_n + sum_j exp(G_n - g_j) k_j v_j^T``,  read ``exp(g_i) q_i^T H_n``
    - backward:     ``R_{n-1} = exp(G_n) R_n + sum_j exp(g_j) k_j v_j^T``,       read ``exp(G_n - g_i) q_i^T R_n``

    Every exponent is ``<= 0``. Memory: the ``N`` states of ``D x (Dv+1)``, linear in ``L``.
    """
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize)
    check_chunk_size(chunk_size)
    dtype = v.dtype
    q, k, v1, l = _prepare(q, k, v, log_decay)
    B, H, L, D = q.shape
    C = min(chunk_size, L)
    N = -(-L // C)
    pad = N * C - L
    if pad:
        q, k, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v1))
        l = F.pad(l, (0, pad))
    q, k, v1 = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v1))
    g = chunk_local_sums(l.reshape(B, H, N, C), C)  # [B, H, N, C]
    G = g[..., -1]  # [B, H, N]

    # Intra-chunk blocks: C x C decay masks from local sums (lower: g_i - g_j <= 0).
    diff = g[..., :, None] - g[..., None, :]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if causal:
        block_mask = torch.exp(diff.masked_fill(~lower, float("-inf")))
    else:
        block_mask = torch.exp(torch.where(lower, diff, -diff))
    out1 = ((q @ k.transpose(-1, -2)) * block_mask) @ v1

    # Forward states: chunk n's keys, decayed to the chunk's end, summed into H.
    fwd_updates = (k * torch.exp(G[..., None] - g)[..., None]).transpose(-1, -2) @ v1  # [B,H,N,D,Dv+1]
    states = [torch.zeros_like(fwd_updates[:, :, 0])]
    for n in range(N - 1):
        states.append(torch.exp(G[:, :, n, None, None]) * states[-1] + fwd_updates[:, :, n])
    H_before = torch.stack(states, dim=2)
    out1 = out1 + torch.exp(g)[..., None] * (q @ H_before)

    if not causal:
        # Backward states: chunk n's keys, decayed to the chunk's start, summed into R.
        bwd_updates = (k * torch.exp(g)[..., None]).transpose(-1, -2) @ v1
        states = [torch.zeros_like(bwd_updates[:, :, 0])]
        for n in reversed(range(1, N)):
            states.append(torch.exp(G[:, :, n, None, None]) * states[-1] + bwd_updates[:, :, n])
        R_after = torch.stack(states[::-1], dim=2)
        out1 = out1 + torch.exp(G[..., None] - g)[..., None] * (q @ R_after)

    out1 = out1.reshape(B, H, N * C, -1)[:, :, :L]
    return _finish(out1, normalize, dtype)
