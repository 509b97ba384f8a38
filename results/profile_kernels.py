"""GPU time per kernel of one LION-S forward (without gradients: the forward alone, as the
benchmark times it) and forward+backward (a GPU is needed).

    python results/profile_kernels.py [L ...]      (default: 1024 4096 16384)

torch.profiler over 20 steps after a warm-up; for each kernel: launches per step, mean GPU
time per launch and GPU time per step. Chunk sizes 64 and 128; B=4, H=16, D=Dv=64, bf16,
bidirectional, normalised. results/NOTES.md quotes its output.
"""
import sys
import warnings
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import lionedu
from lionedu.bench import make_inputs, training_step

STEPS = 20
# One profiling cycle per table: the warning that a new cycle clears the last one's events is noise.
warnings.filterwarnings("ignore", message=".*Profiler clears events")


def kernel_times(step):
    """``{kernel name: (launches per step, µs per launch)}`` of ``step`` on the GPU."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    per_name = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name].append(event.device_time)
    return {name: (len(ts) / STEPS, sum(ts) / len(ts)) for name, ts in per_name.items()}


def report(title, times):
    total = sum(n * us for n, us in times.values())
    print(f"  {title}: {total:.1f} µs of GPU time per step")
    for name, (n, us) in sorted(times.items(), key=lambda item: -item[1][0] * item[1][1]):
        print(f"    {n:4.1f} x {us:8.1f} µs = {n * us:8.1f} µs  {name[:90]}")


def main(lengths):
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lionedu {lionedu.__version__}")
    for L in lengths:
        q, k, v, ld = make_inputs("s", 4, 16, L, 64, 64, torch.bfloat16)
        for chunk in (64, 128):
            def attention(q, k, v, ld, causal, chunk=chunk):
                return lionedu.kernels.chunkwise(q, k, v, ld, causal=causal, chunk_size=chunk, check_values=False)

            step, _ = training_step(attention, q, k, v, ld)
            print(f"L={L} chunk={chunk}")
            with torch.no_grad():
                report("forward", kernel_times(lambda: attention(q, k, v, ld, False)))
            report("forward+backward", kernel_times(step))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024, 4096, 16384])
