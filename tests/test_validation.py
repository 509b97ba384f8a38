"""Bad input gets a clear ValueError or TypeError naming the argument."""
import pytest
import torch

import lionedu
from lionedu import naive, vectorized

FUNCTIONS = {
    "naive.attention": naive.attention,
    "naive.recurrent": naive.recurrent,
    "naive.chunkwise": naive.chunkwise,
    "vectorized.attention": vectorized.attention,
    "vectorized.recurrent": vectorized.recurrent,
    "vectorized.chunkwise": vectorized.chunkwise,
    "lion_attention": lionedu.lion_attention,
    "kernels.chunkwise": lambda *a, **kw: lionedu.kernels.chunkwise(*a, **kw),
}
CHUNKED = {"naive.chunkwise", "vectorized.chunkwise", "lion_attention", "kernels.chunkwise"}
B, H, L, D, DV = 2, 3, 5, 4, 6


def good():
    return dict(q=torch.rand(B, H, L, D), k=torch.rand(B, H, L, D), v=torch.rand(B, H, L, DV),
                log_decay=-torch.rand(B, H, L))


def _bad(**changes):
    args = good()
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


CASES = [
    # (id, arguments, exception type, words the message must contain)
    ("q rank 3", _bad(q=torch.rand(B, L, D)), ValueError, ["q", "[B, H, L, D]", f"[{B}, {L}, {D}]"]),
    ("k other D", _bad(k=torch.rand(B, H, L, D + 1)), ValueError, ["k", f"[{B}, {H}, {L}, {D}]", f"{D + 1}"]),
    ("k other L", _bad(k=torch.rand(B, H, L + 1, D)), ValueError, ["k", f"{L + 1}"]),
    ("v other H", _bad(v=torch.rand(B, H + 1, L, DV)), ValueError, ["v", "[B, H, L, Dv]", f"{H + 1}"]),
    ("v other B", _bad(v=torch.rand(B + 1, H, L, DV)), ValueError, ["v", f"{B + 1}"]),
    ("v rank 3", _bad(v=torch.rand(B, H, L)), ValueError, ["v", "[B, H, L, Dv]"]),
    ("decay other shape", _bad(log_decay=-torch.rand(H, L)), ValueError, ["log_decay", f"[{H}]", f"[{B}, {H}, {L}]", f"[{H}, {L}]"]),
    ("decay other batch", _bad(log_decay=-torch.rand(B + 1, H, L)), ValueError, ["log_decay", f"[{B + 1}, {H}, {L}]"]),
    ("decay other heads", _bad(log_decay=-torch.rand(H + 1)), ValueError, ["log_decay", f"[{H + 1}]"]),
    ("decay positive", _bad(log_decay=torch.full((B, H, L), 0.5)), ValueError, ["log_decay", "<= 0", "0.5"]),
    ("decay nan", _bad(log_decay=torch.full((H,), float("nan"))), ValueError, ["log_decay", "NaN"]),
    ("decay -inf", _bad(log_decay=torch.full((H,), float("-inf"))), ValueError, ["log_decay", "finite"]),
    ("decay int", _bad(log_decay=torch.zeros(H, dtype=torch.int64)), TypeError, ["log_decay", "int64"]),
    ("q int", _bad(q=torch.ones(B, H, L, D, dtype=torch.int32)), TypeError, ["q", "int32"]),
    ("v int", _bad(v=torch.ones(B, H, L, DV, dtype=torch.int64)), TypeError, ["v", "int64"]),
    ("k list", _bad(k=[[1.0]]), TypeError, ["k", "list"]),
    ("mixed dtypes", _bad(v=lambda a: a["v"].double()), TypeError, ["q", "v", "float64"]),
    ("k on meta", _bad(k=lambda a: a["k"].to("meta")), ValueError, ["k", "meta", "device"]),
    ("decay on meta", _bad(log_decay=lambda a: a["log_decay"].to("meta")), ValueError, ["log_decay", "meta"]),
    ("empty L", _bad(q=torch.rand(B, H, 0, D), k=torch.rand(B, H, 0, D), v=torch.rand(B, H, 0, DV),
                     log_decay=None), ValueError, ["empty"]),
]


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(name, case):
    _, args, exc, words = case
    if name == "kernels.chunkwise" and torch.cuda.is_available():  # without a GPU: the interpreter, on the CPU
        args = {key: t.cuda() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t for key, t in args.items()}
    with pytest.raises(exc) as info:
        FUNCTIONS[name](args["q"], args["k"], args["v"], args["log_decay"])
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("name", sorted(CHUNKED))
@pytest.mark.parametrize("chunk_size,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("8", TypeError), (True, TypeError)])
def test_bad_chunk_size(name, chunk_size, exc):
    a = good()
    with pytest.raises(exc, match="chunk_size"):
        FUNCTIONS[name](a["q"], a["k"], a["v"], a["log_decay"], chunk_size=chunk_size)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bad_flags(name):
    a = good()
    with pytest.raises(TypeError, match="causal"):
        FUNCTIONS[name](a["q"], a["k"], a["v"], causal="yes")
    with pytest.raises(TypeError, match="normalize"):
        FUNCTIONS[name](a["q"], a["k"], a["v"], normalize=1)


def test_unknown_impl():
    a = good()
    with pytest.raises(ValueError, match="impl.*'fast'") as info:
        lionedu.lion_attention(a["q"], a["k"], a["v"], impl="fast")
    assert "'chunkwise'" in str(info.value)


def test_gate_helpers_check_shapes():
    from lionedu import features

    with pytest.raises(ValueError, match="a must have shape"):
        features.fixed_log_decay(torch.rand(2, 2))
    with pytest.raises(ValueError, match="weight"):
        features.selective_log_decay(torch.rand(2, 5, 4), torch.rand(3, 5), torch.rand(3))
    with pytest.raises(ValueError, match="bias"):
        features.selective_log_decay(torch.rand(2, 5, 4), torch.rand(3, 4), torch.rand(2))
