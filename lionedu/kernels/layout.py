"""Where a row of a caller's tensor lies: the layouts the kernels write their results in.

The kernels number their sequences ``bh = b * H + h`` and, inside, work on flat contiguous
``[BH, L, W]`` tensors, where row ``l`` of sequence ``bh`` starts at ``(bh * L + l) * W``. The heads
of an attention layer are another layout: :class:`lionedu.nn.LionAttention` splits its projections'
``[B, L, H * W]`` output into heads with a transpose, so its ``[B, H, L, W]`` values are a view
whose row ``(b, h, l)`` starts at ``b * L * H * W + l * H * W + h * W``, which is not a function of
``bh`` alone. Copying such a tensor into the flat layout, and copying results back, costs a pass
over memory each way (results/NOTES.md, "LION in a model").

So the tensors that go back to the caller (the output, and the gradient of the values) can be any
``[B, H, L, W]`` whose last stride is 1, described by three strides, and row ``l`` of sequence
``bh`` starts at ``(bh // H) s_b + (bh % H) s_h + l s_l``. A flat ``[BH, L, W]`` tensor is the
case ``s_b = H L W``, ``s_h = L W``, ``s_l = W``, for any ``H``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["row_offsets", "row_strides", "check_rows", "check_flat", "heads"]


@triton.jit
def row_offsets(bh, rows, H, s_b, s_h, s_l):
    """Element offsets of rows ``rows`` (a vector) of sequence ``bh`` in a tensor with strides
    ``s_b, s_h, s_l`` (module docstring); int64, so that large tensors do not overflow."""
    return (bh // H) * s_b + (bh % H) * s_h + rows.to(tl.int64) * s_l


def row_strides(t: torch.Tensor, H: int) -> tuple:
    """``(s_b, s_h, s_l)`` of ``t``: ``[B, H, L, W]`` with last stride 1, or ``[BH, L, W]``
    contiguous (seen as ``B = BH / H`` blocks of ``H`` sequences)."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    _, L, W = t.shape
    return H * L * W, L * W, W


def heads(*tensors) -> int:
    """The ``H`` of the tensors given as ``[B, H, L, W]`` (``None`` and flat ones skipped; 1 if
    none is): they must agree, since one kernel argument describes them all."""
    found = {t.shape[1] for t in tensors if t is not None and t.dim() == 4}
    if len(found) > 1:
        raise ValueError(f"the outputs given as [B, H, L, W] must have the same H, got {sorted(found)}")
    return found.pop() if found else 1


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` may share an element (a broadcast dimension, or strides that
    interleave): the dimensions of size above 1, by increasing stride, must each step past the
    whole extent of the ones before."""
    if t.is_contiguous():
        return False
    extent = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_rows(t, name: str, BH: int, L: int, W: int, dtype: torch.dtype, device: torch.device,
               output: bool = False):
    """Raise a ``ValueError`` unless ``t`` is a tensor the kernels can read or write row by row
    for ``BH`` sequences of ``L`` rows of width ``W``: ``[BH, L, W]`` contiguous, or
    ``[B, H, L, W]`` with ``B * H = BH`` and last stride 1; of ``dtype`` on ``device``. An
    ``output`` must not overlap itself (two programs would store to one element)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    four = t.dim() == 4 and t.shape[0] * t.shape[1] == BH and tuple(t.shape[2:]) == (L, W) and t.stride(-1) == 1
    flat = tuple(t.shape) == (BH, L, W) and t.is_contiguous()
    if not (four or flat) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be a contiguous [BH, L, W] = {[BH, L, W]} tensor or a [B, H, L, W] one with "
                         f"B * H = {BH} and last stride 1, of dtype {dtype} on {device}; got {list(t.shape)} with "
                         f"strides {list(t.stride())}, {t.dtype} on {t.device}")
    if output and _overlaps(t):
        raise ValueError(f"{name} is written by the kernels, so its elements must not overlap; got strides "
                         f"{list(t.stride())} for shape {list(t.shape)}")


def check_flat(t, name: str, shape: tuple, dtype: torch.dtype, device: torch.device, what: str = ""):
    """Raise a ``TypeError`` / ``ValueError`` unless ``t`` is a contiguous tensor of ``shape``,
    ``dtype`` and ``device``: an input the kernels read only in their flat layout. ``what``
    names the shape's dimensions in the message (``"[BH, L]"``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {what + ' = ' if what else ''}{list(shape)} tensor of dtype "
                         f"{dtype} on {device}; got {list(t.shape)}, {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}")
