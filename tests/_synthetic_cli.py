"""Test-only entry point: `vaelab` on a synthetic "mnist", with optional pause points. Its
`use_synthetic` and `use_fast_classifiers` also set up the notebook tests' kernels.

    python tests/_synthetic_cli.py --data DIR [--pause-at-step K] [--pause-before-replace NAME:N]
                                   [--marker FILE] [--no-figures] [--cache DIR] -- <vaelab arguments>

The four IDX files in DIR (written on first use) become "mnist": the spec's checksums are set to
theirs in this process only, the same way the `synthetic_mnist` fixture does in-process, so the
production code has no test backdoor. VAELAB_DATA must point at a scratch cache.

A pause point makes a kill land at an exact place: on reaching it the process writes FILE and
waits (at most 60 s) until FILE is deleted; the test meanwhile sends its signal. Python runs a
signal handler in the main thread between bytecodes, so SIGINT/SIGTERM set the trainer's flag
during the wait, and SIGKILL ends the process there.
  --pause-at-step K            after the K-th optimizer step of this process
  --pause-before-replace N:I   just before the I-th rename of a temp file onto a file named N
                               (the temp file is complete, the rename has not happened)
  --pause-rank R               under torchrun: only the process of rank R pauses
  --trial-barrier DIR:N         each `sweep --workers` worker takes its first trial once N have
                                come that far (a test of K workers then sees them all work)
Worker processes that `vaelab sweep --workers K` spawns import this script again (as
__mp_main__) and take the same synthetic "mnist" from the VAELAB_TEST_SYNTHETIC variable it sets.
`vaelab train --nproc N` started from here has torchrun start this script again, with the same
options before `--`.
--cache DIR makes DIR the cache vaelab sees (VAELAB_DATA holds the synthetic files already), so
that `data fetch` has something to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conftest import write_dataset_files  # noqa: E402  (tests/ is sys.path[0] when run as a script)

from vaelab import data as data_mod  # noqa: E402
from vaelab import cli  # noqa: E402
from vaelab.cli import main  # noqa: E402


SYNTHETIC_ENV = "VAELAB_TEST_SYNTHETIC"  # DIR:N_TRAIN:N_TEST, read by spawned worker processes
NO_FIGURES_ENV = "VAELAB_TEST_NO_FIGURES"
TRIAL_BARRIER_ENV = "VAELAB_TEST_TRIAL_BARRIER"  # DIR:N, read by spawned sweep workers


def pause(marker: Path, rank: int | None = None) -> None:
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return
    # Written whole, then renamed: a test that sees the marker must also see the PID in it.
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(str(os.getpid()))
    os.replace(partial, marker)
    # The test releases (or kills) the process; one that is never released fails loudly rather
    # than going on as if the test had looked.
    deadline = time.monotonic() + 600
    while marker.exists():
        if time.monotonic() > deadline:
            sys.exit(f"_synthetic_cli: paused 600 s at {marker} and never released")
        time.sleep(0.01)


def use_synthetic_mnist(folder: Path, n_train: int, n_test: int) -> None:
    use_synthetic("mnist", folder, n_train, n_test)


def use_synthetic(name: str, folder: Path, n_train: int, n_test: int) -> None:
    """Make dataset `name` the synthetic images of `folder` (written there on first use) in this
    process, and put them in the cache VAELAB_DATA names."""
    spec = data_mod.DATASETS[name]
    if not all((folder / stem).is_file() for stem in spec.stems.values()):
        write_dataset_files(folder, n_train=n_train, n_test=n_test)
    sums = {role: data_mod.sha256((folder / stem).read_bytes()) for role, stem in spec.stems.items()}
    data_mod.DATASETS[name] = dataclasses.replace(spec, sha256=sums, mirrors=(), registry_source=_no_registry)
    data_mod.fetch(name, from_dir=folder, quiet=True)


def use_fast_classifiers() -> None:
    """Domain classifiers that train on the synthetic images in about a second, for every dataset
    (too small and brief to meet their accuracy targets: they are there to be used, not trusted)."""
    from vaelab import metrics

    for name, config in metrics.CLASSIFIER_CONFIGS.items():
        metrics.CLASSIFIER_CONFIGS[name] = dataclasses.replace(config, widths=(4, 8), hidden=16, epochs=2)


def _no_registry(spec, workdir):
    raise data_mod.DataError("registry disabled in tests")


def pause_at_step(step: int, marker: Path, rank: int | None = None) -> None:
    from vaelab.models import MODELS

    count = {"n": 0}
    for cls in MODELS.values():
        original = cls.training_step

        @functools.wraps(original)
        def training_step(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            count["n"] += 1
            if count["n"] == step:
                pause(marker, rank)
            return out

        cls.training_step = training_step


def pause_before_replace(spec: str, marker: Path) -> None:
    name, index = spec.rsplit(":", 1)
    original, count = os.replace, {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            count["n"] += 1
            if count["n"] == int(index):
                pause(marker)
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def trial_barrier(spec: str) -> None:
    """Each sweep worker of this process takes its first trial only once N workers have come that
    far (each leaves a file in DIR), so that a test of K workers sees them all take trials rather
    than the first one started running the whole grid while the others still import torch."""
    from vaelab import sweep

    folder, n = spec.rsplit(":", 1)
    original, waited = sweep.take_trial, {"done": False}

    def take_trial(*args, **kwargs):
        if not waited["done"]:
            waited["done"] = True
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / str(os.getpid())).touch()
            deadline = time.monotonic() + 600
            while len(list(Path(folder).iterdir())) < int(n):
                if time.monotonic() > deadline:
                    sys.exit(f"_synthetic_cli: {n} sweep workers never met at {folder}")
                time.sleep(0.01)
        return original(*args, **kwargs)

    sweep.take_trial = take_trial


def no_figures() -> None:
    # The end-of-training figures cost seconds per process and are not what these tests check.
    import vaelab.figures

    vaelab.figures.write_training_figures = lambda *args, **kwargs: []


def run(argv: list[str]) -> int:
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=192)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--pause-at-step", type=int)
    p.add_argument("--pause-before-replace")
    p.add_argument("--pause-rank", type=int)
    p.add_argument("--marker", type=Path)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--trial-barrier", metavar="DIR:N")
    p.add_argument("--cache", type=Path)
    opts = p.parse_args(argv[:split])
    use_synthetic_mnist(opts.data, opts.n_train, opts.n_test)
    os.environ[SYNTHETIC_ENV] = f"{opts.data.resolve()}:{opts.n_train}:{opts.n_test}"  # for spawned workers
    if opts.cache:
        os.environ["VAELAB_DATA"] = str(opts.cache)
    if opts.pause_at_step:
        pause_at_step(opts.pause_at_step, opts.marker, opts.pause_rank)
    if opts.pause_before_replace:
        pause_before_replace(opts.pause_before_replace, opts.marker)
    if opts.no_figures:
        no_figures()
        os.environ[NO_FIGURES_ENV] = "1"
    if opts.trial_barrier:
        os.environ[TRIAL_BARRIER_ENV] = opts.trial_barrier
    # torchrun starts this script again for each process, or where a fork server started this
    # one, the server's proxy, which has the server fork it (tests/_forkserver.py).
    from _forkserver import SOCKET_ENV

    here = Path(__file__).resolve()
    entry = [str(here.parent / "_forkserver.py"), "proxy"] if os.environ.get(SOCKET_ENV) else [str(here)]
    cli.LAUNCH_ENTRY = [*entry, *argv[:split], "--"]
    return main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
elif __name__ == "__mp_main__" and os.environ.get(SYNTHETIC_ENV):
    # A worker process multiprocessing spawned for this script (`vaelab sweep --workers K`)
    # imports it under this name: it sees the same synthetic "mnist" as its parent.
    folder, n_train, n_test = os.environ[SYNTHETIC_ENV].rsplit(":", 2)
    use_synthetic_mnist(Path(folder), int(n_train), int(n_test))
    if os.environ.get(NO_FIGURES_ENV):
        no_figures()
    if os.environ.get(TRIAL_BARRIER_ENV):
        trial_barrier(os.environ[TRIAL_BARRIER_ENV])
