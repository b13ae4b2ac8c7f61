"""`vaelab train --tensorboard`: the event log read back with TensorBoard's own reader
(`EventAccumulator`) and compared with what the run folder records (steps.csv, history.csv, the
trained model), through kills and resumes, and the one-line refusal without the package."""

from __future__ import annotations

import csv
import json
import signal
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab import checkpoint as ckpt
from vaelab.cli import main
from vaelab.data import FASHION_MNIST, ImageData
from vaelab.gallery import grid_array, random_test_images, random_test_labels, reconstruction_rows, sample_rows
from vaelab.models import make_config
from vaelab.train import train

from conftest import quick_config, synthetic_data, write_dataset_files
from test_resume_subprocess import cli, finish, signal_at

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (`make install` installs it)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from PIL import Image  # noqa: E402

KEEP_ALL = {"scalars": 0, "images": 0}  # EventAccumulator keeps a sample of each tag by default


def read_log(folder: Path) -> EventAccumulator:
    log = EventAccumulator(str(folder), size_guidance=KEEP_ALL)
    log.Reload()
    return log


def scalars(log: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in log.Scalars(tag)]


def steps_table(run: Path) -> tuple[list[str], np.ndarray]:
    columns = (run / "steps.csv").read_text().splitlines()[0].split(",")
    return columns, np.loadtxt(run / "steps.csv", delimiter=",", skiprows=1, ndmin=2)


def history_table(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open()))


def epoch_ends(run: Path) -> dict[int, int]:
    """epoch -> its last step, from steps.csv."""
    columns, steps = steps_table(run)
    ends = {}
    for row in steps:
        ends[int(row[columns.index("epoch")])] = int(row[columns.index("step")])
    return ends


def check_log_matches_run(log: EventAccumulator, run: Path) -> None:
    """Every term's per-step scalars are steps.csv's rows, each step once; every history row's
    terms are the epoch scalars at that epoch's last step; one image of each grid per epoch."""
    columns, steps = steps_table(run)
    for name in columns[2:]:
        logged = scalars(log, f"{name}/train_step")
        assert [s for s, _ in logged] == steps[:, 0].astype(int).tolist(), name
        np.testing.assert_allclose([v for _, v in logged], steps[:, columns.index(name)], rtol=1e-5, atol=1e-6,
                                   err_msg=name)  # steps.csv keeps 6 significant digits
    ends = epoch_ends(run)
    for split in {r["split"] for r in history_table(run)}:
        rows = [r for r in history_table(run) if r["split"] == split]
        for name in columns[2:]:
            logged = scalars(log, f"{name}/{split}_epoch")
            assert [s for s, _ in logged] == [ends[int(r["epoch"])] for r in rows], (split, name)
            np.testing.assert_allclose([v for _, v in logged], [float(r[name]) for r in rows], rtol=1e-6,
                                       err_msg=f"{split} {name}")
    for tag in ("samples", "reconstructions"):
        assert [e.step for e in log.Images(tag)] == sorted(ends.values()), tag


def png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(encoded)).convert("L"))


def projector_files(logdir: Path) -> dict[str, Path]:
    """The one embedding projector_config.pbtxt lists: its files by role."""
    text = (logdir / "projector_config.pbtxt").read_text()
    paths = {key: logdir / text.split(f"{key}: \"")[1].split("\"")[0]
             for key in ("tensor_path", "metadata_path", "image_path")}
    assert text.count("embeddings {") == 1, text
    return paths


# ---------------------------------------------------------------------------------------------
# One run, read back
# ---------------------------------------------------------------------------------------------

N_TEST = 2100  # more test images than the projector takes
WARMUP = 5  # KL warm-up steps: the KL weight changes within the run


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """2 epochs of the MLP VAE with a validation split and a KL warm-up, logged into RUN/tb."""
    run = tmp_path_factory.mktemp("tb") / "run"
    full = synthetic_data(n_train=256, n_test=N_TEST)
    data = ImageData("mnist", full.classes, full.train_x[64:], full.train_y[64:], full.test_x, full.test_y,
                     val_x=full.train_x[:64], val_y=full.train_y[:64])
    config = quick_config(epochs=2, val_size=64, lr=2e-3, tensorboard="tb")
    model_config = make_config("vae", ["hidden_dims=[32]", f"kl_warmup_steps={WARMUP}", "beta=0.5"])
    train("vae", model_config, config, run, progress=False, data=data)
    return run, data


