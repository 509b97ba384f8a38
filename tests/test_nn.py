"""lionedu.nn: shapes, gradients of every parameter, form equivalence, bad arguments."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lionedu import lion_attention
from lionedu.data import image_orders
from lionedu.masks import decay_mask, per_token_log_decay
from lionedu.nn import VARIANTS, EncoderBlock, LionAttention, SequenceClassifier, SoftmaxAttention
from devices import KERNEL_DEVICE as DEVICE

FORMS64 = ("attention", "recurrent", "chunkwise")


def _kernels_reason():
    """``None`` when ``lionedu.kernels.chunkwise`` can be used, else why not."""
    try:
        kernels = importlib.import_module("lionedu.kernels")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"lionedu.kernels cannot be imported ({type(exc).__name__}: {exc})"
    if not hasattr(kernels, "chunkwise"):
        return "lionedu.kernels has no chunkwise yet"
    return None


def _x(B=2, L=11, dim=8, dtype=torch.float64, seed=0):
    return torch.randn(B, L, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_shape_and_dtype(variant, causal):
    layer = LionAttention(8, 2, variant, causal=causal).double()
    y = layer(_x())
    assert y.shape == (2, 11, 8) and y.dtype == torch.float64
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_forms_agree_float64(variant, causal):
    torch.manual_seed(0)
    layer = LionAttention(8, 2, variant, chunk_size=4, causal=causal).double()
    x = _x()
    ref = layer(x, form="attention")
    for form in ("recurrent", "chunkwise", "auto"):
        assert (layer(x, form=form) - ref).abs().max() < 1e-10, form
    small = x[:1, :5]
    with torch.no_grad():  # the naive loops turn tensors into Python floats
        assert (layer(small, form="naive") - layer(small, form="attention")).abs().max() < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_forms_agree_float64_in_a_model(variant):
    torch.manual_seed(0)
    model = SequenceClassifier(3, dim=8, depth=2, num_heads=2, in_features=5, max_len=13, pool="cls",
                               variant=variant, chunk_size=4).double()
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    ref = model(x, form="attention")
    assert ref.shape == (2, 3)
    for form in ("recurrent", "chunkwise"):
        assert (model(x, form=form) - ref).abs().max() < 1e-10


def _triton_layer_and_input(variant):
    """A small layer and a 40-token input for the Triton form (skips where it cannot run)."""
    reason = _kernels_reason()
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    return LionAttention(32, 2, variant, chunk_size=16).to(DEVICE), torch.randn(1, 40, 32, device=DEVICE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_form(variant):
    layer, x = _triton_layer_and_input(variant)
    y = layer(x, form="triton")
    assert (y - layer(x, form="attention")).abs().max() < 1e-3
    ordered = LionAttention(32, 2, variant, chunk_size=16, orders=torch.stack([torch.arange(40), torch.arange(40).flip(0)]))
    ordered = ordered.to(x.device)
    assert (ordered(x, form="triton") - ordered(x, form="attention")).abs().max() < 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_form_gradients(variant):
    # The kernels are differentiable in q, k, v and the decays: same gradients as the reference.
    # The layer hands them non-contiguous views (heads split by a transpose) and receives a
    # non-contiguous output gradient, so this also checks that the kernels respect strides.
    layer, x = _triton_layer_and_input(variant)
    grads = {}
    for form in ("triton", "attention"):
        layer.zero_grad()
        layer(x, form=form).square().sum().backward()
        grads[form] = [p.grad.clone() for p in layer.parameters()]
    for g_t, g_a in zip(grads["triton"], grads["attention"]):
        assert (g_t - g_a).abs().max() <= 1e-3 * (1 + g_a.abs().max())


def _nonzero_grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {name: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for name, p in module.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", FORMS64)
def test_every_parameter_gets_a_gradient(variant, form):
    # The LION authors' released vision code built the LION-S gate with torch.tensor(...),
    # which detached it: the gate never trained. This test catches that class of bug.
    torch.manual_seed(0)
    model = SequenceClassifier(4, dim=8, depth=2, num_heads=2, in_features=3, max_len=10, pool="cls",
                               variant=variant, chunk_size=4)
    x = torch.randn(3, 9, 3)
    grads = _nonzero_grads(model, model(x, form=form).square().sum())
    assert all(grads.values()), [n for n, ok in grads.items() if not ok]
    if variant == "d":
        assert "blocks.0.mixer.decay_logit" in grads
    if variant == "s":
        assert "blocks.0.mixer.gate.weight" in grads and "blocks.0.mixer.gate.bias" in grads


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 20), heads=st.integers(1, 3), head_dim=st.sampled_from([1, 3, 4]),
       kind=st.sampled_from([("lion", v) for v in VARIANTS] + [("softmax", None)]), causal=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_projections_match_separate_layers(B, L, heads, head_dim, kind, causal, masked, seed):
    """The input projections as one product (q, k, v and LION-S's gate; the default on a GPU) give the
    separate layers' output and every gradient, in float64."""
    torch.manual_seed(seed)
    mixer, variant = kind
    dim = heads * head_dim
    layer = (LionAttention(dim, heads, variant, causal=causal) if mixer == "lion"
             else SoftmaxAttention(dim, heads, causal=causal)).double()
    x = torch.randn(B, L, dim, dtype=torch.float64, requires_grad=True)
    key_mask = ((torch.rand(B, L) < 0.7) | (torch.arange(L) == 0)) if masked else None  # the first token real
    results = {}
    for fused in (False, True):
        layer.fused_projections = fused
        layer.zero_grad()
        x.grad = None
        y = layer(x, key_mask=key_mask)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        results[fused] = [y.detach(), x.grad, *(p.grad for p in layer.parameters())]
    assert len(results[True]) == 2 + len(list(layer.parameters()))
    for separate, fused in zip(results[False], results[True]):
        assert torch.allclose(separate, fused, rtol=1e-10, atol=1e-12), (separate - fused).abs().max()


def test_fused_projections_by_default_on_a_gpu_only(monkeypatch):
    """Heads of one product (q, k, v and the gate, views of one tensor) on CUDA inputs; on a CPU and
    under torch.compile q, k and v from their own layers, the gate left to log_decay; one product
    wherever forced."""
    layer = LionAttention(8, 2, "s").to(DEVICE)
    x = torch.randn(2, 5, 8, device=DEVICE)

    def widths_and_storages():
        outputs = layer._project(x)
        return [t.shape[-1] for t in outputs], len({t.untyped_storage().data_ptr() for t in outputs})

    separate, fused = ([8, 8, 8], 3), ([8, 8, 8, 2], 1)
    assert widths_and_storages() == (fused if x.is_cuda else separate)
    layer.fused_projections = True
    assert widths_and_storages() == fused
    layer.fused_projections = None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert widths_and_storages() == separate


class _NoDecayLionS(LionAttention):
    """A subclass with decays of its own: log_decay overridden (here, all decays 1)."""

    def log_decay(self, x):
        return torch.zeros(x.shape[0], self.num_heads, x.shape[1], dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_projections_respect_an_overridden_log_decay(fused):
    """A subclass's own log_decay is used with the fused product too: its gate stays out of the
    product (the output is LIT-like attention with the S feature map, no decay at all)."""
    torch.manual_seed(0)
    layer = _NoDecayLionS(8, 2, "s").double()
    layer.fused_projections = fused
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    assert [t.shape[-1] for t in layer._project(x)] == [8, 8, 8]
    q, k, v = (layer._split(p(x)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    expected = lion_attention(layer.feature_map(q), layer.feature_map(k), v, None, impl="attention")
    assert torch.allclose(layer(x), layer.out_proj(expected.transpose(1, 2).reshape(x.shape)), rtol=1e-12, atol=1e-12)


def test_projections_that_cannot_join_the_product_are_called_one_by_one():
    """The product reads weights and biases, not forward: a hooked layer, a Linear subclass or a layer
    without bias keeps the separate calls by default, and forcing the product is refused."""
    x = torch.randn(2, 5, 8, device=DEVICE)
    cases = {"hook": lambda layer: layer.q_proj.register_forward_hook(lambda module, args, out: out * 2),
             "subclass": lambda layer: setattr(layer, "k_proj", type("Scaled", (torch.nn.Linear,), {})(8, 8)),
             "no bias": lambda layer: setattr(layer, "v_proj", torch.nn.Linear(8, 8, bias=False))}
    for name, change in cases.items():
        layer = LionAttention(8, 2, "s")
        change(layer)
        layer.to(DEVICE)
        layer.fused_projections = True
        with pytest.raises(ValueError, match="fused_projections=True needs plain nn.Linear"):
            layer(x)
        layer.fused_projections = None
        assert len(layer._project(x)) == 3, name


def test_softmax_gradients():
    torch.manual_seed(0)
    model = SequenceClassifier(4, dim=8, depth=1, num_heads=2, vocab_size=7, mixer="softmax")
    x = torch.randint(0, 7, (3, 9))
    grads = _nonzero_grads(model, model(x).square().sum())
    # Softmax is invariant to adding one constant to every score of a row, and a key bias b
    # adds q_i . b to all of row i: its gradient is exactly zero (up to rounding).
    del grads["blocks.0.mixer.k_proj.bias"]
    assert all(grads.values()), [n for n, ok in grads.items() if not ok]


def test_causal_and_bidirectional():
    torch.manual_seed(0)
    x = _x(B=1, L=8)
    x2 = x.clone()
    x2[:, -1] += 1.0  # change only the last token
    for variant in VARIANTS:
        causal = LionAttention(8, 2, variant, causal=True).double()
        bidir = LionAttention(8, 2, variant).double()
        bidir.load_state_dict(causal.state_dict())
        assert (causal(x)[:, :-1] - causal(x2)[:, :-1]).abs().max() < 1e-12  # the past cannot see the future
        assert (bidir(x)[:, 0] - bidir(x2)[:, 0]).abs().max() > 1e-6  # bidirectional tokens can
        # Token 0 sees only itself when causal: y_0 = v_0.
        v_only = causal.out_proj(causal._split(causal.v_proj(x))[:, :, :1].transpose(1, 2).reshape(1, 1, 8))
        assert (causal(x)[:, :1] - v_only).abs().max() < 1e-12


def test_layer_matches_explicit_formula():
    torch.manual_seed(0)
    layer = LionAttention(8, 2, "s").double()
    x = _x(B=1, L=6)
    q = layer.feature_map(layer._split(layer.q_proj(x)))
    k = layer.feature_map(layer._split(layer.k_proj(x)))
    v = layer._split(layer.v_proj(x))
    M = decay_mask(layer.log_decay(x))
    A = (q @ k.transpose(-1, -2)) * M
    y = (A @ v) / A.sum(-1, keepdim=True)
    ref = layer.out_proj(y.transpose(1, 2).reshape(1, 6, 8))
    assert (layer(x) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_orders_average_the_masks(variant):
    torch.manual_seed(0)
    orders = image_orders(3, 4)
    layer = LionAttention(8, 2, variant, orders=orders, chunk_size=5).double()
    x = _x(B=2, L=12)
    q = layer.feature_map(layer._split(layer.q_proj(x)))
    k = layer.feature_map(layer._split(layer.k_proj(x)))
    v = layer._split(layer.v_proj(x))
    l = per_token_log_decay(layer.log_decay(x), 2, 2, 12, dtype=x.dtype, device=x.device)
    masks = []
    for perm in orders:
        inv = torch.argsort(perm)
        masks.append(decay_mask(l[:, :, perm])[:, :, inv][:, :, :, inv])  # back to raster positions
    A = (q @ k.transpose(-1, -2)) * (masks[0] + masks[1]) / 2
    ref = layer.out_proj(((A @ v) / A.sum(-1, keepdim=True)).transpose(1, 2).reshape(2, 12, 8))
    for form in FORMS64:
        assert (layer(x, form=form) - ref).abs().max() < 1e-10, form
    plain = LionAttention(8, 2, variant).double()
    plain.load_state_dict(layer.state_dict())
    gap = (plain(x) - layer(x)).abs().max()
    # LIT's masks are all ones, so the order changes nothing; with decays it does.
    assert gap < 1e-12 if variant == "lit" else gap > 1e-6


def test_orders_with_a_single_identity_order_change_nothing():
    torch.manual_seed(0)
    plain = LionAttention(8, 2, "d").double()
    ordered = LionAttention(8, 2, "d", orders=torch.arange(7)[None]).double()
    ordered.load_state_dict(plain.state_dict())
    x = _x(L=7)
    assert (plain(x) - ordered(x)).abs().max() < 1e-12


@pytest.mark.parametrize("mixer,variant", [("lion", v) for v in VARIANTS] + [("softmax", None)])
def test_padding_is_invisible(mixer, variant):
    torch.manual_seed(0)
    kw = {"variant": variant, "chunk_size": 4} if mixer == "lion" else {}
    model = SequenceClassifier(5, dim=8, depth=2, num_heads=2, vocab_size=9, max_len=12, mixer=mixer, **kw).double()
    ids = torch.randint(1, 9, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = padded != 0
    forms = FORMS64 if mixer == "lion" else (None,)
    for form in forms:
        assert (model(ids, form=form) - model(padded, mask, form=form)).abs().max() < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_interior_padding_is_invisible(variant):
    torch.manual_seed(0)
    model = SequenceClassifier(5, dim=8, depth=2, num_heads=2, vocab_size=9, variant=variant, chunk_size=4).double()
    ids = torch.randint(1, 9, (1, 7))
    padded = torch.cat([ids[:, :3], torch.zeros(1, 4, dtype=torch.long), ids[:, 3:]], dim=1)
    for form in FORMS64:
        assert (model(ids, form=form) - model(padded, padded != 0, form=form)).abs().max() < 1e-10


@pytest.mark.parametrize("variant", ["d", "s"])
def test_long_padding_with_strong_decays_stays_finite(variant):
    # A pad query far from every real token must not see an underflowed mask (0 / 0).
    torch.manual_seed(0)
    model = SequenceClassifier(10, dim=16, depth=1, num_heads=2, vocab_size=9, max_len=64, variant=variant)
    with torch.no_grad():
        param = model.blocks[0].mixer.gate.bias if variant == "s" else model.blocks[0].mixer.decay_logit
        param.fill_(-8.0)  # lambda ~ 3e-4
    ids = torch.zeros(2, 64, dtype=torch.long)
    ids[:, :10] = torch.randint(1, 9, (2, 10))
    for form in ("attention", "chunkwise"):
        model.zero_grad()
        out = model(ids, ids != 0, form=form)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_block_and_model_shapes():
    block = EncoderBlock(16, 4, mixer="lion", variant="s")
    assert block(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    block = EncoderBlock(16, 4, mixer="softmax")
    assert block(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    model = SequenceClassifier(10, dim=16, depth=2, num_heads=4, vocab_size=20, max_len=9, pool="cls")
    assert model(torch.randint(0, 20, (3, 8))).shape == (3, 10)
    model = SequenceClassifier(10, dim=16, depth=1, num_heads=4, in_features=4, mixer="softmax")
    assert model(torch.randn(3, 16, 4)).shape == (3, 10)


def test_same_size_lion_and_softmax():
    lit = SequenceClassifier(10, dim=16, depth=2, num_heads=4, in_features=4, variant="lit")
    soft = SequenceClassifier(10, dim=16, depth=2, num_heads=4, in_features=4, mixer="softmax")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(lit) == count(soft)
    d = SequenceClassifier(10, dim=16, depth=2, num_heads=4, in_features=4, variant="d")
    assert count(d) == count(lit) + 2 * 4  # one decay per head and block


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=10, num_heads=3), "divisible"),
        (dict(dim=0, num_heads=1), "dim"),
        (dict(dim=8, num_heads=0), "num_heads"),
        (dict(dim=8, num_heads=2, variant="x"), "variant"),
        (dict(dim=8, num_heads=2, impl="fast"), "impl"),
        (dict(dim=8, num_heads=2, chunk_size=0), "chunk_size"),
        (dict(dim=8, num_heads=2, orders=torch.tensor([[0, 0, 1]])), "permutation"),
        (dict(dim=8, num_heads=2, orders=torch.arange(3.0)[None]), "orders"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LionAttention(**kwargs)


def test_bad_call_args():
    layer = LionAttention(8, 2)
    with pytest.raises(ValueError, match="form"):
        layer(torch.randn(1, 4, 8), form="fast")
    with pytest.raises(ValueError, match=r"\[B, L, dim\]"):
        layer(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="orders"):
        LionAttention(8, 2, "d", orders=image_orders(2, 2))(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="attention form"):
        SoftmaxAttention(8, 2)(torch.randn(1, 4, 8), form="recurrent")
    with pytest.raises(ValueError, match="mixer"):
        EncoderBlock(8, 2, mixer="conv")
    with pytest.raises(ValueError, match="exactly one"):
        SequenceClassifier(10, dim=8, num_heads=2)
    with pytest.raises(ValueError, match="max_len"):
        SequenceClassifier(10, dim=8, num_heads=2, in_features=2, max_len=3)(torch.randn(1, 4, 2))


def test_layer_agrees_with_lion_attention_default_impl():
    # impl="auto" on CPU is the vectorized chunkwise form of lionedu.lion_attention.
    torch.manual_seed(0)
    layer = LionAttention(8, 2, "d").double()
    x = _x()
    q = layer.feature_map(layer._split(layer.q_proj(x)))
    k = layer.feature_map(layer._split(layer.k_proj(x)))
    v = layer._split(layer.v_proj(x))
    y = lion_attention(q, k, v, layer.log_decay(x))
    assert (layer(x) - layer.out_proj(y.transpose(1, 2).reshape(x.shape))).abs().max() < 1e-12
