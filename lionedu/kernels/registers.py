"""Fitting one more program on each multiprocessor by capping registers (book chapter 8).

A Hopper multiprocessor has 65,536 registers. A program of four warps (128 threads) that uses
128 registers per thread lets four programs share a multiprocessor; at 130 only three fit,
a quarter fewer warps to hide memory latency with. The compiler's count moves by a few
registers with small changes of the source: the output launch of LION-D's causal forward used
124 registers before its decays were read in place (session 21's base) and 130 after (v19 and
v20), and took 233 µs instead of 204 at L = 16384 (H200, Triton 3.6; dev runs §53). Capped at
128 it used 126, with no local memory, and the forward was 8 % faster. So where a launch site
names a register target, :func:`register_limit` compiles the configuration once without and, if
it lands over the target by at most :data:`SLACK`, once with the cap, and keeps the cap if the
capped build spills at most :data:`SPILL_WORDS` more words per thread to local memory than the
free one. The bidirectional forward's output builds use 146-150 registers: capped at 128 they
spill 6-14 words a thread (the training forward's 18) and still run 3-7 % faster than with three
programs per multiprocessor (dev runs §54): a few spilled words cost less than a third more warps.
The limits are a little wider than the builds that gained (22 registers over, 18 words): builds of
128-wide heads capped with 12-24 words took the same time as free. A build further over the target
is left alone: squeezing it would spill more than was measured. Measured on an H200 (Hopper) with
Triton 3.6 only; other GPUs take the same rule unmeasured.
Only CUDA builds are squeezed (``maxnreg`` is NVIDIA's); a build that fails or does not report
its counts leaves the compiler be.

The backward's launches on the persistent grid (a few programs per multiprocessor, each looping
over chunks) name 168, three programs of four warps, and their grid holds as many programs as the
build's registers and shared memory let share a multiprocessor (:func:`resident_programs`, at most
three): the causal dK build, 182 registers free, runs three capped at 168 without spilling, and the
bidirectional dV build, 162 registers but 90 KB of shared memory, two. A fixed grid of three made
that launch slower: the third program per multiprocessor waited for the first two (dev runs §55).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["MAX_REGISTERS", "SLACK", "SPILL_WORDS", "RESERVED_SHARED", "register_limit", "registers_for_programs",
           "resident_programs", "build_resources"]

SLACK = 24  # squeeze a build that is at most this many registers per thread over its target
SPILL_WORDS = 24  # ... if capped it spills at most this many more 4-byte words per thread (dev runs §54)
MAX_REGISTERS = 255  # the most a thread may have
RESERVED_SHARED = 1024  # bytes of shared memory the hardware keeps for each resident program (compute capability 8.0+)


def registers_for_programs(warps: int, programs: int, registers: int = 65536) -> int:
    """The most registers per thread with which ``programs`` programs of ``warps`` warps share
    a multiprocessor of ``registers`` registers (allocation is per warp, in units of 8 per
    thread), at most :data:`MAX_REGISTERS`."""
    return min(registers // (programs * warps * 32) // 8 * 8, MAX_REGISTERS)


def resident_programs(registers_per_thread: int, shared_bytes: int, warps: int, most: int,
                      registers: int = 65536, shared: int | None = None) -> int:
    """How many programs of ``warps`` warps a multiprocessor with ``registers`` registers and
    ``shared`` bytes of shared memory (``None``: not known, then registers alone decide) holds at
    once, if each thread uses ``registers_per_thread`` registers and each program ``shared_bytes``
    of shared memory; at most ``most``, at least 1. Registers are allocated per warp in units of 8
    per thread; each resident program also takes :data:`RESERVED_SHARED` bytes of shared memory."""
    per_thread = max(8, -(-registers_per_thread // 8) * 8)
    fit = registers // (per_thread * 32 * warps)
    if shared is not None:
        fit = min(fit, shared // (shared_bytes + RESERVED_SHARED))
    return max(1, min(most, fit))


def build_resources(compiled):
    """``(registers per thread, shared memory in bytes)`` of a compiled kernel, or ``None`` where
    this Triton does not report them."""
    counts = _counts(compiled)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    return None if counts is None or shared is None else (counts[0], shared)


def _counts(compiled):
    """``(registers per thread, local memory in 4-byte words)`` of a compiled kernel (Triton's
    ``n_regs`` and ``n_spills``: spills and stack), or ``None`` where this Triton does not report
    them. The counts come with loading the binary onto the device, hence ``_init_handles``."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
    regs, local = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
    return None if regs is None or local is None else (regs, local)


def register_limit(build: Callable[[int | None], object], target: int, slack: int = SLACK,
                   spill_words: int = SPILL_WORDS) -> int | None:
    """``maxnreg`` for a configuration: ``target`` where ``build(None)`` (the compiler's own
    choice) uses more than ``target`` and at most ``target + slack`` registers per thread and
    ``build(target)`` fits the target with at most ``spill_words`` more words of local memory per
    thread; else ``None`` (leave the compiler be: also off CUDA, and where a build raises or does
    not report its counts). v21's rule was ``slack=8, spill_words=0``.
    ``build(maxnreg)`` compiles the configuration without launching it and returns the
    compiled kernel."""
    if torch.version.hip is not None:
        return None
    try:
        free = _counts(build(None))
        if free is None or not target < free[0] <= target + slack:
            return None
        capped = _counts(build(target))
    except Exception:  # an optional saving: whatever fails here, the ordinary launch will report
        return None
    return target if capped is not None and capped[0] <= target and capped[1] <= free[1] + spill_words else None
