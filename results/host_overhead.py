"""Host time against GPU time of one LION-S forward+backward (a GPU is needed).

    python results/host_overhead.py [L ...]      (default: 1024 4096)

For each length: the host's time to enqueue a step (perf_counter over 100 steps, no sync
inside), the step's median time (do_bench), the same with autograd's single-threaded
engine (``torch.autograd.set_multithreading_enabled(False)``: the backward then runs in the
calling thread) and the replay of the step captured in a CUDA graph (the GPU's time alone).
Then an A/B of the launch path: the host time and the median step with the kernels launched
directly (``lionedu.kernels.fast_launch``, the default) and through ``kernel[grid]``
(``set_fast_launch(False)``), in alternating rounds (host times on a virtual machine drift
between runs by more than the difference), medians over the rounds.
B=4, H=16, D=Dv=64, bf16, bidirectional, normalised. results/NOTES.md quotes its output.
"""
import statistics
import sys

import torch
from triton.testing import do_bench

import lionedu
from lionedu.bench import graph_replay, host_ms_per_call, implementation, make_inputs, training_step
from lionedu.kernels.fast_launch import set_fast_launch

ROUNDS = 7


def main(lengths):
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lionedu {lionedu.__version__}")
    for L in lengths:
        step, _ = training_step(implementation("lionedu-triton"), *make_inputs("s", 4, 16, L, 64, 64, torch.bfloat16))
        for _ in range(5):
            step()
        enqueue_ms = host_ms_per_call(step, 100)
        eager_ms = do_bench(step, return_mode="median")
        with torch.autograd.set_multithreading_enabled(False):
            single_ms = do_bench(step, return_mode="median")
        graph_ms = do_bench(graph_replay(step), return_mode="median")
        print(f"L={L}: host enqueue {enqueue_ms:.3f} ms/step, eager {eager_ms:.3f} ms, "
              f"eager with single-threaded autograd {single_ms:.3f} ms, CUDA-graph replay {graph_ms:.3f} ms")
        rounds = {True: [], False: []}
        try:
            for _ in range(ROUNDS):
                for direct in (True, False):
                    set_fast_launch(direct)
                    step()
                    rounds[direct].append((host_ms_per_call(step, 50), do_bench(step, return_mode="median")))
        finally:
            set_fast_launch(True)
        (on_host, on_eager), (off_host, off_eager) = (
            [statistics.median(r[i] for r in rounds[d]) for i in (0, 1)] for d in (True, False))
        print(f"L={L}: direct launches on / off, medians of {ROUNDS} alternating rounds: host enqueue "
              f"{on_host:.3f} / {off_host:.3f} ms/step, eager {on_eager:.3f} / {off_eager:.3f} ms")


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [1024, 4096])
