"""lionedu: bidirectional linear attention (LION) from first principles to Triton kernels.

The package holds each algorithm at three levels, :mod:`lionedu.naive` (loops that mirror
the equations), :mod:`lionedu.vectorized` (PyTorch tensor code) and :mod:`lionedu.kernels`
(Triton), and three representations (attention, recurrent, chunkwise). Importing
``lionedu`` does not import Triton: the kernels load on first use, so a notebook can set
``TRITON_INTERPRET=1`` after ``import lionedu``.
"""
from __future__ import annotations

import importlib

from . import features, masks, naive, vectorized
from .environment import environment
from .validation import check_chunk_size

__version__ = "0.1.0"
__all__ = ["lion_attention", "environment", "naive", "vectorized", "kernels", "features", "masks", "IMPLS", "__version__"]

#: Values of ``impl`` accepted by :func:`lion_attention`.
IMPLS = ("auto", "naive", "attention", "recurrent", "chunkwise", "triton")


def __getattr__(name):
    # `lionedu.kernels` imports triton, so it is loaded only when first asked for.
    if name == "kernels":
        return importlib.import_module(".kernels", __name__)
    raise AttributeError(f"module 'lionedu' has no attribute {name!r}")


def lion_attention(q, k, v, log_decay=None, *, causal=False, normalize=True, impl="auto", chunk_size=64,
                   check_values=True):
    """Masked linear attention, bidirectional (LION) unless ``causal``.

    ``q, k: [B, H, L, D]``, ``v: [B, H, L, Dv]``, ``log_decay``: ``None`` (LION-LIT), ``[H]``
    (LION-D) or ``[B, H, L]`` (LION-S), finite and ``<= 0``. Returns ``[B, H, L, Dv]`` in
    ``v``'s dtype: ``y_i = sum_j A_ij v_j / sum_j A_ij`` with ``A_ij = (q_i . k_j) M_ij``
    (without the division when ``normalize=False``).

    ``impl``: ``"naive"`` (loops over the definition, tiny inputs only), ``"attention"``,
    ``"recurrent"``, ``"chunkwise"`` (vectorized PyTorch), ``"triton"`` (fused kernels) or
    ``"auto"`` (Triton for CUDA tensors, else vectorized chunkwise).

    ``check_values=False`` lets the Triton path skip reading ``log_decay``'s values to reject
    NaN, inf or positive entries: that read waits for the GPU on every call, and under
    ``torch.compile`` it breaks the graph. Pass it where the decays are valid by construction
    (as :class:`lionedu.nn.LionAttention` does). The other implementations, reference code,
    always check.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    check_chunk_size(chunk_size)
    if impl == "auto":
        impl = "triton" if getattr(q, "is_cuda", False) else "chunkwise"
    kwargs = dict(causal=causal, normalize=normalize)
    if impl == "naive":
        return naive.attention(q, k, v, log_decay, **kwargs)
    if impl == "attention":
        return vectorized.attention(q, k, v, log_decay, **kwargs)
    if impl == "recurrent":
        return vectorized.recurrent(q, k, v, log_decay, **kwargs)
    if impl == "chunkwise":
        return vectorized.chunkwise(q, k, v, log_decay, chunk_size=chunk_size, **kwargs)
    from . import kernels  # imported on first use: it imports triton (torch.compile traces this import)

    return kernels.chunkwise(q, k, v, log_decay, chunk_size=chunk_size, check_values=check_values, **kwargs)
