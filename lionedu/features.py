"""Feature maps and decay gates (the book: feature maps in chapters 1 and 3, gates in chapter 2).

Feature maps make queries and keys non-negative so that the normaliser
``sum_j (q_i . k_j) M_ij`` is positive. Gates turn raw pre-activations into log decays
``log lambda <= 0`` of the shapes the attention functions take.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["elu_plus_one", "normalized_shifted_silu", "fixed_log_decay", "selective_log_decay"]


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``, positive everywhere (Katharopoulos et al., 2020; LION-LIT). Any shape."""
    return F.elu(x) + 1.0


def normalized_shifted_silu(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(silu(x) + 0.5) / ||silu(x) + 0.5||`` over the last (head) dimension (LION-D, LION-S).

    ``silu`` is bounded below by about -0.278, so ``silu(x) + 0.5 > 0``. Any shape ``[..., D]``.
    """
    y = F.silu(x) + 0.5
    return y / y.norm(dim=-1, keepdim=True).clamp_min(eps)


def fixed_log_decay(a: torch.Tensor) -> torch.Tensor:
    """LION-D: ``log lambda_h = logsigmoid(a_h)``, one learned scalar per head. ``[H] -> [H]``."""
    if a.dim() != 1:
        raise ValueError(f"a must have shape [H], got {list(a.shape)}")
    return F.logsigmoid(a)


def selective_log_decay(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LION-S: ``log lambda_{h,i} = logsigmoid(w_h . x_i + b_h)``, one decay per token and head.

    ``x`` is ``[B, L, dim]``, ``weight`` is ``[H, dim]``, ``bias`` is ``[H]``; returns ``[B, H, L]``.
    Computed with ``logsigmoid`` (not ``log(sigmoid(.))``) so a very negative pre-activation
    gives a large finite log decay instead of ``log(0) = -inf``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, L, dim], got {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"weight must have shape [H, dim] = [H, {x.shape[2]}], got {list(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [H] = [{weight.shape[0]}], got {list(bias.shape)}")
    pre = torch.einsum("bld,hd->bhl", x, weight) + bias[None, :, None]
    return F.logsigmoid(pre)
