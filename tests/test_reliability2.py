"""Nothing lost, round two (issue 11): one test per reported defect, each its exact repro through
`main(argv)`, a real full (tmpfs) and read-only disk, and a hypothesis test that drives `main`
with generated arguments and damaged run folders.

Every refusal must be one line on stderr (exit 2) and leave every file as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from vaelab import atomic, memory
from vaelab import checkpoint as ckpt
from vaelab import data as data_mod
from vaelab import reading
from vaelab.cli import main
from vaelab.errors import CheckpointError, ConfigError, RunInUseError, WriteError
from vaelab.models import MODELS
from vaelab.models.vae import VAE

from conftest import quick_config, synthetic_data, write_dataset_files
from test_reliability import fail_at_step, nan_term, snapshot

SMALL = ["--batch-size", "256", "--set", "hidden_dims=[16]", "--device", "cpu", "--quiet"]


def one_line(capsys, argv, code=2) -> str:
    """Run `main(argv)`; it must end with `code` and at most one line on stderr, no traceback."""
    try:
        got = main(argv)
    except SystemExit as e:  # argparse
        got = e.code
    err = capsys.readouterr().err
    assert got == code, err
    assert err.count("\n") <= 1 and "Traceback" not in err, err
    return err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the lock file aside: it holds the last locker's PID)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ckpt.LOCK_FILE}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One finished one-epoch run (the MLP VAE, 2-D latent), trained once for the module."""
    from vaelab.train import train
    from vaelab.models import make_config

    run = tmp_path_factory.mktemp("trained") / "run"
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(), run, progress=False, data=synthetic_data())
    return run


