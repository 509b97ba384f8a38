"""The kernels' outputs in the caller's layout (lionedu/kernels/layout.py).

An attention layer splits its projections' ``[B, L, H * D]`` into heads with a transpose, so its
values are a view ``[B, H, L, D]`` that is not contiguous. The output is written in the values'
layout and the values' gradient too, and the normaliser's gradient reads ``dy`` where it lies:
the same numbers as from contiguous inputs (the same kernels; only the addresses of the stores
and of ``dy``'s loads differ), and no copy of those tensors.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from lionedu import kernels
from lionedu.kernels import launch
from lionedu.kernels.global_lit import lit_forward
from lionedu.kernels.normaliser import normaliser_gradient
from lionedu.nn import LionAttention
from devices import KERNEL_DEVICE as DEVICE

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter computes in float32
WIDTH = 64 if DEVICE == "cuda" else 16  # a head width the kernels take unpadded


def _heads(B, L, H, D, gen, offset=0.0):
    """``[B, H, L, D]`` as an attention layer has it: a transposed view of ``[B, L, H, D]``."""
    x = torch.rand(B, L, H, D, generator=gen, device=DEVICE) + offset
    return x.to(DTYPE).transpose(1, 2)


@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 70), padded=st.booleans(),
       wide_values=st.booleans(), variant=st.sampled_from(["lit", "d", "s"]), causal=st.booleans(),
       normalize=st.booleans(), half=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_heads_in_the_callers_layout_give_the_same_numbers(B, H, L, padded, wide_values, variant, causal, normalize,
                                                           half, seed):
    """Transposed views in, the output and dv in their layout out (where the value width needs no
    padding; a padded ``Dv`` keeps contiguous results), training and no-grad forwards, every
    gradient, ``Dv != D`` drawn, both 16-bit dtypes on a GPU (normalised float16's forward alone is
    the training forward): equal to the same call on contiguous copies."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dtype = half if DEVICE == "cuda" else DTYPE
    D = WIDTH - 3 if padded else WIDTH  # D != a power of two: zero-padded by the kernels
    Dv = 2 * D if wide_values else D
    q, k = (_heads(B, L, H, D, gen, 0.05).to(dtype) for _ in range(2))
    v = _heads(B, L, H, Dv, gen, -0.5).to(dtype)
    ld = {"lit": None, "d": -0.2 * torch.rand(H, generator=gen, device=DEVICE) - 1e-3,
          "s": -torch.rand(B, H, L, generator=gen, device=DEVICE)}[variant]
    dy = torch.randn(B, L, H, Dv, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)
    opts = dict(causal=causal, normalize=normalize, chunk_size=16)
    strided = [t.detach().clone().requires_grad_() for t in (q, k, v)]  # clone keeps the strides
    flat = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    decays = [None if ld is None else ld.clone().requires_grad_() for _ in range(2)]
    y = kernels.chunkwise(*strided, decays[0], **opts)
    y_flat = kernels.chunkwise(*flat, decays[1], **opts)
    # torch.autograd.grad returns the gradients as the Function made them (a leaf's .grad would be
    # laid out like the leaf whatever the Function returned)
    grads = torch.autograd.grad(y, strided + decays[:1] if ld is not None else strided, dy)
    grads_flat = torch.autograd.grad(y_flat, flat + decays[1:] if ld is not None else flat, dy.contiguous())
    with torch.no_grad():
        alone = kernels.chunkwise(*strided, ld, **opts)
        alone_flat = kernels.chunkwise(*flat, ld, **opts)
    assert strided[2].stride() == v.stride() and (v.is_contiguous() == (H == 1 or L == 1))
    if padded:  # the kernels' outputs are wider than Dv: the results are contiguous copies
        assert y.is_contiguous() and alone.is_contiguous()
    else:
        assert y.stride() == alone.stride() == grads[2].stride() == v.stride()
    assert torch.equal(y, y_flat) and torch.equal(alone, alone_flat)
    for a, b in zip(grads, grads_flat):
        assert torch.equal(a, b)


