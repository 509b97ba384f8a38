"""The fused feature maps (lionedu.kernels.feature_maps) against lionedu.features in float64."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lionedu import features
from lionedu.kernels import feature_maps
from lionedu.kernels.feature_maps import ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU, feature_map, fused_feature_map
from devices import KERNEL_DEVICE as DEVICE

REFERENCE = {ELU_PLUS_ONE: features.elu_plus_one, NORMALIZED_SHIFTED_SILU: features.normalized_shifted_silu}
LAYOUTS = ("contiguous", "heads split by a transpose", "every other feature")


def _input(B, H, L, D, layout, seed, dtype=torch.float32, device=DEVICE):
    """``x [B, H, L, D]`` in one of three layouts: contiguous; a transposed view of ``[B, L, H, D]``
    (how LionAttention splits its heads); a view that skips every other feature (last stride 2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = 3 * torch.randn(B, L, H, 2 * D if layout == "every other feature" else D, generator=gen,
                           device=device, dtype=torch.float64).to(dtype)
    if layout == "every other feature":
        base = base[..., ::2]
    x = base.transpose(1, 2)
    if layout == "contiguous":
        x = x.contiguous()
    assert x.stride(-1) == (2 if layout == "every other feature" else 1) or D == 1
    return x


def _errors(x, kind, seed):
    """Relative errors of the fused map's value and input gradient against float64."""
    grad = torch.randn(x.shape, generator=torch.Generator(device=x.device).manual_seed(seed + 1), device=x.device,
                       dtype=torch.float64)
    x64 = x.detach().double().requires_grad_()
    ref = REFERENCE[kind](x64)
    (dref,) = torch.autograd.grad(ref, x64, grad)
    xk = x.detach().requires_grad_()  # a view with x's strides (clone would make a strided x contiguous)
    out = feature_map(xk, kind)
    assert xk.stride() == x.stride()
    (dx,) = torch.autograd.grad(out, xk, grad.to(x.dtype))
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert dx.shape == x.shape and dx.dtype == x.dtype
    # Relative to the reference. With D = 1 the normalised map is the constant 1 and its exact
    # gradient 0, where float32 leaves ~1e-7 of the incoming gradient: relative to that there.
    dscale = dref.norm() if x.shape[-1] > 1 or kind == ELU_PLUS_ONE else grad.norm()
    return (float((out.detach().double() - ref).norm() / ref.norm()),
            float((dx.double() - dref).norm() / dscale.clamp_min(1e-30)))


@settings(deadline=None, max_examples=30)
@given(B=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 40), D=st.integers(1, 70),
       layout=st.sampled_from(LAYOUTS), kind=st.sampled_from([ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU]),
       seed=st.integers(0, 2**31 - 1))
def test_fused_feature_map_matches_the_definition(B, H, L, D, layout, kind, seed):
    """Values and gradients as lionedu.features, in float32 against float64, for odd shapes
    (one token, head dims that are not powers of two, rows spread over several programs) and
    three memory layouts. The worst errors seen over 600 such draws on an H200 were 1.1e-7
    (value) and 2.4e-7 (gradient), as on the CPU (results/NOTES.md, correctness records)."""
    x = _input(B, H, L, D, layout, seed)
    value_error, grad_error = _errors(x, kind, seed)
    assert value_error < 1e-6 and grad_error < 1e-6


def test_gradient_keeps_the_inputs_layout():
    """The gradient of a transposed view comes back in the same memory order: the projection
    that made the view receives it without a copy."""
    x = _input(2, 3, 5, 8, "heads split by a transpose", 0).requires_grad_()
    feature_map(x, NORMALIZED_SHIFTED_SILU).sum().backward()
    assert x.grad.stride() == x.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("kind", [ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU])
def test_fused_feature_map_on_the_gpu(dtype, tolerance, kind):
    """16-bit inputs: one rounding of the float32 result (relative error about the dtype's epsilon)."""
    x = _input(2, 16, 333, 64, "heads split by a transpose", 7, dtype=dtype, device="cuda")
    value_error, grad_error = _errors(x, kind, 7)
    assert value_error < tolerance and grad_error < 2 * tolerance


def test_layer_uses_the_fused_map_on_the_kernels_path(monkeypatch):
    """LionAttention's Triton form runs its feature map through the fused kernels (and its
    other forms through lionedu.features), with the same result as the attention form."""
    from lionedu.nn import LionAttention

    calls = []
    fused = feature_maps.feature_map

    def spy(x, kind):
        calls.append(kind)
        return fused(x, kind)

    monkeypatch.setattr(feature_maps, "feature_map", spy)
    torch.manual_seed(0)
    for variant, kind in (("lit", ELU_PLUS_ONE), ("s", NORMALIZED_SHIFTED_SILU)):
        layer = LionAttention(24, 2, variant, chunk_size=16).to(DEVICE)
        x = torch.randn(2, 21, 24, device=DEVICE)
        calls.clear()
        y = layer(x, form="triton")
        assert calls == [kind, kind]  # q and k
        calls.clear()
        ref = layer(x, form="attention")
        assert calls == [] and (y - ref).abs().max() < 1e-4


def test_other_functions_have_no_fused_version():
    assert fused_feature_map(features.normalized_shifted_silu) is not None
    assert fused_feature_map(torch.relu) is None


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"x must be a tensor of shape \[B, H, L, D\], got list"):
        feature_map([[1.0]], ELU_PLUS_ONE)
    with pytest.raises(ValueError, match=r"x must have shape \[B, H, L, D\], got \[2, 3, 4\]"):
        feature_map(torch.zeros(2, 3, 4), ELU_PLUS_ONE)
    with pytest.raises(ValueError, match="head dim D must be at most 256 for the Triton kernels, got 257"):
        feature_map(torch.zeros(1, 1, 2, 257), ELU_PLUS_ONE)
    for kind in (5, True):
        with pytest.raises(ValueError, match="kind must be"):
            feature_map(torch.zeros(1, 1, 2, 4), kind)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        feature_map(torch.zeros(1, 1, 2, 4, dtype=torch.float64), ELU_PLUS_ONE)


def test_empty_input():
    x = torch.zeros(1, 2, 0, 4, device=DEVICE, requires_grad=True)
    assert feature_map(x, NORMALIZED_SHIFTED_SILU).shape == (1, 2, 0, 4)