@pytest.fixture
def run(trained_once, tmp_path):
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def edit_config(run: Path, edit) -> None:
    path = run / ckpt.CONFIG_FILE
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def rewrite_safetensors(path: Path, edit_meta=None, edit_tensors=None) -> None:
    """Rewrite a vaelab safetensors file with its metadata and tensors edited (no new hash)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["vaelab"])
    tensors = dict(load_safetensors_bytes(data))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    path.write_bytes(save_safetensors_bytes(tensors, metadata={"vaelab": json.dumps(meta)}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# 1. A full disk: every output keeps its previous version (a real 5 MB tmpfs where root may
#    mount one; the same checks with a simulated ENOSPC everywhere else)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}): the simulated full disk covers outputs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


def fill(folder: Path, leave: int) -> None:
    st = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_generate_and_plot_on_a_full_disk_keep_the_previous_files(run, small_disk, synthetic_mnist, capsys):
    disk_run = Path(shutil.copytree(run, small_disk / "run"))  # its figures/ is empty
    out, npy = small_disk / "g.png", small_disk / "s.npy"
    argv = ["generate", str(disk_run), "--out", str(out), "--npy", str(npy), "--device", "cpu"]
    assert main([*argv, "-n", "10"]) == 0
    capsys.readouterr()
    before = {**tree(small_disk)}
    fill(small_disk, leave=300_000)
    before["filler"] = (small_disk / "filler").read_bytes()
    err = one_line(capsys, [*argv, "-n", "5000"])
    assert "No space left on device" in err and ("g.png: cannot write" in err or "s.npy: cannot write" in err), err
    err = one_line(capsys, ["plot", str(disk_run), "--device", "cpu"])
    assert f"{disk_run / 'figures'}/" in err and "No space left on device" in err, err
    assert tree(small_disk) == before  # both outputs as they were, no figure, no temp file


def test_outputs_on_a_simulated_full_disk_keep_the_previous_files(run, tmp_path, monkeypatch, capsys):
    out, npy = tmp_path / "g.png", tmp_path / "s.npy"
    argv = ["generate", str(run), "--out", str(out), "--npy", str(npy), "--device", "cpu"]
    assert main([*argv, "-n", "10"]) == 0
    before = tree(tmp_path)
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):  # the temp files take half, then ENOSPC
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.endswith(".tmp"):
            real_write = f.write

            def write(data):
                real_write(bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write
        return f

    monkeypatch.setattr(atomic, "open", full_open, raising=False)
    err = one_line(capsys, [*argv, "-n", "50"])
    assert f"{out}: cannot write (No space left on device); its previous version is unchanged" in err
    assert tree(tmp_path) == before


@pytest.fixture
def read_only_run(run, small_disk):
    disk_run = Path(shutil.copytree(run, small_disk / "run"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True, timeout=20)
    return disk_run


def test_refused_overwrite_on_a_read_only_mount_names_the_folder(read_only_run, synthetic_mnist, capsys):
    before = tree(read_only_run)
    err = one_line(capsys, ["train", "vae", "--out", str(read_only_run), "--overwrite", "--epochs", "1", *SMALL])
    assert f"{read_only_run}: cannot lock the run folder (Read-only file system)" in err, err
    err = one_line(capsys, ["train", "--resume", str(read_only_run), "--epochs", "2", "--quiet"])
    assert f"{read_only_run}: cannot lock" in err, err
    assert tree(read_only_run) == before


# ---------------------------------------------------------------------------------------------
# 2-4. Training commands that fail leave the run as it was; a run is resumable from its first
#      instant (the SIGKILL itself is in test_resume_subprocess.py)
# ---------------------------------------------------------------------------------------------


def test_overwrite_that_diverges_keeps_the_previous_run(run, synthetic_mnist, capsys):
    before = tree(run)
    err = one_line(capsys, ["train", "vae", "--out", str(run), "--overwrite", "--lr", "1e6", "--epochs", "1",
                            "--batch-size", "16", "--set", "hidden_dims=[16]", "--device", "cpu", "--quiet"])
    assert f"training diverged at epoch 1" in err and f"{run} still holds the previous run" in err, err
    assert tree(run) == before
    assert not list(run.parent.glob(".run.*"))  # the new run's folder is gone
    ckpt.load_run(run)


def test_overwrite_replaces_the_run_only_after_the_new_one_saved_an_epoch(run, synthetic_mnist, monkeypatch, capsys):
    seen = []
    original = VAE.training_step

    def spy(self, *args, **kwargs):  # during the first epoch the old run is still in place, whole
        if not seen:
            seen.append(tree(run))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "training_step", spy)
    before = tree(run)
    assert main(["train", "vae", "--out", str(run), "--overwrite", "--epochs", "2", "--seed", "5", *SMALL]) == 0
    assert seen == [before]
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 5
    assert ckpt.load_checkpoint(run)["epoch"] == 2
    assert not list(run.parent.glob(".run.*"))  # the old run, swapped out, is removed


def test_interrupting_an_overwrite_before_its_first_epoch_keeps_the_previous_run(run, synthetic_mnist, monkeypatch, capsys):
    original = VAE.training_step

    def ctrl_c(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a stop flag
        return out

    monkeypatch.setattr(VAE, "training_step", ctrl_c)
    before = tree(run)
    err = one_line(capsys, ["train", "vae", "--out", str(run), "--overwrite", "--epochs", "1", "--batch-size", "64",
                            "--set", "hidden_dims=[16]", "--device", "cpu", "--quiet"], code=130)
    assert f"SIGINT: stopped before the new run's first epoch was saved; {run} still holds the previous run" in err
    assert tree(run) == before and not list(run.parent.glob(".run.*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resume_on_a_missing_device_changes_nothing(run, synthetic_mnist, capsys):
    before = tree(run)
    err = one_line(capsys, ["train", "--resume", str(run), "--epochs", "3", "--device", "cuda"])
    assert "--device cuda asked for, but no CUDA device is available" in err
    assert tree(run) == before
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0  # a plain --resume still works


def test_a_run_with_only_its_config_resumes_from_step_0_like_a_straight_run(tmp_path):
    """What a kill before the first checkpoint leaves: the folder, config.json, figures/."""
    from vaelab.models import make_config
    from vaelab.train import resume, train

    data = synthetic_data()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=2), straight, progress=False, data=data)
    killed.mkdir()
    (killed / "figures").mkdir()
    shutil.copy(straight / "config.json", killed / "config.json")
    edit_config(killed, lambda c: c["train"].update(epochs=1))
    resume(killed, epochs=2, progress=False, data=data)
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, _ = ckpt.load_tensors(killed / name)
        b, _ = ckpt.load_tensors(straight / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (killed / "steps.csv").read_text() == (straight / "steps.csv").read_text()


# ---------------------------------------------------------------------------------------------
# 15 (part). The run lock: nothing trains in, resumes or overwrites a run another process trains in
# ---------------------------------------------------------------------------------------------


def test_a_run_another_process_trains_in_is_refused_naming_its_pid(run, synthetic_mnist, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vaelab.checkpoint import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(3600)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run)
        message = f"{run} is in use: process {holder.pid} is training in it"
        for argv in (["train", "--resume", str(run), "--epochs", "2", "--quiet"],
                     ["train", "vae", "--out", str(run), "--overwrite", "--epochs", "1", *SMALL],
                     ["train", "vae", "--out", str(run), "--epochs", "1", *SMALL],
                     ["config", str(run), "gen_prior=box"]):
            assert message in one_line(capsys, argv), argv
        assert tree(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0  # the lock died with it


def test_overwrite_of_a_recipe_folder_with_a_run_in_training_is_refused(run, tmp_path):
    from vaelab.run_folder import prepare_folder

    with ckpt.RunLock(run):
        with pytest.raises(RunInUseError, match=f"{run} is in use: process {os.getpid()}"):
            prepare_folder(tmp_path, True, lambda folder: True, "recipe")
    assert (run / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 5. Temp files of killed writers are cleaned by the next command that owns the folder
# ---------------------------------------------------------------------------------------------


def test_a_killed_fetch_leaves_nothing_the_next_fetch_does_not_clean(synthetic_mnist, tmp_path, capsys):
    cache = Path(os.environ["VAELAB_DATA"]) / "mnist"
    stem = synthetic_mnist.stems["train-images"]
    (cache / stem).unlink()
    killed = cache / f".{stem}.{dead_pid()}-0123abcd.tmp"  # as a SIGKILL mid-write leaves it
    legacy = cache / f".{stem}.k2j4h_x1.tmp"  # mkstemp's name, before the PID was in it
    live = cache / f".{stem}.{os.getpid()}-89abcdef.tmp"  # a writer still at work
    for p in (killed, legacy, live):
        p.write_bytes(b"\0" * 1000)
    assert main(["data", "fetch", "mnist", "--from", str(tmp_path / "source")]) == 0
    assert not killed.exists() and not legacy.exists() and live.exists()
    assert (cache / stem).is_file()


def test_a_fetch_killed_mid_write_leaves_a_temp_file_the_next_fetch_removes(tmp_path, monkeypatch):
    """The repro itself: SIGKILL while the cache's largest file is being written."""
    import dataclasses

    script = Path(__file__).resolve().parent / "_synthetic_cli.py"
    source, cache, marker = tmp_path / "source", tmp_path / "cache", tmp_path / "marker"
    stem = data_mod.MNIST.stems["train-images"]
    env = {**os.environ, "VAELAB_DATA": str(tmp_path / "setup-cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(script.parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, str(script), "--data", str(source), "--cache", str(cache),
                             "--pause-before-replace", f"{stem}:1", "--marker", str(marker), "--",
                             "data", "fetch", "mnist", "--from", str(source)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the fetch never reached its pause point"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    left = [p.name for p in (cache / "mnist").iterdir()]
    assert any(name.startswith(f".{stem}.{proc.pid}-") and name.endswith(".tmp") for name in left), left
    sums = {role: data_mod.sha256((source / s).read_bytes()) for role, s in data_mod.MNIST.stems.items()}
    monkeypatch.setitem(data_mod.DATASETS, "mnist", dataclasses.replace(data_mod.MNIST, sha256=sums, mirrors=()))
    data_mod.fetch("mnist", from_dir=source, cache_dir=cache, quiet=True)
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(data_mod.MNIST.stems.values())


def test_a_killed_save_leaves_temp_files_the_next_resume_cleans(run, synthetic_mnist):
    stale = [run / f".checkpoint.safetensors.{dead_pid()}-00aa00aa.tmp", run / "figures" / ".samples.png.x8.tmp",
             run.parent / f".run.{dead_pid()}-00bb00bb.new"]
    for p in stale[:2]:
        p.write_bytes(b"x")
    stale[2].mkdir()
    (stale[2] / "config.json").write_text("{}")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert not any(p.exists() for p in stale)


# ---------------------------------------------------------------------------------------------
# 6-8. Bounded, typed reading
# ---------------------------------------------------------------------------------------------


def deep_header(run):
    deep = b"[" * 100_000 + b"]" * 100_000
    (run / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)


def deep_metadata(run):
    data = (run / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["vaelab"] = "[" * 100_000
    blob = json.dumps(header).encode()
    (run / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def sparse(name: str):
    def make(run):
        with open(run / name, "r+b" if (run / name).exists() else "wb") as f:
            f.truncate(100 * 10**9)
    return make


READ_DAMAGE = {
    "config nested 100000 deep": (lambda r: (r / "config.json").write_text("[" * 100_000), "config.json",
                                  "nested deeper than 64 levels"),
    "safetensors header nested": (deep_header, "model.safetensors", "nested deeper than 64 levels"),
    "metadata string nested": (deep_metadata, "model.safetensors", "nested deeper than 64 levels"),
    "model is a list": (lambda r: edit_config(r, lambda c: c.update(model=["vae"])), "config.json",
                        "'model' must be a JSON string, got array"),
    "model_config is a list": (lambda r: edit_config(r, lambda c: c.update(model_config=[])), "config.json",
                               "'model_config' must be a JSON object, got array"),
    "config is a list": (lambda r: (r / "config.json").write_text("[]"), "config.json",
                         "expected a JSON object, got array"),
    "sparse 100 GB config": (sparse("config.json"), "config.json", "100.0 GB, more than the 1.0 MB"),
    "sparse 100 GB weights": (sparse("model.safetensors"), "model.safetensors", "needs about 200.0 GB of memory"),
    "FIFO named config.json": (lambda r: ((r / "config.json").unlink(), os.mkfifo(r / "config.json")),
                               "config.json", "not a regular file"),
}


@pytest.mark.parametrize("damage", READ_DAMAGE)
def test_damaged_files_are_read_bounded_and_refused_in_one_line(run, capsys, monkeypatch, damage):
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 10**9)  # a 16 GB machine
    apply, name, message = READ_DAMAGE[damage]
    apply(run)
    result = {}
    worker = threading.Thread(target=lambda: result.update(err=one_line(
        capsys, ["generate", str(run), "-n", "4", "--out", str(run.parent / "g.png"), "--device", "cpu"])))
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "generate hung"
    assert str(run / name) in result["err"] and message in result["err"], result["err"]
    assert not (run.parent / "g.png").exists()


def test_a_sparse_100_gb_checkpoint_is_refused_before_reading(run, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 10**9)
    sparse("checkpoint.safetensors")(run)
    err = one_line(capsys, ["train", "--resume", str(run), "--epochs", "2", "--quiet"])
    assert f"loading {run / 'checkpoint.safetensors'} (100.0 GB) needs about 200.0 GB of memory" in err


@pytest.mark.parametrize("where", ["cache", "from"])
def test_a_sparse_100_gb_idx_file_is_refused_before_reading(synthetic_mnist, tmp_path, monkeypatch, capsys, where):
    stem = synthetic_mnist.stems["train-images"]
    folder = Path(os.environ["VAELAB_DATA"]) / "mnist" if where == "cache" else tmp_path / "source"
    if where == "from":
        monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "fresh-cache"))
    with open(folder / stem, "r+b") as f:
        f.truncate(100 * 10**9)
    argv = ["data", "fetch", "mnist", "--from", str(tmp_path / "source")]
    if where == "cache":  # the damaged cached copy is replaced from --from
        assert "verified and cached" in one_line(capsys, argv, code=0)
        assert (folder / stem).stat().st_size < 10**6
    else:
        err = one_line(capsys, argv)
        assert f"{folder / stem}: 100.0 GB, more than the 134.2 MB a dataset file can be" in err, err


def test_the_json_reader_for_cached_files_checks_types(tmp_path):
    """What `evaluate` uses for classifier.json: `[]` or a string accuracy are refused, not crashed on."""
    path = tmp_path / "classifier.json"
    path.write_text("[]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got array"):
        reading.read_json(path)
    path.write_text('{"version": 2, "test_accuracy": "high"}')
    with pytest.raises(CheckpointError, match="'test_accuracy' must be a JSON number, got string"):
        reading.require_fields(reading.read_json(path), {"version": int, "test_accuracy": float}, str(path))
    path.write_text('{"version": 2, "test_accuracy": NaN}')
    with pytest.raises(CheckpointError, match="non-finite number NaN"):
        reading.read_json(path)


# ---------------------------------------------------------------------------------------------
# 9, 10, 14. Sizes, seeds and floats are checked before anything is allocated or written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "vae", "--set", "hidden_dims=[100000000000]"], "training a vae of 157,600,000,000,788 parameters"),
    (["train", "vae", "--latent-dim", "100000000000"], "training a vae of 153,800,000,804,624 parameters"),
    (["train", "vae", "--seed", "-1"], "a seed is between 0 and 4294967295, got -1"),
    (["train", "vae", "--seed", str(10**20)], f"a seed is between 0 and 4294967295, got {10**20}"),
    (["train", "vae", "--lr", "inf"], "train.lr: inf is not a finite number"),
    (["train", "vae", "--lr", "nan"], "train.lr: nan is not a finite number"),
    (["train", "vae", "--set", "beta=1e999"], "--set.beta: inf is not a finite number"),
    (["train", "vae", "--clip-grad", "1e999"], "train.clip_grad: inf is not a finite number"),
    (["train", "vae", "--batch-size", str(2**63)], "out of range"),
], ids=["hidden", "latent", "seed-neg", "seed-1e20", "lr-inf", "lr-nan", "beta-1e999", "clip-inf", "batch-2^63"])
def test_bad_sizes_seeds_and_floats_for_train_leave_no_folder(tmp_path, synthetic_mnist, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 10**9)
    err = one_line(capsys, [*argv, "--out", str(tmp_path / "new"), "--epochs", "1", "--quiet"])
    assert message in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", "RUN", "-n", "10000000"], "generate -n 10000000 (10000000 images and a 94860-pixel-wide grid) "
                                            "needs about 119.9 GB of memory, more than the 16.0 GB available"),
    (["plot", "RUN", "--grid", "5000"], "--grid: at most 100"),
    (["generate", "RUN", "--seed", str(10**24)], f"a seed is between 0 and 4294967295, got {10**24}"),
    (["reconstruct", "RUN", "--seed", str(10**24)], f"a seed is between 0 and 4294967295, got {10**24}"),
    (["generate", "RUN", "--npy", "TMP"], "the array is written as NumPy .npy, so name it *.npy"),
    (["generate", "RUN", "--npy", "TMP/folder.npy"], "folder.npy: is a folder; name a file to write"),
], ids=["generate-1e7", "grid-5000", "generate-seed", "reconstruct-seed", "npy-folder", "npy-named-folder"])
def test_bad_sizes_seeds_and_outputs_for_a_run_write_nothing(run, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 10**9)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "folder.npy").mkdir()
    before = tree(tmp_path)
    argv = [a.replace("RUN", str(run)).replace("TMP", str(tmp_path / "out")) for a in argv]
    assert message in one_line(capsys, argv)
    assert tree(tmp_path) == before and not (tmp_path / "out.npy").exists()


