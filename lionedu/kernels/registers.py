"""Fitting one more program on each multiprocessor by capping registers (book chapter 8).

A Hopper multiprocessor has 65,536 registers. A program of four warps (128 threads) that uses
128 registers per thread lets four programs share a multiprocessor; at 130 only three fit,
a quarter fewer warps to hide memory latency with. The compiler's count moves by a few
registers with small changes of the source: the output launch of LION-D's causal forward used
124 registers in v19 and 130 in v20 (one more integer argument, for the decays read in place),
and took 233 µs instead of 204 at L = 16384 (H200, Triton 3.6; dev runs §53). Capped at 128
it used 126, with no spills, and the forward was 8 % faster. So where a launch site names a
register target, :func:`register_limit` compiles the configuration once without and, if it
lands just over the target, once with the cap, and keeps the cap only if the capped build
spills nothing. A build far over the target is left alone: squeezing it would spill.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["register_limit", "SLACK", "registers_for_programs"]

SLACK = 8  # squeeze a build that is at most this many registers per thread over its target


def registers_for_programs(warps: int, programs: int, registers: int = 65536) -> int:
    """The most registers per thread with which ``programs`` programs of ``warps`` warps share
    a multiprocessor of ``registers`` registers (allocation is per warp, in units of 8)."""
    return registers // (programs * warps * 32) // 8 * 8


def _counts(compiled):
    """``(registers per thread, spilled bytes)`` of a compiled kernel, or ``None`` where this
    Triton does not report them (the counts come with loading the binary onto the device)."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
    regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
    return None if regs is None or spills is None else (regs, spills)


def register_limit(build: Callable[[int | None], object], target: int) -> int | None:
    """``maxnreg`` for a configuration: ``target`` where ``build(None)`` (the compiler's own
    choice) uses more than ``target`` and at most ``target + SLACK`` registers per thread and
    ``build(target)`` spills nothing; else ``None`` (leave the compiler be). ``build(maxnreg)``
    compiles the configuration without launching it and returns the compiled kernel."""
    free = _counts(build(None))
    if free is None or not target < free[0] <= target + SLACK:
        return None
    capped = _counts(build(target))
    return target if capped is not None and capped[0] <= target and capped[1] == 0 else None
