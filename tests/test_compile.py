"""The kernels under ``torch.compile``: the custom operators of :mod:`lionedu.kernels.compiled`.

``torch.compile`` calls them instead of the ``autograd.Function``; their fake implementations
must give the shapes and dtypes the real ones give, their autograd registration the same
gradients. Runs on the CPU through Triton's interpreter (``aot_eager``: the graph is traced
with fake tensors, then run with PyTorch's eager kernels and these operators), and on a GPU
with inductor.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lionedu
from lionedu.kernels import compiled
from devices import KERNEL_DEVICE as DEVICE

BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def make_inputs(B, H, L, D, Dv, variant, seed, dtype=torch.float32):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k = (torch.rand(B, H, L, D, generator=gen, device=DEVICE).to(dtype) + 0.05 for _ in range(2))
    v = (2 * torch.rand(B, H, L, Dv, generator=gen, device=DEVICE) - 1).to(dtype)
    log_decay = {"lit": None,
                 "d": -torch.rand(H, generator=gen, device=DEVICE) - 1e-3,
                 "s": -torch.rand(B, H, L, generator=gen, device=DEVICE) * 2}[variant]
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, log_decay)]


def outputs_and_gradients(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


@settings(max_examples=6, deadline=None)
@given(L=st.integers(1, 70), D=st.sampled_from([5, 16, 24]), Dv=st.sampled_from([3, 16, 20]),
       variant=st.sampled_from(["lit", "d", "s"]), causal=st.booleans(), normalize=st.booleans(),
       chunk_size=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
def test_compiled_matches_eager(L, D, Dv, variant, causal, normalize, chunk_size, seed):
    """A compiled call (whole graph, no breaks) gives the eager call's output and gradients:
    the same kernels, so bit for bit."""
    torch._dynamo.reset()
    inputs = make_inputs(2, 2, L, D, Dv, variant, seed)

    def layer(q, k, v, log_decay):
        return lionedu.kernels.chunkwise(q, k, v, log_decay, causal=causal, normalize=normalize,
                                         chunk_size=chunk_size, check_values=False)

    dy = torch.randn(2, 2, L, Dv, generator=torch.Generator(device=DEVICE).manual_seed(seed + 1), device=DEVICE)
    eager = outputs_and_gradients(layer, inputs, dy)
    got = outputs_and_gradients(torch.compile(layer, backend=BACKEND, fullgraph=True), inputs, dy)
    for a, b in zip(got, eager):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["lit", "d", "s"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_operators_pass_opcheck(variant, causal, layout):
    """PyTorch's own checks of a custom operator: schema, fake implementation against the real
    one (shapes, dtypes and strides, also for inputs that are transposed views, as a layer's
    projections give), autograd registration, tracing (torch.library.opcheck)."""
    q, k, v, log_decay = make_inputs(2, 2, 37, 12, 20, variant, seed=3)  # B > 1: LION-D's g has H entries, not B * H
    if layout == "transposed":  # [B, H, L, D] views of [B, L, H, D] memory
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    args = (q, k, v, log_decay, causal, True, 16, 16 if DEVICE == "cpu" else 64)
    torch.library.opcheck(torch.ops.lionedu.chunkwise_forward.default, args)
    y, g, den, S, z, yc, shift = torch.ops.lionedu.chunkwise_forward(*(a.detach() if torch.is_tensor(a) else a
                                                                       for a in args))
    dy = torch.randn_like(y)
    centred = shift.numel() > 0  # normalised (kernels/centring.py): the backward reads the centred output
    backward_args = (dy, q.detach(), k.detach(), v.detach(), g, yc if centred else y, den, S, z, shift,
                     None if log_decay is None else log_decay.dtype, causal, True, 16, args[-1], True)
    torch.library.opcheck(torch.ops.lionedu.chunkwise_backward.default, backward_args)


@settings(max_examples=4, deadline=None)
@given(L=st.integers(1, 70), Dv=st.sampled_from([3, 16, 20]), variant=st.sampled_from(["lit", "d", "s"]),
       causal=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_compiled_forward_without_gradients(L, Dv, variant, causal, normalize, seed):
    """Compiled under ``torch.no_grad()`` the call is the forward alone (kernels/inference.py), one
    operator that passes PyTorch's checks, and gives the eager call's output bit for bit."""
    torch._dynamo.reset()
    q, k, v, log_decay = (t.detach() if t is not None else None for t in make_inputs(1, 2, L, 5, Dv, variant, seed))

    def layer(q, k, v, log_decay):
        return lionedu.kernels.chunkwise(q, k, v, log_decay, causal=causal, normalize=normalize, chunk_size=16,
                                         check_values=False)

    with torch.no_grad():
        eager = layer(q, k, v, log_decay)
        got = torch.compile(layer, backend=BACKEND, fullgraph=True)(q, k, v, log_decay)
    assert got.shape == eager.shape and got.grad_fn is None
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    args = (q, k, v, log_decay, causal, normalize, 16, 16 if lionedu.kernels.interpreted() else 64)
    torch.library.opcheck(torch.ops.lionedu.chunkwise_inference.default, args)


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_graph_holds_the_operator_its_grad_mode_asks_for(grad):
    """Traced without gradients the graph holds the forward-alone operator and not the training
    forward; with gradients, the reverse (a backend that records the traced graph's operators)."""
    torch._dynamo.reset()
    q, k, v, log_decay = make_inputs(1, 2, 20, 8, 8, "s", seed=2)
    seen = []

    def recording(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    def layer(q, k, v, log_decay):
        return lionedu.kernels.chunkwise(q, k, v, log_decay, chunk_size=16, check_values=False)

    with torch.set_grad_enabled(grad):
        torch.compile(layer, backend=recording, fullgraph=True)(q, k, v, log_decay)
    names = " ".join(seen)
    assert ("chunkwise_forward" in names) == grad and ("chunkwise_inference" in names) == (not grad)


def test_eager_calls_keep_the_autograd_function():
    """Outside torch.compile a call stays one autograd.Function node (the cheaper host path)."""
    q, k, v, log_decay = make_inputs(1, 1, 20, 16, 16, "s", seed=0)
    y = lionedu.kernels.chunkwise(q, k, v, log_decay)
    assert type(y.grad_fn).__name__ == "ChunkwiseAttentionBackward"
    assert compiled.chunkwise_op(q, k, v, log_decay, False, True, 64, 16).grad_fn is not None


def test_lion_attention_check_values_switch():
    """lion_attention checks the decays' values on the Triton path unless told not to."""
    q, k, v, _ = make_inputs(1, 2, 20, 16, 16, "lit", seed=1)
    positive = torch.full((2,), 0.5, device=DEVICE)
    with pytest.raises(ValueError, match="log_decay"):
        lionedu.lion_attention(q, k, v, positive, impl="triton", chunk_size=16)
    lionedu.lion_attention(q, k, v, positive, impl="triton", chunk_size=16, check_values=False)  # not read


def test_lion_layer_compiles_into_one_graph():
    """LionAttention (Triton path, decays valid by construction, so no host read) compiles with
    fullgraph=True and gives the eager layer's output and parameter gradients."""
    from lionedu.nn import LionAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LionAttention(32, 2, variant="s", impl="triton", chunk_size=16).to(DEVICE)
    x = torch.randn(2, 37, 32, device=DEVICE)

    def run(module):
        layer.zero_grad()
        y = module(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in layer.parameters()]

    eager = run(layer)
    compiled = run(torch.compile(layer, backend=BACKEND, fullgraph=True))
    # aot_eager runs the layer's own operations with PyTorch's eager kernels (a split graph can
    # round a sum differently: float32 ulps); inductor fuses them into kernels of its own,
    # whose float32 reductions may be ordered differently again
    tol = dict(rtol=1e-6, atol=1e-6) if BACKEND == "aot_eager" else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tol)