def test_a_seed_out_of_range_in_config_json_is_refused(run, capsys):
    edit_config(run, lambda c: c["train"].update(seed=-1))
    assert f"{run / 'config.json'}: seed must be between 0 and 4294967295" in one_line(
        capsys, ["generate", str(run), "-n", "2", "--device", "cpu"])


# ---------------------------------------------------------------------------------------------
# 11. Damaged history files for `vaelab plot`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("history.csv", b"epoch,split,loss\nx,train,1\n", "line 2 holds a value that is not a number"),
    ("history.csv", b"epoch,split,loss,recon,kl,seconds\n1,train,1\n", "line 2 has 3 fields, the header 6"),
    ("history.csv", b"\xff\xfe\x00\x01garbage", "not UTF-8 text"),
    ("steps.csv", b"\xff\xfe\x00\x01garbage", "not UTF-8 text"),
    ("steps.csv", b"step,epoch,loss,recon,kl\n1,1,abc,2,3\n", "not a table of numbers"),
    ("steps.csv", b"step,epoch,loss,recon,kl\n1,1,2\n", "rows of 3 numbers under 5 columns"),
    ("steps.csv", b"", "no step,epoch,... header"),
], ids=["history-value", "history-short-row", "history-binary", "steps-binary", "steps-value", "steps-short-row",
        "steps-empty"])