class _Copies(TorchDispatchMode):
    """Records the shapes of the copies made inside it of tensors of ``size`` elements and at least
    three dimensions (the heads; Triton's interpreter copies its arguments flat)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.shapes = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
            self.shapes += [tuple(a.shape) for a in args[:1]
                            if isinstance(a, torch.Tensor) and a.dim() >= 3 and a.numel() == self.size]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["lit", "s"])
@pytest.mark.parametrize("fused", [False, True])
def test_attention_layer_copies_only_its_values(variant, fused):
    """A LionAttention training step on the kernels copies the heads once, the values into the
    kernels' flat layout: the output goes to the output projection and dv to the value projection
    as views (mutation-checked: contiguous outputs give three more copies), with the projections
    as separate layers or as one product (the heads then slices of a wider tensor)."""
    torch.manual_seed(0)
    B, L, H = 2, 40, 2
    layer = LionAttention(H * WIDTH, H, variant=variant, impl="triton").to(DEVICE, DTYPE)
    layer.fused_projections = fused
    x = torch.randn(B, L, H * WIDTH, device=DEVICE, dtype=DTYPE, requires_grad=True)
    layer(x).square().mean().backward()  # a first step, so that nothing made once is counted
    with _Copies(x.numel()) as copies:
        layer(x).square().mean().backward()
    assert copies.shapes == [(B, H, L, WIDTH)], copies.shapes


def _flat_inputs(BH=3, L=20, W=16):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    return [torch.rand(BH, L, W, generator=gen, device=DEVICE, dtype=DTYPE) + 0.05 for _ in range(3)]


def test_outputs_in_any_layout_of_their_shape():
    """chunk_outputs (out, shifted_out), its twin (out2), the global LIT form and the normaliser's
    gradient: a [B, H, L, W] tensor with last stride 1 in any order of its other dims gets the
    numbers the flat [BH, L, W] one gets."""
    q, k, v = _flat_inputs(BH=6)
    opts = dict(lower=True, upper=True, chunk_size=16)
    states = launch.chunk_states(k, v, None, with_z=True, **opts)
    want, den, _ = launch.chunk_outputs(q, k, v, None, states, with_den=True, normalize=True, **opts)
    layouts = [lambda s: torch.empty(2, 20, 3, 16, **s).transpose(1, 2),  # [B, L, H, W]
               lambda s: torch.empty(20, 2, 3, 16, **s).permute(1, 2, 0, 3),  # [L, B, H, W]
               lambda s: torch.empty(2, 3, 20, 16, **s)]  # contiguous
    like = dict(device=DEVICE, dtype=DTYPE)
    for make in layouts:
        out = make(like)
        got, _, _ = launch.chunk_outputs(q, k, v, None, states, with_den=True, normalize=True, out=out, **opts)
        assert got is out and torch.equal(out.reshape(6, 20, 16), want)
        shift = torch.zeros(6, 16, device=DEVICE)
        shifted = make(like)
        launch.chunk_outputs(q, k, v, None, states, with_den=True, normalize=True, shift=shift, shifted_out=shifted,
                             **opts)
        assert torch.equal(shifted.reshape(6, 20, 16), want)
        twin_states = launch.chunk_states(k, v, None, **opts)
        _, _, twin_want = launch.chunk_outputs_and_twin(q, k, v, None, twin_states, v, **opts)
        out2 = make(like)
        _, _, twin = launch.chunk_outputs_and_twin(q, k, v, None, twin_states, v, out2=out2, **opts)
        assert twin is out2 and torch.equal(out2.reshape(6, 20, 16), twin_want)
        lit = make(like)
        assert torch.equal(lit_forward(q, k, v, True, out=lit).reshape(6, 20, 16), lit_forward(q, k, v, True))
        dy = make(like).copy_(torch.randn(2, 3, 20, 16))
        for got, ref in zip(normaliser_gradient(dy, want, den), normaliser_gradient(dy.contiguous().view(6, 20, 16), want, den)):
            assert torch.equal(got, ref)


def test_outputs_in_a_layout_the_kernels_cannot_write_are_refused():
    """Wrong shapes, a last stride that is not 1, a dtype that is not v's, outputs that disagree
    on H, an output whose elements overlap, a twin and a shifted output in one launch, and an out2
    without a twin: ValueError naming the argument, before any launch."""
    q, k, v = _flat_inputs()
    opts = dict(lower=True, upper=True, chunk_size=16)
    states = launch.chunk_states(k, v, None, with_z=True, **opts)
    like = dict(device=DEVICE, dtype=DTYPE)
    bad = {"wrong shape": torch.empty(3, 21, 16, **like), "wrong B * H": torch.empty(2, 2, 20, 16, **like),
           "last stride": torch.empty(3, 16, 20, **like).transpose(1, 2),
           "dtype": torch.empty(3, 20, 16, device=DEVICE, dtype=torch.float64),
           "flat, not contiguous": torch.empty(20, 3, 16, **like).transpose(0, 1)}
    for why, out in bad.items():
        with pytest.raises(ValueError, match="out must be"):
            launch.chunk_outputs(q, k, v, None, states, out=out, **opts)
        with pytest.raises(ValueError, match="dy must be"):
            normaliser_gradient(out, v, torch.ones(3, 20, device=DEVICE))
        with pytest.raises(ValueError, match="out must be"):
            lit_forward(q, k, v, True, out=out)
    with pytest.raises(ValueError, match="same H"):
        launch.chunk_outputs(q, k, v, None, states, shift=torch.zeros(3, 16, device=DEVICE), with_den=True,
                             normalize=True, out=torch.empty(1, 3, 20, 16, **like),
                             shifted_out=torch.empty(3, 1, 20, 16, **like), **opts)
    with pytest.raises(ValueError, match="must not overlap"):  # two heads' rows at one address
        launch.chunk_outputs(q, k, v, None, states, out=torch.empty(1, 1, 20, 16, **like).expand(3, 1, 20, 16), **opts)
    with pytest.raises(ValueError, match="cannot be asked of one launch"):
        launch._outputs(q, k, v, None, states, v, shift=torch.zeros(3, 16, device=DEVICE), shifted="v",
                        shifted_out=torch.empty(3, 20, 16, **like), **opts)
    with pytest.raises(ValueError, match="out2"):
        launch.chunk_outputs_and_twin(q, k, v, None, states, v, out2=torch.empty(3, 20, 16, device=DEVICE,
                                                                                   dtype=torch.float64), **opts)
    with pytest.raises(ValueError, match="needs q2"):
        launch._outputs(q, k, v, None, states, None, out2=torch.empty(3, 20, 16, **like), **opts)
