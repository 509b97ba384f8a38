"""Naive level: plain Python loops that read like the equations of the book (chapters 2-4).

Slow by design (Python loops over batch, head and position), meant for tiny sizes
(``L`` up to a few dozen) and for reading next to the maths. Every function takes
``q, k: [B, H, L, D]``, ``v: [B, H, L, Dv]``, ``log_decay: None | [H] | [B, H, L]`` and returns
``y: [B, H, L, Dv]`` in ``v``'s dtype. Arithmetic is done in float64.
"""
from __future__ import annotations

import math

import torch

from .validation import check_chunk_size, check_inputs

__all__ = ["attention", "recurrent", "chunkwise"]


def _log_decays(log_decay, b: int, h: int, L: int) -> list[float]:
    """The log decays ``l_1..l_L`` of one (batch, head) pair as Python floats."""
    if log_decay is None:
        return [0.0] * L
    if log_decay.dim() == 1:
        return [float(log_decay[h])] * L
    return [float(x) for x in log_decay[b, h]]


def _finish(num, den, normalize: bool, dtype):
    """``y_i = num_i / den_i`` (normalised) or ``num_i``; stacked to ``[L, Dv]``."""
    rows = [n / d if normalize else n for n, d in zip(num, den)]
    return torch.stack(rows).to(dtype)


def attention(q, k, v, log_decay=None, *, causal=False, normalize=True):
    """The attention form, entry by entry: ``y_i = sum_j (q_i . k_j) M_ij v_j [/ sum_j (q_i . k_j) M_ij]``.

    ``M_ij`` is the product of the decays ``lambda_t`` for ``t`` in ``(min(i,j), max(i,j)]``
    (the book, chapter 3: the bidirectional mask); with ``causal`` only ``j <= i`` is summed.
    """
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize)
    B, H, L, _ = q.shape
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for b in range(B):
        for h in range(H):
            lam = [math.exp(x) for x in _log_decays(log_decay, b, h, L)]
            Q, K, V = q[b, h].double(), k[b, h].double(), v[b, h].double()
            num, den = [], []
            for i in range(L):
                n_i, d_i = torch.zeros_like(V[0]), 0.0
                for j in range(L):
                    if causal and j > i:
                        continue
                    m_ij = 1.0
                    for t in range(min(i, j) + 1, max(i, j) + 1):
                        m_ij *= lam[t]
                    a_ij = float(Q[i] @ K[j]) * m_ij
                    n_i = n_i + a_ij * V[j]
                    d_i += a_ij
                num.append(n_i)
                den.append(d_i)
            out[b, h] = _finish(num, den, normalize, v.dtype)
    return out


def recurrent(q, k, v, log_decay=None, *, causal=False, normalize=True):
    """The RNN form (the book, chapter 3): a forward and, unless ``causal``, a backward recurrence.

    forward,  i = 1..L:  ``S^F_i = lambda_i S^F_{i-1} + k_i v_i^T``,   ``z^F_i = lambda_i z^F_{i-1} + k_i``
    backward, i = L..1:  ``S^B_i = lambda_{i+1} S^B_{i+1} + k_i v_i^T``, ``z^B_i = lambda_{i+1} z^B_{i+1} + k_i``
    ``y_i = (q_i^T S^F_i + q_i^T S^B_i - (q_i.k_i) v_i) / (q_i^T z^F_i + q_i^T z^B_i - q_i.k_i)``
    """
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize)
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for b in range(B):
        for h in range(H):
            lam = [math.exp(x) for x in _log_decays(log_decay, b, h, L)]
            Q, K, V = q[b, h].double(), k[b, h].double(), v[b, h].double()
            num = [None] * L
            den = [0.0] * L
            # Forward recurrence: the state sees tokens 1..i.
            S = torch.zeros(D, Dv, dtype=torch.float64, device=q.device)
            z = torch.zeros(D, dtype=torch.float64, device=q.device)
            for i in range(L):
                S = lam[i] * S + torch.outer(K[i], V[i])
                z = lam[i] * z + K[i]
                num[i] = Q[i] @ S
                den[i] = float(Q[i] @ z)
            if not causal:
                # Backward recurrence: the state sees tokens i..L. Its decay is the one of the
                # token *after* i, lambda_{i+1}, because M_ij for j > i multiplies l_{i+1}..l_j.
                S = torch.zeros(D, Dv, dtype=torch.float64, device=q.device)
                z = torch.zeros(D, dtype=torch.float64, device=q.device)
                for i in reversed(range(L)):
                    lam_next = lam[i + 1] if i + 1 < L else 1.0
                    S = lam_next * S + torch.outer(K[i], V[i])
                    z = lam_next * z + K[i]
                    # Token i was counted by both passes: subtract the diagonal once.
                    qk = float(Q[i] @ K[i])
                    num[i] = num[i] + Q[i] @ S - qk * V[i]
                    den[i] = den[i] + float(Q[i] @ z) - qk
            out[b, h] = _finish(num, den, normalize, v.dtype)
    return out