def test_plot_on_damaged_history_files_is_one_line_and_says_how_to_repair(run, synthetic_mnist, capsys, name, content, message):
    (run / name).write_bytes(content)
    before = tree(run)
    err = one_line(capsys, ["plot", str(run), "--device", "cpu"])
    assert f"{run / name}: {message}" in err and f"`vaelab train --resume {run}` rewrites it" in err, err
    assert tree(run) == before


def test_resume_repairs_damaged_history_files(run, synthetic_mnist, capsys):
    good = {name: (run / name).read_bytes() for name in ("history.csv", "steps.csv")}
    (run / "history.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    (run / "steps.csv").write_bytes(b"step,epoch\n1,x\n")
    assert "already finished" in one_line(capsys, ["train", "--resume", str(run), "--quiet"])
    assert {name: (run / name).read_bytes() for name in good} == good


# ---------------------------------------------------------------------------------------------
# 12. Weights without their hash
# ---------------------------------------------------------------------------------------------


def huge_weight(tensors):
    key = next(k for k in sorted(tensors) if tensors[k].dtype == torch.float32)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = 1e30


@pytest.mark.parametrize("name, argv", [
    ("model.safetensors", ["generate", "RUN", "-n", "2", "--device", "cpu"]),
    ("checkpoint.safetensors", ["train", "--resume", "RUN", "--epochs", "2", "--quiet"]),
], ids=["weights", "checkpoint"])
def test_a_file_without_its_sha256_is_refused(run, capsys, name, argv):
    rewrite_safetensors(run / name, edit_meta=lambda m: m.pop("sha256"), edit_tensors=huge_weight)
    before = tree(run)
    err = one_line(capsys, [a.replace("RUN", str(run)) for a in argv])
    assert f"{run / name}: no SHA-256 in its metadata" in err, err
    assert tree(run) == before


# ---------------------------------------------------------------------------------------------
# 13. The checkpoint is the source of truth; generation-only settings change through `vaelab config`
# ---------------------------------------------------------------------------------------------


def test_config_json_edited_to_change_training_is_refused_naming_the_field(run, synthetic_mnist, capsys):
    edit_config(run, lambda c: c["train"].update(dataset="fashion-mnist", batch_size=7))
    before = tree(run)
    err = one_line(capsys, ["train", "--resume", str(run), "--epochs", "3", "--quiet"])
    assert (f"{run / 'config.json'}: train.dataset is 'fashion-mnist' but {run / 'checkpoint.safetensors'} "
            f"says 'mnist'; config.json cannot change a trained run") in err, err
    err = one_line(capsys, ["generate", str(run), "-n", "2", "--device", "cpu"])
    assert "train.dataset is 'fashion-mnist' but" in err and "model.safetensors" in err, err
    edit_config(run, lambda c: c["train"].update(dataset="mnist"))
    assert "train.batch_size is 7 but" in one_line(capsys, ["train", "--resume", str(run), "--epochs", "3", "--quiet"])
    assert tree(run) == {**before, "config.json": (run / "config.json").read_bytes()}


def test_a_non_finite_number_in_config_json_is_refused(run, capsys):
    text = (run / "config.json").read_text().replace('"lr": 0.001', '"lr": Infinity')
    (run / "config.json").write_text(text)
    assert f"{run / 'config.json'}: non-finite number Infinity" in one_line(
        capsys, ["train", "--resume", str(run), "--epochs", "2", "--quiet"])


@pytest.fixture
def ae_run(tmp_path, monkeypatch):
    from vaelab.models import make_config
    from vaelab.train import train

    assert MODELS["ae"].generation_fields == ("gen_prior",)
    run = tmp_path / "ae"
    train("ae", make_config("ae", hidden_dims=[16]), quick_config(), run, progress=False, data=synthetic_data())
    return run


def test_vaelab_config_changes_a_generation_only_setting(ae_run, capsys):
    assert main(["config", str(ae_run)]) == 0
    assert capsys.readouterr().out == "gen_prior='auto'\n"
    assert main(["config", str(ae_run), "gen_prior=normal"]) == 0
    assert capsys.readouterr().out == f"{ae_run / 'config.json'}: gen_prior 'auto' -> 'normal'\n"
    assert ckpt.load_run(ae_run).model.gen_prior == "normal"
    assert "gen_prior must be one of" in one_line(capsys, ["config", str(ae_run), "gen_prior=nonsense"])
    err = one_line(capsys, ["config", str(ae_run), "hidden_dims=[3]"])
    assert "hidden_dims: only gen_prior can change after training" in err, err
    # the errors speak of what the user typed: `vaelab config` has no --set
    assert "vaelab config 'gen_prior': expected key=value" in one_line(capsys, ["config", str(ae_run), "gen_prior"])
    assert json.loads((ae_run / "config.json").read_text())["model_config"]["gen_prior"] == "normal"


def test_vaelab_config_switches_a_vae_gans_generation_prior_and_refuses_an_unfitted_mixture(tmp_path, capsys):
    """The VAE-GAN fits its mixture whatever gen_prior says, so a trained run switches either
    way; a run saved before the mixture existed loads (drawing N(0, I)) but cannot switch to it."""
    from vaelab.models import make_config
    from vaelab.train import train

    run = tmp_path / "vg"
    config = make_config("vae-gan", arch="mlp", hidden_dims=[16], dis_hidden_dims=[16], latent_dim=2,
                         gen_prior="normal", prior_components=3)
    train("vae-gan", config, quick_config(), run, progress=False, data=synthetic_data())
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    normal = ckpt.load_run(run).model
    assert normal.absent_state == () and normal.code_prior.weights.count_nonzero() == 3  # fitted
    torch.testing.assert_close(normal.prior_sample(5, g()), torch.randn(5, 2, generator=g()))
    assert main(["config", str(run), "gen_prior=mixture"]) == 0
    assert capsys.readouterr().out == f"{run / 'config.json'}: gen_prior 'normal' -> 'mixture'\n"
    mixture = ckpt.load_run(run).model
    torch.testing.assert_close(mixture.prior_sample(5, g()), mixture.code_prior.sample(5, g()))
    assert "mixture" in mixture.prior_name
    assert main(["config", str(run), "gen_prior=normal"]) == 0
    capsys.readouterr()
    # The weights of a run saved before the mixture existed: no code_prior tensors.
    tensors, meta = ckpt.load_tensors(run / ckpt.MODEL_FILE)
    ckpt.save_tensors(run / ckpt.MODEL_FILE, {k: v for k, v in tensors.items() if not k.startswith("code_prior.")}, meta)
    old = ckpt.load_run(run).model
    assert all(k.startswith("code_prior.") for k in old.absent_state) and len(old.absent_state) == 3
    torch.testing.assert_close(old.prior_sample(5, g()), torch.randn(5, 2, generator=g()))
    before = (run / "config.json").read_bytes()
    err = one_line(capsys, ["config", str(run), "gen_prior=mixture"])
    assert f"{run}: gen_prior=mixture: this run has no fitted mixture" in err, err
    assert (run / "config.json").read_bytes() == before
    # Edited into config.json by hand all the same: generation refuses, it does not draw N(0, I).
    (run / "config.json").write_text(before.decode().replace('"gen_prior": "normal"', '"gen_prior": "mixture"'))
    with pytest.raises(ConfigError, match="no fitted mixture"):
        ckpt.load_run(run).model.prior_sample(5, g())


def test_vaelab_config_on_a_model_without_generation_settings(run, capsys):
    assert main(["config", str(run)]) == 0
    assert "no setting changes after training" in capsys.readouterr().out
    assert "beta: no field of a vae can change after training" in one_line(capsys, ["config", str(run), "beta=2"])


# ---------------------------------------------------------------------------------------------
# 15. One-line fetch errors
# ---------------------------------------------------------------------------------------------


def test_a_failed_fetch_is_one_line(synthetic_mnist, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "damaged"
    write_dataset_files(folder)
    target = folder / synthetic_mnist.stems["test-labels"]
    target.write_bytes(target.read_bytes()[:100])
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "fresh"))
    err = one_line(capsys, ["data", "fetch", "mnist", "--from", str(folder)])
    assert err.startswith(f"vaelab: error: {target}: SHA-256 mismatch"), err
    err = one_line(capsys, ["data", "fetch", "mnist", "--from", str(tmp_path / "nowhere")])
    assert err == f"vaelab: error: --from {tmp_path / 'nowhere'}: no such folder\n"