def test_scalars_are_the_steps_and_history_files(logged_run):
    run, _ = logged_run
    log = read_log(run / "tb")
    check_log_matches_run(log, run)
    assert {r["split"] for r in history_table(run)} == {"train", "test", "val"}
    steps = [s for s, _ in scalars(log, "loss/train_step")]
    assert steps == list(range(1, 7))  # 192 training images in batches of 64, twice
    assert scalars(log, "schedule/lr") == [(s, pytest.approx(2e-3)) for s in steps]
    # The weight of step s: beta times the share of the warm-up its s - 1 earlier steps completed.
    assert scalars(log, "schedule/kl_weight") == [(s, pytest.approx(0.5 * min(1, (s - 1) / WARMUP))) for s in steps]


def test_images_are_the_figures_grids_each_epoch(logged_run):
    run, data = logged_run
    log = read_log(run / "tb")
    model = ckpt.load_run(run).model  # the last epoch's weights: the last images were drawn from them
    for tag, rows in (("samples", sample_rows(model, 10, seed=0)),
                      ("reconstructions", reconstruction_rows(model, data.test_x, seed=0, test_y=data.test_y))):
        logged = png(log.Images(tag)[-1].encoded_image_string)
        expected = grid_array(torch.cat(rows), nrow=len(rows[0]))
        assert logged.shape == expected.shape, tag
        # Trained with oneDNN linear layers, loaded without: a pixel may round the other way.
        assert np.abs(logged.astype(int) - expected).max() <= 1, tag
    first, last = (png(e.encoded_image_string) for e in log.Images("samples"))
    assert not np.array_equal(first, last)  # one grid per epoch, not the same one twice


def test_projector_holds_2000_test_codes_with_sprites_and_labels(logged_run):
    run, data = logged_run
    files = projector_files(run / "tb")
    labels = random_test_labels(data.test_y, 2000, 0, "cpu")
    metadata = files["metadata_path"].read_text().splitlines()
    assert metadata[0] == "label\tclass" and len(metadata) == 2001
    assert metadata[1:] == [f"{k}\t{data.classes[k]}" for k in labels.tolist()]
    model = ckpt.load_run(run).model
    with torch.inference_mode():
        codes = model.encode(random_test_images(data.test_x, 2000, 0, "cpu")).mu
    np.testing.assert_allclose(np.loadtxt(files["tensor_path"], delimiter="\t"), codes.numpy(), rtol=1e-4, atol=1e-5)
    sprite = Image.open(files["image_path"])
    assert sprite.size == (45 * 28, 45 * 28)  # ceil(sqrt(2000)) images a side


def test_a_conditional_model_on_fashion_mnist(tmp_path):
    """A cvae: samples one row per class, codes of q(z|x, y), class names in the metadata."""
    tiny = synthetic_data(n_train=128, n_test=40)
    data = ImageData("fashion-mnist", FASHION_MNIST.classes, tiny.train_x, tiny.train_y, tiny.test_x, tiny.test_y)
    run = tmp_path / "cvae"
    train("cvae", make_config("cvae", ["hidden_dims=[32]"]), quick_config(tensorboard="tb"), run, progress=False,
          data=data)
    log = read_log(run / "tb")
    check_log_matches_run(log, run)
    model = ckpt.load_run(run).model
    rows = sample_rows(model, 10, seed=0)
    assert len(rows) == 10  # one per class
    logged = png(log.Images("samples")[-1].encoded_image_string)
    assert np.abs(logged.astype(int) - grid_array(torch.cat(rows), nrow=len(rows[0]))).max() <= 1
    files = projector_files(run / "tb")
    labels = random_test_labels(data.test_y, 40, 0, "cpu")
    assert files["metadata_path"].read_text().splitlines()[1:] == [
        f"{k}\t{FASHION_MNIST.classes[k]}" for k in labels.tolist()]  # all 40: fewer than 2000
    with torch.inference_mode():
        codes = model.encode(random_test_images(data.test_x, 40, 0, "cpu"), labels).mu
    np.testing.assert_allclose(np.loadtxt(files["tensor_path"], delimiter="\t"), codes.numpy(), rtol=1e-4, atol=1e-5)


def test_a_model_with_several_optimizers_logs_each_learning_rate(tmp_path):
    """The VAE-GAN: its three networks' terms, and one learning rate per optimizer."""
    run = tmp_path / "vae-gan"
    model_config = make_config("vae-gan", ["arch='mlp'", "hidden_dims=[32]", "dis_hidden_dims=[32]",
                                           "dis_lr_scale=0.5"])
    train("vae-gan", model_config, quick_config(lr=1e-3, tensorboard="tb"), run, progress=False,
          data=synthetic_data(n_train=128, n_test=40))
    log = read_log(run / "tb")
    check_log_matches_run(log, run)
    assert len(steps_table(run)[0]) == 2 + 1 + 10  # step, epoch, loss and ten terms: all checked above
    rates = {tag: {v for _, v in scalars(log, tag)} for tag in log.Tags()["scalars"] if tag.startswith("schedule/lr")}
    stored = lambda lr: {float(np.float32(lr))}  # noqa: E731  (event files hold float32)
    assert rates == {"schedule/lr_encoder": stored(1e-3), "schedule/lr_decoder": stored(1e-3),
                     "schedule/lr_discriminator": stored(5e-4)}


