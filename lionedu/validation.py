"""Input checks shared by every implementation.

Each public function calls :func:`check_inputs` first, so a mistake in the caller's shapes or
dtypes produces one clear message naming the argument, what was received and what was
expected, instead of a stack trace from deep inside a matmul or a Triton kernel.
"""
from __future__ import annotations

import torch

__all__ = ["check_inputs", "check_log_decay_values", "check_chunk_size"]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def check_inputs(q, k, v, log_decay=None, *, causal=False, normalize=True, check_values=True) -> None:
    """Validate the arguments of every ``f(q, k, v, log_decay, causal=, normalize=)``.

    Shapes: ``q, k`` are ``[B, H, L, D]``, ``v`` is ``[B, H, L, Dv]``, ``log_decay`` is
    ``None``, ``[H]`` or ``[B, H, L]`` with finite entries ``<= 0``.
    Raises ``TypeError`` for wrong types or dtypes and ``ValueError`` for wrong shapes,
    devices or values; every message names the argument. ``check_values=False`` leaves
    the values of ``log_decay`` to a later :func:`check_log_decay_values` call (the check
    reads them, which waits for the device).
    """
    _check_tensor("q", q, "[B, H, L, D]")
    _check_tensor("k", k, "[B, H, L, D]")
    _check_tensor("v", v, "[B, H, L, Dv]")
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dimensions [B, H, L, D], got shape {_shape(q)}")
    B, H, L, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q, [B, H, L, D] = [{B}, {H}, {L}, {D}], got {_shape(k)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, L):
        raise ValueError(f"v must have shape [B, H, L, Dv] = [{B}, {H}, {L}, Dv], got {_shape(v)}")
    if min(B, H, L, D, v.shape[3]) < 1:
        raise ValueError(f"q, k, v must not be empty, got q {_shape(q)}, v {_shape(v)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: put all inputs on one device")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if log_decay is None:
        return
    _check_tensor("log_decay", log_decay, f"[H] = [{H}] or [B, H, L] = [{B}, {H}, {L}]")
    if tuple(log_decay.shape) not in ((H,), (B, H, L)):
        raise ValueError(
            f"log_decay must have shape [H] = [{H}] (one decay per head) or [B, H, L] = "
            f"[{B}, {H}, {L}] (one decay per token), got {_shape(log_decay)}"
        )
    if log_decay.device != q.device:
        raise ValueError(f"log_decay is on {log_decay.device} but q is on {q.device}: put all inputs on one device")
    if check_values:
        check_log_decay_values(log_decay)


def check_log_decay_values(log_decay) -> None:
    """``log_decay`` (``None`` or a tensor) must be finite and ``<= 0``: one reduction, one sync."""
    if log_decay is None:
        return
    with torch.no_grad():
        lowest, highest = torch.aminmax(log_decay.detach())
        valid = bool((highest <= 0) & (lowest > -float("inf")))  # False for NaN too
    if valid:
        return
    if not bool(torch.isfinite(log_decay).all()):
        raise ValueError("log_decay must be finite (decay lambda = exp(log_decay) in (0, 1]); it contains NaN or inf")
    raise ValueError(
        "log_decay must be <= 0 (decay lambda = exp(log_decay) in (0, 1]); it has positive "
        f"entries, largest {float(highest):.4g}"
    )


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` must be a Python int >= 1."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int >= 1, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size}")
