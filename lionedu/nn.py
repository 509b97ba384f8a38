"""LION in models: the attention layer, encoder blocks and a small sequence classifier.

Everything here works on ``[B, L, dim]`` activations (batch, sequence, model width), the
layout of ``torch.nn.TransformerEncoder`` with ``batch_first=True``. Heads are split into
lionedu's ``[B, H, L, D]`` layout only inside the attention layers.

- :class:`LionAttention`: projections, feature map, decay (LIT / D / S) and
  :func:`lionedu.lion_attention`; one ``form`` switch picks the representation.
- :class:`SoftmaxAttention`: the same projections around PyTorch's
  ``scaled_dot_product_attention``, the baseline of equal size.
- :class:`EncoderBlock`: pre-norm block, ``x + mixer(LN(x))`` then ``x + MLP(LN(x))``.
- :class:`SequenceClassifier`: token embedding or patch projection, optional learned
  positions, ``depth`` blocks, mean pooling or a class token, a linear head.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import lion_attention
from .features import elu_plus_one, fixed_log_decay, normalized_shifted_silu, selective_log_decay

__all__ = ["VARIANTS", "FORMS", "LionAttention", "SoftmaxAttention", "EncoderBlock", "SequenceClassifier"]

#: Decay kinds: ``"lit"`` (no decay), ``"d"`` (one learned decay per head), ``"s"`` (per token).
VARIANTS = ("lit", "d", "s")
#: Values of ``impl`` / ``form`` accepted by :class:`LionAttention` (those of :func:`lionedu.lion_attention`).
FORMS = ("auto", "attention", "recurrent", "chunkwise", "triton", "naive")


def _initial_decays(num_heads: int) -> torch.Tensor:
    """Decays ``lambda_h = 1 - 2^-e`` with ``e`` evenly spaced in ``[2, 6]``: 0.75 ... 0.984.

    Short-memory and long-memory heads from the start, as RetNet spreads its decays over
    heads; the values suit sequences of tens to hundreds of tokens.
    """
    exponents = torch.linspace(2.0, 6.0, num_heads) if num_heads > 1 else torch.tensor([2.0])
    return 1.0 - 2.0 ** (-exponents)


def _joins_product(layer) -> bool:
    """Whether a projection can join the fused product: a plain ``nn.Linear`` with a bias and no
    forward hooks (of its own or global), whose output is then ``x W^T + b`` and nothing else."""
    hooks = (layer._forward_hooks, layer._forward_pre_hooks, torch.nn.modules.module._global_forward_hooks,
             torch.nn.modules.module._global_forward_pre_hooks)
    return type(layer) is nn.Linear and layer.bias is not None and not any(hooks)


class _MultiHeadMixer(nn.Module):
    """Shared part of both attention layers: q/k/v/output projections and head reshaping.

    Subclasses implement ``_mix(q, k, v, x, key_mask, form, extra)`` on ``[B, H, L, D]`` heads
    (``extra``: see :meth:`_project`).

    ``fused_projections``: on CUDA inputs (the default, ``None``) the input projections run as
    one matrix product with their weights concatenated, ``[q | k | v | extra] = x [W_q; W_k; W_v;
    ...]^T + b``, and the heads are views of its output: one product, one bias gradient and no
    sum of three input gradients in the backward pass, where separate layers make three of each
    (results/NOTES.md, "LION in a model"). The parameters are the same ``nn.Linear`` layers either
    way; only rounding differs. The product reads the layers' weights and biases, not their
    ``forward``, so layers that are not plain ``nn.Linear`` with a bias, or that have forward hooks,
    are called one by one instead. ``True`` forces the product (a ``ValueError`` if a layer cannot
    join it), ``False`` the separate layers. By default a CPU keeps the separate layers (so that
    results computed on one stay bit for bit what they were), and so does ``torch.compile``, which
    plans the products itself.
    """

    fused_projections: bool | None = None

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim] -> [B, H, L, dim / H]`` (a view; ``t``'s last stride must be 1)."""
        B, L, _ = t.shape
        return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def _input_projections(self) -> list:
        """The ``nn.Linear`` layers applied to the input: q, k, v, then any a subclass adds to the
        fused product (LION-S's gate)."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def _project(self, x: torch.Tensor) -> list:
        """``[q, k, v, *extra]`` for ``x [B, L, dim]``, each ``[B, L, out]``: of one product with the
        weights concatenated where the projections are fused, ``extra`` then holding the outputs of the
        layers after q, k, v in :meth:`_input_projections`; else of each of the three layers, and
        ``extra`` empty (a subclass computes what those layers give from ``x`` itself)."""
        layers = self._input_projections()
        fused = self.fused_projections
        if fused is None:
            fused = x.is_cuda and not torch.compiler.is_compiling() and all(map(_joins_product, layers))
        elif fused and not all(map(_joins_product, layers)):
            raise ValueError("fused_projections=True needs plain nn.Linear input projections with biases and no "
                             "forward hooks (their weights are concatenated, their forward is not called)")
        if not fused:
            return [layer(x) for layer in layers[:3]]
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        return list(F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1))

    def forward(self, x: torch.Tensor, form: str | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, L, dim] -> [B, L, dim]``.

        ``key_mask`` (optional, ``[B, L]`` bool) marks real tokens with ``True``; padding
        tokens are ignored as keys (LION: zero key and decay 1, anywhere in the sequence).
        ``form`` picks the representation (LION layers only).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, L, dim] = [B, L, {self.dim}], got {list(x.shape)}")
        if key_mask is not None and tuple(key_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"key_mask must have shape [B, L] = {list(x.shape[:2])}, got {list(key_mask.shape)}")
        q, k, v, *extra = self._project(x)
        y = self._mix(self._split(q), self._split(k), self._split(v), x, key_mask, form, extra)  # [B, H, L, D]
        return self.out_proj(y.transpose(1, 2).reshape(x.shape))


class LionAttention(_MultiHeadMixer):
    """Multi-head LION attention: ``x: [B, L, dim] -> [B, L, dim]``.

    Per head (``D = dim / num_heads``): ``q = phi(x W_q)``, ``k = phi(x W_k)``, ``v = x W_v``
    (``[B, H, L, D]`` each), a log decay, then :func:`lionedu.lion_attention` and the output
    projection. Variants (the book, chapter 3: the three LION variants):

    - ``"lit"``: ``phi = elu + 1``, no decay (``log_decay=None``);
    - ``"d"``: ``phi`` = normalised shifted SiLU, ``log lambda_h = logsigmoid(a_h)`` with one
      learned scalar ``a_h`` per head (parameter ``decay_logit: [H]``);
    - ``"s"``: the same ``phi``, ``log lambda_{h,i} = logsigmoid(w_h . x_i + b_h)`` from
      ``gate = Linear(dim, H)``: one decay per token and head, ``[B, H, L]``.

    ``impl`` is the default representation (``"auto"``, ``"attention"``, ``"recurrent"``,
    ``"chunkwise"``, ``"triton"``, ``"naive"``); ``forward(x, form=...)`` overrides it per call.
    All forms compute the same function. ``causal=True`` restricts token ``i`` to ``j <= i``.
    On the Triton path (``"triton"``, or ``"auto"`` on a GPU) ``phi`` runs as a fused kernel,
    one pass forward and one backward that also lays the heads out for the attention kernels
    (:mod:`lionedu.kernels.feature_maps`; the same values up to rounding). A ``feature_map``
    attribute replaced by another function runs as given.

    ``orders`` (optional, ``[P, L]`` integer tensor, each row a permutation of ``0..L-1``)
    builds the decay mask once per token order and averages the ``P`` masks (LION-D♮ / S♮ for
    images, the book, chapter 9). The unnormalised outputs and normalisers of the orders are
    summed before the division, so the result is ``Scale(Q K^T ⊙ mean_p M_p) V`` exactly.
    """

    def __init__(self, dim: int, num_heads: int, variant: str = "lit", impl: str = "auto", chunk_size: int = 64,
                 *, causal: bool = False, orders: torch.Tensor | None = None):
        super().__init__(dim, num_heads)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
        if impl not in FORMS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, FORMS))}; got {impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        self.variant, self.impl, self.chunk_size, self.causal = variant, impl, chunk_size, causal
        self.feature_map = elu_plus_one if variant == "lit" else normalized_shifted_silu
        lam = _initial_decays(num_heads)
        if variant == "d":
            self.decay_logit = nn.Parameter(torch.log(lam / (1 - lam)))  # sigmoid(a_h) = lambda_h
        if variant == "s":
            self.gate = nn.Linear(dim, num_heads)
            with torch.no_grad():
                self.gate.weight.mul_(0.1)
                self.gate.bias.copy_(torch.log(lam / (1 - lam)))
        if orders is not None:
            orders = torch.as_tensor(orders)
            if orders.dim() != 2 or orders.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"orders must be an integer tensor of shape [P, L], got {orders.dtype} {list(orders.shape)}")
            ref = torch.arange(orders.shape[1])
            if not all(torch.equal(row.sort().values, ref) for row in orders):
                raise ValueError("every row of orders must be a permutation of 0..L-1")
            orders = orders.long()
        self.register_buffer("orders", orders, persistent=False)

    def extra_repr(self) -> str:
        n = 1 if self.orders is None else self.orders.shape[0]
        return (f"dim={self.dim}, num_heads={self.num_heads}, variant={self.variant!r}, impl={self.impl!r}, "
                f"chunk_size={self.chunk_size}, causal={self.causal}, orders={n}")

    def _input_projections(self) -> list:
        """q, k, v and, for LION-S, the gate, which joins the fused product unless a subclass
        computes its decays another way (overrides :meth:`log_decay`)."""
        gate = self.variant == "s" and type(self).log_decay is LionAttention.log_decay
        return super()._input_projections() + ([self.gate] if gate else [])

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """The decays for input ``x: [B, L, dim]``: ``None`` (lit), ``[H]`` (d) or ``[B, H, L]`` (s)."""
        if self.variant == "d":
            return fixed_log_decay(self.decay_logit)
        if self.variant == "s":
            return selective_log_decay(x, self.gate.weight, self.gate.bias)
        return None

    def _mix(self, q, k, v, x, key_mask, form, extra):
        form = self.impl if form is None else form
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}; got {form!r}")
        phi = self.feature_map
        if form == "triton" or (form == "auto" and q.is_cuda):
            # The kernels' path: phi in one fused pass each way, which also writes the heads
            # contiguous, as the kernels read them (lionedu.kernels.feature_maps)
            from .kernels.feature_maps import fused_feature_map

            phi = fused_feature_map(phi) or phi
        q, k = phi(q), phi(k)
        # LION-S's gate logits [B, L, H] from the fused product, where it made them: the decays
        # log_decay(x) computes, up to rounding
        log_decay = F.logsigmoid(extra[0]).transpose(1, 2) if extra else self.log_decay(x)
        if key_mask is not None:
            # A padding token with a zero key adds nothing to any sum, and a decay of 1 (log 0)
            # adds no factor to the mask between the tokens around it: it is invisible. The
            # decay matters for the pads' own rows too: with real decays, a pad far from every
            # real token would see them all through an underflowed mask (0 / 0 = NaN).
            keep = key_mask[:, None, :].to(q.dtype)  # [B, 1, L]
            k = k * keep[..., None]
            if log_decay is not None:
                B, H, L = q.shape[:3]
                log_decay = log_decay.expand(B, H, L) if log_decay.dim() == 3 else log_decay[None, :, None].expand(B, H, L)
                log_decay = log_decay * keep
        # the decays are logsigmoids (times 0/1 masks): valid by construction, so the kernels need
        # not read them on the host (a wait for the GPU per call, and a graph break when compiled)
        run = dict(causal=self.causal, impl=form, chunk_size=self.chunk_size, check_values=False)
        if self.orders is None:
            return lion_attention(q, k, v, log_decay, **run)
        if self.orders.shape[1] != q.shape[2]:
            raise ValueError(f"orders were built for L={self.orders.shape[1]} tokens, got L={q.shape[2]}")
        # Sum [numerator, normaliser] over the orders, then divide once.
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        total = 0
        for perm in self.orders:
            inv = torch.argsort(perm)
            ld = log_decay[:, :, perm] if log_decay is not None and log_decay.dim() == 3 else log_decay
            out = lion_attention(q[:, :, perm], k[:, :, perm], v1[:, :, perm], ld, normalize=False, **run)
            total = total + out[:, :, inv]
        return total[..., :-1] / total[..., -1:]


class SoftmaxAttention(_MultiHeadMixer):
    """Multi-head softmax attention with the projections of :class:`LionAttention`.

    ``x: [B, L, dim] -> [B, L, dim]`` through ``torch.nn.functional.scaled_dot_product_attention``
    (scale ``1/sqrt(D)``). ``form`` exists for a uniform interface and accepts only ``None``
    or ``"attention"``: softmax attention has no recurrent or chunkwise form.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False):
        super().__init__(dim, num_heads)
        self.causal = causal

    def _mix(self, q, k, v, x, key_mask, form, extra):
        if form not in (None, "attention"):
            raise ValueError(f"softmax attention has only the attention form, got form={form!r}")
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if mask is not None and self.causal:
            L = q.shape[2]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)


