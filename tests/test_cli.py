"""The two command-line tools: python -m lionedu.check and python -m lionedu.bench."""
import io
import json
import os
import pathlib
import subprocess
import sys
import types
from unittest import mock

import pytest
import torch
from hypothesis import given, settings

from lionedu import bench, check, vectorized
from reference import rel_err
from strategies import problems


def test_check_command_reports_agreement():
    out = subprocess.run([sys.executable, "-m", "lionedu.check", "--seed", "3", "--length", "9"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all implementations agree" in out.stdout
    assert "seed 3" in out.stdout
    for name in ("naive.attention", "vectorized.chunkwise", "kernels.chunkwise"):
        assert name in out.stdout


def test_check_fails_on_a_wrong_implementation():
    def off_by_diagonal(q, k, v, log_decay=None, *, causal=False, normalize=True):
        # the classic mistake: two causal passes added, diagonal counted twice
        fwd = vectorized.attention(q, k, v, log_decay, causal=True, normalize=False)
        return fwd + (q * k).sum(-1, keepdim=True) * v

    impls = check.implementations("cpu")[3:4] + [check.Impl("wrong", off_by_diagonal, False, torch.float64, 1e-10)]
    buffer = io.StringIO()
    assert check.run(impls, seed=0, out=buffer) is False
    assert "FAIL" in buffer.getvalue() and "DISAGREEMENT" in buffer.getvalue()


def test_bench_floor_counts_bytes():
    # LION-S, bf16: q, k, v read and y written (2 bytes each) plus float32 decays, over 1 TB/s.
    ms = bench.floor_ms("s", 4, 16, 4096, 64, 64, torch.bfloat16, copy_tbps=1.0)
    nbytes = 4 * 16 * 4096 * (4 * 64) * 2 + 4 * 16 * 4096 * 4
    assert ms == pytest.approx(nbytes / 1e12 * 1e3)
    assert bench.floor_ms("lit", 4, 16, 4096, 64, 64, torch.bfloat16, 1.0) < ms


@pytest.mark.parametrize("with_decay", [True, False])
def test_training_step_recomputes_gradients(with_decay):
    """The benchmark's step clears the gradients, so a second step gives the same ones (not twice)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, 2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    ld = -torch.rand(1, 2, 9, generator=gen, dtype=torch.float64) if with_decay else None
    fn = lambda q, k, v, ld, causal: vectorized.chunkwise(q, k, v, ld, causal=causal)  # noqa: E731
    step, leaves = bench.training_step(fn, q, k, v, ld)
    assert len(leaves) == (4 if with_decay else 3) and all(t.requires_grad for t in leaves)
    step()
    first = [t.grad.clone() for t in leaves]
    step()
    assert all(torch.equal(a, t.grad) for a, t in zip(first, leaves))
    assert all(a.abs().sum() > 0 for a in first)


def test_bench_arguments_and_errors():
    args = bench.parse_args(["--lengths", "128,256", "--variants", "s,lit", "--causal", "both", "--dtype", "fp16"])
    assert args.lengths == [128, 256] and args.causal == [False, True] and args.value_dim == 64
    assert not args.cuda_graph and bench.parse_args(["--cuda-graph"]).cuda_graph
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "nope"])
    assert bench.parse_args(["--single-threaded-autograd"]).single_threaded_autograd
    assert not args.single_threaded_autograd
    with pytest.raises(SystemExit):
        bench.parse_args(["--single-threaded-autograd", "--cuda-graph"])


def _row(impl, L, fwd, fwdbwd=None, error=None):
    row = dict(impl=impl, variant="s", causal=False, B=1, H=1, L=L, D=64, Dv=64, dtype="bf16", fwd_ms=fwd,
               fwdbwd_ms=fwdbwd, peak_mib=None if fwdbwd is None else 10.0 * L, fwd_floor_ms=0.001 * L)
    return row if error is None else {**row, "error": error}


def test_bench_table_and_plot_keep_a_forward_without_a_backward(tmp_path):
    """A row whose training step failed keeps its forward time: the table prints it beside the
    error, and the plot draws it in the forward panel and names it in the legend."""
    import matplotlib.pyplot as plt

    result = dict(device="test GPU", torch="t", triton="t", lionedu="t", date="today", copy_tbps=1.0,
                  rows=[_row("lionedu-triton", 1024, 0.1, 0.3), _row("lionedu-triton", 4096, 0.4, 1.2),
                        _row("fla", 1024, 0.2, error="RuntimeError: no backward"),
                        _row("fla", 4096, 0.7, error="RuntimeError: no backward")])
    table = bench.format_table(result)
    fla_lines = [line for line in table.splitlines() if line.split()[0] == "fla"]
    assert len(fla_lines) == 2 and all("no backward" in line for line in fla_lines)
    assert "0.7" in fla_lines[1].split("(")[0]
    bench.plot(result, tmp_path / "plot.png")
    figure = plt.gcf()
    forward_lines = [line.get_label() for line in figure.axes[0].get_lines()]
    assert "fla (s)" in forward_lines and "fla (s)" not in [line.get_label() for line in figure.axes[1].get_lines()]
    assert "fla (s)" in [text.get_text() for text in figure.legends[0].get_texts()]
    plt.close(figure)


@pytest.mark.gpu
def test_bench_keeps_the_forward_when_the_backward_fails(monkeypatch):
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q * 2

        @staticmethod
        def backward(ctx, dy):
            raise RuntimeError("this implementation has no backward")

    monkeypatch.setattr(bench, "implementation", lambda name: lambda q, k, v, ld, causal: NoBackward.apply(v))
    args = bench.parse_args(["--lengths", "256", "--variants", "s", "--causal", "false", "--impls", "sdpa"])
    result = bench.run(args)
    (row,) = result["rows"]
    assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] is None and "no backward" in row["error"]
    assert result["host_cpus"] == bench.host_cpus() >= 1


def test_bench_says_how_many_cpus_an_eager_run_had(monkeypatch):
    """The JSON records the CPUs the process could use; an eager run on one says so in its table."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert bench.host_cpus() == 1
    base = {"device": "GPU", "torch": "t", "triton": "t", "date": "d", "copy_tbps": 1.0, "rows": []}
    assert "eager, one CPU timing" in bench.format_table({**base, "timing": "eager", "host_cpus": 1})
    assert "one CPU" not in bench.format_table({**base, "timing": "eager", "host_cpus": 16})
    assert "one CPU" not in bench.format_table({**base, "timing": "cuda-graph", "host_cpus": 1})
    assert "one CPU" not in bench.format_table(base)  # files written before the count


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["lit", "d", "s"])
def test_bench_sequence_major_inputs_hold_the_same_values(variant):
    """fla is handed ``[B, L, H, .]`` memory: the same values as the default inputs, whose
    transposes to fla's layout need no copy."""
    default = bench.make_inputs(variant, 2, 3, 50, 16, 24, torch.bfloat16, seed=5)
    major = bench.make_inputs(variant, 2, 3, 50, 16, 24, torch.bfloat16, seed=5, sequence_major=True)
    for a, b in zip(default, major):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b) and a.is_contiguous()
        assert b.transpose(1, 2).is_contiguous() if b.dim() >= 3 else b.is_contiguous()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_gpu_says_so():
    out = subprocess.run([sys.executable, "-m", "lionedu.bench"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["lionedu-triton", "sdpa", "sdpa-cudnn"])
def test_bench_times_cuda_graph_replays(impl):
    """--cuda-graph captures forward and forward+backward (no host sync may hide in them)."""
    eager = bench.measure(bench.implementation(impl), "s", False, 2, 4, 512, 64, 64, torch.bfloat16, 5, 20)
    graph = bench.measure(bench.implementation(impl), "s", False, 2, 4, 512, 64, 64, torch.bfloat16, 5, 20,
                          cuda_graph=True)
    assert all(x > 0 for x in eager + graph) and graph[2] == pytest.approx(eager[2], rel=0.2)


def test_bench_sdpa_backends(monkeypatch):
    """`sdpa` asks for flash with 16-bit inputs and for the memory-efficient kernel with float32
    (flash takes no float32); `sdpa-cudnn` always asks for cuDNN."""
    import contextlib

    import torch.nn.attention as attention

    asked = []

    @contextlib.contextmanager
    def record(backend):
        asked.append(backend)
        yield

    monkeypatch.setattr(attention, "sdpa_kernel", record)
    q = torch.rand(1, 2, 5, 4)
    B = attention.SDPBackend
    for name, dtype, expected in (("sdpa", torch.bfloat16, B.FLASH_ATTENTION), ("sdpa", torch.float16, B.FLASH_ATTENTION),
                                  ("sdpa", torch.float32, B.EFFICIENT_ATTENTION),
                                  ("sdpa-cudnn", torch.bfloat16, B.CUDNN_ATTENTION),
                                  ("sdpa-cudnn", torch.float32, B.CUDNN_ATTENTION)):
        x = q.to(dtype)
        assert bench.implementation(name)(x, x, x, None, False).shape == x.shape
        assert asked[-1] == expected, (name, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bench_sdpa_runs_every_dtype(dtype):
    """SDPA's flash backend refuses float32: the benchmark must still time it (memory-efficient kernel)."""
    times = bench.measure(bench.implementation("sdpa"), "s", False, 2, 4, 256, 64, 64, dtype, 2, 5)
    assert all(x > 0 for x in times)


@pytest.mark.gpu
def test_bench_single_threaded_autograd_times_the_calling_thread(monkeypatch):
    """--single-threaded-autograd: the eager backward runs in the thread that calls it."""
    import threading

    threads = []
    fn = bench.implementation("lionedu-triton")

    def spy(q, k, v, ld, causal):
        y = fn(q, k, v, ld, causal)
        if y.requires_grad:  # not in the forward-only timing, which runs under no_grad
            y.register_hook(lambda grad: threads.append(threading.get_ident()))
        return y

    times = bench.measure(spy, "s", False, 2, 4, 512, 64, 64, torch.bfloat16, 5, 20, single_threaded_autograd=True)
    assert all(x > 0 for x in times) and threads[-1] == threading.get_ident()
    bench.measure(spy, "s", False, 2, 4, 512, 64, 64, torch.bfloat16, 5, 20)
    assert threads[-1] != threading.get_ident()  # PyTorch's default: autograd's worker thread for CUDA


RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("bench-*.json")))
def test_bench_table_and_plot_from_a_result(name, tmp_path):
    """Every committed result has the agreed schema and renders as a table and a plot."""
    with open(RESULTS / name) as f:
        result = json.load(f)
    assert {"device", "torch", "triton", "lionedu", "date", "copy_tbps", "rows"} <= set(result)
    assert result.get("timing", "eager") in ("eager", "cuda-graph")
    assert result.get("autograd", "default") in ("default", "single-threaded")
    keys = {"impl", "variant", "causal", "B", "H", "L", "D", "Dv", "dtype", "fwd_ms", "fwdbwd_ms", "peak_mib", "fwd_floor_ms"}
    for row in result["rows"]:
        assert keys <= set(row) and row["dtype"] in ("bf16", "fp16", "fp32")
        assert (row["fwdbwd_ms"] is None) == ("error" in row)  # a failed backward may keep the forward's time
    table = bench.format_table(result)
    assert result["device"] in table and result.get("timing", "eager") in table
    assert all(row["error"] in table for row in result["rows"] if "error" in row)
    bench.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def _causal_gated_attention(q, k, v, g=None, scale=1.0):
    """flash-linear-attention's ``chunk_simple_gla`` written with lionedu.vectorized: causal,
    unnormalised, ``[B, T, H, .]`` tensors and per-token log gates ``g [B, T, H]``."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out = vectorized.attention(scale * t(q), t(k), t(v), None if g is None else t(g), causal=True, normalize=False)
    return t(out), None


@settings(deadline=None, max_examples=60)
@given(problem=problems())
def test_bench_fla_composition_is_bidirectional_lion(problem):
    """The bench's ``fla`` builds bidirectional LION from a causal gated kernel: a forward pass, a pass
    over the reversed sequence with the gates shifted by one, the diagonal subtracted. With the
    kernel replaced by its definition (fla itself needs a GPU) the layer must equal the float64
    attention form, unnormalised, for every variant, causal or not, and odd shapes."""
    fake = types.ModuleType("fla.ops.simple_gla")
    fake.chunk_simple_gla = _causal_gated_attention
    modules = {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"), "fla.ops.simple_gla": fake}
    with mock.patch.dict(sys.modules, modules):
        layer = bench.implementation("fla")
    assert layer.sequence_major  # measure() hands it [B, L, H, D] memory (make_inputs)
    q, k, v, log_decay, causal = (problem[name] for name in ("q", "k", "v", "log_decay", "causal"))
    expected = vectorized.attention(q, k, v, log_decay, causal=causal, normalize=False)
    assert rel_err(layer(q, k, v, log_decay, causal), expected) < 1e-10
    # as the bench hands them over: [B, L, H, .] memory seen as [B, H, L, .] (make_inputs)
    major = [t if t is None or t.dim() < 3 else bench.as_sequence_major(t) for t in (q, k, v, log_decay)]
    assert rel_err(layer(*major, causal), expected) < 1e-10
