"""Where the host time of the backward goes: autograd's worker thread against the calling thread.

    python results/autograd_thread.py      (on a CUDA machine)

For four forward+backward steps (lionedu's kernels on LION-S at L=1024; SDPA, called as the
benchmark calls it; a Python ``autograd.Function`` that only clones its input; a plain
PyTorch multiply) the host's time per step with PyTorch's default engine (the backward of CUDA tensors runs in autograd's
device thread) and with ``torch.autograd.set_multithreading_enabled(False)`` (it runs in the
calling thread); for lionedu also the time spent inside ``ChunkwiseAttention.backward``.
B=4, H=16, D=Dv=64, bf16. results/NOTES.md quotes its output.
"""
import time

import torch
from triton.testing import do_bench

import lionedu
from lionedu.bench import host_ms_per_call, implementation, make_inputs, training_step
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


def timed_backward(ctx, dy):
    start = time.perf_counter()
    grads = _backward(ctx, dy)
    inside_backward.append(time.perf_counter() - start)
    return grads


def main():
    ChunkwiseAttention.backward = staticmethod(timed_backward)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lionedu {lionedu.__version__}")
    q, k, v, ld = make_inputs("s", 4, 16, 1024, 64, 64, torch.bfloat16)
    x = torch.randn(64, device="cuda", requires_grad=True)

    def on_x(run):
        def step():
            x.grad = None
            run()
        return step

    steps = {
        "lionedu": training_step(implementation("lionedu-triton"), q, k, v, ld)[0],
        "sdpa": training_step(implementation("sdpa"), q, k, v, ld)[0],
        "clone Function": on_x(lambda: CloneFunction.apply(x).sum().backward()),
        "plain multiply": on_x(lambda: (x * 2).sum().backward()),
    }
    for name, step in steps.items():
        results = []
        for threaded in (True, False):
            with torch.autograd.set_multithreading_enabled(threaded):
                for _ in range(10):  # warm-up: compiles or loads the kernels on the first call
                    step()
                inside_backward.clear()
                host = 1e3 * host_ms_per_call(step, 200)
                inside = 1e6 * sum(inside_backward) / len(inside_backward) if inside_backward else float("nan")
                results.append(f"{host:7.1f} µs (in backward {inside:6.1f} µs)")
        median = do_bench(step, return_mode="median")
        print(f"{name:15s} host per step: worker thread {results[0]}, calling thread {results[1]}; "
              f"eager step {median:.4f} ms")


if __name__ == "__main__":
    main()
