"""Shared fixtures: small synthetic datasets that travel through the real IDX/cache code paths."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab import data as data_mod
from vaelab import runtime
from vaelab.data import ImageData, sha256, write_idx
from vaelab.train import TrainConfig


def pytest_configure(config):
    # The tests compute as the command line does (the library itself changes no process setting),
    # at a fixed thread count: torch's own (OMP_NUM_THREADS under `make test`), not the probe's,
    # which `runtime.retune` may change mid-test, and a straight and a resumed run compare bit for
    # bit only at one thread count.
    runtime.configure(threads=torch.get_num_threads())


def pytest_collection_finish(session):
    # What exists once every test module is imported (torch, matplotlib, selenium, optuna, the
    # tests themselves) lives to the end: out of the collector's sight, each full collection
    # walks only what the tests make. Measured: 274-281 busy CPU-s for `make test` against
    # 294-297 without, 147-152 s against 159-161 s.
    import gc

    gc.collect()
    gc.freeze()


def synthetic_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n structured 28x28 uint8 images in 10 classes: class k is a bright bar at a k-dependent
    place and angle, plus noise, so a small model can learn something in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28), np.float32)
    for k in range(10):
        angle = np.pi * k / 10
        dist = np.abs((xx - 14) * np.sin(angle) - (yy - 14) * np.cos(angle))
        pattern = np.clip(1.5 - dist / 2, 0, 1) * ((xx - 14) ** 2 + (yy - 14) ** 2 < 120)
        images[labels == k] = pattern
    images += rng.normal(0, 0.05, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels


def synthetic_data(n_train: int = 256, n_test: int = 64, seed: int = 0) -> ImageData:
    tx, ty = synthetic_arrays(n_train, seed)
    vx, vy = synthetic_arrays(n_test, seed + 1)
    return ImageData("mnist", tuple(str(i) for i in range(10)),
                     torch.from_numpy(tx), torch.from_numpy(ty.astype(np.int64)),
                     torch.from_numpy(vx), torch.from_numpy(vy.astype(np.int64)))


def quick_config(**fields) -> TrainConfig:
    """A TrainConfig for tests: on the CPU, one epoch of `tiny_data` is 4 steps of 64 images, the
    test split is scored in batches of 50 (a short last one) and the loop syncs every 2 steps."""
    return TrainConfig(**{**dict(epochs=1, batch_size=64, eval_batch_size=50, device="cpu", log_every=2), **fields})


@pytest.fixture
def tiny_data() -> ImageData:
    return synthetic_data()


def write_dataset_files(folder, n_train=512, n_test=128, gz=False) -> dict[str, bytes]:
    """Write the four IDX files of a synthetic dataset into `folder`; return role -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tx, ty = synthetic_arrays(n_train, 0)
    vx, vy = synthetic_arrays(n_test, 1)
    contents = {"train-images": write_idx(tx), "train-labels": write_idx(ty),
                "test-images": write_idx(vx), "test-labels": write_idx(vy)}
    for role, payload in contents.items():
        stem = data_mod.MNIST.stems[role]
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)
    return contents


@pytest.fixture
def synthetic_mnist(tmp_path, monkeypatch):
    """Make 'mnist' a small synthetic dataset: its checksums are those of synthetic files, the
    cache is a temp folder holding them, and the network sources are disabled."""
    return use_synthetic_mnist(tmp_path, monkeypatch)


def use_synthetic_mnist(folder, monkeypatch: pytest.MonkeyPatch):
    """`synthetic_mnist` in `folder` through any MonkeyPatch (a module-scoped fixture's own)."""
    source = folder / "source"
    contents = write_dataset_files(source)
    spec = dataclasses.replace(
        data_mod.MNIST,
        sha256={role: sha256(b) for role, b in contents.items()},
        mirrors=(),
        registry_source=_no_registry,
    )
    monkeypatch.setitem(data_mod.DATASETS, "mnist", spec)
    monkeypatch.setenv("VAELAB_DATA", str(folder / "cache"))
    data_mod.fetch("mnist", from_dir=source, quiet=True)
    return spec


def train_by_cli(root: Path, model: str, name: str, *options: str) -> tuple[Path, str]:
    """`vaelab train MODEL` for one epoch on the synthetic "mnist" installed in `root` (for a
    module-scoped fixture: one run shared by a module's tests, each copying it), in this process;
    the run folder and what the command printed."""
    from vaelab.cli import main

    run = root / name
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        use_synthetic_mnist(root, patch)
        code = main(["train", model, "--epochs", "1", "--batch-size", "64", "--out", str(run), "--device", "cpu",
                     "--quiet", *options])
    assert code == 0
    return run, out.getvalue()


def _no_registry(spec, workdir):
    raise data_mod.DataError("registry disabled in tests")
