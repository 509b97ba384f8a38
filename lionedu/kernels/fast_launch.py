"""Launching a compiled Triton kernel with less host work per call (book chapter 8).

``kernel[grid](*args, **meta)`` does, on every call and in Python: bind the arguments to
the kernel's signature, work out the specialisation Triton compiles for (the dtype of each
pointer and whether its address is a multiple of 16 bytes; whether each integer is 1, a
multiple of 16, fits in 32 bits), turn that into a cache key, look the compiled kernel up,
check that the globals the kernel reads have not changed, and only then launch it. On the
H200 host of results/ that was 19-27 µs a call, of which the compiled kernel's own launch
is 6-9 µs; a training step of normalised LION-S makes eight such calls (more with walks in segments), and at
short lengths the GPU waits for them.

:class:`Launcher` keeps the compiled kernel that Triton returns for each key of its own,
made of what that specialisation depends on (device, launch options, constexpr values, per
pointer its dtype and alignment, and the scalar arguments by value: :meth:`Launcher.key`), and
afterwards launches it directly. A new key goes through ``kernel[grid]`` once, which
compiles when needed, so the first call of each configuration is an ordinary Triton call.
The launch sites of the attention kernels make their :class:`LaunchOptions` once per
configuration and pass ``None`` for the pointers a configuration never reads, which Triton
compiles away (a stand-in tensor in their place was one more entry in every key).

A launch site may also name a register target for a configuration (:mod:`.registers`): the
launcher then decides once per compiled specialisation (:meth:`Launcher.specialisation`: a new
sequence length that Triton compiles no differently is not decided again) whether to compile it
with the registers capped, and launches that build on the direct and the ordinary path alike.

It is used only where that is safe: on a GPU (never under Triton's interpreter), with a
Triton that launches compiled kernels the way this module does (one that has
``triton.knobs``; tested with Triton 3.6), and while no launch hooks are installed (profilers install them, and they see
every launch through the ordinary path). ``LIONEDU_FAST_LAUNCH=0`` in the environment, or
:func:`set_fast_launch`, turns it off; if a direct launch is ever refused (a Triton whose
launcher takes other arguments), it turns itself off and the call goes through Triton.
"""
from __future__ import annotations

import os
from functools import partial

import torch
import triton

from .registers import register_limit

__all__ = ["Launcher", "LaunchOptions", "fast_launch_enabled", "set_fast_launch"]

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


MAX_CONFIGURATIONS = 4096  # compiled kernels a Launcher keeps; beyond that it starts afresh (bounded memory)


class LaunchOptions:
    """The compile-time half of a launch: warps, pipeline stages and the constexpr values, made by
    :meth:`Launcher.options` once per configuration (its callers cache it, :mod:`.launch`).

    ``register_target``: registers per thread to squeeze the build into where it lands a little over
    them (:func:`.registers.register_limit`), or ``None``.
    ``key``: ``(num_warps, num_stages, register_target, meta)`` with ``meta`` the constexpr values
    in the kernel's signature order, or ``None`` for a kernel the launcher never launches directly."""
    __slots__ = ("num_warps", "num_stages", "register_target", "constexprs", "meta", "key")

    def __init__(self, num_warps: int, num_stages: int, constexprs: dict, meta, register_target: int | None = None):
        self.num_warps, self.num_stages, self.constexprs, self.meta = num_warps, num_stages, constexprs, meta
        self.register_target = register_target
        self.key = None if meta is None else (num_warps, num_stages, register_target, meta)


