"""What the kernels compile to for a Hopper GPU (sm_90), checked on the CPU.

Triton compiles for a GPU it is told about without one being present (its own ptxas does the
last step), so properties that the kernels' speed depends on can be tested anywhere:

- the persistent loop is *pipelined*: Triton's pipeliner turned the next chunk's loads into
  asynchronous copies to shared memory (results/NOTES.md, v8: this is what made the backward
  faster; a loop the pipeliner cannot handle, such as one with another loop inside, gets none);
- the buffers of two such programs, the fewest the persistent grid was measured to pay with, fit
  in one multiprocessor's shared memory (228 KiB on the H100 and H200; the test holds them to
  227 KiB, the most one program may use; the grid takes as many as fit, up to
  ``output_programs_per_sm``): the first v8, whose buffers were three times as large at 128-wide
  heads, failed on the H200 before computing anything;
- float32 inputs are multiplied on tensor cores: with ``input_precision="ieee"`` Triton
  compiles a float32 ``tl.dot`` to scalar fused multiply-adds, which made float32 18x slower
  forward and 28x slower forward+backward on an H200 (results/NOTES.md, "Float32");
- the fused feature maps (:mod:`lionedu.kernels.feature_maps`) and the values' shift
  (:mod:`lionedu.kernels.centring`) compile for sm_90 and for sm_75, the Colab T4's.

The compiler runs in a subprocess, because the tests import the kernels under Triton's
interpreter (conftest.py), which replaces the compilable kernels.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from lionedu.kernels import launch
from lionedu.kernels.launch import launch_config, persistent_outputs

HOPPER_SHARED_BYTES = 227 * 1024  # shared memory one block may use on an H100 / H200

# Shared by the scripts below: compile one kernel for a CUDA compute capability (sm_90 unless
# told) with the given compile-time switches, integer arguments and pointer types (float32
# where not named).
PRELUDE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lionedu.kernels.output import chunk_output_kernel
from lionedu.kernels.states import chunk_states_kernel

# the output kernel's integer arguments: sizes, the segments' length, its outputs' layouts (layout.py)
OUTPUT_INTEGERS = ("L", "N", "BH", "seg_chunks", "H", "out_sb", "out_sh", "out_sl", "second_sb", "second_sh",
                   "second_sl", "decay_heads")

def compile_for_gpu(kernel, consts, integers, pointers=None, capability=90, num_warps=4):
    names = [p.name for p in kernel.params]
    signature = {n: (pointers or {}).get(n, "*fp32") for n in names if n.endswith("_ptr")}
    signature.update({n: "i32" for n in integers})
    source = ASTSource(fn=kernel, signature={**signature, **{c: "constexpr" for c in consts}},
                       constexprs={(names.index(c),): v for c, v in consts.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps, num_stages=1))
"""

COMPILE = PRELUDE + r"""
dtype, d, chunk, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pointer = {"bfloat16": "*bf16", "float16": "*fp16"}[dtype]
pointers = {n: pointer for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "partner_ptr", "q2_ptr", "out2_ptr", "y_ptr",
                                  "dn_ptr")}
launches = {  # the backward's three output launches (lionedu/kernels/autograd.py), LION-S, bidirectional
    "dQ": dict(ROW_OFFSET=True, SPLIT=True, TRANSPOSED_STATE=True, SHIFT=2, NORMALISER_GRADIENT=True),
    "dK": dict(COL_OFFSET=True, SPLIT=True, SHIFT=1),
    # LION-D's: one decay per head, and each chunk's moments of the partner dots
    "dQ of LION-D": dict(ROW_OFFSET=True, SPLIT=True, DOT_MOMENTS=True, TRANSPOSED_STATE=True, SHIFT=2,
                         NORMALISER_GRADIENT=True, SCALAR_DECAY=True),
    "dK of LION-D": dict(COL_OFFSET=True, SPLIT=True, DOT_MOMENTS=True, SHIFT=1, SCALAR_DECAY=True),
    # causal: dQ keeps the keys before, dK those after (one triangle's products and moments each)
    "dQ of causal LION-D": dict(ROW_OFFSET=True, SPLIT=True, DOT_MOMENTS=True, TRANSPOSED_STATE=True, SHIFT=2,
                                NORMALISER_GRADIENT=True, SCALAR_DECAY=True, UPPER=False),
    "dK of causal LION-D": dict(COL_OFFSET=True, SPLIT=True, DOT_MOMENTS=True, SHIFT=1, SCALAR_DECAY=True, LOWER=False),
    "dV": dict(TRANSPOSED_STATE=True),
    # dK and dV in one launch (launch.chunk_outputs_and_twin), which runs one program per chunk
    "dK and dV": dict(COL_OFFSET=True, SPLIT=True, SHIFT=1, TWIN=True, PERSISTENT=False, LOOP_STAGES=1),
}
result = {}
for name, flags in launches.items():
    consts = dict(LOWER=True, UPPER=True, HAS_DECAY=True, SCALAR_DECAY=False, WITH_DEN=False, NORMALIZE=False,
                  ROW_OFFSET=False, COL_OFFSET=False, SPLIT=False, DOT_MOMENTS=False, TRANSPOSED_STATE=False, SHIFT=0,
                  SHIFTED=False, TWIN=False, CARRIES=False, NORMALISER_GRADIENT=False, CHUNK=chunk, DK=d, DV=d,
                  BLOCK_DV=min(d, 64), BLOCK_DV2=min(d, 64),
                  PRECISION="tf32",
                  PERSISTENT=True, LOOP_STAGES=stages)
    consts.update(flags)
    dots = "*fp64" if consts["DOT_MOMENTS"] else "*fp32"  # the moments are float64
    kernel = compile_for_gpu(chunk_output_kernel, consts, OUTPUT_INTEGERS,
                             {**pointers, "dot_before_ptr": dots, "dot_after_ptr": dots})
    result[name] = dict(shared=kernel.metadata.shared,
                        async_copies=kernel.asm["ttgir"].count("async_copy_global_to_local"))
print(json.dumps(result))
"""

