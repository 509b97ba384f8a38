#!/usr/bin/env bash
# Regenerates everything under results/ on a CUDA machine, in one command:
#   bash results/reproduce.sh [OUTDIR]      (default OUTDIR: results/)
# 1. the GPU test suite (pytest -m gpu; worst error per dtype), 2. python -m lionedu.check on the GPU,
# 3. python -m lionedu.bench (JSON + plot; the README and chapter 8 read these files).
set -uo pipefail
out=${1:-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
LIONEDU_ERROR_LOG="$out/gpu-errors.jsonl" python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
python3 results/summarise_errors.py "$out/gpu-errors.jsonl" | tee "$out/gpu-errors-summary.txt"
python3 -m lionedu.check --device cuda 2>&1 | tee "$out/check-gpu.log"
python3 -m lionedu.bench --variants s,d,lit --causal both --impls lionedu-triton,vectorized-chunkwise,attention-form,sdpa,fla \
  --json "$out/bench-h100.json" --plot "$out/bench-h100.png" 2>&1 | tee "$out/bench.log"
