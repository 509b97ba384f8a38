"""One encoder block's training step, kernel by kernel, LION-S against softmax attention (a GPU is needed).

    python results/block_profile.py [L ...]      (default: 1024 4096)

The block of results/model_step.py (``lionedu.nn.EncoderBlock``: dim 1024, 16 heads of 64, bf16,
B = 4; LION-S on the Triton kernels with the fused feature maps, and softmax attention through
SDPA). For each kernel: launches per step, mean GPU time per launch and GPU time per step
(torch.profiler over 20 steps, results/profile_kernels.py's ``kernel_times``), largest first:
where the LION block's GPU time goes besides its attention kernels. results/NOTES.md ("LION in a
model") quotes its output.
"""
import sys

import torch

from model_step import encoder, run_header, training_step  # results/ (this script's folder is on sys.path)
from profile_kernels import kernel_times


def main(lengths):
    print(run_header(), flush=True)
    for L in lengths:
        x = torch.randn(4, L, 1024, device="cuda", dtype=torch.bfloat16)
        for mixer in ("lion", "softmax"):
            times = kernel_times(training_step(encoder(mixer, 1), x))
            total = sum(n * us for n, us in times.values())
            print(f"L={L} {mixer}: {total:.1f} us of GPU time per step", flush=True)
            for name, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
                print(f"  {n:5.1f} x {us:8.1f} us = {n * us:8.1f} us  {name[:110]}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024, 4096])
