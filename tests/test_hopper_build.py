"""What the output kernel's persistent grid compiles to for a Hopper GPU (sm_90), checked on the CPU.

Triton compiles for a GPU it is told about without one being present (its own ptxas does the
last step), so two properties that the backward's speed depends on can be tested anywhere:

- the persistent loop is *pipelined*: Triton's pipeliner turned the next chunk's loads into
  asynchronous copies to shared memory (results/NOTES.md, v8: this is what made the backward
  faster; a loop the pipeliner cannot handle, such as one with another loop inside, gets none);
- the buffers of ``output_programs_per_sm`` such programs fit in one multiprocessor's shared
  memory (227 KiB on the H100 and H200): the first v8, whose buffers were three times as
  large at 128-wide heads, failed on the H200 before computing anything.

The compiler runs in a subprocess, because the tests import the kernels under Triton's
interpreter (conftest.py), which replaces the compilable kernels.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from lionedu.kernels.launch import launch_config, persistent_outputs

HOPPER_SHARED_BYTES = 227 * 1024  # shared memory one block may use on an H100 / H200

COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lionedu.kernels.output import chunk_output_kernel

dtype, d, chunk, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
names = [p.name for p in chunk_output_kernel.params]
pointer = {"bfloat16": "*bf16", "float16": "*fp16"}[dtype]
signature = {n: pointer if n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "partner_ptr") else "*fp32"
             for n in names if n.endswith("_ptr")}
signature.update(L="i32", N="i32", BH="i32")
launches = {  # the backward's three output launches (lionedu/kernels/autograd.py), LION-S, bidirectional
    "dQ": dict(ROW_OFFSET=True, SPLIT=True, TRANSPOSED_STATE=True),
    "dK": dict(COL_OFFSET=True, SPLIT=True),
    "dV": dict(TRANSPOSED_STATE=True),
}
result = {}
for name, flags in launches.items():
    consts = dict(LOWER=True, UPPER=True, HAS_DECAY=True, SCALAR_DECAY=False, WITH_DEN=False, NORMALIZE=False,
                  ROW_OFFSET=False, COL_OFFSET=False, SPLIT=False, TRANSPOSED_STATE=False, CHUNK=chunk, DK=d, DV=d,
                  BLOCK_DV=min(d, 64), PRECISION="tf32", PERSISTENT=True, LOOP_STAGES=stages)
    consts.update(flags)
    source = ASTSource(fn=chunk_output_kernel, signature={**signature, **{c: "constexpr" for c in consts}},
                       constexprs={(names.index(c),): v for c, v in consts.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
    result[name] = dict(shared=kernel.metadata.shared,
                        async_copies=kernel.asm["ttgir"].count("async_copy_global_to_local"))
print(json.dumps(result))
"""


def compile_for_hopper(dtype: str, d: int, chunk: int, stages: int) -> dict:
    """{launch: {"shared": bytes, "async_copies": count}} of the persistent backward launches."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", COMPILE, dtype, str(d), str(chunk), str(stages)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_persistent_backward_is_pipelined_and_fits_on_hopper(dtype):
    """The largest configuration the rule takes (16-bit, heads and chunks of 64), every
    backward launch: loads pipelined, ``output_programs_per_sm`` programs within shared memory."""
    assert persistent_outputs(getattr(torch, dtype), 64, 64, 64, True)
    config = launch_config(64, 64, 64)
    for name, kernel in compile_for_hopper(dtype, 64, 64, config["output_loop_stages"]).items():
        assert kernel["async_copies"] > 0, f"{name}: the persistent loop was not pipelined"
        assert config["output_programs_per_sm"] * kernel["shared"] <= HOPPER_SHARED_BYTES, (name, kernel)
