"""``python -m lionedu.bench``: speed and memory of LION against softmax attention (GPU).

For each implementation, variant, causality and length it measures, on random inputs:
the median forward time (under ``torch.no_grad()``, as inference runs it: for
``lionedu-triton`` the forward alone, :mod:`lionedu.kernels.inference`), the median
forward+backward time (``triton.testing.do_bench``, CUDA events) and the peak memory of one
forward+backward (its inputs plus what it allocates). In the same run it measures the device-to-device copy bandwidth and reports
each forward's memory floor: the bytes of q, k, v, log_decay read and y written, over that
bandwidth.

Implementations: ``lionedu-triton`` (lionedu.kernels.chunkwise), ``vectorized-chunkwise``,
``attention-form`` (the materialised L x L mask, as the LION paper's code trains), ``sdpa``
(PyTorch's fused softmax attention: the flash backend, or for float32, which flash does not
take, the memory-efficient backend), ``sdpa-cudnn`` (the same call on the cuDNN backend, which
PyTorch itself prefers on Hopper and which was ~1.5x faster than flash on the H200; it takes no
float32, whose rows record the error) and ``fla``
(flash-linear-attention's causal chunk kernel, twice plus a flip, for a bidirectional layer)
when it can be imported; fla gets its inputs in the ``[B, L, H, D]`` memory it takes, so its
time includes the composition's flips but no layout copies.

Writes a table to the terminal, JSON with ``--json`` and a plot with ``--plot``.
``--cuda-graph`` times replays of captured steps (the GPU's time alone);
``--single-threaded-autograd`` times the eager forward+backward with PyTorch's backward in the
calling thread (``torch.autograd.set_multithreading_enabled(False)``) for every
implementation, instead of autograd's worker thread: on some hosts that changes the eager
step of Python-launched kernels a lot (results/NOTES.md, "Host overhead").
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("lionedu-triton", "vectorized-chunkwise", "attention-form", "sdpa", "sdpa-cudnn", "fla")
SOFTMAX = ("sdpa", "sdpa-cudnn")  # no decay: the same computation for every variant


def copy_bandwidth_tbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e12


def as_sequence_major(t):
    """``t [B, H, L, ...]`` with the same values held in ``[B, L, H, ...]`` memory, as a transposed view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def make_inputs(variant, B, H, L, D, Dv, dtype, seed=0, sequence_major=False):
    """Random q, k (non-negative, as after a feature map), v and the variant's log decay.

    Shapes ``[B, H, L, D]`` (``[B, H, L]`` or ``[H]`` for the log decay). ``sequence_major``:
    the same values held in ``[B, L, H, .]`` memory and returned as transposed views, for an
    implementation that takes that layout (fla), so that it is not timed copying its inputs."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(sample, *features, dtype=dtype):
        t = sample(B, H, L, *features, device="cuda", generator=gen).to(dtype)
        return as_sequence_major(t) if sequence_major else t

    q = draw(torch.rand, D)
    k = draw(torch.rand, D)
    v = draw(torch.randn, Dv)
    if variant == "lit":
        ld = None
    elif variant == "d":
        ld = torch.nn.functional.logsigmoid(torch.randn(H, device="cuda", generator=gen) + 3)
    else:
        ld = torch.nn.functional.logsigmoid(draw(torch.randn, dtype=torch.float32) + 3)
    return q, k, v, ld


def _fla_bidirectional():
    """A bidirectional layer from flash-linear-attention's causal kernel, or None."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None

    def run(q, k, v, ld, causal):
        # fla takes [B, L, H, D] and a per-token log gate; no normaliser (normalize=False).
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        g = None if ld is None else t(ld if ld.dim() == 3 else ld[None, :, None].expand(q.shape[:3]))
        fwd, _ = chunk_simple_gla(t(q), t(k), t(v), g=g, scale=1.0)
        if causal:
            return t(fwd)
        gb = None if g is None else torch.cat([torch.zeros_like(g[:, :1]), g.flip(1)[:, :-1]], 1)
        bwd, _ = chunk_simple_gla(t(q).flip(1), t(k).flip(1), t(v).flip(1), g=gb, scale=1.0)
        diag = (q * k).sum(-1, keepdim=True) * v
        return t(fwd) + t(bwd.flip(1)) - diag

    run.sequence_major = True  # the bench hands it [B, L, H, D] memory (make_inputs)
    return run


