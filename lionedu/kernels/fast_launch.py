"""Launching a compiled Triton kernel with less host work per call (book chapter 8).

``kernel[grid](*args, **meta)`` does, on every call and in Python: bind the arguments to
the kernel's signature, work out the specialisation Triton compiles for (the dtype of each
pointer and whether its address is a multiple of 16 bytes; whether each integer is 1, a
multiple of 16, fits in 32 bits), turn that into a cache key, look the compiled kernel up,
check that the globals the kernel reads have not changed, and only then launch it. On the
H200 host of results/ that was 19-27 µs a call, of which the compiled kernel's own launch
is 6-9 µs; a training step of LION makes eight such calls (ten with walks in segments), and at short lengths the GPU
waits for them.

:class:`Launcher` keeps the compiled kernel that Triton returns for each key of its own,
made of what that specialisation depends on (device, launch options, constexpr values, and
per argument the dtype and alignment of a tensor or the divisibility of an integer), and
afterwards launches it directly. A new key goes through ``kernel[grid]`` once, which
compiles when needed, so the first call of each configuration is an ordinary Triton call.

It is used only where that is safe: on a GPU (never under Triton's interpreter), with a
Triton that launches compiled kernels the way this module does (one that has
``triton.knobs``; tested with Triton 3.6), and while no launch hooks are installed (profilers install them, and they see
every launch through the ordinary path). ``LIONEDU_FAST_LAUNCH=0`` in the environment, or
:func:`set_fast_launch`, turns it off; if a direct launch is ever refused (a Triton whose
launcher takes other arguments), it turns itself off and the call goes through Triton.
"""
from __future__ import annotations

import os

import torch
import triton

__all__ = ["Launcher", "fast_launch_enabled", "set_fast_launch"]

_Tensor = torch.Tensor

_enabled: bool | None = None  # decided on the first launch (None: not yet)


def _supported() -> bool:
    """Can this process launch compiled kernels directly?"""
    from . import interpreted

    return (torch.cuda.is_available() and not interpreted() and hasattr(triton, "knobs")
            and os.environ.get("LIONEDU_FAST_LAUNCH", "1") != "0")


def fast_launch_enabled() -> bool:
    """Whether :class:`Launcher` launches compiled kernels directly in this process."""
    global _enabled
    if _enabled is None:
        _enabled = _supported()
    return _enabled


def set_fast_launch(enabled: bool) -> bool:
    """Turn direct launches on (where supported) or off; returns the previous setting.
    With ``enabled=False`` every launch goes through ``kernel[grid]``, as Triton's own."""
    global _enabled
    previous = fast_launch_enabled()
    _enabled = bool(enabled) and _supported()
    return previous


def _triton_current_device() -> int:
    return triton.runtime.driver.active.get_current_device()


# The current CUDA device of this thread, which is what ``kernel[grid]`` launches on. Triton's
# driver asks PyTorch through ``torch.cuda.current_device`` (about 0.3 µs on the H200 host of
# results/, with its lazy-initialisation checks); where PyTorch has the C function behind it,
# the launcher asks that directly (0.1 µs).
_current_device = getattr(torch._C, "_cuda_getDevice", _triton_current_device)


def _current_stream(device: int) -> int:
    return triton.runtime.driver.active.get_current_stream(device)


def _hook_active(hook) -> bool:
    """A launch hook is in use: set (older Triton) or a chain with functions in it (newer)."""
    return hook is not None and getattr(hook, "calls", True) != []


def _hooks_installed() -> bool:
    runtime = triton.knobs.runtime
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def argument_key(arg):
    """What Triton's specialisation of one runtime argument depends on.

    A tensor: its dtype and whether its address is a multiple of 16 bytes. An integer:
    whether it is 1, whether it is a multiple of 16 and whether it fits in 32 bits (``bool``
    included, as its own type). Anything else: its type and value, so that a different value
    is a different key."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, not arg.data_ptr() & 15
    if isinstance(arg, int):
        return type(arg), arg == 1, arg & 15 == 0, -(1 << 31) <= arg < (1 << 31)
    return type(arg), arg


class Launcher:
    """``Launcher(kernel)(grid, *args, num_warps=..., num_stages=..., **constexprs)`` launches
    ``kernel`` (a ``@triton.jit`` function whose constexpr parameters all come after its
    runtime ones) as ``kernel[grid](*args, ...)`` would, with less host work from the second
    call of each configuration on (module docstring). ``args``: the runtime arguments in
    order; every constexpr parameter by name."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}
        params = getattr(kernel, "params", None)  # a JITFunction's; the interpreter's functions have none
        if params is None:
            self._constexpr_names = None  # always the ordinary path
            return
        is_constexpr = [p.is_constexpr for p in params]
        first = is_constexpr.index(True) if True in is_constexpr else len(params)
        # Direct launches pass the runtime arguments, then the constexprs, in signature order.
        ordered = all(is_constexpr[first:])
        self._constexpr_names = tuple(p.name for p in params[first:]) if ordered else None

    def __call__(self, grid, *args, num_warps: int = 4, num_stages: int = 3, **constexprs):
        if self._constexpr_names is None or not fast_launch_enabled() or _hooks_installed():
            return self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        meta = tuple(map(constexprs.__getitem__, self._constexpr_names))
        device = _current_device()
        # argument_key for every argument, with plain tensors (nearly all of them) keyed
        # inline: the same (dtype, aligned) pair without a Python call each.
        key = (device, num_warps, num_stages, meta,
               *[(a.dtype, not a.data_ptr() & 15) if a.__class__ is _Tensor else argument_key(a) for a in args])
        compiled = self._compiled.get(key)
        if compiled is None:  # first call of this configuration: Triton's path, which may compile
            self._compiled[key] = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages,
                                                    **constexprs)
            return self._compiled[key]
        grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
        try:
            # The compiled kernel's C launcher: grid, stream, the kernel's handle and metadata,
            # launch metadata and enter / exit hooks (none here), then every argument.
            compiled.run(grid_x, grid_y, grid_z, _current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *meta)
        except TypeError:  # a launcher with another signature: fall back for good
            set_fast_launch(False)
            return self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return compiled
