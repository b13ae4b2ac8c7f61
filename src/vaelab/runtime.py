"""Process-wide settings for fast CPU work: the intra-op thread count, denormal flushing,
glibc keeping freed memory for reuse, and no TorchDynamo import where nothing is compiled.

They change the whole process, so nothing in the library applies them by itself: the command line
does, for every command (`--threads N` overrides the thread count), and a program that uses
vaelab as a library opts in with one call, `vaelab.runtime.configure()` (or `configure(threads=N)`).
Training computes the same numbers either way, up to rounding.

The thread count, in order: `threads` given (the CLI's `--threads`), then `OMP_NUM_THREADS` in the
environment (the user's choice), then `default_threads()`: what is fastest here and now. Every
OpenMP region ends in a barrier, so one thread descheduled by a busy neighbour stalls all the
others: on a 2-core machine with one core busy, `make demo`'s epochs took 54-120 s with two
threads, and the whole 12-epoch demo 4 minutes with one. The load average sees such a neighbour
only after it has run for a minute, so the default is measured: a short timed probe of the
candidate thread counts on a training-sized matrix multiply.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from .errors import ConfigError

# The probe's work: one (128, 784) x (784, 512) multiply, the MLP VAE's first layer at batch 128,
# repeated for PROBE_SECONDS per round, PROBE_ROUNDS rounds per candidate, interleaved.
PROBE_SHAPE = (128, 784, 512)
PROBE_SECONDS = 0.02
PROBE_ROUNDS = 3
# More threads must be this much faster than fewer to be chosen: a busy machine's timings are
# noisy, and too few threads costs less than too many (a stalled barrier costs whole time slices).
PROBE_MARGIN = 0.85


def physical_cores(cpus: set[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among `cpus` (default: those this process may run on): SMT siblings of one
    core count once."""
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@functools.cache
def idle_cores() -> int:
    """The physical cores (SMT siblings share one core's vector units, so a second thread on them
    only adds barrier waits) less those the 1-minute load average says other processes keep busy.

    Read once, at the first call, before this process's own work adds to it (a recipe estimates its
    time with it after its first model has trained)."""
    cores = physical_cores()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return cores
    return max(1, min(cores, cores - int(busy + 0.5)))


def probe_seconds(threads: int, a: torch.Tensor, b: torch.Tensor) -> float:
    """Seconds per multiply of a @ b with `threads` intra-op threads, over PROBE_SECONDS."""
    torch.set_num_threads(threads)
    torch.mm(a, b)  # warm-up: the thread pool resizes on first use
    n, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= PROBE_SECONDS:
            return elapsed / n


def fastest_threads(candidates: list[int]) -> int:
    """The candidate thread count that multiplies fastest now; a larger one wins only if it is
    faster than the best smaller one by PROBE_MARGIN. Leaves the thread count as it found it."""
    candidates = sorted(set(candidates))
    if len(candidates) == 1:
        return candidates[0]
    before = torch.get_num_threads()
    m, k, n = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(m, k, generator=generator), torch.rand(k, n, generator=generator)
    times: dict[int, list[float]] = {t: [] for t in candidates}
    try:
        for _ in range(PROBE_ROUNDS):  # interleaved, so a neighbour's burst hits every candidate
            for t in candidates:
                times[t].append(probe_seconds(t, a, b))
    finally:
        torch.set_num_threads(before)
    best = candidates[0]
    for t in candidates[1:]:
        if statistics.median(times[t]) < PROBE_MARGIN * statistics.median(times[best]):
            best = t
    return best


# How often a long computation measures again which thread count is fastest (`retune`): a probe
# costs about 0.15 s, so about 1 % of the time goes to it. The first time sooner, as what misleads
# the probe at the start (a burst of load just before) passes within a second or two.
FIRST_RETUNE_SECONDS, RETUNE_SECONDS = 5.0, 15.0


class _Tuning:
    """Whether this process's thread count is vaelab's own choice (`configure` picked it, so
    `retune` may change it), and when to measure it again."""

    auto = False
    due = 0.0


@functools.cache
def default_threads() -> int:
    """Intra-op threads for this process when nobody chose: 1, the cores the load average calls
    idle, or all physical cores, whichever a probe finds fastest (measured once per process)."""
    cores = physical_cores()
    if cores == 1:
        return 1
    return fastest_threads([1, idle_cores(), cores])


