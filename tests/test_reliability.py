"""Nothing lost, in-process: divergence (loss and gradient), gradient clipping, safe loading of
damaged run folders, and bad data or an unwritable / full cache during a fetch."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from vaelab import atomic
from vaelab import checkpoint as ckpt
from vaelab import data as data_mod
from vaelab.cli import main
from vaelab.errors import CheckpointError, DataError, DivergenceError
from vaelab.models import MODELS, build_model, make_config, register
from vaelab.models.base import ModelOutput
from vaelab.models.vae import VAE
from vaelab.train import resume, train

from conftest import quick_config, write_dataset_files

RUN_FILES = ("checkpoint.safetensors", "model.safetensors", "history.csv", "steps.csv", "config.json")


def snapshot(run):
    return {name: (run / name).read_bytes() for name in RUN_FILES}


def one_epoch_run(tmp_path, data, model="vae", **train_kw):
    run = tmp_path / "run"
    train(model, make_config(model, hidden_dims=[16]), quick_config(**train_kw), run, progress=False, data=data)
    return run


def fail_at_step(monkeypatch, cls, step: int, corrupt) -> None:
    """Make the `step`-th training step (counted in this test) go wrong via `corrupt(model, out)`,
    which runs either before the update (to poison gradients) or after it (to poison the loss)."""
    original, count = cls.training_step, {"n": 0}

    def training_step(self, batch, optimizers, state):
        count["n"] += 1
        hit = count["n"] == step
        handles = corrupt(self, None) if hit and corrupt.before else []
        try:
            out = original(self, batch, optimizers, state)
        finally:
            for h in handles:
                h.remove()
        if hit and not corrupt.before:
            corrupt(self, out)
        return out

    monkeypatch.setattr(cls, "training_step", training_step)


def nan_term(name):
    def corrupt(model, out):
        out.terms[name] = torch.tensor(float("nan"))
        out.loss = out.loss + out.terms[name]
    corrupt.before = False
    return corrupt


def nan_gradient(params_of):
    """Gradients of some parameters become NaN, through hooks; the step's loss stays finite.
    (A hook sends the MLP VAE to the autograd step, which runs it.)"""
    def corrupt(model, out):
        targets = {id(p) for p in params_of(model)}
        return [p.register_hook(lambda g: torch.full_like(g, float("nan")))
                for p in model.parameters() if id(p) in targets]
    corrupt.before = True
    return corrupt


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_naming_epoch_step_and_term_and_keeps_the_checkpoint(tmp_path, tiny_data, monkeypatch):
    run = one_epoch_run(tmp_path, tiny_data)
    before = snapshot(run)
    fail_at_step(monkeypatch, VAE, 3, nan_term("kl"))  # the resumed run's 3rd step: epoch 2, step 7
    with pytest.raises(DivergenceError) as e:
        resume(run, epochs=3, progress=False, data=tiny_data)
    assert str(e.value).startswith("training diverged at epoch 2, step 7: kl is nan; "
                                   f"the last good checkpoint (epoch 1) is intact in {run}.")
    assert "\n" not in str(e.value)
    after = snapshot(run)
    after["config.json"] = before["config.json"]  # resume stored the new --epochs, by design
    assert after == before
    ckpt.load_run(run)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
def test_nonfinite_gradient_with_finite_loss_is_caught_before_the_save(tmp_path, tiny_data, monkeypatch, clip):
    """The worst place: the last step of an epoch, whose loss is still finite. Without the check
    the epoch's save would checkpoint NaN weights over the last good ones."""
    run = one_epoch_run(tmp_path, tiny_data, clip_grad=clip)
    before = snapshot(run)
    fail_at_step(monkeypatch, VAE, 4, nan_gradient(lambda m: m.decoder.parameters()))  # epoch 2, step 8
    with pytest.raises(DivergenceError, match=r"at epoch 2, step 8: the weights became non-finite "
                                              r"\(a non-finite gradient\); the last good checkpoint \(epoch 1\)"):
        resume(run, epochs=2, progress=False, data=tiny_data)
    assert {k: v for k, v in snapshot(run).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}
    state = ckpt.load_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_divergence_in_the_first_epoch_says_nothing_was_saved(tmp_path, tiny_data, monkeypatch):
    fail_at_step(monkeypatch, VAE, 2, nan_term("recon"))
    with pytest.raises(DivergenceError, match="epoch 1, step 2: recon is nan; no epoch had completed"):
        one_epoch_run(tmp_path, tiny_data)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_divergence_through_the_cli_is_one_line(tmp_path, synthetic_mnist, monkeypatch, capsys):
    fail_at_step(monkeypatch, VAE, 5, nan_term("kl"))  # 512 images / 256 = 2 steps per epoch: epoch 3
    code = main(["train", "vae", "--epochs", "3", "--batch-size", "256", "--set", "hidden_dims=[16]",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert (f"training diverged at epoch 3, step 5: kl is nan; the last good checkpoint (epoch 2) is intact "
            f"in {tmp_path / 'run'}. Try a lower --lr or --clip-grad") in err


class TwoNetworks(VAE):
    """A VAE trained as two networks with their own optimizers and loss terms, like the VAE-GAN:
    the trainer must say which one diverged."""

    term_names = ("enc_loss", "dec_loss")

    def forward(self, batch, state=None):
        out = super().forward(batch, state)
        return ModelOutput(out.loss, {"enc_loss": out.terms["kl"], "dec_loss": out.terms["recon"]})

    def configure_optimizers(self, lr):
        enc = [*self.trunk.parameters(), *self.heads.parameters()]
        return {"encoder": torch.optim.Adam(enc, lr=lr), "decoder": torch.optim.Adam(self.decoder.parameters(), lr=lr)}

    def training_step(self, batch, optimizers, state):
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        out = self(batch, state)
        out.loss.backward()
        for opt in optimizers.values():
            opt.step()
        return out


@pytest.fixture
def two_networks(monkeypatch):
    monkeypatch.delitem(MODELS, "two-networks", raising=False)
    register("two-networks")(TwoNetworks)
    yield TwoNetworks
    MODELS.pop("two-networks", None)


@pytest.mark.parametrize("corrupt, message", [
    (nan_term("dec_loss"), "at epoch 1, step 3: dec_loss is nan;"),
    (nan_gradient(lambda m: m.decoder.parameters()), "at epoch 1, step 3: the decoder weights became non-finite"),
    (nan_gradient(lambda m: m.heads.parameters()), "at epoch 1, step 3: the encoder weights became non-finite"),
], ids=["loss", "decoder-gradient", "encoder-gradient"])
def test_divergence_names_the_network(tmp_path, tiny_data, monkeypatch, two_networks, corrupt, message):
    fail_at_step(monkeypatch, two_networks, 3, corrupt)
    with pytest.raises(DivergenceError, match=message):
        train("two-networks", make_config("two-networks", hidden_dims=[16]), quick_config(log_every=1),
              tmp_path / "run", progress=False, data=tiny_data)


def test_vae_gan_divergence_names_the_network(tmp_path, tiny_data, monkeypatch):
    cls = MODELS["vae-gan"]
    term = next(t for t in ("dec_loss", "dis_loss", "enc_loss") if t in cls.term_names)
    fail_at_step(monkeypatch, cls, 2, nan_term(term))
    with pytest.raises(DivergenceError, match=f"at epoch 1, step 2: {term} is nan"):
        train("vae-gan", make_config("vae-gan"), quick_config(), tmp_path / "run", progress=False, data=tiny_data)


def test_clip_grad_clips_every_step_to_the_configured_norm(tmp_path, tiny_data, monkeypatch):
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = original(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        seen.append((max_norm, float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    one_epoch_run(tmp_path, tiny_data, clip_grad=0.5)
    assert len(seen) == 4 and all(m == 0.5 for m, _, _ in seen)
    assert all(after <= 0.5 * (1 + 1e-4) for _, total, after in seen)
    assert any(total > 0.5 for _, total, _ in seen)  # it did clip something
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["clip_grad"] == 0.5


def test_clip_grad_from_the_cli(tmp_path, synthetic_mnist, capsys):
    assert main(["train", "vae", "--epochs", "1", "--batch-size", "256", "--set", "hidden_dims=[16]",
                 "--clip-grad", "2.5", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["clip_grad"] == 2.5
    capsys.readouterr()
    assert main(["train", "vae", "--clip-grad", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "clip-grad must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Loading is safe
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    from conftest import synthetic_data

    return one_epoch_run(tmp_path_factory.mktemp("trained"), synthetic_data())


@pytest.fixture
def finished_run(trained_once, tmp_path):
    """A fresh copy of a finished one-epoch run, free to damage."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def other_model_weights(run, tmp_path, tiny_data):
    other = tmp_path / "other"
    train("vae", make_config("vae", hidden_dims=[24], latent_dim=3), quick_config(), other, progress=False, data=tiny_data)
    for name in ("model.safetensors", "checkpoint.safetensors"):
        shutil.copy(other / name, run / name)


def other_model_name(run, tmp_path, tiny_data):
    model = build_model("vae", make_config("vae", hidden_dims=[16]))
    ckpt.save_tensors(run / "model.safetensors", dict(model.state_dict()),
                      {"format_version": ckpt.FORMAT_VERSION, "model": "lstm-vae"})


def set_config(run, **changes):
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


DAMAGE = {
    # The weights carry the config they were trained with: config.json no longer matches them.
    "weights of another model": (other_model_weights, "model.safetensors", "cannot change a trained run"),
    "another model's name": (other_model_name, "model.safetensors", "holds a 'lstm-vae' model, config says 'vae'"),
    "truncated weights": (lambda r, *_: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:-100]),
                          "model.safetensors", "corrupt"),
    "flipped bit in the weights": (lambda r, *_: flip_byte(r / "model.safetensors", -7), "model.safetensors",
                                   "does not match its SHA-256"),
    "flipped bit in the header": (lambda r, *_: flip_byte(r / "model.safetensors", 20), "model.safetensors", "corrupt"),
    "missing weights": (lambda r, *_: (r / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "unknown format version": (lambda r, *_: set_config(r, format_version=99), "config.json",
                               "format version 99 is not supported"),
    "unknown model": (lambda r, *_: set_config(r, model="nope"), "config.json", "unknown model 'nope'"),
    "config not JSON": (lambda r, *_: (r / "config.json").write_text("{ nope"), "config.json", "not JSON"),
    "missing config": (lambda r, *_: (r / "config.json").unlink(), "", "not a vaelab run folder (no config.json)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_run_folder_is_one_line_naming_the_file(finished_run, tmp_path, tiny_data, capsys, damage):
    apply, file, message = DAMAGE[damage]
    apply(finished_run, tmp_path, tiny_data)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_run(finished_run)
    assert f"{finished_run / file}".rstrip("/") in str(e.value) and message in str(e.value)
    code = main(["generate", str(finished_run), "-n", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and message in err, err


CHECKPOINT_DAMAGE = {
    "weights of another model": (other_model_weights, "cannot change a trained run"),
    "truncated": (lambda r, *_: (r / "checkpoint.safetensors").write_bytes((r / "checkpoint.safetensors").read_bytes()[:5000]),
                  "corrupt"),
    "flipped bit": (lambda r, *_: flip_byte(r / "checkpoint.safetensors", -3), "does not match its SHA-256"),
    "missing": (lambda r, *_: (r / "checkpoint.safetensors").unlink(), "missing"),
    "weights file instead": (lambda r, *_: shutil.copy(r / "model.safetensors", r / "checkpoint.safetensors"),
                             "not a training checkpoint"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_damaged_checkpoint_refuses_to_resume_in_one_line(finished_run, tmp_path, tiny_data, capsys, damage):
    apply, message = CHECKPOINT_DAMAGE[damage]
    apply(finished_run, tmp_path, tiny_data)
    with pytest.raises(CheckpointError, match=message) as e:
        resume(finished_run, epochs=2, progress=False, data=tiny_data)
    assert str(finished_run / "checkpoint.safetensors") in str(e.value)
    code = main(["train", "--resume", str(finished_run), "--epochs", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and message in err, err


def test_loading_never_unpickles(finished_run, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a run")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt.load_run(finished_run)
    ckpt.load_checkpoint(finished_run)


# ---------------------------------------------------------------------------------------------
# Bad data and an unwritable or full cache
# ---------------------------------------------------------------------------------------------


def cache_leftovers(cache):
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "SHA-256 mismatch"),
    (lambda b: b"\x08\x03" + b[2:], "SHA-256 mismatch"),
    (lambda b: b"", "SHA-256 mismatch"),
], ids=["truncated", "wrong-magic", "empty"])
def test_from_folder_with_a_damaged_file_caches_nothing(synthetic_mnist, tmp_path, capsys, damage, message):
    folder = tmp_path / "damaged"
    write_dataset_files(folder)
    target = folder / synthetic_mnist.stems["test-images"]
    target.write_bytes(damage(target.read_bytes()))
    cache = tmp_path / "fresh-cache"
    with pytest.raises(DataError, match=f"{target}: {message}"):
        data_mod.fetch("mnist", from_dir=folder, cache_dir=cache, quiet=True)
    assert cache_leftovers(cache) == []


def test_from_folder_with_a_corrupt_gzip_through_the_cli(synthetic_mnist, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "gz"
    write_dataset_files(folder, gz=True)
    target = folder / (synthetic_mnist.stems["train-images"] + ".gz")
    raw = bytearray(target.read_bytes())
    raw[40:60] = b"\xff" * 20  # damaged deflate blocks: zlib.error, not OSError
    target.write_bytes(bytes(raw))
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "fresh-cache"))
    code = main(["data", "fetch", "mnist", "--from", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith(f"vaelab: error: {target}: corrupt gzip data"), err
    assert cache_leftovers(tmp_path / "fresh-cache") == []


@pytest.mark.parametrize("idx, message", [
    (b"\x00\x00\x08\x03" + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 784,
     "truncated or corrupt"),
    (b"\x01\x02\x08\x03" + b"\x00" * 100, "bad IDX magic"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00", "element type"),
])
def test_checksum_valid_but_malformed_idx_is_a_data_error(tmp_path, monkeypatch, idx, message):
    """Even a file whose checksum matches (e.g. a wrong entry in a spec) is parsed defensively."""
    import dataclasses

    folder = tmp_path / "src"
    contents = write_dataset_files(folder)
    contents["train-images"] = idx
    (folder / data_mod.MNIST.stems["train-images"]).write_bytes(idx)
    spec = dataclasses.replace(data_mod.MNIST, sha256={r: data_mod.sha256(b) for r, b in contents.items()},
                               mirrors=(), registry_source=lambda s, w: folder)
    monkeypatch.setitem(data_mod.DATASETS, "mnist", spec)
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):
        data_mod.load("mnist", from_dir=folder, quiet=True)


def test_cache_path_that_is_a_file_is_a_clear_error(synthetic_mnist, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("VAELAB_DATA", str(blocker))
    code = main(["data", "fetch", "mnist", "--from", str(tmp_path / "source")])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the "fetching ..." progress line
    assert code == 2 and "Traceback" not in err and "cannot write the cache" in last and "VAELAB_DATA" in last, err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied"),
    OSError(errno.EROFS, "Read-only file system"),
], ids=["EACCES", "EROFS"])
def test_cache_that_refuses_the_rename_leaves_no_temp_file(synthetic_mnist, tmp_path, monkeypatch, error):
    def refuse(src, dst):
        raise error

    monkeypatch.setattr(atomic.os, "replace", refuse)
    cache = tmp_path / "fresh-cache"
    with pytest.raises(DataError, match=f"cannot write the cache .*{error.strerror}"):
        data_mod.fetch("mnist", from_dir=tmp_path / "source", cache_dir=cache, quiet=True)
    assert cache_leftovers(cache / "mnist") == []


class FillingDisk:
    """The disk fills while `name` is written: the temp file takes half the data, then ENOSPC."""

    def __init__(self, monkeypatch, name: str):
        self.name = name
        real_open = open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if "w" in mode and Path(file).name.startswith(f".{self.name}."):
                real_write = f.write

                def write(data):
                    real_write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")

                f.write = write
            return f

        monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def test_disk_filling_during_a_fetch_leaves_only_complete_files(synthetic_mnist, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "fresh-cache"
    FillingDisk(monkeypatch, synthetic_mnist.stems["test-images"])  # the third of four files
    with pytest.raises(DataError, match="cannot write the cache .*No space left on device"):
        data_mod.fetch("mnist", from_dir=tmp_path / "source", cache_dir=cache, quiet=True)
    left = cache_leftovers(cache / "mnist")
    assert len(left) == 2 and not any(name.endswith(".tmp") for name in left)
    for name in left:  # what is there is complete and verified
        role = next(r for r, s in synthetic_mnist.stems.items() if s == name)
        data_mod._verified_bytes(synthetic_mnist, role, cache / "mnist" / name)
    monkeypatch.undo()
    monkeypatch.setitem(data_mod.DATASETS, "mnist", synthetic_mnist)
    data_mod.fetch("mnist", from_dir=tmp_path / "source", cache_dir=cache, quiet=True)  # space freed: completes
    assert len(cache_leftovers(cache / "mnist")) == 4


def test_disk_filling_during_a_checkpoint_keeps_the_last_one(tmp_path, synthetic_mnist, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["--batch-size", "256", "--set", "hidden_dims=[16]", "--device", "cpu", "--quiet"]
    assert main(["train", "vae", "--epochs", "1", "--out", str(run), *args]) == 0
    before = snapshot(run)
    capsys.readouterr()
    FillingDisk(monkeypatch, "checkpoint.safetensors")
    code = main(["train", "--resume", str(run), "--epochs", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{run / 'checkpoint.safetensors'}: cannot write (No space left on device); its previous version is unchanged" in err
    after = snapshot(run)
    assert after["checkpoint.safetensors"] == before["checkpoint.safetensors"]
    assert not list(run.glob(".*.tmp"))
    assert ckpt.load_checkpoint(run)["epoch"] == 1
