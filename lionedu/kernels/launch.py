"""Launching the two kernels: one masked operator = chunk states, then chunk outputs.

Everything here works on flattened, contiguous ``[BH, L, .]`` tensors whose head dims are
powers of two (:mod:`.autograd` pads them). :func:`chunk_states` runs kernel 1 and
:func:`chunk_outputs` kernel 2; :func:`masked_operator` is the two in a row. The backward
pass calls the two halves separately, because several of its operators read the same
states (:mod:`.autograd`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .carries import end_record_size, segment_carries_kernel
from .centring import shift_constants
from .fast_launch import Launcher
from .layout import check_flat, check_rows, heads, row_strides
from .output import chunk_output_kernel
from .registers import build_resources, registers_for_programs, resident_programs
from .states import chunk_states_kernel

_launch_states = Launcher(chunk_states_kernel)
_launch_carries = Launcher(segment_carries_kernel)
_launch_output = Launcher(chunk_output_kernel)

__all__ = ["States", "SegmentStarts", "padded_chunk_sums", "chunk_states", "chunk_outputs", "masked_operator",
           "launch_config", "states_plan", "persistent_outputs", "twin_outputs", "chunk_outputs_and_twin",
           "chunk_outputs_through_normaliser", "float32_dot_precision", "tile_dot_precision", "ceil_div",
           "next_power_of_2"]


MIN_SEGMENT_CHUNKS = 8  # a walk is cut into segments of at least this many chunks (states_plan)


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints. Plain Python on purpose: ``triton.cdiv`` and
    ``triton.next_power_of_2`` cost about 2 µs a call in recent Triton versions, and the
    launchers run on every forward and backward pass, where host time is what short
    sequences wait for."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``); see :func:`ceil_div`."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; under Triton's interpreter (CPU) a nominal 1."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _multiprocessor_memory(device: torch.device) -> tuple:
    """``(registers, shared memory bytes or None)`` of one multiprocessor of a CUDA device (``None``
    where this PyTorch does not report it)."""
    props = torch.cuda.get_device_properties(device)
    return (getattr(props, "regs_per_multiprocessor", 65536),
            getattr(props, "shared_memory_per_multiprocessor", None))


@functools.lru_cache(maxsize=256)  # keyed by the compiled kernel itself: one decision per build
def _resident(compiled, device: torch.device, warps: int, most: int) -> int:
    """How many programs of ``compiled`` (a launch of ``warps`` warps) share a multiprocessor of
    ``device``, at most ``most``. Where the build (Triton's interpreter), its counts or the shared
    memory of a multiprocessor are not known, and on AMD GPUs: at most 2, the persistent grid's
    size before v23 (measured, dev runs §25)."""
    known = compiled is not None and device.type == "cuda" and torch.version.hip is None  # (AMD: other warps, registers)
    resources = build_resources(compiled) if known else None
    registers, shared = _multiprocessor_memory(device) if resources is not None else (None, None)
    if shared is None:
        return min(most, 2)
    return resident_programs(*resources, warps, most, registers, shared)


def _persistent_grid(work: int, device: torch.device, warps: int, most: int, compiled) -> tuple:
    """The persistent grid of a launch of ``work`` chunks: as many programs as share each
    multiprocessor (:func:`_resident`), times the multiprocessors, at most one per chunk."""
    return (min(work, _resident(compiled, device, warps, most) * _multiprocessors(device)),)


@functools.lru_cache(maxsize=4096)  # keyed by sizes and lengths: bounded, for servers that see many lengths
def states_plan(dk: int, dv: int, walks: int, chunks: int, multiprocessors: int) -> tuple:
    """``(block_dk, block_dv, segments)``: how the states kernel shares out its walks.

    The kernel walks the chunks of each sequence one after another, one program per
    sequence, direction, tile of the state (``block_dk`` key features by ``block_dv`` value
    columns) and segment of the walk (:mod:`.carries`): ``walks`` (sequences times
    directions) times tiles times segments programs. The plan, measured on an H200
    (results/NOTES.md, "Few sequences"):

    - 64 x 64 tiles (heads wider than 128: all key features by 32 columns, so a tile's state
      stays in registers) and no segments where that already gives at least 3/4 of a
      program per multiprocessor: more programs did not pay there (bidirectional,
      B*H = 64: two segments +28 % forward, 32 x 64 tiles +7 %);
    - otherwise the walks are cut into segments until there are about two programs per
      multiprocessor, each segment at least 8 chunks long: against v6's tile rule, forward
      0.17-0.69x and fwd+bwd 0.22-0.68x with B*H = 4 to 16 at L = 4096 to 65536; causal
      passes at B*H = 64 fwd+bwd 0.93-0.99x at L = 4096 and 16384 (at 1024 two segments gave
      1.01-1.06x: next point; with few sequences, narrower tiles alone gave 0.67-0.86x of
      v6's forward);
    - except where only two segments would fit (walks of 16 to 23 chunks) and 64 x 32 tiles
      fill the GPU without segments: those are taken (B*H = 64, causal, L = 1024: forward
      -4 % for LION-S and -10 % for LIT, fwd+bwd -1 % and -7 %; dev runs §24);
    - where the sequences are too short for enough segments, narrower tiles as well:
      64 x 32, 32 x 32, 16 x 32, 16 x 16, the widest that gives 3/4 of a program per
      multiprocessor.
    """
    def programs(tile, segments=1):
        return walks * ceil_div(dk, tile[0]) * ceil_div(dv, tile[1]) * segments

    def fills(count):
        return 4 * count >= 3 * multiprocessors

    wide = dk > 128 or dv > 128
    tiles = [(dk, 32)] if wide else [(64, 64), (64, 32)]
    tiles = [(min(dk, a), min(dv, b)) for a, b in tiles + [(32, 32), (16, 32), (16, 16)]]
    if fills(programs(tiles[0])):
        return tiles[0] + (1,)
    segments = max(1, min(ceil_div(2 * multiprocessors, max(1, programs(tiles[0]))), chunks // MIN_SEGMENT_CHUNKS))
    if segments == 2 and not wide and fills(programs(tiles[1])):
        return tiles[1] + (1,)  # a walk of 16-23 chunks: halving the tile beats halving the walk
    for tile in tiles:
        if fills(programs(tile, segments)):
            return tile + (segments,)
    return tiles[-1] + (segments,)


@functools.lru_cache(maxsize=4096)  # called on every launch: a cached dict (read it, do not change it)
def launch_config(dk: int, dv: int, chunk: int, walks: int = 0, multiprocessors: int = 1, chunks: int = 1) -> dict:
    """Tile widths, warps and pipeline stages for head dims ``dk``, ``dv`` and chunk size
    ``chunk`` (results/NOTES.md, tuning). ``walks``: the states kernel's sequences times
    directions, ``chunks`` its chunks per sequence, ``multiprocessors`` the device's (left at
    their defaults, only the output kernel's entries are meaningful). How the states kernel
    shares out its walks: :func:`states_plan`. The
    output kernel is parallel over chunks already, computes the ``C x C`` scores once per
    program and loops over value tiles, so it wants wide ones; on its persistent grid
    (:func:`persistent_outputs`) it runs as many programs per multiprocessor as the compiled
    build's registers and shared memory let share one, at most ``output_programs_per_sm``, with
    ``output_loop_stages`` chunks' loads in flight, and a four-warp build is squeezed into
    ``output_persistent_registers`` (168) per thread, three programs, where it lands a little over
    them; on one program per chunk, with four warps, into ``output_registers`` (128), four programs
    per multiprocessor (:mod:`.registers`; ``None``: never).
    """
    wide = dk > 128 or dv > 128
    block_dk, block_dv, segments = states_plan(dk, dv, walks, chunks, multiprocessors)
    output_warps = 8 if wide or chunk > 64 else 4
    return dict(states_block_dk=block_dk, states_block_dv=block_dv, states_segments=segments, states_warps=4,
                states_stages=2 if wide else 3,
                output_block_dv=min(dv, 64), output_warps=output_warps,
                output_stages=1, output_programs_per_sm=3, output_loop_stages=2,
                # four programs of four warps (measured); 8-warp builds are left to the compiler
                output_registers=registers_for_programs(output_warps, 4) if output_warps == 4 else None,
                # on the persistent grid, three (v23, dev runs §55)
                output_persistent_registers=registers_for_programs(output_warps, 3) if output_warps == 4 else None)


def persistent_outputs(dtype: torch.dtype, dk: int, dv: int, chunk: int, decays: bool) -> bool:
    """Whether the backward pass's output launches use the persistent grid (``chunk_outputs``'s
    ``persistent``), for inputs of ``dtype`` with (padded) head dims ``dk``, ``dv``, chunk size
    ``chunk``, and ``decays`` (LION-S or LION-D; LIT has none).

    Measured on an H200 (results/NOTES.md, dev runs §25-26; B*H = 64, D = Dv = 64, C = 64,
    bf16, CUDA-graph timing): forward+backward of LION-S and LION-D -3 to -4 % at L = 1024,
    -9 to -10 % at 4096, -12 to -13 % at 16384; LIT's -0.3 to +6 %, so LIT keeps one program
    per chunk. The forward's own launch gained little or lost (-1 % at 4096, -4 % at 16384,
    +5 to +11 % at 1024) and keeps one program per chunk. Only the measured sizes take it:
    16-bit inputs, heads up to 64, chunks up to 64. (128-wide heads do not pay: with 128-wide
    value tiles the two pipelined stages need more shared memory than the H200 has, and with
    64-wide tiles the loop over them keeps the persistent loop from being pipelined, +2-3 %
    fwd+bwd; dev runs §32.) float32 stays on one program per chunk: with its
    tensor-core dots (:func:`float32_dot_precision`) the persistent grid was 21 % slower
    (dev runs §30); LIT's, timed again, was -1 to +5 % (§29)."""
    return decays and dtype != torch.float32 and dk <= 64 and dv <= 64 and chunk <= 64


