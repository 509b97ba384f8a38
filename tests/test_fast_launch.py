"""lionedu.kernels.fast_launch: the cache of compiled kernels behind the launchers.

A fake kernel stands in for a ``@triton.jit`` function (on a CPU the kernels are the
interpreter's, which the launcher never launches directly), so these tests check the
bookkeeping: which calls go through Triton, which go straight to the compiled kernel and with
what arguments. tests/test_kernels.py checks on a GPU that both paths compute the same.
"""
from types import SimpleNamespace

import pytest
import torch
import triton

from lionedu.kernels import fast_launch
from lionedu.kernels.fast_launch import Launcher


class FakeCompiled:
    function, packed_metadata = "handle", "metadata"

    def __init__(self, fail=False):
        self.runs, self.fail = [], fail

    def run(self, *args):
        if self.fail:
            raise TypeError("launcher takes other arguments")
        self.runs.append(args)


class FakeKernel:
    """Records ``kernel[grid](*args, **kw)`` calls; parameters ``x, n`` then constexprs ``A, B``."""

    def __init__(self, names=("x", "n", "A", "B"), constexpr=(False, False, True, True), fail=False):
        self.params = [SimpleNamespace(name=a, is_constexpr=c) for a, c in zip(names, constexpr)]
        self.calls, self.fail = [], fail

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            return FakeCompiled(self.fail)
        return launch