COMPILE_FLOAT32 = PRELUDE + r"""
import torch
from lionedu.kernels.centring import shift_constants
precision = sys.argv[1]
shared = dict(HAS_DECAY=True, SCALAR_DECAY=False, CHUNK=64, DK=64, DV=64, PRECISION=precision)
kernels = {  # the forward's two launches (lionedu/kernels/autograd.py), LION-S, normalised, bidirectional
    "states": (chunk_states_kernel, ("L", "N", "stats_blocks", "seg_chunks", "decay_heads"),
               dict(FIRST_DIRECTION=0, WITH_Z=True, WITH_U=False, WITH_W=False, SEGMENTED=False, BLOCK_DK=64,
                    BLOCK_DV=64, WEIGHTS_BY_PRODUCT=False, SHIFT_VALUES=True, **shift_constants(torch.float32))),
    "output": (chunk_output_kernel, OUTPUT_INTEGERS,
               dict(LOWER=True, UPPER=True, WITH_DEN=True, NORMALIZE=True, ROW_OFFSET=False, COL_OFFSET=False,
                    SPLIT=False, DOT_MOMENTS=False, TRANSPOSED_STATE=False, SHIFT=3, SHIFTED=True, TWIN=False,
                    CARRIES=False,
                    NORMALISER_GRADIENT=False, BLOCK_DV=64,
                    BLOCK_DV2=64,
                    PERSISTENT=False, LOOP_STAGES=1)),
}
result = {}
for name, (kernel, integers, consts) in kernels.items():
    ttgir = compile_for_gpu(kernel, {**shared, **consts}, integers).asm["ttgir"]
    result[name] = dict(tensor_core_dots=ttgir.count("warp_group_dot "), scalar_dots=len(re.findall(r"tt\.dot ", ttgir)))
print(json.dumps(result))
"""

COMPILE_STATES_SUMS = PRELUDE + r"""
import torch
from lionedu.kernels.centring import shift_constants
from lionedu.kernels.launch import weighted_sums_by_product
pointer, sums = sys.argv[1], sys.argv[2]
dtype = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}[pointer]
consts = dict(FIRST_DIRECTION=0, HAS_DECAY=True, SCALAR_DECAY=False, WITH_Z="z" in sums, WITH_U="u" in sums,
              WITH_W="w" in sums, SEGMENTED=False, CHUNK=64, DK=64, DV=64, BLOCK_DK=64, BLOCK_DV=64,
              PRECISION="tf32x3" if pointer == "*fp32" else "tf32", WEIGHTS_BY_PRODUCT=weighted_sums_by_product(dtype),
              SHIFT_VALUES=sums == "z", **shift_constants(dtype))  # the forward's states centre the values
# (lionedu/kernels/centring.py)
ttgir = compile_for_gpu(chunk_states_kernel, consts, ("L", "N", "stats_blocks", "seg_chunks", "decay_heads"),
                        dict(k_ptr=pointer, v_ptr=pointer, S_ptr=pointer)).asm["ttgir"]
dots = ttgir.count("warp_group_dot ") + len(re.findall(r"tt\.dot ", ttgir))  # Hopper's products and mma.sync's
# the layout of mma.sync's result: which warps hold which rows and columns
layouts = re.findall(r"nvidia_mma<\{versionMajor = 2, versionMinor = \d+, warpsPerCTA = \[(\d+), (\d+)\]", ttgir)
print(json.dumps(dict(dots=dots, reductions=ttgir.count('"tt.reduce"'), warps_per_rows_cols=sorted(set(layouts)))))
"""


