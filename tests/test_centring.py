"""The values' shift before normalised attention (lionedu/kernels/centring.py).

On a CPU the kernels run through Triton's interpreter, which takes float16 and float32 at this
level; a GPU adds bfloat16. What is checked, on fresh random values with a common part:

- the shift ``m`` is a multiple of the spacing ``2^(e - p + 1)`` of the dtype's numbers at the
  column's largest ``|v|`` (``p`` significant bits), and the nearest such multiple to the mean;
- the same holds for the shift the states kernel computes, and stores, for attention (its
  sums may be added in another order than :func:`value_shift`'s: another layout);
- ``v - m`` computed as the kernels centre the values on loading them (``shifted_rows``: in
  float32, rounded once to the dtype; here in PyTorch, the kernels' own subtraction is tested
  through attention in test_kernels.py) is exact wherever it stays below the next power of two
  above ``|v|`` (no systematic rounding: the mean itself as the shift fails this);
- no shift for an all-zero column, nor for float16 columns past half its range; float16's
  subnormals are respected.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lionedu.kernels import centring
from lionedu.kernels.centring import (STATS_BLOCK, format_grid, stats_rows, value_shift, value_stats,
                                     value_stats_and_chunk_sums)
from lionedu.kernels.launch import chunk_states
from devices import KERNEL_DEVICE as DEVICE

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Each format's significant bits (the leading one counted) and the log2 of its finest spacing allowed
# (float16's subnormals; 2^-126, float32's smallest normal, for the others): written out here, not
# taken from the module under test.
FORMAT = {torch.float16: (11, -24), torch.bfloat16: (8, -126), torch.float32: (24, -126)}


def _spacing(largest: torch.Tensor, dtype) -> torch.Tensor:
    """``2^(e - p + 1)`` with ``2^e <= largest < 2^(e+1)`` and ``p`` the dtype's significant
    bits, at least the dtype's finest (subnormal) spacing; in float64 (frexp: exact)."""
    bits, finest = FORMAT[dtype]
    _, exponent = torch.frexp(largest)  # largest = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.clamp(exponent - bits, min=finest)
    return torch.ldexp(torch.ones_like(largest), exponent)


@settings(max_examples=25, deadline=None)
@given(BH=st.integers(1, 3), L=st.integers(1, 600), DV=st.sampled_from([16, 32, 64]), dtype=st.sampled_from(DTYPES),
       mean=st.floats(-50, 50), spread=st.floats(1e-6, 10), seed=st.integers(0, 2**31 - 1))
def test_shift_and_centred_values(BH, L, DV, dtype, mean, spread, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    v = mean + spread * (2 * torch.rand(BH, L, DV, generator=gen, device=DEVICE, dtype=torch.float64) - 1)
    v[:, :, 3] = 0  # an all-zero column
    v = v.to(dtype)
    shift = value_shift(v)
    assert shift.shape == (BH, DV) and shift.dtype == torch.float32
    _check_shift(v, shift)
    _check_shift(v, _states_kernel_shift(v, chunk_size=16))


def _states_kernel_shift(v, chunk_size):
    """The shift the states kernel stores for values ``v [BH, L, DV]``, padded to 64 columns as
    attention pads them on a GPU (the padding's shift must be 0): ``[BH, DV]``."""
    BH, _, DV = v.shape
    padded = F.pad(v, (0, 64 - DV))
    stored = torch.full((BH, 64), float("nan"), device=DEVICE)
    chunk_states(padded, padded, None, lower=True, upper=False, chunk_size=chunk_size, with_z=True,
                 value_stats=value_stats(padded), shift_out=stored)
    assert torch.equal(stored[:, DV:], torch.zeros_like(stored[:, DV:]))
    return stored[:, :DV]


def _check_shift(v, shift):
    """``shift [BH, DV]``: on the grid of the column's largest magnitude, the nearest grid point
    to the mean, and ``v - shift`` exact where it stays in ``v``'s binade."""
    dtype = v.dtype
    exact = v.double()
    m = shift.double()
    largest = exact.abs().amax(dim=1)
    spacing = _spacing(largest, dtype)
    ones = largest > 0
    assert torch.equal(m[~ones], torch.zeros_like(m[~ones]))
    # On the grid, and the nearest grid point to the mean (the mean summed in float32: allow
    # its rounding, L * 2^-24 of the largest |v|).
    assert torch.equal(torch.remainder(m[ones], spacing[ones]), torch.zeros_like(m[ones]))
    slack = exact.shape[1] * 2.0**-24 * largest[ones]
    assert ((m[ones] - exact.mean(dim=1)[ones]).abs() <= spacing[ones] / 2 + slack).all()
    # The kernels' centred values: the float32 difference (exact: both on the grid) rounded
    # once; no rounding at all where it stays in v's binade or below.
    difference = exact - m[:, None, :]
    centred = (v.float() - shift[:, None, :]).to(dtype)
    assert torch.equal(centred.double(), difference.to(dtype).double())
    _, exponent = torch.frexp(exact)
    in_binade = difference.abs() < torch.ldexp(torch.ones_like(exact), exponent)
    assert torch.equal(centred.double()[in_binade], difference[in_binade])


def test_shift_of_a_long_sequence(monkeypatch):
    """More blocks of rows than :func:`shift_from_stats` adds in one step (``STATS_BLOCK``), so that
    its loop over them takes more than one step, in value_shift and in the states kernel (one
    tile a block, to keep the sequence short for the interpreter)."""
    monkeypatch.setattr(centring, "TILES", 1)
    L = stats_rows(16) * STATS_BLOCK + 300
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    v = (3 + torch.randn(1, L, 16, generator=gen, device=DEVICE)).half()
    assert value_stats(v).shape[1] > STATS_BLOCK
    _check_shift(v, value_shift(v))
    _check_shift(v, _states_kernel_shift(v, chunk_size=64))


@pytest.mark.gpu
@pytest.mark.parametrize("dv", [64, 256])
def test_gpu_shift_of_a_long_sequence(dv):
    """:func:`test_shift_of_a_long_sequence` with the stats kernel's own launch (its tiles a program
    and rows a tile for ``dv`` value columns), past ``STATS_BLOCK`` blocks of rows."""
    L = stats_rows(dv) * centring.TILES * STATS_BLOCK + 300
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    v = (3 + torch.randn(1, L, dv, generator=gen, device=DEVICE)).bfloat16()
    assert value_stats(v).shape[1] > STATS_BLOCK
    _check_shift(v, value_shift(v))


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 1200), DV=st.sampled_from([16, 64, 256]),
       chunk_size=st.sampled_from([16, 32, 64, 128]), heads_last=st.booleans(),
       decay_dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]
                                   + ([torch.bfloat16] if DEVICE == "cuda" else [])),
       seed=st.integers(0, 2**31 - 1))