@pytest.fixture(autouse=True)
def cuda_build(monkeypatch):
    """The register target squeezes CUDA builds only: pretend a CUDA torch where it is ROCm's."""
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.fixture
def fast(monkeypatch):
    """Direct launches on, as on a GPU: device 0, stream 7, no hooks."""
    monkeypatch.setattr(fast_launch, "_enabled", True)
    monkeypatch.setattr(fast_launch, "_supported", lambda: True)
    monkeypatch.setattr(fast_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(fast_launch, "_current_stream", lambda device: 7)
    monkeypatch.setattr(fast_launch, "_hooks_installed", lambda: False)


def test_second_call_launches_the_compiled_kernel_directly(fast):
    kernel = FakeKernel()
    launch = Launcher(kernel)
    x = torch.zeros(4)
    first = launch((3,), x, 32, A=1, B="ieee", num_warps=8, num_stages=2)
    assert kernel.calls == [((3,), (x, 32), dict(A=1, B="ieee", num_warps=8, num_stages=2))]
    y = torch.ones(4)  # another tensor of the same dtype and alignment: the same key
    assert launch((5, 2), y, 32, B="ieee", A=1, num_warps=8, num_stages=2) is first
    assert len(kernel.calls) == 1
    assert first.runs == [(5, 2, 1, 7, "handle", "metadata", None, None, None, y, 32, 1, "ieee")]


def test_options_made_once_launch_as_the_call_does(fast):
    kernel = FakeKernel()
    launch = Launcher(kernel)
    x = torch.zeros(4)
    options = launch.options(num_warps=2, num_stages=1, B=0, A=5)
    assert options.meta == (5, 0) and options.key == (2, 1, None, (5, 0))
    first = launch.launch((2,), options, (x,), (16,))
    assert kernel.calls == [((2,), (x, 16), dict(A=5, B=0, num_warps=2, num_stages=1))]
    assert launch((3,), x, 16, A=5, B=0, num_warps=2, num_stages=1) is first  # the call's key is the same
    assert first.runs == [(3, 1, 1, 7, "handle", "metadata", None, None, None, x, 16, 5, 0)]


def test_a_tensor_after_a_scalar_is_refused(fast):
    """Scalars are keyed by value: a tensor among them would be keyed by identity and never found again."""
    launch = Launcher(FakeKernel(names=("n", "x", "A", "B"), constexpr=(False, False, True, True)))
    with pytest.raises(TypeError, match="tensor arguments first"):
        launch((1,), 16, torch.zeros(2), A=0, B=0)


def test_the_cache_of_configurations_is_bounded(fast, monkeypatch):
    monkeypatch.setattr(fast_launch, "MAX_CONFIGURATIONS", 2)
    kernel = FakeKernel()
    launch = Launcher(kernel)
    x = torch.zeros(4)
    for n in (16, 17, 18, 16):
        launch((1,), x, n, A=0, B=0)
        assert len(launch._compiled) <= 2
    assert len(kernel.calls) == 4  # 16 was dropped when the cache started afresh at 18


@pytest.mark.parametrize("change", ["dtype", "alignment", "none", "int", "bool", "constexpr", "warps"])
def test_a_new_specialisation_goes_through_triton(fast, change):
    kernel = FakeKernel()
    launch = Launcher(kernel)
    x = torch.zeros(8)
    args, kw = [x, 1 if change == "bool" else 32], dict(A=1, B="ieee", num_warps=4, num_stages=3)
    launch((1,), *args, **kw)
    if change == "dtype":
        args[0] = x.double()
    elif change == "alignment":
        args[0] = x[1:]
    elif change == "none":  # a pointer the configuration does not read: compiled away
        args[0] = None
    elif change == "int":
        args[1] = 33
    elif change == "bool":  # equal to 1 in Python, another type to Triton
        args[1] = True
    elif change == "constexpr":
        kw["A"] = 2
    else:
        kw["num_warps"] = 8
    launch((1,), *args, **kw)
    assert len(kernel.calls) == 2


def test_ordinary_path_when_off_or_hooked(fast, monkeypatch):
    kernel = FakeKernel()
    launch = Launcher(kernel)
    monkeypatch.setattr(fast_launch, "_enabled", False)
    for _ in range(2):
        launch((1,), torch.zeros(2), 16, A=0, B=0)
    monkeypatch.setattr(fast_launch, "_enabled", True)
    monkeypatch.setattr(fast_launch, "_hooks_installed", lambda: True)
    for _ in range(2):
        launch((1,), torch.zeros(2), 16, A=0, B=0)
    assert len(kernel.calls) == 4


def test_hooks_count_when_set_or_chained():
    chain = SimpleNamespace(calls=[])
    assert not fast_launch._hook_active(None) and not fast_launch._hook_active(chain)
    chain.calls.append(print)
    assert fast_launch._hook_active(chain) and fast_launch._hook_active(print)
    if hasattr(triton, "knobs"):  # this Triton's own defaults: no hooks
        assert not fast_launch._hooks_installed()


def test_a_refused_direct_launch_turns_the_fast_path_off(fast):
    kernel = FakeKernel(fail=True)
    launch = Launcher(kernel)
    for _ in range(2):
        launch((1,), torch.zeros(2), 16, A=0, B=0)
    assert len(kernel.calls) == 2  # the first call, then the fallback after the refusal
    assert not fast_launch.fast_launch_enabled()


def test_kernels_without_trailing_constexprs_or_params_use_triton(fast):
    middle = FakeKernel(names=("x", "A", "n"), constexpr=(False, True, False))
    interpreted = FakeKernel()
    del interpreted.params
    for kernel, kw in ((middle, dict(A=0)), (interpreted, dict(A=0, B=0))):
        launch = Launcher(kernel)
        for _ in range(2):
            launch((1,), torch.zeros(2), 16, **kw)
        assert len(kernel.calls) == 2


def test_off_under_the_interpreter_and_by_environment(monkeypatch):
    monkeypatch.setattr(fast_launch, "_enabled", None)  # decided afresh here, restored afterwards
    import lionedu.kernels

    if lionedu.kernels.interpreted():  # tests/conftest.py without a GPU: never direct launches there
        assert not fast_launch._supported()
        assert fast_launch.set_fast_launch(True) is False and not fast_launch.fast_launch_enabled()
    # As on a GPU: supported unless the environment says no.

    monkeypatch.setattr(lionedu.kernels, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fast_launch._supported() == hasattr(triton, "knobs")
    monkeypatch.setenv("LIONEDU_FAST_LAUNCH", "0")
    assert not fast_launch._supported()


class CountingKernel(FakeKernel):
    """A fake kernel whose builds report registers and spills: ``counts(maxnreg)`` gives them."""

    def __init__(self, counts):
        super().__init__()
        self.counts, self.builds = counts, []

    def warmup(self, *args, grid, **kw):
        self.builds.append(kw.get("maxnreg"))
        regs, spills = self.counts(kw.get("maxnreg"))
        return SimpleNamespace(n_regs=regs, n_spills=spills)


@pytest.mark.parametrize("free, capped, limit", [
    ((130, 0), (126, 0), 128),  # just over the target, and the capped build does not spill: squeezed
    ((150, 0), (128, 14), 128),  # LION-S's bidirectional forward (dev runs §54): a few words spilled, squeezed
    ((152, 0), (128, 24), 128),  # at the slack and the spill allowance: squeezed
    ((128, 0), None, None),  # at the target already: left alone, nothing built twice
    ((153, 0), None, None),  # further over it than the slack: left alone
    ((200, 0), None, None),  # far over it: left alone
    ((131, 0), (128, 25), None),  # the capped build spills more than allowed: left alone
])
@pytest.mark.parametrize("direct", [True, False])
def test_a_register_target_squeezes_only_a_build_just_over_it(fast, monkeypatch, free, capped, limit, direct):
    monkeypatch.setattr(fast_launch, "_enabled", direct)  # the direct path and the ordinary one decide alike
    kernel = CountingKernel(lambda maxnreg: free if maxnreg is None else capped)
    launch = Launcher(kernel)
    options = launch.options(num_warps=4, num_stages=1, register_target=128, A=0, B=0)
    assert options.key == (4, 1, 128, (0, 0))
    x = torch.zeros(4)
    for _ in range(3):
        launch.launch((2,), options, (x,), (16,))
    assert kernel.builds == ([None] if capped is None else [None, 128])  # decided once per configuration
    launched = [call[2] for call in kernel.calls]
    assert len(launched) == (1 if direct else 3)
    assert all(kw.get("maxnreg") == limit for kw in launched)


def test_no_register_target_builds_nothing_first(fast):
    kernel = CountingKernel(lambda maxnreg: (130, 0))
    launch = Launcher(kernel)
    launch((1,), torch.zeros(2), 16, A=0, B=0)
    assert kernel.builds == [] and "maxnreg" not in kernel.calls[0][2]


def test_registers_for_programs():
    from lionedu.kernels.registers import registers_for_programs

    assert registers_for_programs(4, 4) == 128  # 65,536 registers, 4 programs of 128 threads
    assert registers_for_programs(4, 3) == 168  # 170 rounded down to the allocation unit of 8
    assert registers_for_programs(8, 4) == 64


def test_counts_unknown_mean_no_squeeze():
    from lionedu.kernels.registers import register_limit

    assert register_limit(lambda maxnreg: SimpleNamespace(), 128) is None  # a Triton that does not report them


class LoadedOnDemand:
    """A compiled kernel as Triton's: its counts exist only once ``_init_handles`` has loaded it."""

    def __init__(self, regs, local):
        self._counts = (regs, local)

    def _init_handles(self):
        self.n_regs, self.n_spills = self._counts


def test_counts_are_read_after_loading_the_build():
    from lionedu.kernels.registers import register_limit

    builds = {None: LoadedOnDemand(130, 0), 128: LoadedOnDemand(126, 0)}
    assert register_limit(builds.__getitem__, 128) == 128


def test_the_spill_allowance_counts_from_the_free_builds_local_memory():
    from lionedu.kernels.registers import SPILL_WORDS, register_limit

    def limit(free_local, capped_local):
        return register_limit(lambda m: SimpleNamespace(n_regs=130 if m is None else 128,
                                                        n_spills=free_local if m is None else capped_local), 128)

    assert limit(4, 4) == 128  # the free build's own stack
    assert limit(4, 4 + SPILL_WORDS) == 128
    assert limit(4, 5 + SPILL_WORDS) is None
    assert limit(0, 1 + SPILL_WORDS) is None


def test_v21_rule_by_keywords():
    """v21's rule (at most 8 over, no more local memory) left the bidirectional forward's builds alone."""
    from lionedu.kernels.registers import register_limit

    def build(maxnreg):
        return SimpleNamespace(n_regs=150 if maxnreg is None else 128, n_spills=0 if maxnreg is None else 14)

    assert register_limit(build, 128) == 128
    assert register_limit(build, 128, slack=8, spill_words=0) is None
    assert register_limit(build, 128, slack=22, spill_words=0) is None  # within reach, but it spills


@pytest.mark.parametrize("fails", [None, 128])
def test_a_failing_build_leaves_the_compiler_be(fails):
    """A Triton without maxnreg (its capped build raises), or a failing build: no cap, no error."""
    from lionedu.kernels.registers import register_limit

    def build(maxnreg):
        if maxnreg == fails:
            raise KeyError("Keyword argument maxnreg was specified but unrecognised")
        return SimpleNamespace(n_regs=130 if maxnreg is None else 126, n_spills=0)

    assert register_limit(build, 128) is None


def test_no_squeeze_off_cuda(monkeypatch):
    from lionedu.kernels.registers import register_limit

    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert register_limit(lambda m: SimpleNamespace(n_regs=130 if m is None else 126, n_spills=0), 128) is None


def test_the_interpreters_kernels_get_no_register_target(fast):
    kernel = CountingKernel(lambda maxnreg: pytest.fail("an interpreted kernel is never built ahead"))
    del kernel.params  # the interpreter's functions have none
    launch = Launcher(kernel)
    options = launch.options(num_warps=4, num_stages=1, register_target=128, A=0, B=0)
    launch.launch((1,), options, (torch.zeros(2),), (16,))
    assert kernel.builds == [] and "maxnreg" not in kernel.calls[0][2]


def test_the_register_decisions_are_bounded(fast, monkeypatch):
    monkeypatch.setattr(fast_launch, "MAX_CONFIGURATIONS", 2)
    monkeypatch.setattr(fast_launch, "_enabled", False)
    kernel = CountingKernel(lambda maxnreg: (130, 0) if maxnreg is None else (126, 0))
    launch = Launcher(kernel)
    for n in (16, 17, 1, 16):  # three specialisations: a multiple of 16, another number, 1
        launch((1,), torch.zeros(2), n, A=0, B=0, register_target=128)
        assert len(launch._register_limits) <= 2
    assert kernel.builds == [None, 128] * 4  # 16 was decided again after the decisions started afresh
    assert all(call[2]["maxnreg"] == 128 for call in kernel.calls)


@pytest.mark.parametrize("direct", [True, False])
def test_register_decisions_follow_triton_s_specialisation(fast, monkeypatch, direct):
    """A new length that Triton compiles no differently (here 4096 after 1024: both multiples of 16) is
    not built again to decide; 1000 (not a multiple of 16) and 2**40 (past 32 bits) are."""
    monkeypatch.setattr(fast_launch, "_enabled", direct)
    kernel = CountingKernel(lambda maxnreg: (130, 0) if maxnreg is None else (126, 0))
    launch = Launcher(kernel)
    options = launch.options(num_warps=4, num_stages=1, register_target=128, A=0, B=0)
    x = torch.zeros(4)
    for n in (1024, 4096, 1000, 2**40, 4096):
        launch.launch((2,), options, (x,), (n, 0.5, True))
    assert kernel.builds == [None, 128] * 3
    assert all(call[2]["maxnreg"] == 128 for call in kernel.calls)
    assert len(kernel.calls) == (4 if direct else 5)  # the direct path launches the second 4096 itself


def test_the_specialisation_of_scalars():
    from lionedu.kernels.fast_launch import _scalar_class

    assert _scalar_class(32) == _scalar_class(4096) != _scalar_class(40) != _scalar_class(1)
    assert _scalar_class(2**40) == _scalar_class(2**41 + 16) != _scalar_class(2**20)  # past 32 bits: int64
    assert _scalar_class(2**63) == _scalar_class(2**64 - 16) != _scalar_class(2**62)  # past int64: uint64
    assert _scalar_class(-32) == _scalar_class(32) and _scalar_class(-2**40) == _scalar_class(2**40)
    assert _scalar_class(0.5) == _scalar_class(2.0)
    assert _scalar_class(True) != _scalar_class(False)  # finer than Triton: one decision more, never a wrong one
    assert _scalar_class(True) != _scalar_class(1)


@pytest.mark.parametrize("registers, shared, warps, most, memory, expected", [
    (168, 0, 4, 3, None, 3),  # 168 registers x 128 threads x 3 = 64,512 of 65,536
    (169, 0, 4, 3, None, 2),  # rounded up to 176: three programs would need 67,584
    (182, 0, 4, 3, None, 2),  # LION-S's causal dK build, free (dev runs §55)
    (128, 0, 4, 3, None, 3),  # four would fit, the launch asks for at most three
    (128, 0, 4, 4, None, 4),
    (128, 60_000, 4, 4, 233_472, 3),  # shared memory decides: 3 x (60,000 + 1,024) bytes fit, 4 do not
    (128, 75_000, 4, 4, 233_472, 3),
    (128, 77_000, 4, 4, 233_472, 2),  # 3 x 78,024 bytes would be 600 over
    (255, 0, 8, 3, None, 1),  # 256 x 256 threads: the whole register file
    (64, 300_000, 4, 3, 233_472, 1),  # more than a multiprocessor has: still one (the launch reports it)
])
def test_resident_programs(registers, shared, warps, most, memory, expected):
    from lionedu.kernels.registers import resident_programs

    assert resident_programs(registers, shared, warps, most, shared=memory) == expected


def test_build_resources_reads_registers_and_shared_memory():
    from lionedu.kernels.registers import build_resources

    build = LoadedOnDemand(168, 0)
    build.metadata = SimpleNamespace(shared=59_392)
    assert build_resources(build) == (168, 59_392)
    assert build_resources(LoadedOnDemand(168, 0)) is None  # no metadata: not known


class SizedKernel(CountingKernel):
    """A counting kernel whose builds also report their shared memory."""

    def warmup(self, *args, grid, **kw):
        build = super().warmup(*args, grid=grid, **kw)
        build.metadata = SimpleNamespace(shared=1000)
        return build

    def __getitem__(self, grid):  # Triton's launch returns the compiled kernel, counts and all
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            compiled = FakeCompiled()
            compiled.n_regs = self.counts(kw.get("maxnreg"))[0]
            return compiled
        return launch


@pytest.mark.parametrize("direct", [True, False])
def test_a_grid_sized_by_the_build(fast, monkeypatch, direct):
    """A grid given as a function gets the compiled kernel (built first on Triton's path, with the
    registers the target decided) and is launched as it returns it."""
    monkeypatch.setattr(fast_launch, "_enabled", direct)
    kernel = SizedKernel(lambda maxnreg: (182, 0) if maxnreg is None else (168, 0))
    launch = Launcher(kernel)
    options = launch.options(num_warps=4, num_stages=1, register_target=168, A=0, B=0)
    seen = []

    def grid(compiled):
        seen.append(compiled)
        return (compiled.n_regs,)  # any function of the build will do

    x = torch.zeros(4)
    launch.launch(grid, options, (x,), (16,))
    assert kernel.calls[0][0] == (168,) and kernel.calls[0][2]["maxnreg"] == 168  # the capped build's grid
    assert kernel.builds == [None, 168, 168]  # the decision's two builds, then the launch's, which Triton finds cached
    compiled = launch.launch(grid, options, (x,), (16,))
    if direct:  # the second call: the compiled kernel's own launcher, with the grid made from it
        assert seen[-1] is compiled and compiled.runs[0][:3] == (168, 1, 1)
    else:
        assert len(kernel.calls) == 2 and kernel.calls[1][0] == (168,)


def test_an_interpreted_kernel_s_grid_gets_no_build(fast):
    kernel = FakeKernel(names=("x", "A"), constexpr=(False, True))
    kernel.params = None  # the interpreter's functions have no params
    launch = Launcher(kernel)
    launch.launch(lambda compiled: (3,) if compiled is None else (99,), launch.options(A=0), (torch.zeros(1),))
    assert kernel.calls[0][0] == (3,)


def test_the_persistent_grid_follows_the_build(monkeypatch):
    """launch._persistent_grid: as many programs per multiprocessor as the build's registers and
    shared memory allow (at most the launch's ``most``), times the multiprocessors, at most one
    per chunk; two where the build or the device does not say (the grid before v23)."""
    from lionedu.kernels import launch

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(launch, "_multiprocessor_memory", lambda device: (65536, 233_472))

    def build(regs, shared):
        compiled = LoadedOnDemand(regs, 0)
        compiled.metadata = SimpleNamespace(shared=shared)
        return compiled

    assert launch._persistent_grid(10_000, cuda, 4, 3, build(168, 59_392)) == (396,)  # LION-S's causal dK, capped
    assert launch._persistent_grid(10_000, cuda, 4, 3, build(204, 59_392)) == (264,)  # its causal dQ
    assert launch._persistent_grid(10_000, cuda, 4, 3, build(142, 80_000)) == (264,)  # shared memory decides
    assert launch._persistent_grid(300, cuda, 4, 3, build(142, 59_392)) == (300,)  # no more programs than chunks
    assert launch._persistent_grid(10_000, cuda, 4, 1, build(142, 59_392)) == (132,)  # at most one: test_kernels'
    assert launch._persistent_grid(10_000, cuda, 4, 3, None) == (264,)  # the interpreter: no build to look at
    assert launch._persistent_grid(10_000, cuda, 4, 3, LoadedOnDemand(150, 0)) == (264,)  # no shared memory reported
    monkeypatch.setattr(launch, "_multiprocessor_memory", lambda device: (65536, None))
    assert launch._persistent_grid(10_000, cuda, 4, 3, build(150, 1_000)) == (264,)  # a PyTorch that does not say
    monkeypatch.setattr(launch, "_multiprocessor_memory", lambda device: (65536, 233_472))
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert launch._persistent_grid(10_000, cuda, 4, 3, build(120, 1_000)) == (264,)  # AMD: not NVIDIA's arithmetic
