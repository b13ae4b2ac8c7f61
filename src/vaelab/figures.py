"""Which figures a run gets: reads a run's history and model, calls the pure plots."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from . import plots
from .data import to_float


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["epoch"] = int(r["epoch"])
    return rows


def read_steps(run_dir: Path) -> tuple[np.ndarray, list[str]]:
    path = Path(run_dir) / "steps.csv"
    if not path.exists():
        return np.zeros((0, 0)), []
    with path.open() as f:
        columns = f.readline().strip().split(",")
    values = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return values, columns


def random_test_images(test_x: torch.Tensor, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test_x), generator=g)[:n]
    return to_float(test_x[idx]).to(device)


def write_training_figures(run_dir: Path, model, test_x: torch.Tensor, seed: int = 0) -> list[Path]:
    """Loss curves, a 10x10 samples grid and reconstructions of 10 random test images."""
    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    history = read_history(run_dir)
    steps, columns = read_steps(run_dir)
    if history:
        written.append(plots.plot_loss_curves(
            history, steps, columns, fig_dir / "loss_curves.png",
            regularizer=model.regularizer_term, title=f"{model.name}: training curves"))
    model.eval()
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    written.append(plots.save_image_grid(model.sample(100, generator=g), fig_dir / "samples.png", nrow=10))
    x = random_test_images(test_x, 10, seed, device)
    written.append(plots.plot_image_rows(
        [x, model.reconstruct(x)], ["original", "reconstruction"], fig_dir / "reconstructions.png",
        title=f"{model.name}: 10 random test images and their reconstructions"))
    return written
