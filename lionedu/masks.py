"""Decay masks and their log-space construction.

The book derives the masks in chapters 2 (causal) and 3 (bidirectional), the chunk-local
sums in chapter 4.

Notation: per head, log decays ``l_t = log lambda_t <= 0`` and their running sums
``c_t = l_1 + ... + l_t``. lionedu's bidirectional mask is
``M_ij = exp(-|c_i - c_j|)``, the product of ``lambda_t`` for ``t`` in ``(min(i,j), max(i,j)]``;
its lower triangle is the causal mask.
"""
from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "per_token_log_decay", "decay_mask", "chunk_local_sums"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_token_log_decay(log_decay, B: int, H: int, L: int, *, dtype, device) -> torch.Tensor:
    """Expand ``None`` (LIT), ``[H]`` (D) or ``[B, H, L]`` (S) to a ``[B, H, L]`` tensor.

    The result is a view where possible, so gradients flow back to the ``[H]`` decay
    (summed over batch and positions by autograd).
    """
    if log_decay is None:
        return torch.zeros(B, H, L, dtype=dtype, device=device)
    if log_decay.dim() == 1:
        return log_decay.to(dtype)[None, :, None].expand(B, H, L)
    return log_decay.to(dtype)


def decay_mask(log_decay: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """The ``[B, H, L, L]`` decay mask ``M`` from per-token log decays ``[B, H, L]``.

    Built from differences of running sums, so every exponent is ``<= 0`` and nothing
    overflows. ``c_i - c_j`` is ``<= 0`` below the diagonal and ``>= 0`` above it (``c`` is
    non-increasing), so we take it with the sign that makes it non-positive in each
    triangle; unlike ``-|c_i - c_j|`` this keeps the right gradient where a decay is exactly 1.
    The running sum is taken in float64: it is O(L) work and keeps all digits of
    ``c_i - c_j`` even where ``|c|`` is large (the book, chapter 2: computing the mask in
    log space).
    """
    c = torch.cumsum(log_decay.double(), dim=-1)
    diff = (c[..., :, None] - c[..., None, :]).to(log_decay.dtype)  # c_i - c_j
    L = log_decay.shape[-1]
    lower = torch.ones(L, L, dtype=torch.bool, device=log_decay.device).tril()
    mask = torch.exp(torch.where(lower, diff, -diff))
    if causal:
        mask = mask.masked_fill(~lower, 0.0)
    return mask


def chunk_local_sums(log_decay: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Running sums of the log decays restarted at each chunk (the book, chapter 4).

    ``log_decay`` is ``[B, H, N, C]`` (already cut into ``N`` chunks of ``C`` tokens);
    returns ``g`` of the same shape with ``g_i = l_s + ... + l_i`` inside each chunk.
    A chunk holds at most ``C`` terms, so ``|g|`` stays small and float32 keeps its digits.
    """
    if log_decay.shape[-1] != chunk_size:
        raise ValueError(f"log_decay must be cut into chunks of {chunk_size}, got last dim {log_decay.shape[-1]}")
    return torch.cumsum(log_decay, dim=-1)
