"""Pure plotting functions: tensors or rows in, a PNG out. They never import the trainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SPLIT_STYLES = {"train": dict(color="tab:blue"), "test": dict(color="tab:orange"),
                "val": dict(color="tab:green")}


def _as_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) floats in [0, 1] -> (N, H, W) uint8."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 4:
        arr = arr[:, 0]
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def grid_array(images, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile N images into a (rows*H, nrow*W) uint8 array with `padding` pixels between them."""
    arr = _as_uint8_images(images)
    n, h, w = arr.shape
    ncol = nrow
    nrows = max(1, math.ceil(n / ncol))
    out = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        out[y : y + h, x : x + w] = arr[i]
    return out


def save_image_grid(images, path: str | Path, nrow: int = 10, scale: int = 2) -> Path:
    """A plain PNG grid of images (white gutters), upscaled `scale` times with nearest pixels."""
    arr = grid_array(images, nrow)
    img = Image.fromarray(arr, mode="L")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_image_rows(rows: Sequence[torch.Tensor], row_labels: Sequence[str], path: str | Path,
                    title: str) -> Path:
    """Rows of images (each (N, 1, 28, 28)) with a label per row: originals above reconstructions."""
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * 0.9, len(rows) * 1.0 + 0.4), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        arr = _as_uint8_images(images)
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(arr):
                ax.imshow(arr[c], cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_loss_curves(history: Sequence[dict], steps: np.ndarray | None, step_columns: Sequence[str],
                     path: str | Path, regularizer: str | None = "kl", title: str = "Training curves") -> Path:
    """Per-epoch total loss (and the regularization term) per split, plus the per-iteration
    training loss.

    `history` rows have keys epoch, split, loss, <terms>; `steps` is an array whose columns are
    named by `step_columns` (step, epoch, loss, ...).
    """
    panels = ["loss"] + ([regularizer] if regularizer else [])
    ncols = len(panels) + (1 if steps is not None and len(steps) else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.6), squeeze=False)
    axes = axes[0]
    for ax, term in zip(axes, panels):
        for split in dict.fromkeys(r["split"] for r in history):
            rows = [r for r in history if r["split"] == split]
            ax.plot([r["epoch"] for r in rows], [float(r[term]) for r in rows], marker="o", ms=3,
                    label=split, **SPLIT_STYLES.get(split, {}))
        ax.set_xlabel("epoch")
        ax.set_ylabel("KL divergence (nats)" if term == "kl" else ("total loss" if term == "loss" else term))
        ax.set_title("total loss per epoch" if term == "loss" else f"{term} term per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if ncols > len(panels):
        ax = axes[-1]
        cols = list(step_columns)
        x = steps[:, cols.index("step")]
        for term, style in (("loss", dict(color="tab:blue")), (regularizer, dict(color="tab:red"))):
            if term and term in cols:
                y = steps[:, cols.index(term)]
                ax.plot(x, y, lw=0.6, alpha=0.35, **style)
                ax.plot(x, _smooth(y), lw=1.4, label=f"{term} (smoothed)", **style)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.set_title("per iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _smooth(y: np.ndarray, window: int = 25) -> np.ndarray:
    if len(y) < window:
        return y
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")