# ---------------------------------------------------------------------------------------------
# The writer itself
# ---------------------------------------------------------------------------------------------


def test_together_commits_every_file_or_none(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"old a")
    with pytest.raises(RuntimeError):
        with atomic.together():
            atomic.atomic_write(a, b"new a")
            assert a.read_bytes() == b"old a"  # nothing is renamed before the block ends
            atomic.atomic_write(b, b"new b")
            raise RuntimeError("a later step fails")
    assert a.read_bytes() == b"old a" and not b.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with atomic.together():
        atomic.atomic_write(a, b"new a")
        atomic.atomic_write(b, b"new b")
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")


def test_a_folder_in_the_way_is_a_write_error_naming_it(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(WriteError, match=f"{tmp_path / 'x.png'}: cannot write \\(it is a folder\\); its previous"):
        atomic.atomic_write(tmp_path / "x.png", b"data")


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("b")
    atomic.exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"


# ---------------------------------------------------------------------------------------------
# No traceback, ever: generated arguments against good and damaged run folders
# ---------------------------------------------------------------------------------------------

NUMBERS = ["-1", "0", "1", "2", "3", "64", "1e-3", "1e6", "1e999", "-1e999", "inf", "nan", str(2**31), str(2**63),
           str(10**24), "", "x", "0x10"]


def numbers(*extra: str):
    return st.one_of(st.sampled_from(NUMBERS + list(extra)), st.text(max_size=5))


def option(flag: str, values):
    return values.map(lambda v: [flag, v])


def options(*choices):
    return st.lists(st.one_of(*choices), max_size=4).map(lambda groups: [a for g in groups for a in g])


SET_ITEMS = st.sampled_from(["hidden_dims=[16]", "hidden_dims=[]", "hidden_dims=[0]", "hidden_dims=[100000000000]",
                             "hidden_dims=x", "latent_dim=3", "latent_dim=-2", "beta=1e999", "beta=-1", "beta=0.5",
                             "gen_prior=normal", "normalize_latent=true", "nope=1", "=", "x", "hidden_dims=[2**70]"])


def train_new(out: str):
    # Sizes stay tiny whenever they are valid (epochs <= 3, batch >= 64), so a run that trains is quick.
    opts = options(option("--epochs", st.sampled_from(["-1", "0", "1", "2", "x", "1e3", str(2**63)])),
                   option("--batch-size", st.sampled_from(["-5", "0", "64", "256", str(2**40), str(2**63), "x"])),
                   option("--lr", numbers()), option("--clip-grad", numbers()), option("--seed", numbers()),
                   option("--latent-dim", st.sampled_from(["-1", "0", "1", "3", "100000000000", str(2**63), "x"])),
                   option("--device", st.sampled_from(["auto", "cpu", "cuda", "cuda:3", "tpu", "", "cuda:x"])),
                   option("--val-size", st.sampled_from(["-1", "0", "10", "100000", "x"])),
                   option("--binarize", st.sampled_from(["none", "dynamic", "static", "x"])),
                   option("--precision", st.sampled_from(["fp32", "bf16", "x"])),
                   option("--dataset", st.sampled_from(["mnist", "fashion-mnist", "x"])),
                   option("--set", SET_ITEMS), st.just(["--overwrite"]), st.just(["--compile"]),
                   st.just(["--tensorboard"]))
    return st.tuples(st.sampled_from(["vae", "ae", "nope", ""]), opts).map(
        lambda t: ["train", t[0], "--epochs", "1", "--batch-size", "256", "--set", "hidden_dims=[16]",
                   "--device", "cpu", *t[1], "--out", out, "--quiet"])


def commands(run: str, out: str, source: str):
    png = st.sampled_from([f"{out}/a.png", f"{out}/a.txt", f"{out}", f"{run}/figures/x.png", f"{out}/new/b.png"])
    npy = st.sampled_from([f"{out}/a.npy", f"{out}", f"{out}/a", f"{run}/model.safetensors.npy"])
    return st.one_of(
        train_new(f"{out}/new-run"),
        train_new(run),
        options(option("--epochs", st.sampled_from(["1", "2", "3", "0", "x", "-1"])),
                option("--device", st.sampled_from(["cpu", "cuda", "x"])),
                option("--lr", numbers()), st.just(["--quiet"])).map(lambda o: ["train", "--resume", run, *o]),
        options(option("-n", numbers("10", "100", "10000000")), option("--out", png), option("--npy", npy),
                option("--seed", numbers()), option("--device", st.sampled_from(["cpu", "cuda", "x"])))
            .map(lambda o: ["generate", run, *o]),
        options(option("-n", numbers("10", "101")), option("--out", png), option("--seed", numbers()))
            .map(lambda o: ["reconstruct", run, *o]),
        options(option("--grid", numbers("5000", "101")), option("--seed", numbers()))
            .map(lambda o: ["plot", run, "--grid", "2", *o]),
        st.lists(st.one_of(SET_ITEMS, st.text(max_size=6)), max_size=2).map(lambda a: ["config", run, *a]),
        st.tuples(st.sampled_from(["mnist", "fashion-mnist", "x", ""]),
                  st.sampled_from([source, f"{out}/nowhere", run])).map(lambda t: ["data", "fetch", t[0], "--from", t[1]]),
        st.sampled_from([["models"], ["models", "--fields"], ["--version"], [], ["--help"]]),
        st.lists(st.text(max_size=6), max_size=4),
    )


def json_values():
    return st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_subnormal=False),
                                  st.text(max_size=5)),
                        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=8)