def twin_outputs(dtype: torch.dtype, dk: int, dv: int, chunk: int, decays: bool) -> bool:
    """Whether the backward pass makes dK and dV in one output launch
    (:func:`chunk_outputs_and_twin`, one program per chunk), for the arguments of
    :func:`persistent_outputs`: for 16-bit inputs whose two launches would not run on the
    persistent grid.

    Measured on an H200 (results/NOTES.md, 1c; B*H = 64, bf16 unless said, CUDA-graph timing of
    forward+backward): with D = Dv = 64, LIT -2.9 to -3.4 % bidirectional and -0.1 to -2.6 % causal
    at L = 1024 to 16384; with D = Dv = 128 at L = 4096, LION-S -1.2 % and LIT -3.9 %. Where
    the persistent grid runs the two launches (LION-S and LION-D in 16-bit with heads and chunks
    up to 64), the pair on one program per chunk was slower from L = 4096 on (+1.5 to +5 %; -1
    to -3 % at 1024), and the pair on the persistent grid slower still (+3 to +12 %). float32:
    LION-S +11 %, LIT +0.1 % (D = 64, L = 4096). Those keep two launches."""
    return dtype != torch.float32 and not persistent_outputs(dtype, dk, dv, chunk, decays)


def padded_chunk_sums(log_decay, chunk_size: int):
    """``g``: running sums of ``log_decay [BH, L]`` (any float dtype) restarted at every chunk,
    ``[BH, N*C]`` float32.

    The tail is padded with zero log decays (decay 1) to whole chunks, so the last entry of
    every chunk is its total ``G``. O(L) work in PyTorch: one cumsum, which also makes the
    float32 copy (three PyTorch calls where L is a multiple of C; each costs the host a few µs).
    """
    BH, L = log_decay.shape
    N = ceil_div(L, chunk_size)
    if N * chunk_size != L:
        log_decay = F.pad(log_decay, (0, N * chunk_size - L))
    return torch.cumsum(log_decay.reshape(BH, N, chunk_size), -1, dtype=torch.float32).view(BH, N * chunk_size)


