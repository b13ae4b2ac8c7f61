"""The images that show a model, as tensors: its samples, random test images above their
reconstructions, and the tiling of many images into one grid.

figures.py draws them as PNGs (through plots.py) and tensorboard_log.py logs them after each
epoch, so both show the same images. Without matplotlib on purpose: the trainer imports the
TensorBoard log, and importing the library should not load a plotting stack.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import to_float


def as_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) floats in [0, 1] -> (N, H, W) uint8."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 4:
        arr = arr[:, 0]
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def grid_array(images, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile N images into a (rows*H, nrow*W) uint8 array with `padding` pixels between them."""
    arr = as_uint8_images(images)
    n, h, w = arr.shape
    ncol = nrow
    nrows = max(1, math.ceil(n / ncol))
    out = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        out[y : y + h, x : x + w] = arr[i]
    return out


def random_test_images(test_x: torch.Tensor, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test_x), generator=g)[:n]
    return to_float(test_x[idx]).to(device)


def random_test_labels(test_y: torch.Tensor, n: int, seed: int, device) -> torch.Tensor:
    """The labels of the images `random_test_images` picks with the same arguments."""
    g = torch.Generator().manual_seed(seed)
    return test_y[torch.randperm(len(test_y), generator=g)[:n]].to(device)


@torch.inference_mode()
def sample_rows(model, n_classes: int, seed: int = 0) -> list[torch.Tensor]:
    """A model's samples as rows of images. A conditional model: one row per class, each column
    one code z decoded with every label (the style held fixed down a column while the class
    changes; 10 x 10 for 10 classes). Any other: 100 images from its prior, 10 rows of 10.
    Drawn with their own generator (seeded by `seed`), so the global random state is untouched."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    if not model.conditional:
        return list(model.sample(100, generator=g).split(10))
    z = model.prior_sample(n_classes, generator=g)  # (C, D): one code per column
    return [model.decode(z, torch.full((len(z),), c, device=model.device)).cpu() for c in range(n_classes)]


def reconstruction_rows(model, test_x: torch.Tensor, seed: int = 0, n: int = 10,
                        test_y: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[n random test images, their reconstructions]; a conditional model is given each image's
    label (`test_y`) to encode and decode with."""
    x = random_test_images(test_x, n, seed, model.device)
    y = random_test_labels(test_y, n, seed, model.device) if model.conditional else None
    return [x, model.reconstruct(x, y)]