def damage_strategy():
    files = st.sampled_from(["config.json", "model.safetensors", "checkpoint.safetensors", "history.csv", "steps.csv"])
    return st.one_of(
        st.just(None),
        st.sampled_from(sorted(READ_DAMAGE)).map(lambda k: ("read", k)),
        st.tuples(st.just("truncate"), files, st.floats(0, 1, allow_subnormal=False)),
        st.tuples(st.just("flip"), files, st.integers(0, 10**6)),
        st.tuples(st.just("delete"), files),
        st.tuples(st.just("config-field"), st.sampled_from(["model", "model_config", "train", "format_version"]),
                  json_values()),
        st.tuples(st.just("train-field"), st.sampled_from(["dataset", "epochs", "batch_size", "lr", "seed", "device",
                                                            "val_size", "binarize", "clip_grad", "log_every",
                                                            "tensorboard"]),
                  json_values()),
    )


def apply_damage(run: Path, damage) -> None:
    if damage is None:
        return
    kind = damage[0]
    if kind == "read":
        READ_DAMAGE[damage[1]][0](run)
    elif kind == "truncate":
        p = run / damage[1]
        p.write_bytes(p.read_bytes()[: int(damage[2] * p.stat().st_size)])
    elif kind == "flip":
        p = run / damage[1]
        data = bytearray(p.read_bytes())
        if data:
            data[damage[2] % len(data)] ^= 0x55
        p.write_bytes(bytes(data))
    elif kind == "delete":
        (run / damage[1]).unlink()
    elif kind == "config-field":
        edit_config(run, lambda c: c.update({damage[1]: damage[2]}))
    elif kind == "train-field":
        edit_config(run, lambda c: c["train"].update({damage[1]: damage[2]}))