class SegmentStarts(NamedTuple):
    """What a walk in ``P`` segments owes each segment, for the output kernel to add as it reads the
    states (:mod:`.carries`, ``STARTS_ONLY``): ``C [slots, BH, P, DK, DV]`` and ``z [slots, BH, P,
    DK]`` (or ``None`` without key sums) float32, the state and key sums entering each segment,
    ``gamma [slots, BH, N]`` float32 (``None`` without decays), each chunk's log decay from its
    segment's edge, and ``seg_chunks``, the chunks per segment."""
    C: torch.Tensor
    z: Optional[torch.Tensor]
    gamma: Optional[torch.Tensor]
    seg_chunks: int


class States(NamedTuple):
    """What kernel 1 leaves for kernel 2, for keys ``[BH, L, DK]`` and values ``[BH, L, DV]``.

    ``S [slots, BH, N, DK, DV]`` (the inputs' dtype) holds the state entering each chunk,
    slot 0 for the first direction asked for; ``z [slots, BH, N, DK]``, ``u`` and ``w``
    ``[slots, BH, N, DV]`` (float32, or ``None`` where not computed) the decayed sums of the
    keys, the values and the values times the column offsets. ``starts``: ``None``, or, for a
    walk in segments whose carries were not added (``chunk_states(..., fold_carries=True)``),
    what each segment is owed (:class:`SegmentStarts`): ``S`` and ``z`` then hold each
    segment's own keys only.
    """
    S: torch.Tensor
    z: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    starts: Optional[SegmentStarts] = None


@functools.lru_cache(maxsize=None)
def float32_dot_precision(device: torch.device) -> str:
    """How the kernels multiply float32 tiles on ``device`` (``tl.dot``'s ``input_precision``).

    ``"tf32x3"`` where tensor cores take TF32 (CUDA compute capability 8.0 and later): each
    operand is split into a TF32 part and a TF32 remainder, and three tensor-core products
    (big x big, big x small, small x big) give float32 accuracy (on an H200 the errors against
    float64 were those of ``"ieee"`` within a factor 2, and float32 LION-S at L = 4096 ran
    18x faster forward, 28x forward+backward: results/NOTES.md, "Float32"). ``"ieee"``
    elsewhere: older GPUs, whose float32 products do not use tensor cores anyway, and the
    interpreter, which multiplies in float32 whatever it is told.
    """
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


def weighted_sums_by_product(dtype: torch.dtype) -> bool:
    """Whether the states kernel takes the value sums ``u`` and ``w`` (chapter 7's offsets) as a
    tensor-core product with the float32 weights split into two parts in the inputs' format
    (``states._weighted_value_sum``; dev runs §39: the backward's states pass 30-40 % faster).

    bfloat16 only. Float32 has no faster product (three TF32 products a dot), and a float16
    row cannot hold a weight past 65504 or below ~6e-8, while the offsets ``dc`` have no
    bound; bfloat16 has float32's range.
    """
    return dtype == torch.bfloat16


