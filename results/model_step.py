"""A model's training step with LION-S against softmax attention (a GPU is needed).

    python results/model_step.py [L ...]      (default: 1024 4096)

An encoder of pre-norm blocks (:class:`lionedu.nn.EncoderBlock`: dim 1024, 16 heads of 64,
MLP ratio 2), bf16 weights and inputs, B = 4, a squared-output loss; three mixers:

- ``lion``: LION-S on the Triton kernels, with the fused feature maps
  (:mod:`lionedu.kernels.feature_maps`, the layer's default on a GPU);
- ``lion, PyTorch maps``: the same with the feature map written in PyTorch
  (:mod:`lionedu.features`, what the layer ran before the fused maps);
- ``softmax``: :class:`lionedu.nn.SoftmaxAttention` (PyTorch's SDPA with its own choice of
  backend: cuDNN on the H200).

First one block's GPU time per step (torch.profiler, the sum over kernels, as
results/profile_kernels.py measures it; the committed log was written with 5 profiled steps
instead of that script's 20, commit f7b3f7d) and its CUDA-graph
replay; then four blocks: the eager step, the eager step with autograd's single-threaded
engine, the CUDA-graph replay and ``torch.compile(mode="reduce-overhead")``. Medians of
``triton.testing.do_bench``, ms. results/NOTES.md ("LION in a model") quotes its output.
"""
import datetime
import sys

import torch
import triton
from triton.testing import do_bench

import lionedu
from lionedu.bench import graph_replay
from lionedu.features import normalized_shifted_silu
from lionedu.nn import EncoderBlock
from profile_kernels import kernel_times  # results/profile_kernels.py (this script's folder is on sys.path)

MIXERS = ("lion", "lion, PyTorch maps", "softmax")


def pytorch_map(x):
    """The PyTorch feature map under another name, which LionAttention does not replace by
    the fused one (lionedu.kernels.feature_maps.fused_feature_map)."""
    return normalized_shifted_silu(x)


def encoder(mixer, depth):
    torch.manual_seed(0)
    kind = "softmax" if mixer == "softmax" else "lion"
    options = {} if kind == "softmax" else dict(variant="s", impl="triton")
    blocks = [EncoderBlock(1024, 16, mixer=kind, **options) for _ in range(depth)]
    if mixer == "lion, PyTorch maps":
        for block in blocks:
            block.mixer.feature_map = pytorch_map
    return torch.nn.Sequential(*blocks).cuda().to(torch.bfloat16)


def training_step(model, x):
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        model(x).float().square().mean().backward()

    return step


def gpu_ms_per_step(step):
    """GPU time of one ``step``, summed over its kernels (torch.profiler)."""
    return sum(n * us for n, us in kernel_times(step).values()) / 1e3


def run_header() -> str:
    """The device, the library versions and the date: a log's first line."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"lionedu {lionedu.__version__}, {date}")


def main(lengths):
    print(run_header(), flush=True)
    for L in lengths:
        x = torch.randn(4, L, 1024, device="cuda", dtype=torch.bfloat16)
        for mixer in MIXERS:
            step = training_step(encoder(mixer, 1), x)
            print(f"L={L} one block, {mixer}: GPU time {gpu_ms_per_step(step):.3f} ms/step, "
                  f"CUDA-graph replay {do_bench(graph_replay(step), return_mode='median'):.3f} ms", flush=True)
    for L in lengths:
        x = torch.randn(4, L, 1024, device="cuda", dtype=torch.bfloat16)
        for mixer in MIXERS:
            model = encoder(mixer, 4)
            step = training_step(model, x)
            times = {"eager": do_bench(step, return_mode="median")}
            with torch.autograd.set_multithreading_enabled(False):
                times["eager, single-threaded autograd"] = do_bench(step, return_mode="median")
            times["CUDA-graph replay"] = do_bench(graph_replay(step), return_mode="median")
            compiled = training_step(torch.compile(model, mode="reduce-overhead"), x)
            for _ in range(3):
                compiled()
            times["torch.compile reduce-overhead"] = do_bench(compiled, return_mode="median")
            print(f"L={L} four blocks, {mixer}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()) + " ms",
                  flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024, 4096])
