#!/usr/bin/env bash
# Regenerates everything under results/ on a CUDA machine, in one command:
#   bash results/reproduce.sh [OUTDIR] [PART]      (default OUTDIR: results/; PART: all, or 1, 2 or 3
#   to run steps 1-3, 4-7 or 8-12 alone, for machines that limit one command's time)
# 1. the GPU test suite (pytest -m gpu; worst error per dtype), then tests/test_compile.py (torch.compile
#    with inductor on the GPU; not gpu-marked, since it also runs on the CPU), 2. python -m lionedu.check on the GPU,
# (the tests run in 8 processes: pytest-xdist; compiling the kernels' variants is most of their time)
# 3. python -m lionedu.bench (JSON + plot; the README and chapter 8 read these files), eager and
#    with --cuda-graph; 4. results/host_overhead.py (host time against GPU time of one step);
# 5. results/profile_kernels.py (GPU time per kernel, torch.profiler); 6. results/autograd_thread.py
#    (host time of the backward in autograd's worker thread and in the calling thread), and results/host_pinning.py
#    (the same question with the process free to use every CPU and pinned to one); 7. few, long
#    sequences (B=1, H=8) with CUDA-graph replays, where the states kernel walks in segments;
# 8. the eager benchmark of LION-S and SDPA pinned to one CPU, and with every backward in the calling thread
#    (--single-threaded-autograd: on some hosts autograd's worker thread slows Python-launched kernels);
# 9. float32 inputs, lionedu's kernels and SDPA, CUDA-graph replays (float32 tiles on tensor cores: v9);
# 10. LION-S against SDPA on both its 16-bit backends, flash (the reference) and cuDNN (PyTorch's own
#     choice on Hopper, faster), CUDA-graph replays; 11. results/model_step.py: an encoder's training step
#     with LION-S (fused feature maps, and PyTorch's) against softmax attention, and results/block_profile.py: one
#     block's step kernel by kernel; 12. flash-linear-attention (below).
set -uo pipefail
out=${1:-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts in results/ import lionedu from the checkout
# Files are named after the GPU: "NVIDIA H100 80GB HBM3" -> bench-h100.json, "NVIDIA H200" -> bench-h200.json.
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
part=${2:-all}
# Eager timings pinned to one CPU (taskset): on the H200 virtual machines a process free to use every CPU spent about
# twice the host time per step (results/NOTES.md, "Host overhead"); the first CPU this process may use.
one_cpu=$(python3 -c "import os; print(min(os.sched_getaffinity(0)))")
if [ "$part" = all ] || [ "$part" = 1 ]; then
LIONEDU_ERROR_LOG="$out/gpu-errors-$tag.jsonl" python3 -m pytest -q -m gpu tests -p no:cacheprovider -n 8 2>&1 | tee "$out/gpu-tests-$tag.log"
python3 results/summarise_errors.py "$out/gpu-errors-$tag.jsonl" | tee "$out/gpu-errors-$tag.txt"
python3 -m pytest -q tests/test_compile.py -p no:cacheprovider 2>&1 | tee "$out/compile-tests-$tag.log"
python3 -m lionedu.check --device cuda 2>&1 | tee "$out/check-gpu-$tag.log"
python3 -m lionedu.bench --variants s,d,lit --causal both --impls lionedu-triton,vectorized-chunkwise,attention-form,sdpa,fla \
  --json "$out/bench-$tag.json" --plot "$out/bench-$tag.png" 2>&1 | tee "$out/bench-$tag.log"
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
# 4. the same for the kernels and SDPA with CUDA-graph replays: the GPU's time without the host's.
python3 -m lionedu.bench --variants s,d,lit --causal both --impls lionedu-triton,sdpa --cuda-graph \
  --json "$out/bench-$tag-graph.json" --plot "$out/bench-$tag-graph.png" 2>&1 | tee "$out/bench-$tag-graph.log"
python3 results/host_overhead.py 1024 4096 2>&1 | tee "$out/host-overhead-$tag.log"
python3 results/profile_kernels.py 1024 4096 16384 2>&1 | tee "$out/profile-kernels-$tag.log"
python3 results/autograd_thread.py 2>&1 | tee "$out/autograd-thread-$tag.log"
python3 results/host_pinning.py 2>&1 | tee "$out/host-pinning-$tag.log"
taskset -c "$one_cpu" python3 results/host_pinning.py 2>&1 | tee "$out/host-pinning-$tag-one-cpu.log"
python3 -m lionedu.bench --batch 1 --heads 8 --lengths 4096,16384,65536 --variants s --causal both \
  --impls lionedu-triton,sdpa --cuda-graph --json "$out/bench-$tag-b1-graph.json" --plot "$out/bench-$tag-b1-graph.png" \
  2>&1 | tee "$out/bench-$tag-b1-graph.log"
fi
if [ "$part" = all ] || [ "$part" = 3 ]; then
taskset -c "$one_cpu" python3 -m lionedu.bench --lengths 1024,4096,16384 --variants s --impls lionedu-triton,sdpa \
  --json "$out/bench-$tag-one-cpu.json" --plot "$out/bench-$tag-one-cpu.png" 2>&1 | tee "$out/bench-$tag-one-cpu.log"
python3 -m lionedu.bench --variants s --impls lionedu-triton,sdpa --single-threaded-autograd \
  --json "$out/bench-$tag-single-thread.json" --plot "$out/bench-$tag-single-thread.png" 2>&1 | tee "$out/bench-$tag-single-thread.log"
python3 -m lionedu.bench --dtype fp32 --variants s,lit --impls lionedu-triton,sdpa --cuda-graph \
  --json "$out/bench-$tag-fp32-graph.json" --plot "$out/bench-$tag-fp32-graph.png" 2>&1 | tee "$out/bench-$tag-fp32-graph.log"
python3 -m lionedu.bench --variants s --causal both --impls lionedu-triton,sdpa,sdpa-cudnn --cuda-graph \
  --json "$out/bench-$tag-cudnn-graph.json" --plot "$out/bench-$tag-cudnn-graph.png" 2>&1 | tee "$out/bench-$tag-cudnn-graph.log"
python3 results/model_step.py 2>&1 | tee "$out/model-step-$tag.log"
python3 results/block_profile.py 2>&1 | tee "$out/block-profile-$tag.log"
# 12. flash-linear-attention's causal chunk kernels composed into a bidirectional layer (bench's fla), where it is
#     installed (pip install fla-core==0.6.0; its rows say "not installed" otherwise): checked against float64, then
#     timed; fla 0.6.0 refuses its gated backward with Triton < 3.7.1 on Hopper, which the rows record.
if python3 -c "import fla" 2>/dev/null; then
python3 results/fla_check.py 2>&1 | tee "$out/fla-check-$tag.log"
python3 -m lionedu.bench --variants s,lit --causal both --impls lionedu-triton,fla,sdpa --cuda-graph \
  --json "$out/bench-$tag-fla-graph.json" --plot "$out/bench-$tag-fla-graph.png" 2>&1 | tee "$out/bench-$tag-fla-graph.log"
fi
fi