def implementation(name):
    """``fn(q, k, v, log_decay, causal) -> y`` for a benchmark name, or None if unavailable."""
    import lionedu

    if name == "lionedu-triton":
        # The benchmark's decays come from logsigmoid (valid by construction), so the
        # per-call check of their values, a host-device sync, stays out of the timing.
        return lambda q, k, v, ld, causal: lionedu.kernels.chunkwise(q, k, v, ld, causal=causal, check_values=False)
    if name == "vectorized-chunkwise":
        return lambda q, k, v, ld, causal: lionedu.vectorized.chunkwise(q, k, v, ld, causal=causal)
    if name == "attention-form":
        return lambda q, k, v, ld, causal: lionedu.vectorized.attention(q, k, v, ld, causal=causal)
    if name in SOFTMAX:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend(dtype):
            if name == "sdpa-cudnn":
                return SDPBackend.CUDNN_ATTENTION
            # Flash attention takes only 16-bit inputs; float32 goes to the memory-efficient kernel.
            return SDPBackend.EFFICIENT_ATTENTION if dtype == torch.float32 else SDPBackend.FLASH_ATTENTION

        def sdpa(q, k, v, ld, causal):
            with sdpa_kernel(backend(q.dtype)):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if name == "fla":
        return _fla_bidirectional()
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")


