"""Worst relative error per dtype and quantity from a LIONEDU_ERROR_LOG file (tests/test_kernels.py).

    python results/summarise_errors.py results/gpu-errors-h100.jsonl
"""
import json
import sys
from collections import defaultdict

NAMES = ["y", "dq", "dk", "dv", "dlog_decay"]
worst = defaultdict(lambda: defaultdict(float))
count = defaultdict(int)
for line in open(sys.argv[1]):
    row = json.loads(line)
    count[row["dtype"]] += 1
    for name, err in zip(NAMES, row["errors"]):
        worst[row["dtype"]][name] = max(worst[row["dtype"]][name], err)
for dtype in sorted(worst):
    cells = "  ".join(f"{n} {worst[dtype][n]:.1e}" for n in NAMES if n in worst[dtype])
    print(f"{dtype:9s} {count[dtype]:3d} checks, worst: {cells}")
