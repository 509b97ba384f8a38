"""An independent float64 evaluation of the definition, in NumPy (the book's notation page).

Written without any lionedu code so that the package is checked against something it does
not share: ``M_ij = exp(-|c_i - c_j|)`` with ``c`` the running sum of log decays,
``A_ij = (q_i . k_j) M_ij`` (``j <= i`` when causal), ``y_i = sum_j A_ij v_j [/ sum_j A_ij]``.
"""
import numpy as np
import torch


def reference(q, k, v, log_decay=None, *, causal=False, normalize=True):
    q, k, v = (t.detach().cpu().double().numpy() for t in (q, k, v))
    B, H, L, _ = q.shape
    if log_decay is None:
        l = np.zeros((B, H, L))
    else:
        ld = log_decay.detach().cpu().double().numpy()
        l = np.broadcast_to(ld[None, :, None], (B, H, L)) if ld.ndim == 1 else ld
    c = np.cumsum(l, axis=-1)
    M = np.exp(-np.abs(c[..., :, None] - c[..., None, :]))
    if causal:
        M = np.tril(M)
    A = np.einsum("bhid,bhjd->bhij", q, k) * M
    y = A @ v
    if normalize:
        y = y / A.sum(-1, keepdims=True)
    return torch.from_numpy(y)


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (a relative error robust to tiny individual entries)."""
    out = out.detach().cpu().double()
    ref = ref.detach().cpu().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