def graph_replay(step):
    """Capture one call of ``step`` in a CUDA graph (after warm-up on a side stream, as
    PyTorch asks) and return a function that replays it: the GPU's work with no host in between."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def training_step(fn, q, k, v, ld, causal=False):
    """``(step, leaves)`` for ``fn(q, k, v, log_decay, causal)`` (see :func:`implementation`).

    ``leaves`` are q, k, v and the log decay if there is one, set to require gradients here;
    ``step()`` clears their gradients, runs ``fn`` and backpropagates a fixed random output
    gradient: the attention work of one training step.
    """
    leaves = [t.requires_grad_(True) for t in (q, k, v, ld) if t is not None]
    dy = torch.randn_like(v)

    def step():
        for t in leaves:
            t.grad = None
        fn(q, k, v, ld, causal).backward(dy)

    return step, leaves


def host_ms_per_call(step, calls=100):
    """The host's time per call of ``step``, ms, with no synchronisation between calls: how
    long the host needs to queue the work, whatever the GPU's time. Warm ``step`` up first."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def step_peak_mib(step, leaves, input_bytes: int) -> float:
    """Peak memory of one call of ``step`` in MiB: ``input_bytes`` (its inputs and output
    gradient) plus the most it allocated above what was allocated just before it, with the
    gradients of ``leaves`` cleared first. Memory that belongs to neither the step nor its
    inputs (the benchmark's own buffers, earlier rows' tensors) does not count."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before + input_bytes) / 2**20


def measure(fn, variant, causal, B, H, L, D, Dv, dtype, warmup_ms=25, rep_ms=100, cuda_graph=False,
            single_threaded_autograd=False, partial=None):
    """One benchmark row's numbers: fwd_ms, fwdbwd_ms, peak_mib (medians of repeated runs).

    ``cuda_graph``: time replays of CUDA graphs captured from one call instead of eager
    calls, which removes the host's share (Python, launches, the autograd engine): what a
    captured training step (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graphs``)
    would see. Peak memory is always measured on eager calls. ``single_threaded_autograd``:
    the eager forward+backward runs its backward in the calling thread
    (``torch.autograd.set_multithreading_enabled(False)``), not in autograd's worker thread.
    ``partial``: a dict that receives ``fwd_ms`` as soon as the forward is timed, so that a
    caller keeps it when the training step then fails (an implementation without a backward).
    """
    from triton.testing import do_bench

    q, k, v, ld = make_inputs(variant, B, H, L, D, Dv, dtype, sequence_major=getattr(fn, "sequence_major", False))
    timed = graph_replay if cuda_graph else (lambda step: step)
    with torch.no_grad():
        fwd_ms = do_bench(timed(lambda: fn(q, k, v, ld, causal)), warmup=warmup_ms, rep=rep_ms, return_mode="median")
    if partial is not None:
        partial["fwd_ms"] = fwd_ms
    fwdbwd, leaves = training_step(fn, q, k, v, ld, causal)

    fwdbwd()
    peak_mib = step_peak_mib(fwdbwd, leaves, sum(t.nbytes for t in leaves) + v.nbytes)  # + dy, shaped like v
    if cuda_graph:
        fwdbwd_ms = do_bench(graph_replay(fwdbwd), warmup=warmup_ms, rep=rep_ms, return_mode="median")
    else:
        with torch.autograd.set_multithreading_enabled(not single_threaded_autograd):
            fwdbwd_ms = do_bench(fwdbwd, warmup=warmup_ms, rep=rep_ms, return_mode="median", grad_to_none=leaves)
    return fwd_ms, fwdbwd_ms, peak_mib


def floor_ms(variant, B, H, L, D, Dv, dtype, copy_tbps):
    """Bytes that one forward must move (q, k, v, log_decay read; y written) over the bandwidth."""
    size = torch.finfo(dtype).bits // 8
    decay_bytes = {"lit": 0, "d": H * 4, "s": B * H * L * 4}[variant]
    nbytes = B * H * L * (2 * D + 2 * Dv) * size + decay_bytes
    return nbytes / (copy_tbps * 1e12) * 1e3


def run(args) -> dict:
    import triton

    import lionedu

    dtype = DTYPES[args.dtype]
    copy_tbps = copy_bandwidth_tbps()
    cases = [(impl, variant, causal, L) for L in args.lengths for variant in args.variants
             for causal in args.causal for impl in args.impls]
    rows = []
    try:
        from tqdm import tqdm

        progress = tqdm(cases, desc="lionedu.bench", file=sys.stderr)
    except ImportError:
        progress = cases
    for impl, variant, causal, L in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{impl} {variant} L={L}")
        row = dict(impl=impl, variant=variant, causal=causal, B=args.batch, H=args.heads, L=L, D=args.head_dim,
                   Dv=args.value_dim, dtype=args.dtype, fwd_ms=None, fwdbwd_ms=None, peak_mib=None,
                   fwd_floor_ms=floor_ms(variant, args.batch, args.heads, L, args.head_dim, args.value_dim, dtype, copy_tbps))
        fn = implementation(impl)
        if fn is None:
            row["error"] = "not installed"
        else:
            try:
                # a failed training step keeps the forward's time (partial=row)
                row["fwd_ms"], row["fwdbwd_ms"], row["peak_mib"] = measure(
                    fn, variant, causal, args.batch, args.heads, L, args.head_dim, args.value_dim, dtype,
                    cuda_graph=args.cuda_graph, single_threaded_autograd=args.single_threaded_autograd, partial=row)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # a failed case is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
        rows.append(row)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "lionedu": lionedu.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "copy_tbps": copy_tbps,
        "timing": "cuda-graph" if args.cuda_graph else "eager",
        "autograd": "single-threaded" if args.single_threaded_autograd else "default",
        "host_cpus": host_cpus(),
        "rows": rows,
    }


def host_cpus() -> int:
    """How many CPUs this process may run on (``taskset`` narrows it). Eager timings depend on it:
    on the H200 machines of results/, one CPU halved the host's time per step (results/NOTES.md)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _timing(result: dict) -> str:
    """How a result was timed, for its table and plot: "eager", "cuda-graph", or eager with the
    backward in the calling thread; eager on one CPU says so (older files lack the count)."""
    single = result.get("autograd") == "single-threaded"
    one_cpu = result.get("timing", "eager") == "eager" and result.get("host_cpus") == 1
    return result.get("timing", "eager") + (", single-threaded autograd" if single else "") + (", one CPU" if one_cpu else "")


