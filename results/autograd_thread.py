"""Where the host time of the backward goes: autograd's worker thread against the calling thread.

    python results/autograd_thread.py      (on a CUDA machine)

For four forward+backward steps (lionedu's kernels on LION-S at L=1024; SDPA; a Python
``autograd.Function`` that only clones its input; a plain PyTorch multiply) the host's time
per step with PyTorch's default engine (the backward of CUDA tensors runs in autograd's
device thread) and with ``torch.autograd.set_multithreading_enabled(False)`` (it runs in the
calling thread); for lionedu also the time spent inside ``ChunkwiseAttention.backward``.
B=4, H=16, D=Dv=64, bf16. results/NOTES.md quotes its output.
"""
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import lionedu
from lionedu.bench import make_inputs
from lionedu.kernels.autograd import ChunkwiseAttention


class CloneFunction(torch.autograd.Function):
    """The cheapest Python autograd node: what any Python backward costs to hand over."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


inside_backward = []  # seconds spent in ChunkwiseAttention.backward, per call
_backward = ChunkwiseAttention.backward


def _timed_backward(ctx, dy):
    start = time.perf_counter()
    grads = _backward(ctx, dy)
    inside_backward.append(time.perf_counter() - start)
    return grads


def host_us_per_step(step, n=200):
    """Host time per call of ``step`` (no synchronisation inside the loop), µs."""
    for _ in range(10):  # warm-up: compiles or loads the kernels on the first call
        step()
    torch.cuda.synchronize()
    inside_backward.clear()
    start = time.perf_counter()
    for _ in range(n):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main():
    ChunkwiseAttention.backward = staticmethod(_timed_backward)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lionedu {lionedu.__version__}")
    q, k, v, ld = make_inputs("s", 4, 16, 1024, 64, 64, torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in (q, k, v, ld)]
    dy = torch.randn_like(v)
    x = torch.randn(64, device="cuda", requires_grad=True)

    def clear():
        for t in leaves + [x]:
            t.grad = None

    steps = {
        "lionedu": lambda: lionedu.kernels.chunkwise(q, k, v, ld, check_values=False).backward(dy),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v).backward(dy),
        "clone Function": lambda: CloneFunction.apply(x).sum().backward(),
        "plain multiply": lambda: (x * 2).sum().backward(),
    }
    for name, run in steps.items():
        def step(run=run):
            clear()
            run()

        results = []
        for threaded in (True, False):
            with torch.autograd.set_multithreading_enabled(threaded):
                inside_backward.clear()
                host = host_us_per_step(step)
                inside = 1e6 * sum(inside_backward) / len(inside_backward) if inside_backward else float("nan")
                results.append(f"{host:7.1f} µs (in backward {inside:6.1f} µs)")
        median = do_bench(step, return_mode="median")
        print(f"{name:15s} host per step: worker thread {results[0]}, calling thread {results[1]}; "
              f"eager step {median:.4f} ms")


if __name__ == "__main__":
    main()
