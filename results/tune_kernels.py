"""Times the kernels for a small committed set of launch configurations (results/NOTES.md).

    python results/tune_kernels.py      (on a CUDA machine; prints a table)

Each configuration overrides entries of ``lionedu.kernels.launch.launch_config`` (value-tile
widths, warps and pipeline stages of the two kernels) at B=4, H=16, D=Dv=64, bf16, LION-S,
bidirectional, for chunk sizes 64 and 128. A configuration that fails (e.g. out of shared
memory) prints its error and the run goes on; a CUDA fault ends the process, so run risky
configurations one process at a time.
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from lionedu import kernels
from lionedu.kernels import launch

DEFAULT = launch.launch_config
CONFIGS = [{}, {"states_block_dv": 64}, {"states_warps": 2}, {"states_warps": 8}, {"states_stages": 1},
           {"output_warps": 8}, {"output_stages": 2}]
B, H, D = 4, 16, 64
for L in (4096, 16384):
    q, k = (torch.rand(B, H, L, D, device="cuda").bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(B, H, L, D, device="cuda").bfloat16().requires_grad_()
    ld = F.logsigmoid(torch.randn(B, H, L, device="cuda") + 3).requires_grad_()
    dy = torch.randn_like(v)
    for chunk in (64, 128):
        for override in CONFIGS:
            launch.launch_config = lambda dk, dv, c, o=override, **kw: {**DEFAULT(dk, dv, c, **kw), **o}
            run = lambda: kernels.chunkwise(q, k, v, ld, chunk_size=chunk, check_values=False)  # noqa: E731
            try:
                with torch.no_grad():
                    fwd = do_bench(run, return_mode="median")
                both = do_bench(lambda: run().backward(dy), return_mode="median", grad_to_none=[q, k, v, ld])
            except Exception as exc:
                print(f"L={L:6d} C={chunk:3d} {override}: failed {type(exc).__name__}: {str(exc)[:80]}")
                continue
            print(f"L={L:6d} C={chunk:3d} {str(override):28s} forward {fwd:.4f} ms  fwd+bwd {both:.4f} ms")
launch.launch_config = DEFAULT