def format_table(result: dict) -> str:
    head = (f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}, "
            f"copy {result['copy_tbps']:.2f} TB/s, {_timing(result)} timing")
    cols = ["impl", "variant", "causal", "L", "fwd_ms", "fwdbwd_ms", "peak_mib", "fwd_floor_ms", "fwd/floor"]
    lines = [head, "  ".join(f"{c:>12}" for c in cols)]
    fmt = lambda x: "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))  # noqa: E731
    for r in result["rows"]:
        ratio = None if r["fwd_ms"] is None else r["fwd_ms"] / r["fwd_floor_ms"]
        cells = [r["impl"], r["variant"], r["causal"], r["L"], r["fwd_ms"], r["fwdbwd_ms"], r["peak_mib"], r["fwd_floor_ms"], ratio]
        line = "  ".join(f"{fmt(c):>12}" for c in cells)
        lines.append(line + (f"  ({r['error']})" if "error" in r else ""))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Time (forward+backward) and peak memory against L, log scales, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    keys = sorted({(r["impl"], r["variant"], r["causal"]) for r in result["rows"]})
    # One colour per implementation, one line style per variant, one marker per causality.
    # SDPA has no decay: its rows are the same computation for every variant, drawn once
    # (from the first variant of the run), in black (flash) and grey (cuDNN).
    first_variant = result["rows"][0]["variant"]
    keys = [key for key in keys if key[0] not in SOFTMAX or key[1] == first_variant]
    colors = {"lionedu-triton": "tab:red", "vectorized-chunkwise": "tab:blue", "attention-form": "tab:green",
              "fla": "tab:purple", "sdpa": "black", "sdpa-cudnn": "tab:gray"}
    for impl, variant, causal in keys:
        rs = [r for r in result["rows"] if (r["impl"], r["variant"], r["causal"]) == (impl, variant, causal)]
        style = dict(color=colors.get(impl, "tab:gray"), marker="^" if causal else "o", markersize=4,
                     linestyle=":" if impl in SOFTMAX and causal else {"s": "-", "d": "--", "lit": "-."}[variant])
        label = f"{impl}{' (causal)' if causal else ''}" if impl in SOFTMAX else f"{impl} ({variant}{', causal' if causal else ''})"
        for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms", "peak_mib")):  # a row may have a forward time only
            measured = [r for r in rs if r[key] is not None]
            if measured:
                ax.plot([r["L"] for r in measured], [r[key] for r in measured], label=label, **style)
    floors = sorted({(r["L"], r["fwd_floor_ms"]) for r in result["rows"] if r["variant"] == result["rows"][0]["variant"]})
    floor_line, = axes[0].plot([f[0] for f in floors], [f[1] for f in floors], "k--", label="forward memory floor")
    axes[0].legend(handles=[floor_line], fontsize=7, loc="upper left")
    for ax, title in zip(axes, ["forward (ms)", "forward + backward (ms)", "peak memory, fwd+bwd (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []  # every implementation once, also one with a forward time only
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and handle is not floor_line:
                handles.append(handle)
                labels.append(label)
    rows_of_legend = -(-len(labels) // 6)  # six entries a row, under the panels
    r0 = result["rows"][0]
    fig.suptitle(f"{result['device']}: B={r0['B']} H={r0['H']} D={r0['D']} {r0['dtype']}; torch {result['torch']}, "
                 f"triton {result['triton']}, {result['date']}, {_timing(result)} timing", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lionedu.bench", description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--variants", type=lambda s: s.split(","), default=["s"], help="comma list of lit,d,s")
    p.add_argument("--causal", choices=["false", "true", "both"], default="false")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--value-dim", type=int, default=None, help="Dv (default: the head dim)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS))
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of CUDA graphs captured from one call (the GPU's time, no host overhead)")
    p.add_argument("--single-threaded-autograd", action="store_true",
                   help="run every eager backward in the calling thread (torch.autograd.set_multithreading_enabled(False))")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG plot here")
    args = p.parse_args(argv)
    args.causal = {"false": [False], "true": [True], "both": [False, True]}[args.causal]
    args.value_dim = args.value_dim or args.head_dim
    if args.single_threaded_autograd and args.cuda_graph:
        p.error("--single-threaded-autograd changes eager timing; with --cuda-graph the host is not timed")
    for v in args.variants:
        if v not in ("lit", "d", "s"):
            p.error(f"--variants: unknown variant {v!r} (lit, d, s)")
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"--impls: unknown implementation {i!r} ({', '.join(IMPLS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("lionedu.bench needs a CUDA GPU (it times GPU kernels); none is available here.", file=sys.stderr)
        return 2
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
