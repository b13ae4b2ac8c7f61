"""Pure plotting functions: tensors or rows in, a PNG out. They never import the trainer.

Every PNG is written through `atomic.atomic_file`: a failed write leaves the previous file.

Figures are `matplotlib.figure.Figure` objects, not pyplot's: writing a PNG needs no backend and
no global figure registry, so importing this module changes nothing in the process (a notebook's
inline plots and a GUI's backend stay as their owner set them; see STYLE.md on libraries and
process settings), and a figure is freed when its function returns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .atomic import atomic_file
from .gallery import as_uint8_images, grid_array

SPLIT_STYLES = {"train": dict(color="tab:blue"), "test": dict(color="tab:orange"),
                "val": dict(color="tab:green")}


def save_image_grid(images, path: str | Path, nrow: int = 10, scale: int = 2) -> Path:
    """A plain PNG grid of images (white gutters), upscaled `scale` times with nearest pixels."""
    arr = grid_array(images, nrow)
    img = Image.fromarray(arr, mode="L")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_file(path) as f:
        img.save(f, format="PNG")
    return path


def save_figure(fig: Figure, path: str | Path, crop: bool = True) -> Path:
    """The figure as a PNG, cropped to its content. A figure with a layout engine (constrained
    layout) already fills its canvas, and one laid out with margins in inches (`crop=False`) has
    room for its labels: cropping either would cost a second full draw for a few pixels of
    margin."""
    path = Path(path)
    tight = crop and fig.get_layout_engine() is None
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight" if tight else None)
    return path


def plot_image_rows(rows: Sequence[torch.Tensor], row_labels: Sequence[str], path: str | Path,
                    title: str, col_labels: Sequence[str] | None = None) -> Path:
    """Rows of images (each (N, 1, 28, 28)) with a label per row (originals above
    reconstructions, one class per row, one model per row) and optional column labels.

    The images are tiled into one picture, each in a thin dark frame with white gutters, and
    drawn on a single axes whose ticks carry the labels: the same figure as an axes per image,
    drawn ten to fifty times faster (matplotlib's cost is per axes, not per pixel)."""
    arrays = [as_uint8_images(images) for images in rows]
    ncol = max(len(a) for a in arrays)
    h, w = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
    frame, gap = 1, 6  # pixels: the frame around each image, the white gutter between frames
    cell_h, cell_w = h + 2 * frame + gap, w + 2 * frame + gap
    canvas = np.full((len(arrays) * cell_h - gap, ncol * cell_w - gap), 255, np.uint8)
    for r, arr in enumerate(arrays):
        for c, image in enumerate(arr):
            y, x = r * cell_h, c * cell_w
            canvas[y : y + h + 2 * frame, x : x + w + 2 * frame] = 0
            canvas[y + frame : y + frame + image.shape[0], x + frame : x + frame + image.shape[1]] = image
    height = len(rows) * 0.95 + 0.7
    fig = Figure(figsize=(ncol * 0.9 + 0.8, height))
    # The axes take the whole figure below the title and the column labels; the picture sits at
    # its top, and the saved PNG is cropped to what is drawn.
    above = 0.3 * (title.count("\n") + 1) + 0.15 + (0.25 if col_labels else 0)  # inches
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - above / height)
    ax = fig.subplots()
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_anchor("N")
    ax.set_yticks([r * cell_h + frame + h / 2 - 0.5 for r in range(len(arrays))], list(row_labels), fontsize=9)
    if col_labels:
        ax.xaxis.tick_top()
        ax.set_xticks([c * cell_w + frame + w / 2 - 0.5 for c in range(len(col_labels))], list(col_labels),
                      fontsize=8)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_image_grid(images, path: str | Path, title: str, nrow: int = 10) -> Path:
    """A grid of images (e.g. 100 samples) as one picture with a title, no axes."""
    arr = grid_array(images, nrow, padding=1)
    size = max(3.0, 0.42 * nrow)
    fig = Figure(figsize=(size, size * arr.shape[0] / arr.shape[1] + 0.4))
    ax = fig.subplots()
    ax.imshow(arr, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


# The fixed colour map for classes: class k is always colour k, in every figure.
CLASS_COLORS = matplotlib.colormaps["tab10"].colors


def plot_latent_scatter(points: torch.Tensor | np.ndarray, labels, class_names: Sequence[str],
                        path: str | Path, title: str, axis_labels: tuple[str, str] = ("z1", "z2"),
                        note: str | None = None) -> Path:
    """2-D points (N, 2) coloured by integer label, with a legend of class names; `note` is
    printed in the corner (e.g. that the points are a PCA projection)."""
    pts = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=float)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    fig = Figure(figsize=(7.6, 6.2))
    ax = fig.subplots()
    for k, name in enumerate(class_names):
        sel = labels == k
        ax.scatter(pts[sel, 0], pts[sel, 1], s=4, alpha=0.6, color=CLASS_COLORS[k % 10],
                   label=f"{k}: {name}" if name != str(k) else name, rasterized=True)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=3, frameon=False,
                       title="class")
    for handle in legend.legend_handles:
        handle.set_alpha(1)
    if note:
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, va="bottom",
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    return save_figure(fig, path)


