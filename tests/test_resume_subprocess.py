"""Exact resume in real processes: a run killed (SIGKILL), interrupted (SIGINT) or terminated
(SIGTERM) at an exact point, then resumed, ends bit-identical to the same run trained straight.

Each process is `tests/_synthetic_cli.py`, i.e. the real CLI on a synthetic "mnist". The kill
point is made deterministic by a pause point in that script: the child writes a marker file and
waits; the test sends the signal, then deletes the marker.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vaelab import checkpoint as ckpt
from vaelab.models import MODELS

from _forkserver import Process, spawn
from conftest import write_dataset_files

SCRIPT = Path(__file__).resolve().parent / "_synthetic_cli.py"
EPOCHS, BATCH, N_TRAIN = 3, 8, 192
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 24
# The models resumed in subprocesses: the MLP VAE's hand-derived step and the VAE-GAN's own
# multi-optimizer step. A name missing from the registry fails.
RESUME_MODELS = ["vae", "vae-gan"]


def small_overrides(name: str) -> list[str]:
    """--set arguments that make any registered model small (only fields it has)."""
    fields = {f.name for f in dataclasses.fields(MODELS[name].config_class)}
    wanted = {"hidden_dims": "[16]", "arch": "mlp", "latent_dim": "2"}
    return [a for k, v in wanted.items() if k in fields for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_dataset_files(root / "data", n_train=N_TRAIN, n_test=32)  # before the children race to it
    env = {**os.environ, "VAELAB_DATA": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    return root, env


def cli(workspace, *vaelab_args, pause: list[str] = (), marker: Path | None = None) -> Process:
    root, env = workspace
    opts = ["--data", str(root / "data"), "--n-train", str(N_TRAIN), "--no-figures", *pause]
    if marker is not None:
        opts += ["--marker", str(marker)]
    return spawn([sys.executable, SCRIPT, *opts, "--", *vaelab_args], env=env)


def finish(proc: Process, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train_args(model: str, run: Path) -> list[str]:
    return ["train", model, "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu",
            "--quiet", "--out", str(run), *small_overrides(model)]


def signal_at(proc: Process, marker: Path, sig: int) -> None:
    """Wait for the child to reach its pause point, then deliver `sig` and let it go on."""
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"child ended before its pause point: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child never reached its pause point")
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    time.sleep(0.1)  # the handler runs in the child's wait loop before it sees the marker vanish
    marker.unlink()


def history_rows(run: Path) -> list[dict]:
    rows = list(csv.DictReader((run / "history.csv").open()))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@dataclass
class Stage:
    """What one process did and what it left in the run folder."""

    code: int
    err: str
    epoch: int
    step: int
    partial: dict | None
    history_epochs: set[str]
    steps_lines: list[str]


def run_stage(workspace, run: Path, args: list[str], pause: list[str] = (), sig: int | None = None) -> Stage:
    marker = run.parent / f"{run.name}.marker"
    proc = cli(workspace, *args, pause=list(pause), marker=marker if pause else None)
    if sig is not None:
        signal_at(proc, marker, sig)
    code, _, err = finish(proc)
    state = ckpt.load_checkpoint(run)
    return Stage(code, err, state["epoch"], state["step"], state["partial"],
                 {r["epoch"] for r in history_rows(run)}, (run / "steps.csv").read_text().splitlines())


def resume_args(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--quiet"]


# The scenarios. Each is a chain of processes on one run folder; all chains run at once (each
# mostly waits for its child), and the tests below check what each stage left behind.

def straight(workspace, model):
    run = workspace[0] / f"straight-{model}"
    return run, [run_stage(workspace, run, train_args(model, run))]


def sigkill_mid_epoch(workspace, model):
    run = workspace[0] / f"sigkill-{model}"
    return run, [
        run_stage(workspace, run, train_args(model, run), ["--pause-at-step", str(STEPS_PER_EPOCH + 7)], signal.SIGKILL),
        run_stage(workspace, run, resume_args(run)),
    ]


def sigint_then_sigterm(workspace, model):
    """Ctrl-C in epoch 2; the resumed process is terminated in epoch 3; the third one finishes."""
    run = workspace[0] / f"signals-{model}"
    return run, [
        run_stage(workspace, run, train_args(model, run), ["--pause-at-step", str(STEPS_PER_EPOCH + 13)], signal.SIGINT),
        run_stage(workspace, run, resume_args(run), ["--pause-at-step", "16"], signal.SIGTERM),
        run_stage(workspace, run, resume_args(run)),
    ]


def sigkill_inside_saves(workspace, model):
    """Killed with epoch 2's checkpoint complete in its temp file but not renamed; then the resumed
    process is killed between the final checkpoint's rename and model.safetensors' (that
    process writes model.safetensors on resume, after epoch 2 and after epoch 3)."""
    run = workspace[0] / f"in-save-{model}"
    return run, [
        run_stage(workspace, run, train_args(model, run), ["--pause-before-replace", f"{ckpt.CHECKPOINT_FILE}:2"],
                  signal.SIGKILL),
        run_stage(workspace, run, resume_args(run), ["--pause-before-replace", f"{ckpt.MODEL_FILE}:3"], signal.SIGKILL),
        run_stage(workspace, run, resume_args(run)),
    ]


def sigkill_before_first_checkpoint(workspace, model):
    """Killed in epoch 1, before any checkpoint: the folder holds its config.json; --resume
    trains from step 0 with it."""
    run = workspace[0] / f"sigkill-early-{model}"
    marker = run.parent / f"{run.name}.marker"
    proc = cli(workspace, *train_args(model, run), pause=["--pause-at-step", "7"], marker=marker)
    signal_at(proc, marker, signal.SIGKILL)
    code, _, err = finish(proc)
    left = sorted(p.name for p in run.iterdir())
    return run, [(code, left), run_stage(workspace, run, resume_args(run))]


@pytest.fixture(scope="module")
def outcomes(workspace):
    jobs = {(f.__name__, m): (f, m) for m in RESUME_MODELS
            for f in (straight, sigkill_mid_epoch, sigint_then_sigterm)}
    jobs[("sigkill_inside_saves", "vae")] = (sigkill_inside_saves, "vae")
    jobs[("sigkill_before_first_checkpoint", "vae")] = (sigkill_before_first_checkpoint, "vae")
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(f, workspace, m) for key, (f, m) in jobs.items()}
        return {key: fut.result() for key, fut in futures.items()}


def assert_identical_runs(run: Path, straight: Path) -> None:
    a, _ = ckpt.load_tensors(run / ckpt.MODEL_FILE)
    b, _ = ckpt.load_tensors(straight / ckpt.MODEL_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights {k} differ"
    sa, sb = ckpt.load_checkpoint(run), ckpt.load_checkpoint(straight)
    assert (sa["epoch"], sa["step"], sa["partial"]) == (sb["epoch"], sb["step"], None)
    for name, opt in sb["optimizers"].items():
        for pid, st in opt["state"].items():
            for key, value in st.items():
                assert torch.equal(sa["optimizers"][name]["state"][pid][key], value), (name, pid, key)
    assert history_rows(run) == history_rows(straight)
    assert (run / "steps.csv").read_text() == (straight / "steps.csv").read_text()


def assert_interrupted(stage: Stage, run: Path, name: str, epoch: int, done: int) -> None:
    assert stage.code == 130, stage.err
    assert stage.err.count("\n") == 1 and "Traceback" not in stage.err, stage.err
    assert f"{name}: saved {run} in epoch {epoch} after {done}/{STEPS_PER_EPOCH} batches" in stage.err
    assert f"continue with `vaelab train --resume {run}`" in stage.err
    assert stage.partial["batches_done"] == done and stage.step == (epoch - 1) * STEPS_PER_EPOCH + done
    # The unfinished epoch's rows stay in the checkpoint until the epoch completes.
    assert stage.history_epochs == {str(e) for e in range(1, epoch)}
    assert len(stage.steps_lines) == 1 + (epoch - 1) * STEPS_PER_EPOCH


@pytest.mark.parametrize("model", RESUME_MODELS)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(outcomes, model):
    run, (killed, resumed) = outcomes["sigkill_mid_epoch", model]
    assert killed.code == -signal.SIGKILL
    # The lost epoch left no trace: the files hold epoch 1 only, the checkpoint is epoch 1's.
    assert (killed.epoch, killed.step, killed.partial) == (1, STEPS_PER_EPOCH, None)
    assert killed.history_epochs == {"1"}
    assert len(killed.steps_lines) == 1 + STEPS_PER_EPOCH and killed.steps_lines[-1].startswith(f"{STEPS_PER_EPOCH},1,")
    assert resumed.code == 0, resumed.err
    assert_identical_runs(run, outcomes["straight", model][0])


@pytest.mark.parametrize("model", RESUME_MODELS)
def test_sigint_and_sigterm_save_mid_epoch_say_how_to_resume_and_resume_exactly(outcomes, model):
    run, (interrupted, terminated, resumed) = outcomes["sigint_then_sigterm", model]
    assert_interrupted(interrupted, run, "SIGINT", epoch=2, done=13)
    # Resumed from the mid-epoch checkpoint and stopped again, 16 steps later, in epoch 3.
    assert_interrupted(terminated, run, "SIGTERM", epoch=3, done=13 + 16 - STEPS_PER_EPOCH)
    assert resumed.code == 0, resumed.err
    assert_identical_runs(run, outcomes["straight", model][0])


def test_sigkill_inside_saves_keeps_the_last_checkpoint_and_resumes_exactly(outcomes):
    run, (in_checkpoint, before_weights, repaired) = outcomes["sigkill_inside_saves", "vae"]
    assert in_checkpoint.code == -signal.SIGKILL
    assert (in_checkpoint.epoch, in_checkpoint.partial) == (1, None) and in_checkpoint.history_epochs == {"1"}
    assert before_weights.code == -signal.SIGKILL and before_weights.epoch == EPOCHS
    # The run is complete in its checkpoint; resuming says so and brings the files in line.
    assert repaired.code == 2 and "already finished" in repaired.err, repaired.err
    assert_identical_runs(run, outcomes["straight", "vae"][0])
    assert not list(run.glob(".*.tmp")), "resume removes the temp files of killed saves"


def test_sigkill_before_the_first_checkpoint_then_resume_is_bit_identical(outcomes):
    run, ((code, left), resumed) = outcomes["sigkill_before_first_checkpoint", "vae"]
    assert code == -signal.SIGKILL
    assert left == [".lock", "config.json", "figures"]  # no checkpoint yet, but a resumable run
    assert resumed.code == 0, resumed.err
    assert_identical_runs(run, outcomes["straight", "vae"][0])