COMPILE_FEATURE_MAPS = PRELUDE + r"""
from lionedu.kernels.feature_maps import ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU, ROWS
from lionedu.kernels.feature_maps import feature_map_backward_kernel, feature_map_kernel
capability, pointer = int(sys.argv[1]), sys.argv[2]
strides = ("s_x_b", "s_x_h", "s_x_l")
backward_strides = strides + ("s_dphi_b", "s_dphi_h", "s_dphi_l", "s_dx_b", "s_dx_h", "s_dx_l")
result = {}
for kind in (ELU_PLUS_ONE, NORMALIZED_SHIFTED_SILU):
    consts = dict(KIND=kind, ROWS=ROWS, BLOCK_D=64)
    forward = compile_for_gpu(feature_map_kernel, consts, strides + ("H", "L", "D", "R"),
                               dict(x_ptr=pointer, out_ptr=pointer), capability)
    backward = compile_for_gpu(feature_map_backward_kernel, consts, backward_strides + ("H", "L", "D", "R"),
                                dict(x_ptr=pointer, dphi_ptr=pointer, dx_ptr=pointer), capability)
    result[kind] = [len(forward.asm["cubin"]), len(backward.asm["cubin"])]
print(json.dumps(result))
"""

COMPILE_CENTRING = PRELUDE + r"""
import torch
from lionedu.kernels.centring import TILES, shift_constants, shift_kernel, stats_rows, value_stats_kernel
capability, pointer = int(sys.argv[1]), sys.argv[2]
dtype = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}[pointer]
stats = [compile_for_gpu(value_stats_kernel, dict(DV=dv, ROWS=stats_rows(dv), TILES=TILES, CHUNK_SUMS=sums,
                                                   CHUNK=chunk), ("L", "N", "H", "ld_sb", "ld_sh", "ld_sl"),
                         dict(v_ptr=pointer, log_decay_ptr=pointer), capability, num_warps=8)  # as centring launches it
         for dv in (64, 256)  # the benchmark's heads, and the widest (fewer rows a tile)
         for sums, chunk in ((False, 16), (True, 16), (True, 128))]  # with LION-S's chunk sums, narrow and wide
shift = compile_for_gpu(shift_kernel, dict(DV=64, **shift_constants(dtype)), ("L", "P"), {}, capability)
print(json.dumps(dict(stats=min(len(k.asm["cubin"]) for k in stats), shift=len(shift.asm["cubin"]),
                      atomics=sum(len(re.findall(r"(?<![\w.])(?:atom|red)\.", k.asm["ptx"])) for k in (*stats, shift)))))
"""


COMPILE_DECAY_GRADIENT = PRELUDE + r"""
from lionedu.kernels.decay_gradient import BLOCK, decay_gradient_kernel, head_decay_gradient_kernel
capability = int(sys.argv[1])
rows = compile_for_gpu(decay_gradient_kernel, dict(BLOCK=BLOCK), ("L",), {}, capability)
heads = compile_for_gpu(head_decay_gradient_kernel, dict(BLOCK=BLOCK), ("L", "N", "B", "H"),
                        {n: "*fp64" for n in ("r_before_ptr", "r_after_ptr", "c_before_ptr", "c_after_ptr")}, capability)
print(json.dumps(dict(rows=len(rows.asm["cubin"]), heads=len(heads.asm["cubin"]),
                      atomics=sum(len(re.findall(r"(?<![\w.])(?:atom|red)\.", k.asm["ptx"])) for k in (rows, heads)))))
"""


def _compile(script: str, *args) -> dict:
    """Run one of the compile scripts above without the interpreter; its last line, parsed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_for_hopper(dtype: str, d: int, chunk: int, stages: int) -> dict:
    """{launch: {"shared": bytes, "async_copies": count}} of the persistent backward launches."""
    return _compile(COMPILE, dtype, d, chunk, stages)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_persistent_backward_is_pipelined_and_fits_on_hopper(dtype):
    """The largest configuration the rule takes (16-bit, heads and chunks of 64), every
    backward launch: loads pipelined, two programs within shared memory."""
    assert persistent_outputs(getattr(torch, dtype), 64, 64, 64, True)
    config = launch_config(64, 64, 64)
    launches = compile_for_hopper(dtype, 64, 64, config["output_loop_stages"])
    launches.pop("dK and dV")  # one program per chunk: no loop to pipeline (the next test)
    for name, kernel in launches.items():
        assert kernel["async_copies"] > 0, f"{name}: the persistent loop was not pipelined"
        assert 2 * kernel["shared"] <= HOPPER_SHARED_BYTES, (name, kernel)


@pytest.mark.parametrize("d", [64, 128])
def test_paired_backward_launch_fits_on_hopper(d):
    """dK and dV in one launch (the rule takes it for 16-bit heads off the persistent grid: LIT,
    and heads wider than 64) compiles for sm_90 and fits in a block's shared memory, at 64- and
    128-wide heads."""
    kernel = compile_for_hopper("bfloat16", d, 64, 1)["dK and dV"]
    assert 0 < kernel["shared"] <= HOPPER_SHARED_BYTES, kernel


def test_float32_dots_run_on_tensor_cores_on_hopper(monkeypatch):
    """The precision the launcher picks for float32 inputs on a compute-capability-9 GPU
    compiles every ``tl.dot`` of the forward's two kernels to tensor-core products (three per
    dot: tf32x3), none to scalar multiply-adds (what ``"ieee"`` gives; mutation-checked)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    precision = launch.float32_dot_precision.__wrapped__(torch.device("cuda", 0))
    for name, dots in _compile(COMPILE_FLOAT32, precision).items():
        assert dots["tensor_core_dots"] > 0 and dots["scalar_dots"] == 0, (name, precision, dots)