def tile_dot_precision(t) -> str:
    """``tl.dot``'s ``input_precision`` for the kernels' tiles of tensor ``t``: :func:`float32_dot_precision`
    of its device for float32, else ``"tf32"`` (which 16-bit tiles ignore)."""
    return float32_dot_precision(t.device) if t.dtype == torch.float32 else "tf32"


def _decay_kind(g) -> tuple:
    """``(HAS_DECAY, SCALAR_DECAY)`` for the decays ``g`` (see :func:`masked_operator`)."""
    return g is not None, g is not None and g.dim() == 1


def _decay_heads(g, BH: int) -> int:
    """The kernels' ``decay_heads``: the entries of a one-per-head ``g`` (sequence ``bh`` takes
    ``g[bh % decay_heads]``), else 1 (unused). A length that does not divide ``BH`` is refused."""
    if g is None or g.dim() != 1:
        return 1
    if g.dtype != torch.float32 or not g.is_contiguous():
        raise ValueError(f"g with one log decay per head must be a contiguous float32 tensor, got {g.dtype} with "
                         f"stride {g.stride()}")
    if g.shape[0] == 0 or BH % g.shape[0]:
        raise ValueError(f"g with one log decay per head must have a length that divides BH = {BH} "
                         f"(sequences b * H + h take g[h]), got {g.shape[0]}")
    return g.shape[0]


# The launch options of each configuration, made once (fast_launch.LaunchOptions): building the
# constexpr values afresh on every call was a few µs of a launch's host time. They are cached on
# every value they hold, computed by the caller (launch_config's tiles, warps and stages, the
# rules' choices), never read inside: a launch's grid and its options come from one configuration.
@functools.lru_cache(maxsize=4096)
def _states_options(DK: int, DV: int, chunk_size: int, dtype, precision: str, has_decay: bool, scalar_decay: bool,
                    first_direction: int, with_z: bool, with_u: bool, with_w: bool, shift_values: bool,
                    segmented: bool, weights_by_product: bool, block_dk: int, block_dv: int, warps: int, stages: int):
    return _launch_states.options(
        num_warps=warps, num_stages=stages, FIRST_DIRECTION=first_direction, HAS_DECAY=has_decay,
        SCALAR_DECAY=scalar_decay, WITH_Z=with_z, WITH_U=with_u, WITH_W=with_w, SEGMENTED=segmented,
        CHUNK=chunk_size, DK=DK, DV=DV, BLOCK_DK=block_dk, BLOCK_DV=block_dv, PRECISION=precision,
        WEIGHTS_BY_PRODUCT=weights_by_product, SHIFT_VALUES=shift_values, **shift_constants(dtype))


@functools.lru_cache(maxsize=4096)
def _output_options(DK: int, DV: int, chunk_size: int, precision: str, has_decay: bool, scalar_decay: bool,
                    lower: bool, upper: bool, with_den: bool, normalize: bool, row_offset: bool, col_offset: bool,
                    split: bool, dot_moments: bool, transposed_state: bool, shift: int, shifted: bool, twin: bool,
                    carries: bool, normaliser_gradient: bool, persistent: bool, block_dv: int, block_dv2: int,
                    warps: int, stages: int, loop_stages: int, registers: Optional[int]):
    return _launch_output.options(
        num_warps=warps, num_stages=stages, register_target=registers, LOWER=lower, UPPER=upper, HAS_DECAY=has_decay,
        SCALAR_DECAY=scalar_decay,
        WITH_DEN=with_den, NORMALIZE=normalize, ROW_OFFSET=row_offset, COL_OFFSET=col_offset, SPLIT=split,
        DOT_MOMENTS=dot_moments, TRANSPOSED_STATE=transposed_state, SHIFT=shift, SHIFTED=shifted, TWIN=twin,
        CARRIES=carries, NORMALISER_GRADIENT=normaliser_gradient, CHUNK=chunk_size, DK=DK, DV=DV, BLOCK_DV=block_dv,
        BLOCK_DV2=block_dv2, PRECISION=precision, PERSISTENT=persistent, LOOP_STAGES=loop_stages)