MIXERS = ("lion", "softmax")


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: ``x = x + mixer(LN(x))``, then ``x = x + MLP(LN(x))``.

    ``x: [B, L, dim] -> [B, L, dim]``. ``mixer="lion"`` uses :class:`LionAttention` (extra
    keyword arguments such as ``variant``, ``impl``, ``chunk_size``, ``orders`` go to it);
    ``mixer="softmax"`` uses :class:`SoftmaxAttention`. The MLP is
    ``Linear(dim, mlp_ratio * dim) -> GELU -> Linear(mlp_ratio * dim, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, mixer: str = "lion", mlp_ratio: float = 2.0, dropout: float = 0.0,
                 **mixer_kwargs):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {', '.join(map(repr, MIXERS))}; got {mixer!r}")
        if mixer == "softmax" and set(mixer_kwargs) - {"causal"}:
            raise ValueError(f"softmax attention takes no {sorted(set(mixer_kwargs) - {'causal'})}")
        hidden = int(round(mlp_ratio * dim))
        if hidden < 1:
            raise ValueError(f"mlp_ratio * dim must be >= 1, got mlp_ratio={mlp_ratio}, dim={dim}")
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = (LionAttention if mixer == "lion" else SoftmaxAttention)(dim, num_heads, **mixer_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, form: str | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), form=form, key_mask=key_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class SequenceClassifier(nn.Module):
    """A small encoder that maps a sequence to class logits ``[B, num_classes]``.

    Input: token ids ``[B, L]`` (give ``vocab_size``; ``nn.Embedding``) or feature vectors
    ``[B, L, in_features]`` (give ``in_features``; a linear patch projection). Then an
    optional learned positional embedding (``max_len`` positions, counting the class token),
    ``depth`` :class:`EncoderBlock` s, a final LayerNorm, pooling and a linear head.

    ``pool="mean"`` averages the real tokens (those with ``mask`` True); ``pool="cls"``
    prepends a learned class token at position 0 and reads it out. ``forward(x, mask=None,
    form=None)``: ``mask`` is ``[B, L]`` bool (True for real tokens, False for padding);
    ``form`` is passed to every LION layer. Other keyword arguments (``mixer``, ``variant``,
    ``impl``, ``chunk_size``, ``orders``, ``causal``) go to the blocks.
    """

    def __init__(self, num_classes: int, dim: int = 32, depth: int = 1, num_heads: int = 2, *,
                 vocab_size: int | None = None, in_features: int | None = None, max_len: int | None = None,
                 pool: str = "mean", mlp_ratio: float = 2.0, dropout: float = 0.0, **block_kwargs):
        super().__init__()
        if (vocab_size is None) == (in_features is None):
            raise ValueError("give exactly one of vocab_size (token ids) and in_features (feature vectors)")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.pool = pool
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size is not None else nn.Linear(in_features, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02) if max_len is not None else None
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, **block_kwargs) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, form: str | None = None) -> torch.Tensor:
        h = self.embed(x)  # [B, L, dim]
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
            if mask is not None:
                mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        if self.pos is not None:
            if h.shape[1] > self.pos.shape[1]:
                raise ValueError(f"sequence of {h.shape[1]} tokens is longer than max_len={self.pos.shape[1]}")
            h = h + self.pos[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h, form=form, key_mask=mask)
        h = self.norm(h)
        if self.pool == "cls":
            return self.head(h[:, 0])
        if mask is None:
            return self.head(h.mean(dim=1))
        w = mask.to(h.dtype)[..., None]
        return self.head((h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0))
