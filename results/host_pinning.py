"""The host's time per training step with the process free to use every CPU, or pinned to one.

    python results/host_pinning.py                  (on a CUDA machine: every CPU)
    taskset -c 3 python results/host_pinning.py     (pinned to one CPU)

Session 19's question (results/NOTES.md, "Host overhead"): is the eager step slow on the H200
machines because of autograd's worker thread, as earlier sessions read their runs? For the LION-S
training step on lionedu's kernels and SDPA's (B=4, H=16, D=Dv=64, bf16, L = 1024 and 4096): the
host's time per step with PyTorch's default engine (backward in autograd's device thread,
"worker") and with ``torch.autograd.set_multithreading_enabled(False)`` ("calling"), in alternating
rounds, and lionedu's time inside ``ChunkwiseAttention.backward``; then the eager step as the
benchmark times it (``triton.testing.do_bench``). First, three small pieces of host work run inside
a Python ``autograd.Function``'s backward (worker, calling) and called directly: 50 allocations,
20 launches of a tiny Triton kernel, and 20 of (an allocation, a view, a launch).
Medians over rounds, µs unless marked.
"""
import os
import statistics
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from lionedu.bench import host_ms_per_call, implementation, make_inputs, training_step
from lionedu.kernels.autograd import ChunkwiseAttention
from lionedu.kernels.fast_launch import Launcher
from autograd_thread import timed_backward, inside_backward  # results/ (this script's folder is on sys.path)
from model_step import run_header


@triton.jit
def _tiny(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1, mask=offsets < n)


_launch_tiny = Launcher(_tiny)
_buffer = torch.zeros(128, device="cuda")


def host_work(kind: str, n: int) -> None:
    for _ in range(n):
        if kind == "allocations":
            torch.empty(1024, device="cuda")
        elif kind == "launches":
            _launch_tiny((1,), _buffer, 100, BLOCK=128, num_warps=1, num_stages=1)
        else:  # "allocation, view, launch"
            torch.empty(64, device="cuda").view(8, 8).t()
            _launch_tiny((1,), _buffer, 100, BLOCK=128, num_warps=1, num_stages=1)


class _WorkInBackward(torch.autograd.Function):
    """A node whose backward does ``host_work(kind, n)`` and records how long that took."""
    kind, n, seconds = "allocations", 50, []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        start = time.perf_counter()
        host_work(_WorkInBackward.kind, _WorkInBackward.n)
        _WorkInBackward.seconds.append(time.perf_counter() - start)
        return grad


def _median_us(seconds):
    return statistics.median(seconds) * 1e6


def main(rounds: int = 5):
    cpus = sorted(os.sched_getaffinity(0))
    print(f"{run_header()}; CPUs this process may use: {len(cpus)} ({', '.join(map(str, cpus[:16]))})", flush=True)
    x = torch.randn(64, device="cuda", requires_grad=True)
    for kind, n in (("allocations", 50), ("launches", 20), ("allocation, view, launch", 20)):
        _WorkInBackward.kind, _WorkInBackward.n = kind, n
        found = {}
        for _ in range(rounds):
            for mode in ("worker", "calling", "direct"):
                _WorkInBackward.seconds = []
                torch.autograd.set_multithreading_enabled(mode != "calling")
                for _ in range(30):
                    if mode == "direct":
                        start = time.perf_counter()
                        host_work(kind, n)
                        _WorkInBackward.seconds.append(time.perf_counter() - start)
                    else:
                        _WorkInBackward.apply(x).sum().backward()
                found.setdefault(mode, []).append(_median_us(_WorkInBackward.seconds[5:]))
        torch.autograd.set_multithreading_enabled(True)
        print(f"{n} x {kind}: " + ", ".join(f"{mode} {statistics.median(v):.1f}" for mode, v in found.items()),
              flush=True)
    ChunkwiseAttention.backward = staticmethod(timed_backward)
    for L in (1024, 4096):
        steps = {name: training_step(implementation(name), *make_inputs("s", 4, 16, L, 64, 64, torch.bfloat16))[0]
                 for name in ("lionedu-triton", "sdpa")}
        found = {}
        for _ in range(rounds):
            for mode in ("worker", "calling"):
                torch.autograd.set_multithreading_enabled(mode == "worker")
                for name, step in steps.items():
                    for _ in range(5):
                        step()
                    inside_backward.clear()
                    found.setdefault(f"{name}, {mode}: host per step", []).append(host_ms_per_call(step, 50) * 1e3)
                    if name == "lionedu-triton":
                        found.setdefault(f"{name}, {mode}: in its backward", []).append(_median_us(inside_backward))
        torch.autograd.set_multithreading_enabled(True)
        for what, values in found.items():
            print(f"L={L} {what} {statistics.median(values):.1f} (rounds: {' '.join(f'{v:.0f}' for v in values)})",
                  flush=True)
        print(f"L={L} eager step (do_bench median): " + ", ".join(
            f"{name} {do_bench(step, return_mode='median'):.3f} ms" for name, step in steps.items()), flush=True)


if __name__ == "__main__":
    main()