def plot_manifold(images, x_values: Sequence[float], y_values: Sequence[float], path: str | Path,
                  title: str, axis_labels: tuple[str, str] = ("z1", "z2")) -> Path:
    """An n x n grid of decoded images in row-major order, row 0 at the top; the axes carry the
    latent values each column (`x_values`) and row (`y_values`, top to bottom) was decoded at."""
    ny, nx = len(y_values), len(x_values)
    arr = grid_array(images, nx, padding=0)  # (ny*28, nx*28)
    h, w = arr.shape[0] / ny, arr.shape[1] / nx
    fig = Figure(figsize=(0.5 * nx + 1.4, 0.5 * ny + 1.2))
    ax = fig.subplots()
    ax.imshow(arr, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks((np.arange(nx) + 0.5) * w, [f"{v:.2f}" for v in x_values], rotation=90, fontsize=7)
    ax.set_yticks((np.arange(ny) + 0.5) * h, [f"{v:.2f}" for v in y_values], fontsize=7)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    return save_figure(fig, path)


TERM_LABELS = {"loss": "total loss", "kl": "KL divergence (nats)", "recon": "reconstruction"}


def plot_loss_curves(history: Sequence[dict], steps: np.ndarray | None, step_columns: Sequence[str],
                     path: str | Path, regularizer: str | None = "kl", title: str = "Training curves",
                     terms: Sequence[str] | None = None,
                     kl_weight: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """One column per loss term (the total first, then the regularizer, then the rest), in bands
    of at most 4 columns: in each band the top row per epoch for each split, the bottom row per
    training iteration. `kl_weight` (iterations, weights): the regularizer's effective weight over
    the iterations (a KL warm-up), drawn on its per-iteration panel against a right-hand axis.

    `history` rows have keys epoch, split, loss, <terms>; `steps` is an array whose columns are
    named by `step_columns` (step, epoch, loss, ...). `terms` defaults to every term in `history`.
    """
    if terms is None:
        terms = [k for k in history[0] if k not in ("epoch", "split", "seconds")] if history else ["loss"]
    order = ["loss"] + ([regularizer] if regularizer in terms else [])
    panels = order + [t for t in terms if t not in order]
    has_steps = steps is not None and len(steps) > 0
    per_term = 2 if has_steps else 1  # rows per band of terms: per epoch, per iteration
    ncols = min(len(panels), 4)  # wrap many terms (the VAE-GAN's) into bands of 4 columns
    bands = math.ceil(len(panels) / ncols)
    width = 4.2 if ncols <= 3 else 3.5
    nrows = bands * per_term
    fig = Figure(figsize=(width * ncols, 3.1 * nrows + 0.5))
    # Fixed margins in inches (tick labels and axis label on the left of each panel, the panel
    # titles and x labels between rows, a right-hand axis where the KL weight is drawn): a
    # layout engine measures every text at each save (a quarter to a third of a small figure's time).
    axes = fig.subplots(nrows, ncols, squeeze=False,
                        gridspec_kw=_fixed_margins(fig, nrows, ncols, left=0.85, right=0.8 if kl_weight is not None else 0.2,
                                                   top=0.8, bottom=0.5, hgap=0.95 + (0.55 if kl_weight is not None else 0),
                                                   vgap=0.75))
    for ax in axes[:, len(panels) % ncols or ncols:][-per_term:].flat:
        ax.axis("off")  # unused cells of the last band
    splits = list(dict.fromkeys(r["split"] for r in history))
    for i, term in enumerate(panels):
        band, c = divmod(i, ncols)
        label = TERM_LABELS.get(term, term)
        ax = axes[band * per_term, c]
        for split in splits:
            rows = [r for r in history if r["split"] == split and r.get(term) not in (None, "")]
            ax.plot([r["epoch"] for r in rows], [float(r[term]) for r in rows], marker="o", ms=3,
                    label=split, **SPLIT_STYLES.get(split, {}))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if has_steps:
            ax = axes[band * per_term + 1, c]
            cols = list(step_columns)
            if term in cols:
                x = steps[:, cols.index("step")]
                y = steps[:, cols.index(term)]
                ax.plot(x, y, lw=0.6, alpha=0.3, color="tab:blue", label="per iteration")
                ax.plot(x, _smooth(y), lw=1.4, color="tab:blue", label="smoothed (25 steps)")
                if np.all(y > 0) and y.max() / y.min() > 20:
                    ax.set_yscale("log")  # the first steps are often orders of magnitude higher
            ax.set_xlabel("iteration")
            ax.set_ylabel(f"training {label}")
            ax.set_title(f"{label} per iteration (train)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if kl_weight is not None and term == regularizer:
                right = ax.twinx()
                right.plot(*kl_weight, lw=1.4, ls="--", color="tab:orange", label="its weight in the loss")
                right.set_ylabel("effective weight", color="tab:orange")
                right.set_ylim(bottom=0)
                right.legend(fontsize=8, loc="center right")
    fig.suptitle(title, y=1 - 0.12 / fig.get_size_inches()[1], va="top")
    return save_figure(fig, path, crop=False)  # the margins above are in inches, sized for the labels


def _fixed_margins(fig: Figure, nrows: int, ncols: int, left: float, right: float, top: float, bottom: float,
                   hgap: float, vgap: float) -> dict:
    """GridSpec arguments for margins and gaps given in inches."""
    w, h = fig.get_size_inches()
    axes_w = (w - left - right - hgap * (ncols - 1)) / ncols
    axes_h = (h - top - bottom - vgap * (nrows - 1)) / nrows
    return dict(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                wspace=hgap / axes_w, hspace=vgap / axes_h)


def plot_series(panels: Sequence[tuple[str, str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
                path: str | Path, title: str, xlabel: str = "epoch",
                levels: dict[str, float] | None = None) -> Path:
    """Side-by-side line panels, each (title, y label, {series label: (x, y)}); the same label
    gets the same colour in every panel. `levels` {label: y}: dashed horizontal lines drawn on the
    first panel in the colour of the series of that label (a reference value for it)."""
    labels = list(dict.fromkeys(label for _, _, series in panels for label in series))
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    fig = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (panel_title, ylabel, series) in zip(axes[0], panels):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", ms=2.5, lw=1.2, color=colours[label], label=label)
        ax.set_xlabel(xlabel)
        if xlabel == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
    for label, y in (levels or {}).items():
        axes[0, 0].axhline(y, ls="--", lw=1, color=colours.get(label, "gray"), label=f"{label}: the paper's NLL")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def _smooth(y: np.ndarray, window: int = 25) -> np.ndarray:
    if len(y) < window:
        return y
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")