# FUZZ_N=500 pytest -k no_traceback explores further, with fresh random draws each time.
@settings(max_examples=int(os.environ.get("FUZZ_N", 40)), derandomize=not os.environ.get("FUZZ_N"), deadline=None,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_traceback_escapes_main(trained_once, synthetic_mnist, tmp_path_factory, monkeypatch, capsys, data):
    """Any arguments, any of the damages above: `main` returns 0 or one line with exit 2, and
    leaves no temp file or half-made folder behind."""
    import dataclasses

    monkeypatch.setitem(data_mod.DATASETS, "fashion-mnist", dataclasses.replace(  # no network, ever
        data_mod.FASHION_MNIST, mirrors=(), registry_source=synthetic_mnist.registry_source))
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 10**9)
    root = tmp_path_factory.mktemp("fuzz")
    run = Path(shutil.copytree(trained_once, root / "run"))
    (root / "out").mkdir()
    apply_damage(run, data.draw(damage_strategy(), label="damage"))
    source = Path(os.environ["VAELAB_DATA"]).parent / "source"
    argv = data.draw(commands(str(run), str(root / "out"), str(source)), label="argv")
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("vaelab"), err
    left = [p for p in root.rglob(".*") if p.name != ckpt.LOCK_FILE]
    assert not left, f"temp files or folders left behind: {left}"
    shutil.rmtree(root, ignore_errors=True)


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """`vaelab score --json` used to compute its whole table (18 s on MNIST) and only then find
    that its output could not be written; generate and reconstruct share the check."""
    import numpy as np

    import vaelab.metrics

    monkeypatch.setattr(vaelab.metrics, "score_file", lambda *a, **k: pytest.fail("scored before checking --json"))
    images = tmp_path / "s.npy"
    np.save(images, np.zeros((4, 28, 28), dtype=np.float32))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    err = one_line(capsys, ["score", str(images), "--dataset", "mnist", "--json", str(a_file / "x.json")])
    assert err == (f"vaelab: error: {a_file / 'x.json'}: cannot write ({a_file} is a file, not a folder); "
                   "nothing was written\n"), err
    if Path("/proc").is_dir():  # not writable even by root
        err = one_line(capsys, ["score", str(images), "--dataset", "mnist", "--json", "/proc/vaelab-x.json"])
        assert err.startswith("vaelab: error: /proc/vaelab-x.json: cannot write (creating a file in /proc: "), err
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "s.npy"]