def test_stats_launch_makes_the_chunk_sums(B, H, L, DV, chunk_size, heads_last, decay_dtype, seed):
    """:func:`value_stats_and_chunk_sums`: the same block sums as :func:`value_stats`, bit for bit,
    and the log decays' chunk-local sums (tail padded with log decay 0 to whole chunks) against
    float64, for any length, chunk size, float dtype and layout of the decays (an attention
    layer's gate arrives as a transposed view of ``[B, L, H]``; bfloat16 on a GPU only, where the
    interpreter's numpy has no such type), and for 256 value columns, whose blocks of rows are
    shorter (several chunks of 128 a program, or two)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    v = 3 + torch.randn(B * H, L, DV, generator=gen, device=DEVICE)
    shape = (B, L, H) if heads_last else (B, H, L)
    log_decay = -3 * torch.rand(*shape, generator=gen, device=DEVICE, dtype=decay_dtype)
    if heads_last:
        log_decay = log_decay.transpose(1, 2)
    stats, g = value_stats_and_chunk_sums(v, log_decay, chunk_size)
    assert torch.equal(stats, value_stats(v))
    N = -(-L // chunk_size)
    padded = F.pad(log_decay.double().reshape(B * H, L), (0, N * chunk_size - L))
    ref = padded.view(B * H, N, chunk_size).cumsum(-1).view(B * H, N * chunk_size)
    assert g.shape == (B * H, N * chunk_size) and g.dtype == torch.float32
    assert float((g.double() - ref).norm() / ref.norm()) < 1e-6


def test_stats_launch_refuses_bad_decays():
    """Decays of another shape or of an integer dtype, a chunk size that is not an int, not a power
    of two or wider than the stats kernel's block of rows, and a decay that is not a tensor:
    refused by name."""
    v = torch.rand(6, 40, 16, device=DEVICE)
    good = torch.zeros(2, 3, 40, device=DEVICE)
    with pytest.raises(ValueError, match=r"log_decay must have shape \[B, H, L\] with B \* H = 6 and L = 40"):
        value_stats_and_chunk_sums(v, good[:, :2], 16)
    with pytest.raises(ValueError, match="log_decay must have shape"):
        value_stats_and_chunk_sums(v, good.reshape(6, 40), 16)
    for bad in (0, 3, 48, 2 * stats_rows(16) * centring.TILES):
        with pytest.raises(ValueError, match="chunk_size must be a power of two"):
            value_stats_and_chunk_sums(v, good, bad)
    with pytest.raises(TypeError, match="log_decay must be a tensor"):
        value_stats_and_chunk_sums(v, good.tolist(), 16)
    with pytest.raises(ValueError, match="log_decay must be a floating-point tensor on v's device"):
        value_stats_and_chunk_sums(v, good.int(), 16)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        value_stats_and_chunk_sums(v, good, 16.0)


def test_mean_as_shift_rounds_every_value_alike():
    """Why the shift is moved onto the grid: with the mean itself (off the grid by a fixed
    fraction of the spacing), ``v - mean`` rounds every value of a binade the same way, so the
    centred values' mean is off by a sizeable part of a spacing; with the grid shift it is not."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    v = (0.02 + (2 * torch.rand(1, 4000, 16, generator=gen, device=DEVICE, dtype=torch.float64) - 1)).half()
    exact = v.double()
    spacing = 2.0**-11  # float16's spacing in [0.5, 1)
    by_mean = (exact - exact.mean(dim=1, keepdim=True)).half().double()
    shift = value_shift(v)
    by_grid = (v.float() - shift[:, None, :]).half()
    bias_mean = (by_mean - (exact - exact.mean(dim=1, keepdim=True))).mean(dim=1).abs().max().item()
    bias_grid = (by_grid.double() - (exact - shift.double()[:, None, :])).mean(dim=1).abs().max().item()
    assert bias_mean > 0.05 * spacing  # a systematic rounding error
    assert bias_grid < 0.01 * spacing