def test_the_log_changes_nothing_in_training(tmp_path):
    """Drawing the images and codes in the loop must neither draw from the global random state
    nor touch batch norm's statistics: a model with both trains to the same weights with the
    log as without."""
    data = synthetic_data(n_train=128, n_test=40)
    model_config = make_config("lstm-vae", ["lstm_hidden=16", "channels=[8, 4]", "batch_norm=true", "dropout=0.3"])
    runs = {}
    for name, folder in (("plain", None), ("logged", "tb")):
        runs[name] = train("lstm-vae", model_config, quick_config(epochs=2, tensorboard=folder), tmp_path / name,
                           progress=False, data=data)
    assert (tmp_path / "logged" / "tb").is_dir() and not (tmp_path / "plain" / "tb").exists()
    plain, logged = (runs[n].model.state_dict() for n in ("plain", "logged"))
    assert plain.keys() == logged.keys()
    for key in plain:
        assert torch.equal(plain[key], logged[key]), key
    assert torch.equal(runs["plain"].steps, runs["logged"].steps)


# ---------------------------------------------------------------------------------------------
# Through the command line
# ---------------------------------------------------------------------------------------------


def test_the_flag_alone_logs_into_the_run_and_a_folder_is_taken_from_here(tmp_path, synthetic_mnist, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "vae", "--epochs", "1", "--batch-size", "128", "--set", "hidden_dims=[16]", "--quiet"]
    assert main([*args, "--out", "runs/a", "--tensorboard"]) == 0
    assert "tensorboard --logdir runs/a/tb" in capsys.readouterr().out
    assert json.loads(Path("runs/a/config.json").read_text())["train"]["tensorboard"] == "tb"
    check_log_matches_run(read_log(Path("runs/a/tb")), Path("runs/a"))
    assert main([*args, "--out", "runs/b", "--tensorboard", "logs/b"]) == 0
    assert json.loads(Path("runs/b/config.json").read_text())["train"]["tensorboard"] == str(tmp_path / "logs/b")
    check_log_matches_run(read_log(tmp_path / "logs/b"), Path("runs/b"))
    assert not Path("runs/b/tb").exists()


def test_overwrite_swaps_the_log_in_with_the_new_run(tmp_path, synthetic_mnist):
    """--overwrite trains in a hidden sibling swapped in after its first epoch: the log follows
    it, so the second epoch's events and the projector land in the run, and nothing is left
    under the sibling's name."""
    run = tmp_path / "run"
    args = ["train", "vae", "--batch-size", "128", "--set", "hidden_dims=[16]", "--quiet", "--out", str(run)]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--overwrite", "--tensorboard"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run", "source"]
    check_log_matches_run(read_log(run / "tb"), run)
    assert projector_files(run / "tb")["tensor_path"].is_file()