class Launcher:
    """``Launcher(kernel)`` launches ``kernel`` (a ``@triton.jit`` function whose runtime
    parameters are its pointers, then its scalars, and whose constexpr parameters come last) as
    ``kernel[grid](...)`` would, with less host work from the second call of each configuration on
    (module docstring).

    ``launcher(grid, *args, num_warps=..., num_stages=..., **constexprs)`` takes the arguments as
    ``kernel[grid]`` does. Where a launch runs often, make its options once,
    ``options = launcher.options(num_warps=..., num_stages=..., **constexprs)``, and call
    ``launcher.launch(grid, options, pointers, scalars)``: ``pointers`` the tensor arguments in
    order (``None`` for one the configuration never reads; Triton then compiles it away),
    ``scalars`` the rest. Options with a ``register_target`` are compiled with the registers
    capped where :func:`.registers.register_limit` says so, decided once per specialisation.
    ``grid`` may also be a function of the compiled kernel that returns the grid (or of ``None``
    where there is none to look at: Triton's interpreter, and kernels whose constexpr parameters
    are not last), for a grid sized by what the build uses (a persistent grid of as many programs
    as share a multiprocessor). Off the direct path (turned off, or hooks installed: a profiler),
    each such launch compiles-or-finds its build first, one more call into Triton."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}
        self._register_limits: dict = {}  # specialisation -> maxnreg or None, for options with a register target
        params = getattr(kernel, "params", None)  # a JITFunction's; the interpreter's functions have none
        if params is None:
            self._constexpr_names = None  # always the ordinary path
            return
        is_constexpr = [p.is_constexpr for p in params]
        first = is_constexpr.index(True) if True in is_constexpr else len(params)
        # Direct launches pass the runtime arguments, then the constexprs, in signature order.
        ordered = all(is_constexpr[first:])
        self._constexpr_names = tuple(p.name for p in params[first:]) if ordered else None

    def options(self, num_warps: int = 4, num_stages: int = 3, register_target: int | None = None,
                **constexprs) -> LaunchOptions:
        """The :class:`LaunchOptions` of a configuration; every constexpr parameter by name;
        ``register_target``: see :class:`LaunchOptions`."""
        names = self._constexpr_names
        meta = None if names is None else tuple(constexprs[name] for name in names)
        return LaunchOptions(num_warps, num_stages, constexprs, meta, register_target)

    def __call__(self, grid, *args, num_warps: int = 4, num_stages: int = 3, **constexprs):
        pointers = 0  # the leading tensor (or None) arguments
        while pointers < len(args) and (args[pointers] is None or isinstance(args[pointers], torch.Tensor)):
            pointers += 1
        if any(isinstance(a, torch.Tensor) for a in args[pointers:]):
            raise TypeError(f"{self.kernel}: the launcher takes the tensor arguments first, then the scalars")
        return self.launch(grid, self.options(num_warps, num_stages, **constexprs), args[:pointers], args[pointers:])

    @staticmethod
    def key(device: int, options: LaunchOptions, pointers, scalars) -> tuple:
        """The key a launch's compiled kernel is kept under: what Triton's specialisation depends on.

        The device, the options (warps, stages, constexpr values), per pointer its dtype and
        whether its address is a multiple of 16 bytes (``None`` for one that is compiled away), and
        the scalars by value and type (``True`` and ``1`` are equal in Python, not to Triton): finer
        than Triton's own key for integers (whether each is 1, a multiple of 16, fits in 32 bits),
        so a new value costs one call through Triton, which finds the compiled kernel in its own
        cache; in exchange the scalars cost no Python per element."""
        return (device, options.key, scalars, tuple(map(type, scalars)), *_pointer_classes(pointers))

    @staticmethod
    def specialisation(device: int, options: LaunchOptions, pointers, scalars) -> tuple:
        """What Triton compiles a launch's kernel for, the key of the register decisions: :meth:`key`
        with each scalar reduced to what Triton specialises it on (:func:`_scalar_class`)."""
        return (device, options.key, tuple(map(_scalar_class, scalars)), *_pointer_classes(pointers))

    def launch(self, grid, options: LaunchOptions, pointers, scalars=()):
        """Launch with ``options`` (:meth:`options`) on ``grid``; ``pointers`` and ``scalars``
        (tuples): the runtime arguments in signature order. Returns the compiled kernel."""
        if options.key is None or not fast_launch_enabled() or _hooks_installed():
            return self._through_triton(grid, options, pointers, scalars)
        device = _current_device()
        key = self.key(device, options, pointers, scalars)
        compiled = self._compiled.get(key)
        if compiled is None:  # first call of this configuration: Triton's path, which may compile
            if len(self._compiled) >= MAX_CONFIGURATIONS:
                self._compiled.clear()
            compiled = self._compiled[key] = self._through_triton(grid, options, pointers, scalars)
            return compiled
        if callable(grid):
            grid = grid(compiled)
        grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
        try:
            # The compiled kernel's C launcher: grid, stream, the kernel's handle and metadata,
            # launch metadata and enter / exit hooks (none here), then every argument.
            compiled.run(grid_x, grid_y, grid_z, _current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *pointers, *scalars, *options.meta)
        except TypeError:  # a launcher with another signature: fall back for good
            set_fast_launch(False)
            return self._through_triton(grid, options, pointers, scalars)
        return compiled

    def _through_triton(self, grid, options: LaunchOptions, pointers, scalars):
        """The ordinary launch, ``kernel[grid](...)``: Triton's own path, which compiles when needed;
        with the registers capped where the options' target says so, decided once per specialisation."""
        maxnreg = None
        # (_constexpr_names is None for the interpreter's functions, which take no maxnreg, and for
        # a kernel whose constexpr parameters are not last: neither gets a register target)
        if options.register_target is not None and self._constexpr_names is not None:
            which = self.specialisation(_current_device(), options, pointers, scalars)
            if which not in self._register_limits:
                if len(self._register_limits) >= MAX_CONFIGURATIONS:
                    self._register_limits.clear()
                build = partial(self._build, (1,), options, pointers, scalars)  # (a build needs no grid)
                self._register_limits[which] = register_limit(build, options.register_target)
            maxnreg = self._register_limits[which]
        if callable(grid):  # sized by the build: compile it first (Triton's launch below then finds it)
            grid = grid(None if self._constexpr_names is None else
                        self._build((1,), options, pointers, scalars, maxnreg))
        return self.kernel[grid](*pointers, *scalars, **_compile_options(options, maxnreg))

    def _build(self, grid, options: LaunchOptions, pointers, scalars, maxnreg):
        """The compiled kernel of a launch, without launching it (``maxnreg``: a cap, or ``None``)."""
        return self.kernel.warmup(*pointers, *scalars, grid=grid, **_compile_options(options, maxnreg))


def _pointer_classes(pointers) -> list:
    """What Triton's specialisation keeps of the tensor arguments: per pointer its dtype and whether
    its address is a multiple of 16 bytes (``None`` for one that is compiled away)."""
    return [p if p is None else (p.dtype, not p.data_ptr() & 15) for p in pointers]


def _scalar_class(value) -> tuple:
    """What Triton's specialisation keeps of a scalar argument (:meth:`Launcher.specialisation`):
    of an integer, whether it is 1, whether it is a multiple of 16 and its width (32-bit, 64-bit
    signed, 64-bit unsigned); of any other scalar its type, and of a boolean also its value (finer
    than Triton, which compiles both alike: one decision more, never a wrong one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return (type(value), value if isinstance(value, bool) else None)
    width = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
    return (int, value == 1, value % 16 == 0, width)


def _compile_options(options: LaunchOptions, maxnreg) -> dict:
    """The keyword arguments of a launch or a build with ``options``; ``maxnreg`` only where set
    (Triton's interpreter takes no such option)."""
    limit = {} if maxnreg is None else dict(maxnreg=maxnreg)
    return dict(num_warps=options.num_warps, num_stages=options.num_stages, **limit, **options.constexprs)