def test_no_shift_near_the_end_of_the_range():
    """float16 columns with values past half its largest number keep them (v - m could overflow);
    so do columns whose float32 sum overflows or meets a NaN."""
    v = torch.full((1, 20, 16), 1000.0, device=DEVICE, dtype=torch.float16)
    v[0, :, 1] = 40000.0  # mean 40000, past 65504 / 2
    v[0, 7, 2] = float("nan")
    shift = value_shift(v)
    assert shift[0, 0].item() == 1000.0 and shift[0, 1].item() == 0.0 and shift[0, 2].item() == 0.0
    big = torch.full((1, 100, 16), 1e37, device=DEVICE)  # float32: the sum of 100 overflows
    assert torch.equal(value_shift(big), torch.zeros(1, 16, device=DEVICE))


def test_tiny_values_keep_to_the_dtype():
    """float16 values below its smallest normal number (6.1e-5): the shift is on the grid of its
    subnormals (2^-24), so that it, and v - m, are float16 numbers."""
    v = torch.tensor([[[-2.8789e-05] * 16, [5.1856e-05] * 16]], device=DEVICE).half()
    shift = value_shift(v).double()
    assert torch.equal(shift, shift.half().double())
    assert torch.equal(torch.remainder(shift, 2.0**-24), torch.zeros_like(shift))


def test_centring_asks_for_what_it_needs():
    """The launcher refuses the combinations the states kernel does not centre: the stats without a
    place for the shift (or the reverse), centring without the key sums z (from whose product the
    16-bit states subtract the shift's share), and centring with the value sums u, w."""
    v = torch.randn(1, 40, 16, device=DEVICE)
    stats, shift = value_stats(v), torch.empty(1, 16, device=DEVICE)
    opts = dict(lower=True, upper=False, chunk_size=16)
    for bad in (dict(with_z=True, value_stats=stats), dict(with_z=True, shift_out=shift),
                dict(value_stats=stats, shift_out=shift), dict(with_z=True, with_u=True, value_stats=stats, shift_out=shift),
                dict(with_z=True, col_offset=torch.zeros(1, 40, device=DEVICE), value_stats=stats, shift_out=shift)):
        with pytest.raises(ValueError, match="chunk_states"):
            chunk_states(v, v, None, **opts, **bad)


def test_format_grid():
    """The bits and finest spacing derived from torch.finfo are the ones written out above."""
    assert all(format_grid(dtype) == expected for dtype, expected in FORMAT.items())


@pytest.mark.gpu
def test_same_shift_on_every_call():
    """The blocks' sums are added in a fixed order (no atomics), so the shift, and with it the
    outputs' last bits, are the same on every call, in :func:`value_shift` as in the states kernel (where
    many programs of a sequence compute it, and one stores it; a GPU test: the interpreter
    runs the programs one after another, where any order would pass)."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    v = (3 + torch.randn(4, 5000, 64, generator=gen, device=DEVICE)).half()
    first = value_shift(v)
    stored = [torch.empty_like(first) for _ in range(5)]
    for shift_out in stored:
        assert torch.equal(first, value_shift(v))
        chunk_states(v, v, None, lower=True, upper=True, chunk_size=64, with_z=True, value_stats=value_stats(v),
                     shift_out=shift_out)
    assert all(torch.equal(stored[0], other) for other in stored[1:])
    _check_shift(v, stored[0])
