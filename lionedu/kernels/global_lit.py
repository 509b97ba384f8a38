"""LIT's bidirectional forward without a walk (book chapter 8, section 12).

LIT has no decay, so its bidirectional mask is all ones and every position attends to the same
keys: with ``S = K^T V`` (``[D, Dv]``) and ``z = K^T 1`` (``[D]``) summed over the whole sequence,

    y_i = q_i^T S / q_i^T z        (normalised; unnormalised, y_i = q_i^T S).

Nothing is sequential: the sums are a reduction over the sequence, and the outputs are
independent rows. Two kernels make them. :func:`lit_sums_kernel` gives each program a block of
rows and one tile of ``S``; it adds ``K_n^T V_n`` over the block's chunks in float32 and stores
its partial sums, which the host adds up in a fixed order (no atomics, so a call gives the same
bits every time). :func:`lit_output_kernel` reads ``S`` once per program and makes a block of
output rows. Used by :func:`.inference.inference_forward`, for calls without gradients; the
backward pass keeps the chunkwise kernels (chapter 7's operators need their states per chunk).
``S`` enters the products in the inputs' dtype, as the chunkwise kernels' stored states do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_launch import Launcher
from . import launch
from .launch import ceil_div, tile_dot_precision
from .layout import check_rows, heads, row_offsets, row_strides

__all__ = ["lit_forward"]

ROWS = 64  # rows per step of the sums kernel, and per output program (times OUT_STEPS)
OUT_STEPS = 2  # row blocks per output program
TILE = 64  # the widest tile of S a program owns (rows and columns)


@triton.jit
def lit_sums_kernel(
    k_ptr, v_ptr,  # keys [BH, L, DK], values [BH, L, DV], one dtype, contiguous
    S_ptr,  # out: partial sums [BH, P, DK, DV] float32, P = the grid's first axis
    z_ptr,  # out: partial key sums [BH, P, DK] float32 (WITH_Z)
    L, steps,  # sequence length; blocks of ROWS rows per program
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    ROWS: tl.constexpr, WITH_Z: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)  # which block of rows
    bh = tl.program_id(1).to(tl.int64)  # which sequence
    k_tile = tl.program_id(2) // (DV // BLOCK_DV)  # which tile of S: its rows (key features) ...
    v_tile = tl.program_id(2) % (DV // BLOCK_DV)  # ... and its columns (value features)
    dk = k_tile * BLOCK_DK + tl.arange(0, BLOCK_DK)
    dv = v_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    S = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_DK], dtype=tl.float32)
    # The steps are independent of each other except for the running sum, so Triton's pipeliner
    # loads the next rows while this product runs.
    for step in range(0, steps):
        rows = (block * steps + step) * ROWS + tl.arange(0, ROWS)
        ok = rows < L  # rows past the sequence read as 0 and add nothing
        k = tl.load(k_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + (bh * L + rows[:, None]) * DV + dv[None, :], mask=ok[:, None], other=0.0)
        S += tl.dot(tl.trans(k), v, input_precision=PRECISION)  # [BLOCK_DK, ROWS] x [ROWS, BLOCK_DV]
        if WITH_Z:
            z += tl.sum(k.to(tl.float32), axis=0)
    at = bh * tl.num_programs(0) + block
    tl.store(S_ptr + (at * DK + dk[:, None]) * DV + dv[None, :], S)
    if WITH_Z:
        if v_tile == 0:  # z has no value columns: one column tile stores it
            tl.store(z_ptr + at * DK + dk, z)


@triton.jit
def lit_output_kernel(
    q_ptr,  # queries [BH, L, DK], contiguous
    S_ptr, z_ptr,  # the sums S [BH, DK, DV] and z [BH, DK], float32
    out_ptr,  # out: y [BH, L, DV] in q's dtype, in the layout of H, out_sb, out_sh, out_sl (layout.py)
    L, H, out_sb, out_sh, out_sl,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr,
    NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    dk = tl.arange(0, DK)
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    # S is the same for every row of the sequence: load it once, in the inputs' dtype for the
    # tensor cores (as the chunkwise kernels store their states), and reuse it for STEPS blocks.
    S = tl.load(S_ptr + (bh * DK + dk[:, None]) * DV + dv[None, :]).to(q_ptr.dtype.element_ty)
    if NORMALIZE:
        z = tl.load(z_ptr + bh * DK + dk)
    for step in tl.static_range(STEPS):
        rows = (tl.program_id(0) * STEPS + step) * ROWS + tl.arange(0, ROWS)
        ok = rows < L
        q = tl.load(q_ptr + (bh * L + rows[:, None]) * DK + dk[None, :], mask=ok[:, None], other=0.0)
        out = tl.dot(q, S, input_precision=PRECISION)  # [ROWS, BLOCK_DV] float32
        if NORMALIZE:
            den = tl.sum(q.to(tl.float32) * z[None, :], axis=1)  # q_i . z, float32
            out = out / tl.where(ok, den, 1.0)[:, None]
        out_rows = row_offsets(bh, rows, H, out_sb, out_sh, out_sl)
        tl.store(out_ptr + out_rows[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


_launch_sums = Launcher(lit_sums_kernel)
_launch_output = Launcher(lit_output_kernel)


def lit_forward(q, k, v, normalize: bool, out=None):
    """LIT's bidirectional attention ``y [BH, L, DV]`` (``v``'s dtype) for ``q, k [BH, L, DK]``
    and ``v [BH, L, DV]``: one dtype, contiguous, ``DK`` and ``DV`` powers of two >= 16.
    ``out``: where to write, ``[BH, L, DV]`` contiguous or ``[B, H, L, DV]`` with last stride 1
    (:mod:`.layout`), or ``None`` for a new one."""
    BH, L, DK = q.shape
    DV = v.shape[-1]
    block_dk, block_dv = min(DK, TILE), min(DV, TILE)
    tiles = (DK // block_dk) * (DV // block_dv)
    precision = tile_dot_precision(q)
    # Blocks of rows for the sums: enough programs for about two per multiprocessor, each at
    # least one step of ROWS rows.
    chunks = ceil_div(L, ROWS)
    blocks = max(1, min(chunks, ceil_div(2 * launch._multiprocessors(q.device), BH * tiles)))
    steps = ceil_div(chunks, blocks)
    blocks = ceil_div(chunks, steps)
    f32 = dict(device=q.device, dtype=torch.float32)
    S_parts = torch.empty(BH, blocks, DK, DV, **f32)
    z_parts = torch.empty(BH, blocks, DK, **f32) if normalize else S_parts
    _launch_sums((blocks, BH, tiles), k, v, S_parts, z_parts, L, steps, DK=DK, DV=DV, BLOCK_DK=block_dk,
                 BLOCK_DV=block_dv, ROWS=ROWS, WITH_Z=normalize, PRECISION=precision, num_warps=4, num_stages=3)
    S = S_parts.sum(1)  # [BH, DK, DV]: the blocks added in order, in float32
    z = z_parts.sum(1) if normalize else S
    if out is None:
        out = torch.empty(BH, L, DV, device=v.device, dtype=v.dtype)
    check_rows(out, "out", BH, L, DV, v.dtype, v.device, output=True)
    H = heads(out)
    grid = (ceil_div(L, ROWS * OUT_STEPS), BH, DV // block_dv)
    _launch_output(grid, q, S, z, out, L, H, *row_strides(out, H), DK=DK, DV=DV, BLOCK_DV=block_dv, ROWS=ROWS, STEPS=OUT_STEPS,
                   NORMALIZE=normalize, PRECISION=precision, num_warps=4, num_stages=1)
    return out