def test_without_the_package_one_line_and_nothing_written(tmp_path, synthetic_mnist, monkeypatch, capsys):
    run = tmp_path / "runs" / "logged"
    base = ["--batch-size", "128", "--set", "hidden_dims=[16]", "--quiet"]
    assert main(["train", "vae", "--epochs", "1", *base, "--out", str(run), "--tensorboard"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    # The package gone: its import, and torch's module that wraps it, fail as they would.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for argv in (["train", "vae", "--epochs", "1", *base, "--out", str(tmp_path / "new" / "run"), "--tensorboard"],
                 ["train", "--resume", str(run), "--epochs", "2", "--quiet"]):  # stored in the run
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("vaelab: error: --tensorboard needs the tensorboard package"), err
        assert "pip install 'vaelab[tensorboard]'" in err
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after == before and not (tmp_path / "new").exists()


def test_a_file_where_the_log_goes_is_refused_before_anything_is_written(tmp_path, synthetic_mnist, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert main(["train", "vae", "--epochs", "1", "--quiet", "--out", str(tmp_path / "new" / "run"),
                 "--tensorboard", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err == f"vaelab: error: --tensorboard {tmp_path / 'taken'}: exists and is not a folder\n"
    assert not (tmp_path / "new").exists()


def test_a_run_saved_before_the_option_loads_and_resumes_without_a_log(tmp_path, synthetic_mnist, monkeypatch):
    """Run folders written before the field existed lack it in config.json and in the weights'
    stored config: they load, and resume, as runs without a log."""
    run = tmp_path / "old"
    real_run_config = ckpt.run_config

    def as_before(model, train_config):
        cfg = real_run_config(model, train_config)
        del cfg["train"]["tensorboard"]
        return cfg

    args = ["--batch-size", "128", "--set", "hidden_dims=[16]", "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "run_config", as_before)
        assert main(["train", "vae", "--epochs", "1", *args, "--out", str(run)]) == 0
    assert "tensorboard" not in json.loads((run / "config.json").read_text())["train"]
    assert "tensorboard" not in ckpt.load_tensors(run / ckpt.MODEL_FILE)[1]["config"]["train"]
    assert ckpt.load_run(run).train_config.tensorboard is None
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert not (run / "tb").exists() and not any(run.rglob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# Kills and resumes, in real processes
# ---------------------------------------------------------------------------------------------

N_TRAIN, BATCH = 192, 32  # 6 steps per epoch


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("tb_resume")
    write_dataset_files(root / "data", n_train=N_TRAIN, n_test=32)
    env = {**os.environ, "VAELAB_DATA": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return root, env


@pytest.mark.parametrize("pause, sig, logged, extend", [
    # After epoch 2's log was flushed, before its checkpoint replaced epoch 1's: the log holds
    # 6 steps, one epoch's rows and images, and a projector the checkpoint does not.
    (["--pause-before-replace", "checkpoint.safetensors:2"], signal.SIGKILL, 12, []),
    # Mid-epoch: the checkpoint holds 9 steps, 3 of an unfinished epoch, and so does the log.
    (["--pause-at-step", "9"], signal.SIGINT, 9, []),
    # Just after the last checkpoint (before the weights' rename): the run is complete, and the
    # resume extends it by an epoch, whose projector replaces the first one in the config.
    (["--pause-before-replace", "model.safetensors:2"], signal.SIGKILL, 12, ["--epochs", "3"]),
], ids=["killed-before-checkpoint", "interrupted-mid-epoch", "killed-after-checkpoint-then-extended"])
def test_resume_continues_the_log_without_duplicates(workspace, pause, sig, logged, extend):
    root, _ = workspace
    run = root / f"run-{sig.name}-{logged}-{len(extend)}"
    args = ["train", "vae", "--epochs", "2", "--batch-size", str(BATCH), "--log-every", "2", "--set",
            "hidden_dims=[16]", "--device", "cpu", "--quiet", "--out", str(run), "--tensorboard"]
    marker = root / f"{run.name}.marker"
    proc = cli(workspace, *args, pause=pause, marker=marker)
    signal_at(proc, marker, sig)
    finish(proc)
    before = read_log(run / "tb")
    assert [s for s, _ in scalars(before, "loss/train_step")] == list(range(1, logged + 1))
    code, out, err = finish(cli(workspace, "train", "--resume", str(run), *extend, "--quiet"))
    assert code == 0, err
    assert "warning" not in out.lower(), out  # a projector written again replaces the old one quietly
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # one per process, appended
    log = read_log(run / "tb")
    check_log_matches_run(log, run)  # each step, epoch row and image once
    total = 6 * (3 if extend else 2)
    assert [s for s, _ in scalars(log, "loss/train_step")] == list(range(1, total + 1))
    assert f"{total:05d}/test_codes/tensors.tsv" in str(projector_files(run / "tb")["tensor_path"])


def test_the_log_is_on_disk_before_each_checkpoint(tmp_path, tiny_data, monkeypatch):
    """With a slow disk (20 ms per event), each checkpoint, at the end of an epoch and at a
    Ctrl-C mid-epoch, finds every step it holds (and the epoch's last image) already in the
    event file: a process killed right after a checkpoint leaves no gap in its log."""
    import os
    import time

    from tensorboard.summary.writer import record_writer

    from vaelab.errors import TrainingInterrupted
    from vaelab.models import get_model_class

    write = record_writer.RecordWriter.write
    monkeypatch.setattr(record_writer.RecordWriter, "write", lambda self, data: (time.sleep(0.02), write(self, data)))
    seen, save = [], ckpt.save_checkpoint

    def save_and_look(run_dir, state, config=None):
        log = read_log(Path(run_dir) / "tb")
        images = [e.step for e in log.Images("reconstructions")] if "reconstructions" in log.Tags()["images"] else []
        seen.append((state["step"], scalars(log, "loss/train_step")[-1][0], images[-1:]))
        save(run_dir, state, config)

    cls = get_model_class("vae")
    step, calls = cls.training_step, {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:  # the third step of epoch 2 (4 per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_look)
    monkeypatch.setattr(cls, "training_step", step_then_interrupt)
    with pytest.raises(TrainingInterrupted):
        train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=2, tensorboard="tb"), tmp_path / "run",
              progress=False, data=tiny_data)
    assert seen == [(4, 4, [4]), (7, 7, [4])]
