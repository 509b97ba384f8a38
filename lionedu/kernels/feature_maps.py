"""The feature maps of :class:`lionedu.nn.LionAttention`, fused: one pass forward, one backward.

The layer computes ``q = phi(x W_q)`` and ``k = phi(x W_k)`` per head. Written in PyTorch
(:mod:`lionedu.features`), ``phi`` is a chain of element-wise operations: the normalised
shifted SiLU ``(silu(x) + 1/2) / ||silu(x) + 1/2||`` is five of them forward and about a
dozen backward, each a full pass over a ``[B, L, H, D]`` tensor in memory, and the attention
kernels then copy the heads, which the layer splits with a transpose, into contiguous
``[B, H, L, D]`` tensors. In an encoder block on the H200 that glue cost more GPU time than
the attention kernels themselves (results/NOTES.md, "LION in a model").

Here one program reads ``ROWS`` rows of ``x`` (one row = one head of one token, ``D``
features) wherever they lie (any strides, last one 1), computes ``phi`` in float32 and
writes the rows contiguous ``[B, H, L, D]``: the layout the attention kernels read, so the
copy disappears too. The backward pass reads ``x`` and the incoming gradient once and
writes the gradient in ``x``'s layout. In the book's notation (chapter 8, section 7), with
``dphi`` the incoming gradient,

    psi = silu(x) + 1/2,   phi = psi / ||psi||,   silu'(x) = sigma(x) (1 + x (1 - sigma(x)))
    dpsi = (dphi - phi (phi . dphi)) / ||psi||,   dx = silu'(x) dpsi

(the PyTorch definition clamps the norm at ``eps``; the clamp never binds, since
``silu >= -0.279`` makes every ``psi >= 0.22``, so it is left out here). For ``elu(x) + 1``,
``dx = dphi`` where ``x > 0`` and ``dphi exp(x)`` elsewhere.

Under ``torch.compile`` the PyTorch definitions are used instead: the compiler fuses them
itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import features
from .fast_launch import Launcher
from .launch import ceil_div, next_power_of_2

__all__ = ["fused_feature_map", "feature_map"]

ROWS = 32  # rows (token-heads) per program
ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU = 0, 1
_KINDS = {features.elu_plus_one: ELU_PLUS_ONE, features.normalized_shifted_silu: NORMALIZED_SHIFTED_SILU}


@triton.jit
def _rows(H, L, D, R, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows ``r = (b H + h) L + l`` of the ``[B, H, L, D]`` output, split into
    ``(b, h, l)``, the feature indices and the masks of both."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < R, cols < D
    l = rows % L
    h = (rows // L) % H
    b = rows // (L * H)
    return rows, cols, b, h, l, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _at(b, h, l, cols, stride_b, stride_h, stride_l):
    """Offsets of the rows ``(b, h, l)``, features ``cols``, of a tensor with these strides (last one 1)."""
    return (b * stride_b + h * stride_h + l * stride_l)[:, None] + cols[None, :]


@triton.jit
def _shifted_silu(x, ok):
    """``psi = silu(x) + 1/2`` (0 outside the mask, so it adds nothing to the norm) and ``sigma(x)``."""
    sig = tl.sigmoid(x)
    return tl.where(ok, x * sig + 0.5, 0.0), sig


@triton.jit
def feature_map_kernel(
    x_ptr,  # x [B, H, L, D], strides (s_x_b, s_x_h, s_x_l, 1)
    out_ptr,  # out: phi(x) [B, H, L, D], contiguous, in x's dtype
    s_x_b, s_x_h, s_x_l, H, L, D, R,  # R = B * H * L rows
    KIND: tl.constexpr,  # ELU_PLUS_ONE or NORMALIZED_SHIFTED_SILU
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D: D rounded up to a power of two
):
    rows, cols, b, h, l, ok = _rows(H, L, D, R, ROWS, BLOCK_D)
    x = tl.load(x_ptr + _at(b, h, l, cols, s_x_b, s_x_h, s_x_l), mask=ok, other=0.0).to(tl.float32)
    if KIND == 0:  # ELU_PLUS_ONE, elu(x) + 1: x + 1 above zero, exp(x) below
        out = tl.where(x > 0, x + 1.0, tl.exp(x))
    else:  # (silu(x) + 1/2) / ||silu(x) + 1/2||, the norm over the row's D features
        psi, _ = _shifted_silu(x, ok)
        out = psi / tl.sqrt(tl.sum(psi * psi, axis=1))[:, None]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)  # contiguous


@triton.jit
def feature_map_backward_kernel(
    x_ptr, dphi_ptr, dx_ptr,  # x, the gradient of phi(x), out: the gradient of x; all [B, H, L, D]
    s_x_b, s_x_h, s_x_l, s_dphi_b, s_dphi_h, s_dphi_l, s_dx_b, s_dx_h, s_dx_l,  # their strides (the last ones are 1)
    H, L, D, R,
    KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, b, h, l, ok = _rows(H, L, D, R, ROWS, BLOCK_D)
    x = tl.load(x_ptr + _at(b, h, l, cols, s_x_b, s_x_h, s_x_l), mask=ok, other=0.0).to(tl.float32)
    dphi = tl.load(dphi_ptr + _at(b, h, l, cols, s_dphi_b, s_dphi_h, s_dphi_l), mask=ok, other=0.0).to(tl.float32)
    if KIND == 0:  # ELU_PLUS_ONE
        dx = tl.where(x > 0, dphi, dphi * tl.exp(x))
    else:
        psi, sig = _shifted_silu(x, ok)
        norm = tl.sqrt(tl.sum(psi * psi, axis=1))
        phi = psi / norm[:, None]
        dpsi = (dphi - phi * tl.sum(phi * dphi, axis=1)[:, None]) / norm[:, None]  # dphi less its part along phi
        dx = dpsi * sig * (1.0 + x * (1.0 - sig))  # times silu'(x)
    tl.store(dx_ptr + _at(b, h, l, cols, s_dx_b, s_dx_h, s_dx_l), dx.to(dx_ptr.dtype.element_ty), mask=ok)


_launch_forward = Launcher(feature_map_kernel)
_launch_backward = Launcher(feature_map_backward_kernel)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FeatureMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind: int):
        x = _unit_stride(x)
        B, H, L, D = x.shape
        out = torch.empty(B, H, L, D, device=x.device, dtype=x.dtype)
        R = B * H * L
        _launch_forward((ceil_div(R, ROWS),), x, out, *x.stride()[:3], H, L, D, R, KIND=kind, ROWS=ROWS,
                        BLOCK_D=next_power_of_2(D), num_warps=4)
        ctx.save_for_backward(x)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, dphi):
        x, = ctx.saved_tensors
        dphi = _unit_stride(dphi)
        # x's layout (the projection's [B, L, H, D] order: no copy after), or contiguous where the
        # forward had to copy an x whose last stride was not 1
        dx = torch.empty_like(x)
        B, H, L, D = x.shape
        R = B * H * L
        _launch_backward((ceil_div(R, ROWS),), x, dphi, dx, *x.stride()[:3], *dphi.stride()[:3], *dx.stride()[:3],
                         H, L, D, R, KIND=ctx.kind, ROWS=ROWS, BLOCK_D=next_power_of_2(D), num_warps=4)
        return dx, None


def fused_feature_map(phi):
    """The fused version of ``phi`` (:func:`lionedu.features.elu_plus_one` or
    :func:`~lionedu.features.normalized_shifted_silu`) as a function of ``x [B, H, L, D]``, or
    ``None`` for any other function."""
    kind = _KINDS.get(phi)
    if kind is None:
        return None
    return lambda x: feature_map(x, kind)


def feature_map(x: torch.Tensor, kind: int) -> torch.Tensor:
    """``phi(x)`` for ``x [B, H, L, D]`` (any strides; float32, bfloat16 or float16, where the
    Triton kernels run: :func:`lionedu.kernels.chunkwise`; ``D <= 256``), ``kind``
    :data:`ELU_PLUS_ONE` or :data:`NORMALIZED_SHIFTED_SILU`. Returns a contiguous
    ``[B, H, L, D]`` tensor in ``x``'s dtype; differentiable, the gradient in ``x``'s strides
    (contiguous if ``x``'s last stride is not 1). The same values as :mod:`lionedu.features` up
    to rounding (the fused map computes in float32 and rounds once)."""
    from . import MAX_HEAD_DIM, check_kernel_tensor

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of shape [B, H, L, D], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, H, L, D], got {list(x.shape)}")
    if x.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"x's head dim D must be at most {MAX_HEAD_DIM} for the Triton kernels, got {x.shape[-1]}")
    if isinstance(kind, bool) or kind not in (ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU):
        raise ValueError(f"kind must be ELU_PLUS_ONE (0) or NORMALIZED_SHIFTED_SILU (1), got {kind!r}")

    check_kernel_tensor(x, "x")
    if torch.compiler.is_compiling() or x.numel() == 0:  # the compiler fuses the PyTorch definition itself
        return (features.elu_plus_one if kind == ELU_PLUS_ONE else features.normalized_shifted_silu)(x)
    return _FeatureMap.apply(x, kind)