def check_threads(threads: int) -> int:
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    return threads


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed blocks back to the kernel. By default it unmaps big blocks
    and trims the heap on free, so each training step's megabyte-sized tensors page-fault in
    afresh: on the VM of benchmarks/RESULTS.md that doubled the time of the weight-gradient
    multiplies. Freed memory stays reserved for reuse instead: blocks under 32 MB come from the
    heap, and up to 512 MB of free heap is kept before it is returned. Returns whether it took
    effect (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))


# Where `torch._disable_dynamo` caches a method's disabled version (torch/_compile.py).
DYNAMO_DISABLE_ATTR = "__dynamo_disable"


class _DisableOnceDynamoLoads:
    """Stands in for the `torch._dynamo.disable(fn)` that `torch._disable_dynamo` builds on a
    method's first call: the method runs as it is until `torch._dynamo` has been imported by
    someone (torch.compile, say), and through the real `disable` from then on. Until then nothing
    can be tracing, so the disable has nothing to do."""

    def __init__(self, fn, recursive: bool):
        self.fn, self.recursive = fn, recursive

    def __call__(self, *args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return self.fn(*args, **kwargs)
        import torch._dynamo

        disabled = torch._dynamo.disable(self.fn, self.recursive, wrapping=False)
        setattr(self.fn, DYNAMO_DISABLE_ATTR, disabled)  # what torch._disable_dynamo caches, from now on
        return disabled(*args, **kwargs)


def defer_dynamo_import() -> int:
    """Keep torch from importing TorchDynamo where nothing is compiled.

    Functions that torch marks `torch._disable_dynamo` (Optimizer.zero_grad and state_dict, the
    reference implementations that ops on the meta device run, ...) import `torch._dynamo` on their
    first call to wrap themselves: 1.7 s of CPU, nearly as much as importing torch, in every `vaelab`
    command that builds a model or an optimizer. Each such function's wrapper is pre-set to `_DisableOnceDynamoLoads`, which behaves
    the same without the import. Functions of torch modules imported later keep torch's own
    behaviour. Returns how many it deferred; 0 where the torch in use has no such wrapper."""
    marker = torch._disable_dynamo(lambda: None).__code__
    deferred = 0
    # The wrappers are closures over the function they wrap, so the garbage collector's list of
    # live objects is where they can all be found (~70 ms).
    for wrapper in gc.get_objects():
        if type(wrapper) is not types.FunctionType or wrapper.__code__ is not marker:
            continue
        cells = dict(zip(marker.co_freevars, (c.cell_contents for c in wrapper.__closure__)))
        fn = cells.get("fn")
        if fn is None or getattr(fn, DYNAMO_DISABLE_ATTR, None) is not None:
            continue
        setattr(fn, DYNAMO_DISABLE_ATTR, _DisableOnceDynamoLoads(fn, cells.get("recursive", True)))
        deferred += 1
    return deferred


def configure(threads: int | None = None) -> int:
    """Tune this process for vaelab's CPU work: freed memory kept for reuse, no TorchDynamo
    import until something compiles (`defer_dynamo_import`), denormals flushed
    (they appear in the tails of trained weights and slow CPU multiplies by orders of magnitude),
    and the intra-op thread count: `threads`, else OMP_NUM_THREADS, else `default_threads()`.
    Returns the thread count now in use."""
    keep_freed_memory()
    defer_dynamo_import()
    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())
        _Tuning.auto, _Tuning.due = True, time.monotonic() + FIRST_RETUNE_SECONDS
    return torch.get_num_threads()


def retune() -> int:
    """Measure again which thread count is fastest now, FIRST_RETUNE_SECONDS after `configure`
    and then at most every RETUNE_SECONDS, and switch to it: where `configure` chose the count
    itself, nowhere else (the user's `--threads` or OMP_NUM_THREADS, and a program that never
    called `configure`, keep theirs). The first probe sees a moment: a neighbour may start later,
    and on a VM the second core can be missing for a second or two after a burst of load (a probe
    right after another process's 8 s of two-thread work found two threads no faster than one, 2
    times in 4; two seconds later, 0.55-0.63 of one thread's time). The trainer calls this at its
    host syncs when it trains on the CPU. The thread count changed no weight and no test loss of a
    run (`vae`, `ae`, `lstm-vae`, 1 against 2 threads: benchmarks/RESULTS.md); only a logged
    training mean may differ in its last bits, a sum taken in another order. Returns the thread
    count now in use."""
    if _Tuning.auto and time.monotonic() >= _Tuning.due:
        cores = physical_cores()
        if cores > 1:
            torch.set_num_threads(fastest_threads([1, torch.get_num_threads(), cores]))
        _Tuning.due = time.monotonic() + RETUNE_SECONDS
    return torch.get_num_threads()