def chunkwise(q, k, v, log_decay=None, *, causal=False, normalize=True, chunk_size=64):
    """The chunkwise form (the book, chapter 4), with loops over chunks and positions.

    In chunk ``n`` (positions ``s..e``) with chunk-local sums ``g_i = l_s + ... + l_i`` and
    total ``G = g_e``:
    intra-chunk   ``sum_{j in n} (q_i.k_j) exp(-|g_i - g_j|) v_j``
    forward state ``H_{n+1} = exp(G) H_n + sum_{j in n} exp(G - g_j) k_j v_j^T``, read as ``exp(g_i) q_i^T H_n``
    backward state ``R_{n-1} = exp(G) R_n + sum_{j in n} exp(g_j) k_j v_j^T``, read as ``exp(G - g_i) q_i^T R_n``
    The normaliser is the same computation with ``v_j`` replaced by 1.
    """
    check_inputs(q, k, v, log_decay, causal=causal, normalize=normalize)
    check_chunk_size(chunk_size)
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    chunks = [range(s, min(s + chunk_size, L)) for s in range(0, L, chunk_size)]
    for b in range(B):
        for h in range(H):
            logs = _log_decays(log_decay, b, h, L)
            Q, K, V = q[b, h].double(), k[b, h].double(), v[b, h].double()
            # Chunk-local running sums g and chunk totals G.
            g = [0.0] * L
            G = []
            for chunk in chunks:
                total = 0.0
                for i in chunk:
                    total += logs[i]
                    g[i] = total
                G.append(total)
            num = [torch.zeros(Dv, dtype=torch.float64, device=q.device) for _ in range(L)]
            den = [0.0] * L
            # Intra-chunk blocks: every pair inside one chunk, exponents from local sums.
            for chunk in chunks:
                for i in chunk:
                    for j in chunk:
                        if causal and j > i:
                            continue
                        a_ij = float(Q[i] @ K[j]) * math.exp(-abs(g[i] - g[j]))
                        num[i] = num[i] + a_ij * V[j]
                        den[i] += a_ij
            # Forward state H_n (keys before chunk n), carried left to right.
            Hs = torch.zeros(D, Dv, dtype=torch.float64, device=q.device)
            hz = torch.zeros(D, dtype=torch.float64, device=q.device)
            for n, chunk in enumerate(chunks):
                for i in chunk:
                    num[i] = num[i] + math.exp(g[i]) * (Q[i] @ Hs)
                    den[i] += math.exp(g[i]) * float(Q[i] @ hz)
                Hs = math.exp(G[n]) * Hs
                hz = math.exp(G[n]) * hz
                for j in chunk:
                    Hs = Hs + math.exp(G[n] - g[j]) * torch.outer(K[j], V[j])
                    hz = hz + math.exp(G[n] - g[j]) * K[j]
            if not causal:
                # Backward state R_n (keys after chunk n), carried right to left.
                Rs = torch.zeros(D, Dv, dtype=torch.float64, device=q.device)
                rz = torch.zeros(D, dtype=torch.float64, device=q.device)
                for n in reversed(range(len(chunks))):
                    for i in chunks[n]:
                        num[i] = num[i] + math.exp(G[n] - g[i]) * (Q[i] @ Rs)
                        den[i] += math.exp(G[n] - g[i]) * float(Q[i] @ rz)
                    Rs = math.exp(G[n]) * Rs
                    rz = math.exp(G[n]) * rz
                    for j in chunks[n]:
                        Rs = Rs + math.exp(g[j]) * torch.outer(K[j], V[j])
                        rz = rz + math.exp(g[j]) * K[j]
            out[b, h] = _finish(num, den, normalize, v.dtype)
    return out