@pytest.mark.parametrize("pointer", ["*bf16", "*fp16", "*fp32"])
@pytest.mark.parametrize("sums", ["z", "u", "w"])
def test_states_kernel_sums_on_tensor_cores(pointer, sums):
    """The sums that ride along the states, with the switches the launcher passes: the
    normaliser's key sums z (forward) and the value sums u, w (the backward's offsets).

    - z, 16-bit: a second tensor-core product, with a block of ones; no reduction left in the
      walk (the two counted with z are the shift's, before the walk: below).
    - u and w, bfloat16: a second product, their weights as a [16, C] block (mma.sync), and one
      reduction of its 16 rows when stored; the product's layout puts the four warps side by
      side along the columns (warpsPerCTA [1, 4]), so each warp holds all 16 rows of its
      columns and that reduction stays inside warps.
    - u and w, float16 (whose weights could leave float16's range) and every float32 sum (a
      float32 product is three TF32 products): a reduction over the chunk, and the state's dot
      alone (tf32x3: three products).
    Dev runs §37 and §39 measured both ways. With z (the forward of normalised attention) the
    kernel also takes the values' shift from their block sums before its walk: a sum and a
    maximum over the blocks, two reductions more, outside the walk."""
    counts = _compile(COMPILE_STATES_SUMS, pointer, sums)
    shift = 2 if sums == "z" else 0
    if pointer == "*fp32":
        assert counts == dict(dots=3, reductions=1 + shift, warps_per_rows_cols=[]), counts
    elif sums == "z":
        assert counts == dict(dots=2, reductions=shift, warps_per_rows_cols=[]), counts
    elif pointer == "*bf16":
        assert counts == dict(dots=2, reductions=1, warps_per_rows_cols=[["1", "4"]]), counts
    else:
        assert counts == dict(dots=1, reductions=1, warps_per_rows_cols=[]), counts


@pytest.mark.parametrize("capability, pointer", [(90, "*bf16"), (75, "*fp16")])
def test_feature_map_kernels_compile(capability, pointer):
    """Both fused feature maps, forward and backward, compile to machine code for an H100/H200
    (sm_90, bfloat16) and for a T4 (sm_75, float16; no bfloat16 there)."""
    sizes = _compile(COMPILE_FEATURE_MAPS, capability, pointer)
    assert len(sizes) == 2 and all(forward > 0 and backward > 0 for forward, backward in sizes.values()), sizes


@pytest.mark.parametrize("capability, dtype", [(90, torch.bfloat16), (90, torch.float16), (90, torch.float32),
                                               (75, torch.float16), (75, torch.float32)])
def test_centring_kernels_compile(capability, dtype):
    """The values' shift (lionedu/kernels/centring.py): both kernels compile to machine code for
    an H100/H200 and a T4 in each dtype they take there (the stats kernel as launched for 64- and
    256-wide heads, with and without LION-S's chunk sums of the log decays), without atomics (the blocks' sums are
    added in a fixed order, so a call's bits do not depend on which program finished first)."""
    pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    sizes = _compile(COMPILE_CENTRING, capability, pointer)
    assert sizes["stats"] > 0 and sizes["shift"] > 0 and sizes["atomics"] == 0, sizes


@pytest.mark.parametrize("capability", [90, 75])
def test_decay_gradient_kernels_compile(capability):
    """The decay gradient's two kernels (lionedu/kernels/decay_gradient.py), the per-position scan and
    LION-D's per-head sum of the float64 moments, compile for an H100/H200 and a T4, without atomics:
    each head's chunks are added in a fixed order by one program."""
    sizes = _compile(COMPILE_DECAY_GRADIENT, capability)
    assert sizes["rows"] > 0 and sizes["heads"] > 0 and sizes["atomics"] == 0, sizes
