"""The primer kernels of chapter 5 (lionedu.kernels.primer) against PyTorch.

Without a CUDA GPU the kernels run through Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton. Inputs are fresh random float32 tensors
of small, odd sizes (not multiples of the block, so every mask is exercised).

Tolerances. vector_add: float32 addition is correctly rounded on both sides, so the result
must be identical. matmul and masked_attention_block use IEEE float32 products with float32
accumulation; a sum of K products carries an error of at most about K unit round-offs
(2^-24 each) of the sum of the magnitudes of its terms, so we check, element by element,
|got - exact| <= 1e-5 * (sum of |terms|) + 1e-7, with `exact` computed in float64 from the
same float32 inputs (K <= 70, so K * 2^-24 < 5e-6). The decay mask adds the rounding of
exp and of the running sum of at most 40 log decays in [-1, 0], well inside that bound.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lionedu import vectorized
from lionedu.kernels import primer
from devices import KERNEL_DEVICE as DEVICE

SETTINGS = settings(max_examples=30, deadline=None)


def _rand(gen, *shape, positive=False):
    t = torch.rand(*shape, generator=gen, dtype=torch.float32) if positive else torch.randn(*shape, generator=gen)
    return t.to(DEVICE)


def _within(got, exact, scale, rtol=1e-5, atol=1e-7):
    """|got - exact| <= rtol * scale + atol elementwise (scale: sum of |terms|)."""
    return bool(((got.double() - exact).abs() <= rtol * scale + atol).all())


@SETTINGS
@given(n=st.integers(1, 600), cols=st.sampled_from([1, 3]), block=st.sampled_from([16, 32, 128, 256]),
       seed=st.integers(0, 2**31 - 1))
def test_vector_add(n, cols, block, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = _rand(gen, n, cols), _rand(gen, n, cols)
    out = primer.vector_add(x, y, block_size=block)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out, x + y)


@SETTINGS
@given(M=st.integers(1, 70), N=st.integers(1, 70), K=st.integers(1, 70),
       blocks=st.tuples(*[st.sampled_from([16, 32])] * 3), transposed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matmul(M, N, K, blocks, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand(gen, M, K), _rand(gen, K, N)
    if transposed:  # same values, column-major storage: the kernel must follow the strides
        a = a.t().contiguous().t()
    bm, bn, bk = blocks
    c = primer.matmul(a, b, block_m=bm, block_n=bn, block_k=bk)
    assert c.shape == (M, N) and c.dtype == torch.float32
    exact = a.double() @ b.double()
    assert _within(c, exact, a.double().abs() @ b.double().abs())


@SETTINGS
@given(C=st.integers(1, 40), D=st.integers(1, 20), Dv=st.integers(1, 20), decay=st.booleans(),
       causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_masked_attention_block(C, D, Dv, decay, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _rand(gen, C, D), _rand(gen, C, D), _rand(gen, C, Dv)
    log_decay = None
    if decay:  # in [-1, 0], about one in five exactly 0 (decay 1)
        log_decay = -_rand(gen, C, positive=True) * (_rand(gen, C, positive=True) > 0.2)
    y = primer.masked_attention_block(q, k, v, log_decay, causal=causal)
    assert y.shape == (C, Dv) and y.dtype == torch.float32

    def reference(q_, k_, v_):
        ld = None if log_decay is None else log_decay.double()[None, None]
        return vectorized.attention(q_[None, None], k_[None, None], v_[None, None], ld,
                                    causal=causal, normalize=False)[0, 0]

    q64, k64, v64 = q.double(), k.double(), v.double()
    exact = reference(q64, k64, v64)
    scale = reference(q64.abs(), k64.abs(), v64.abs())  # same mask, every term made positive
    assert _within(y, exact, scale)


def test_masked_attention_block_decay_one_is_no_decay():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _rand(gen, 17, 5), _rand(gen, 17, 5), _rand(gen, 17, 3)
    zeros = torch.zeros(17, device=DEVICE)
    assert torch.equal(primer.masked_attention_block(q, k, v, zeros), primer.masked_attention_block(q, k, v, None))


def _t(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device=DEVICE)


BAD = [
    # (call, exception, fragment of the message)
    (lambda: primer.vector_add([1.0], _t(1)), TypeError, "x must be a torch.Tensor"),
    (lambda: primer.vector_add(_t(3), _t(4)), ValueError, "y must have the shape of x"),
    (lambda: primer.vector_add(_t(3), _t(3, dtype=torch.float64)), TypeError, "y"),
    (lambda: primer.vector_add(_t(3, dtype=torch.int32), _t(3, dtype=torch.int32)), TypeError, "x"),
    (lambda: primer.vector_add(_t(3), _t(3), block_size=48), ValueError, "block_size"),
    (lambda: primer.vector_add(_t(3), _t(3), block_size=16.0), TypeError, "block_size"),
    (lambda: primer.matmul(_t(3), _t(3, 3)), ValueError, "a must have 2 dimension"),
    (lambda: primer.matmul(_t(3, 4), _t(5, 2)), ValueError, "b must have shape [K, N] with K = 4"),
    (lambda: primer.matmul(_t(3, 4), _t(4, 2), block_m=8), ValueError, "block_m"),
    (lambda: primer.matmul(_t(3, 4), _t(4, 2), block_k=24), ValueError, "block_k"),
    (lambda: primer.matmul(_t(3, 4), _t(4, 2), precision="fast"), ValueError, "precision"),
    (lambda: primer.matmul(_t(3, 4), _t(4, 2, dtype=torch.float64)), TypeError, "b"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 3), _t(4, 2), None), ValueError, "k must have the shape of q"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 2), _t(5, 2), None), ValueError, "v must have shape [C, Dv]"),
    (lambda: primer.masked_attention_block(_t(1, 4, 2), _t(4, 2), _t(4, 2), None), ValueError, "q must have 2"),
    (lambda: primer.masked_attention_block(_t(200, 2), _t(200, 2), _t(200, 2), None), ValueError, "128"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 2), _t(4, 2), -_t(5)), ValueError, "log_decay must have shape [C] = [4]"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 2), _t(4, 2), _t(4)), ValueError, "log_decay must be <= 0"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 2), _t(4, 2), -_t(4) * float("inf")), ValueError, "finite"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 2), _t(4, 2), [0.0] * 4), TypeError, "log_decay"),
    (lambda: primer.masked_attention_block(_t(4, 2), _t(4, 2), _t(4, 2), None, causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("call, exc, fragment", BAD, ids=range(len(BAD)))
def test_bad_inputs(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    # Pretend triton was imported without TRITON_INTERPRET=1: CPU tensors cannot run.
    monkeypatch.setattr(primer, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        primer.vector_add(torch.ones(3), torch.ones(3))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter runs only where there is no CUDA GPU here")
def test_interpreter_is_float32_only():
    assert primer.interpreted()
    with pytest.raises(TypeError, match="float32 under Triton's interpreter"):
        primer.matmul(torch.ones(4, 4, dtype=torch.bfloat16), torch.ones(4, 4, dtype=torch.bfloat16))