def chunk_states(k, v, g, *, lower: bool, upper: bool, chunk_size: int, with_z: bool = False,
                 with_u: bool = False, col_offset=None, value_stats=None, shift_out=None,
                 fold_carries: bool = False) -> States:
    """Kernel 1: the states every chunk reads, for keys ``k [BH, L, DK]`` and values ``v [BH, L, DV]``.

    ``lower`` / ``upper`` ask for the forward states (keys before each chunk) and the
    backward states (keys after it); ``with_z``, ``with_u`` and ``col_offset`` (``b [BH, L]``
    float32) for the key sums, value sums and offset-weighted value sums; ``value_stats``
    (:func:`.centring.value_stats` of ``v``) and ``shift_out`` (a ``[BH, DV]`` float32 tensor),
    together: the states of the centred values ``v - m``, the kernel writing the shift ``m``
    to ``shift_out`` (:mod:`.centring`). ``fold_carries``: where the walk runs in segments, leave
    each segment's states as it made them and return what the segments are owed instead
    (``States.starts``), for :func:`chunk_outputs` to add as it reads them; for states read once
    (a forward without gradients), it saves the carries' pass over them. Not with ``with_u`` or
    ``col_offset``.
    """
    if not (lower or upper):
        raise ValueError("chunk_states needs lower, upper or both")
    if (shift_out is None) != (value_stats is None):
        raise ValueError("chunk_states takes value_stats and shift_out together")
    if fold_carries and (with_u or col_offset is not None):
        raise ValueError("chunk_states folds the carries (fold_carries) only without the value sums (with_u, col_offset)")
    if shift_out is not None and (not with_z or with_u or col_offset is not None):
        raise ValueError("chunk_states centres the values (shift_out) only with the key sums (with_z), "
                         "without the value sums (with_u, col_offset)")
    BH, L, DK = k.shape
    DV = v.shape[-1]
    N = ceil_div(L, chunk_size)
    slots = int(lower) + int(upper)
    cfg = launch_config(DK, DV, chunk_size, walks=BH * slots, multiprocessors=_multiprocessors(k.device), chunks=N)
    f32 = dict(device=k.device, dtype=torch.float32)
    st = States(torch.empty(slots, BH, N, DK, DV, device=k.device, dtype=k.dtype),
                torch.empty(slots, BH, N, DK, **f32) if with_z else None,
                torch.empty(slots, BH, N, DV, **f32) if with_u else None,
                torch.empty(slots, BH, N, DV, **f32) if col_offset is not None else None)
    # A walk in segments (carries.py): P segments of seg_chunks chunks, each walked by its own program.
    seg_chunks = ceil_div(N, cfg["states_segments"])
    segments = ceil_div(N, seg_chunks)
    ends = gamma = None
    if segments > 1:
        ends = torch.empty(slots, BH, segments, end_record_size(DK, DV), **f32)
        gamma = torch.empty(slots, BH, N, **f32) if g is not None else None
    has_decay, scalar_decay = _decay_kind(g)
    options = _states_options(DK, DV, chunk_size, v.dtype, tile_dot_precision(k), has_decay, scalar_decay,
                              0 if lower else 1, with_z, with_u, col_offset is not None, shift_out is not None,
                              segments > 1, weighted_sums_by_product(v.dtype), cfg["states_block_dk"],
                              cfg["states_block_dv"], cfg["states_warps"], cfg["states_stages"])
    # Pointers a configuration never reads are None: Triton compiles them away.
    _launch_states.launch(
        (BH, (DK // cfg["states_block_dk"]) * (DV // cfg["states_block_dv"]), slots * segments), options,
        (k, v, g, col_offset, *st[:4], ends, gamma, value_stats, shift_out),
        (L, N, 0 if value_stats is None else value_stats.shape[1], seg_chunks, _decay_heads(g, BH)))
    if segments > 1:
        starts = None
        if fold_carries:
            starts = SegmentStarts(torch.empty(slots, BH, segments, DK, DV, **f32),
                                   torch.empty(slots, BH, segments, DK, **f32) if with_z else None, gamma, seg_chunks)
        _launch_carries((BH, segments, slots), *st[:4], ends, gamma, *(starts[:2] if fold_carries else (None, None)),
                        N, seg_chunks, HAS_DECAY=has_decay, FIRST_DIRECTION=0 if lower else 1, WITH_Z=with_z,
                        WITH_U=with_u, WITH_W=col_offset is not None, DK=DK, DV=DV, BLOCK_DV=min(DV, 64),
                        STARTS_ONLY=fold_carries, num_warps=8 if DK > 128 else 4, num_stages=1)
        st = st._replace(starts=starts)
    return st


def chunk_outputs(q, k, v, g, states: States, *, lower: bool, upper: bool, chunk_size: int,
                  normalize: bool = False, with_den: bool = False, row_offset=None, col_offset=None,
                  partner=None, dot_moments: bool = False, transposed_state: bool = False, out=None,
                  persistent: bool = False, shift=None, shifted: str = "v", shifted_out=None):
    """Kernel 2: ``out_i = sum_j M_ij (q_i . k_j + a_i + b_j) v_j`` for every chunk at once.

    ``q, k: [BH, L, DK]``, ``v: [BH, L, DV]``; ``states`` from :func:`chunk_states` for the
    same ``lower`` / ``upper`` (``S`` as ``[.., DK, DV]``, or as ``[.., DV, DK]`` with
    ``transposed_state``; ``z`` with ``with_den``, ``u`` with ``row_offset``, ``w`` with
    ``col_offset``). ``out``: where to write the result (in ``v``'s dtype, a contiguous
    ``[BH, L, DV]`` tensor or a ``[B, H, L, DV]`` one with ``B * H = BH`` and last stride 1, such
    as a transposed view of ``[B, L, H, DV]``: :mod:`.layout`), or ``None`` for a new one. ``persistent``: launch a few programs per
    multiprocessor that loop over the chunks (:mod:`.output`) instead of one per chunk; the
    same sums. ``shift``: the values' shift ``m`` float32, ``[BH, width]`` of the input named by
    ``shifted`` (``"q"``, ``"k"`` or ``"v"``), which the kernel centres as it loads it
    (:mod:`.centring`); ``shifted_out`` (like ``out``, with ``shifted="v"``): also write
    ``out + m`` there. ``partner``: ``[BH, L, DV]`` contiguous, of ``v``'s dtype. ``dot_moments``
    (with ``partner``): instead of the row dots ``x_i``, each chunk's sums ``sum_i x_i`` and
    ``sum_i i x_i`` (``i`` the position in the sequence), ``[BH, N, 2]`` float64 each: all that a
    decay shared by a head's positions needs (:mod:`.decay_gradient`).
    See :func:`masked_operator` for the rest.

    Returns ``out``, the normaliser ``[BH, L]`` float32 (or ``None``) and the pair of partner
    row dots ``[BH, L]`` float32, or of their moments (or ``None``).
    """
    return _outputs(q, k, v, g, states, None, lower=lower, upper=upper, chunk_size=chunk_size,
                    normalize=normalize, with_den=with_den, row_offset=row_offset, col_offset=col_offset,
                    partner=partner, dot_moments=dot_moments, transposed_state=transposed_state, out=out,
                    persistent=persistent, shift=shift, shifted=shifted, shifted_out=shifted_out)[:3]


def chunk_outputs_and_twin(q, k, v, g, states: States, q2, *, lower: bool, upper: bool, chunk_size: int,
                           col_offset=None, partner=None, dot_moments: bool = False, transposed_state: bool = False,
                           shift=None, out2=None):
    """:func:`chunk_outputs`, and in the same launch its *twin*: the plain operator with queries
    ``q2 [BH, L, DV]``, keys ``v`` and values ``k``, ``out2_i = sum_j M_ij (q2_i . v_j) k_j``.

    The states ``S`` of ``chunk_outputs``'s operator are sums of ``k_j v_j^T``: read the other
    way (transposed where it reads them as stored, and the reverse) they are the twin's
    ``v_j k_j^T``, and the twin's keys and values are the chunk's ``v`` and ``k`` again, so one
    program per chunk makes both outputs and reads those once from memory. The twin has no
    offset, normaliser, partner dots or shift; ``shift``, if given, centres ``q`` alone
    (``shifted="q"``). The backward pass's dK and dV are such a pair (:mod:`.autograd`). One
    program per chunk: on the persistent grid the pair was slower than two launches
    (results/NOTES.md, 1c).

    Returns ``(out, dots, out2)``: ``out`` and ``dots`` as :func:`chunk_outputs` returns them,
    ``out2 [BH, L, DK]`` in ``k``'s dtype: written where ``out2`` says (a tensor laid out as
    :func:`chunk_outputs`'s ``out`` may be), or a new one.
    """
    BH, L = q.shape[:2]
    DV = v.shape[-1]
    check_flat(q2, "q2", (BH, L, DV), k.dtype, k.device, "[BH, L, DV]")  # the twin's queries meet v
    out, _, dots, out2 = _outputs(q, k, v, g, states, q2, lower=lower, upper=upper, chunk_size=chunk_size,
                                  col_offset=col_offset, partner=partner, dot_moments=dot_moments,
                                  transposed_state=transposed_state, shift=shift, shifted="q", out2=out2)
    return out, dots, out2


def chunk_outputs_through_normaliser(dy, y, den, k, v, g, states: States, *, lower: bool, upper: bool,
                                     chunk_size: int, partner=None, dot_moments: bool = False,
                                     transposed_state: bool = False, persistent: bool = False, shift=None,
                                     shifted: str = "v"):
    """:func:`chunk_outputs` whose queries and row offsets are the normaliser's gradient, made in the
    same launch as they are loaded (the dQ operator of normalised attention, :mod:`.autograd`):
    ``dN_i = dy_i / c_i`` and ``dc_i = -(dy_i . y_i) / c_i``, as :func:`.normaliser.normaliser_gradient`
    makes them in a launch of its own.

    ``dy``: the output gradient, ``[BH, L, DK]`` contiguous or ``[B, H, L, DK]`` with ``B * H = BH``
    and last stride 1 (:mod:`.layout`); ``y``: the saved output ``[BH, L, DK]`` contiguous, of
    ``dy``'s dtype; ``den``: the normaliser ``c [BH, L]`` float32, contiguous; ``k [BH, L, DK]``,
    ``v [BH, L, DV]`` and the rest as for :func:`chunk_outputs` (``states`` with ``u``: the row
    offsets meet the value sums).

    Returns ``(out [BH, L, DV], dots or None, dN [BH, L, DK] in dy's dtype, dc [BH, L] float32)``:
    ``dN`` and ``dc`` for the backward's later launches.
    """
    BH, L, DK = k.shape
    check_flat(y, "y", (BH, L, DK), k.dtype, k.device, "[BH, L, DK]")
    check_flat(den, "den", (BH, L), torch.float32, k.device, "[BH, L]")
    check_rows(dy, "dy", BH, L, DK, k.dtype, k.device)
    if states.u is None:
        raise ValueError("chunk_outputs_through_normaliser needs the states' value sums u (chunk_states(..., with_u=True), "
                         "or the forward's key sums): the row offsets meet them")
    if shift is not None and shifted == "q":
        raise ValueError("chunk_outputs_through_normaliser makes its queries dN itself: shifting them (shifted='q') "
                         "is not supported; shift the keys or the values")
    out, _, dots, dn, dc = _outputs(dy, k, v, g, states, None, lower=lower, upper=upper, chunk_size=chunk_size,
                                    partner=partner, dot_moments=dot_moments, transposed_state=transposed_state,
                                    persistent=persistent, shift=shift, shifted=shifted, normaliser=(y, den))
    return out, dots, dn, dc


def _outputs(q, k, v, g, states: States, q2, *, lower: bool, upper: bool, chunk_size: int,
             normalize: bool = False, with_den: bool = False, row_offset=None, col_offset=None,
             partner=None, dot_moments: bool = False, transposed_state: bool = False, out=None,
             persistent: bool = False, shift=None, shifted: str = "v", shifted_out=None, out2=None, normaliser=None):
    """The launch behind :func:`chunk_outputs`, :func:`chunk_outputs_and_twin` and
    :func:`chunk_outputs_through_normaliser`, for ``q, k [BH, L, DK]``, ``v [BH, L, DV]`` and the
    twin's queries ``q2 [BH, L, DV]`` or ``None``; with ``normaliser = (y, den)``, ``q`` is the output
    gradient ``dy``, in its layout, and the row offsets are made in the launch. Returns
    ``(out [BH, L, DV], den [BH, L] or None, dots or None, out2 [BH, L, DK] or None)``, ``out`` and
    ``out2`` in the layouts they were given in (:mod:`.layout`); with ``normaliser``, ``(out, None,
    dots, dN, dc)``."""
    if shifted_out is not None and (shift is None or shifted != "v"):
        raise ValueError("shifted_out needs the values' shift (shift, shifted='v')")
    if row_offset is not None and col_offset is not None:
        raise ValueError("chunk_outputs takes a row offset or a column offset, not both")
    if normalize and not with_den:
        raise ValueError("normalize needs with_den")
    if not (lower or upper):
        raise ValueError("chunk_outputs needs lower, upper or both")
    if dot_moments and partner is None:
        raise ValueError("dot_moments are the moments of the partner dots: it needs a partner")
    if q2 is not None and persistent:
        raise ValueError("the twin operator runs on one program per chunk, not on the persistent grid")
    starts = states.starts
    if starts is not None and (transposed_state or q2 is not None or row_offset is not None or col_offset is not None
                               or normaliser is not None or persistent):
        raise ValueError("chunk_outputs adds a segmented walk's carries (states.starts) only to states read as "
                         "stored, on one program per chunk, without offsets or a twin")
    if starts is not None and (starts.gamma is None) != (g is None):
        raise ValueError("chunk_outputs needs the decays g that chunk_states walked with (states.starts)")
    BH, L, DK = k.shape
    DV = v.shape[-1]
    N = ceil_div(L, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    offset = row_offset if row_offset is not None else col_offset
    y = c = dn = dc = None
    if partner is not None:
        check_flat(partner, "partner", (BH, L, DV), v.dtype, v.device, "[BH, L, DV]")
    if normaliser is not None:  # the kernel makes dN and the row offsets dc, and stores both
        y, c = normaliser
        dn = torch.empty(BH, L, DK, device=q.device, dtype=q.dtype)
        dc = torch.empty(BH, L, **f32)
    if out is None:
        out = torch.empty(BH, L, DV, device=q.device, dtype=v.dtype)
    else:
        check_rows(out, "out", BH, L, DV, v.dtype, q.device, output=True)
    if shifted_out is not None:
        check_rows(shifted_out, "shifted_out", BH, L, DV, v.dtype, q.device, output=True)
    if out2 is not None and q2 is None:
        raise ValueError("out2 is the twin's output: it needs q2")
    if q2 is not None and shifted_out is not None:  # the two share the kernel's second layout
        raise ValueError("the twin (q2) and shifted_out cannot be asked of one launch")
    if q2 is not None:
        if out2 is None:
            out2 = torch.empty(BH, L, DK, device=q.device, dtype=k.dtype)
        else:
            check_rows(out2, "out2", BH, L, DK, k.dtype, q.device, output=True)
    # The kernel's second layout: never two of these (SHIFTED centres v, the twin q; dy needs neither).
    second = shifted_out if shifted_out is not None else out2 if out2 is not None else q if normaliser else None
    H = heads(out, second)
    den = torch.empty(BH, L, **f32) if with_den else None
    dots = None
    if partner is not None:  # the row dots, or each chunk's two moments of them in float64
        dots = tuple(torch.empty(BH, N, 2, device=q.device, dtype=torch.float64) if dot_moments
                     else torch.empty(BH, L, **f32) for _ in range(2))
    cfg = launch_config(DK, DV, chunk_size)
    if persistent:  # a few programs per multiprocessor, each looping over chunks: as many as the build lets fit
        grid = functools.partial(_persistent_grid, N * BH, q.device, cfg["output_warps"],
                                 cfg["output_programs_per_sm"])
    else:  # one program per chunk
        grid = (N, BH)
    options = _output_options(DK, DV, chunk_size, tile_dot_precision(q), *_decay_kind(g), lower, upper, with_den,
                              normalize, row_offset is not None or normaliser is not None, col_offset is not None,
                              partner is not None, dot_moments, transposed_state,
                              0 if shift is None else ("q", "k", "v").index(shifted) + 1, shifted_out is not None,
                              q2 is not None, starts is not None, normaliser is not None, persistent,
                              cfg["output_block_dv"], launch_config(DV, DK, chunk_size)["output_block_dv"],
                              cfg["output_warps"], cfg["output_stages"], cfg["output_loop_stages"],
                              cfg["output_persistent_registers" if persistent else "output_registers"])
    # Pointers a configuration never reads are None: Triton compiles them away.
    _launch_output.launch(
        grid, options,
        (q, k, v, g, offset, *states[:4], partner, out, den, *(dots or (None, None)), shift, shifted_out, q2, out2,
         *((starts.C, starts.z, starts.gamma) if starts is not None else (None, None, None)), y, c, dn, dc),
        (L, N, BH, 1 if starts is None else starts.seg_chunks, H, *row_strides(out, H),
         *(row_strides(second, H) if second is not None else (0, 0, 0)), _decay_heads(g, BH)))
    if normaliser is not None:
        return out, None, dots, dn, dc
    return out, den, dots, out2


def masked_operator(q, k, v, g, *, lower: bool, upper: bool, chunk_size: int, normalize: bool = False,
                    with_den: bool = False, row_offset=None, col_offset=None, partner=None,
                    dot_moments: bool = False, persistent: bool = False, out=None, fold_carries: bool = False):
    """``out_i = sum_j M_ij (q_i . k_j + a_i + b_j) v_j`` over ``j = i`` and, with ``lower``
    / ``upper``, the keys before / after ``i``: :func:`chunk_states`, then :func:`chunk_outputs`.

    ``q, k: [BH, L, DK]``, ``v: [BH, L, DV]`` (one dtype, contiguous, DK and DV powers of two
    >= 16); ``g``: the decays, one of ``None`` (LIT), ``[G]`` float32 with ``G`` dividing ``BH``
    (one log decay per head, LION-D: sequence ``bh`` takes ``g[bh % G]``; ``G = BH`` gives one per
    sequence; the kernels compute the sums) or ``[BH, N*C]`` from
    :func:`padded_chunk_sums` (one per token, LION-S); ``row_offset`` ``a`` or
    ``col_offset`` ``b``: at most one, ``[BH, L]`` float32; ``normalize`` divides by the
    normaliser (needs ``with_den``); ``partner`` ``P [BH, L, DV]`` asks for the row dots
    ``P_i . (keys-before part of out_i)`` and ``P_i . (keys-after part)``, diagonal in neither
    (``dot_moments``: each chunk's two moments of them instead, :func:`chunk_outputs`);
    ``persistent``: the output kernel's grid, ``out``: where to write (:func:`chunk_outputs`);
    ``fold_carries``: a walk in segments leaves its carries to the output kernel
    (:func:`chunk_states`), which reads each state once here; not with an offset.

    Returns ``out [BH, L, DV]`` in ``v``'s dtype, the normaliser ``[BH, L]`` float32 (or
    ``None``) and the pair of row dots ``[BH, L]`` float32, or of their moments (or ``None``).
    """
    if row_offset is not None and col_offset is not None:
        raise ValueError("masked_operator takes a row offset or a column offset, not both")
    states = chunk_states(k, v, g, lower=lower, upper=upper, chunk_size=chunk_size, with_z=with_den,
                          with_u=row_offset is not None, col_offset=col_offset, fold_carries=fold_carries)
    return chunk_outputs(q, k, v, g, states, lower=lower, upper=upper, chunk_size=chunk_size,
                         normalize=normalize, with_den=with_den, row_offset=row_offset,
                         col_offset=col_offset, partner=partner, dot_moments=dot_moments, persistent=persistent,
                         out=out)
