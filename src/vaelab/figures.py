"""Which figures a run gets: reads a run's history and model, calls the pure plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import plots
from .batch import StepState
from .data import to_float
from .gallery import random_test_images, random_test_labels, reconstruction_rows, sample_rows
from .history_files import read_history, read_steps
from .inference import batched


def write_training_figures(run_dir: Path, model, test_x: torch.Tensor, seed: int = 0,
                           test_y: torch.Tensor | None = None, classes=None) -> list[Path]:
    """Loss curves, a 10x10 samples grid and reconstructions of 10 random test images. A
    conditional model (which needs `test_y` and the class names) draws its grid with one row per
    class and one code per column."""
    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    loss = loss_curves_figure(run_dir, model, fig_dir / "loss_curves.png")
    if loss is not None:
        written.append(loss)
    model.eval()
    if model.conditional:
        written.append(conditional_samples_figure(model, list(classes), fig_dir / "samples.png", seed))
    else:
        samples = torch.cat(sample_rows(model, len(classes or ()), seed))
        written.append(plots.save_image_grid(samples, fig_dir / "samples.png", nrow=10))
    written.append(reconstructions_figure(model, test_x, fig_dir / "reconstructions.png", seed, test_y=test_y))
    return written


def conditional_samples_figure(model, classes: list[str], path: Path, seed: int = 0) -> Path:
    """A conditional model's samples, one row per class, each column one code z decoded with every
    label: the style held fixed down a column while the class changes (10 x 10 for 10 classes)."""
    rows = sample_rows(model, len(classes), seed)
    return plots.plot_image_rows(rows, classes, path, col_labels=[f"z{j + 1}" for j in range(len(rows[0]))],
                                 title=f"{model.name}: one row per class, the same code z down each column")


# ---------------------------------------------------------------------------------------------
# Every figure of `vaelab plot`
# ---------------------------------------------------------------------------------------------

FIGURE_FILES = {
    "loss_curves": "loss_curves.png",
    "latent_scatter": "latent_scatter.png",
    "manifold": "manifold.png",
    "class_grid": "class_grid.png",
    "samples": "samples.png",
    "reconstructions": "reconstructions.png",
    "interpolation": "interpolation.png",
}


def loss_curves_figure(run_dir: Path, model, path: Path) -> Path | None:
    history = read_history(run_dir)
    if not history:
        return None
    steps, columns = read_steps(run_dir)
    return plots.plot_loss_curves(history, steps, columns, path, regularizer=model.regularizer_term,
                                  terms=["loss", *model.term_names], title=f"{model.name}: training curves",
                                  kl_weight=kl_weight_over_steps(model, steps, columns))


def kl_weight_over_steps(model, steps: np.ndarray, columns: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(iterations, the KL term's weight at each) from the model's own `kl_weight`, for a run with
    a KL warm-up; None without one. Derived, not logged: the weight is a function of the step."""
    if getattr(model.config, "kl_warmup_steps", 0) <= 0 or len(steps) == 0 or "step" not in columns:
        return None
    iterations = steps[:, columns.index("step")]
    # steps.csv counts from 1; the state of that step counts the steps completed before it.
    weights = np.array([model.kl_weight(StepState(step=int(s) - 1)) for s in iterations])
    return iterations, weights


def reconstructions_figure(model, test_x: torch.Tensor, path: Path, seed: int = 0, n: int = 10,
                           test_y: torch.Tensor | None = None) -> Path:
    """A conditional model is given each image's label (`test_y`) to encode and decode with."""
    return plots.plot_image_rows(
        reconstruction_rows(model, test_x, seed, n, test_y), ["original", "reconstruction"], path,
        title=f"{model.name}: {n} random test images and their reconstructions")


def principal_axes(codes: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The mean of (N, D) codes, their first k principal axes (k, D) as orthonormal rows (float64),
    and the share of the variance each axis explains."""
    mean = codes.double().mean(0)
    _, s, v = torch.linalg.svd(codes.double() - mean, full_matrices=False)
    var = s.pow(2)
    return mean, v[:k], (var[:k] / var.sum()).tolist()


def pca_2d(codes: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project (N, D) codes on their first two principal axes: (N, 2) and the share of the
    variance each axis explains."""
    mean, axes, share = principal_axes(codes, 2)
    return ((codes.double() - mean) @ axes.T).float(), share


def encode_means(model, images_uint8: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 1000):
    """Posterior means (codes) and, for VAEs, log-variances of uint8 images, batched; a
    conditional model's are of q(z|x, y), each image given its label in `labels` (B,)."""
    def encode(x, *y):
        post = model.encode(to_float(x), y[0] if y else None)
        return post.mu.float(), (None if post.logvar is None else post.logvar.float())

    inputs = (images_uint8,) if labels is None else (images_uint8, labels)
    return batched(encode, *inputs, batch_size=batch, device=model.device)


def latent_axis_values(model, n: int) -> tuple[list[list[float]], str]:
    """n values per latent axis at the quantiles (i + 0.5) / n of the model's prior (its
    `prior_quantiles`: the inverse CDF of each axis's marginal), and that prior in words."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return model.prior_quantiles(q).T.tolist(), f"prior {model.prior_name}: quantiles via the inverse CDF"


def class_samples(codes: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int = 5,
                  candidates: int = 400, seed: int = 0) -> torch.Tensor:
    """k varied latent points inside each class's region: (n_classes * k, D).

    A Gaussian is fitted to each class's codes. Candidates drawn from a class's Gaussian are
    kept only where that class is the most probable under all the fitted Gaussians (weighted by
    class frequency), so overlapping classes do not leak into each other's rows; the k kept
    points are taken at evenly spaced quantiles along the class's main axis of variation.

    Where fewer than k + 2 candidates pass, more are drawn (up to 10 rounds), and the k + 2 most
    probable are kept all the same, so the k points of a row are always distinct.
    """
    g = torch.Generator().manual_seed(seed)
    codes = codes.double()
    d = codes.shape[1]
    jitter = 1e-6 * torch.eye(d, dtype=torch.float64)
    fits = []
    for c in range(n_classes):
        zc = codes[labels == c]
        if len(zc) < d + 2:  # too few codes for a covariance: fall back to all codes
            zc = codes
        fits.append((zc.mean(0), torch.atleast_2d(torch.cov(zc.T)) + jitter, len(zc) / len(codes)))
    dists = [torch.distributions.MultivariateNormal(m, covariance_matrix=cv) for m, cv, _ in fits]
    log_prior = torch.tensor([math.log(w) for _, _, w in fits], dtype=torch.float64)
    out = []
    for c, (mean, cov, _) in enumerate(fits):
        chol = torch.linalg.cholesky(cov)
        zs, owns = [], []
        for _ in range(10):
            z = mean + torch.randn(candidates, d, generator=g, dtype=torch.float64) @ chol.T
            log_post = torch.stack([dist.log_prob(z) for dist in dists], 1) + log_prior  # (candidates, C)
            zs.append(z)
            owns.append(log_post[:, c] - torch.logsumexp(log_post, 1))
            if int((torch.cat(owns) > math.log(0.5)).sum()) >= k + 2:
                break
        z, own = torch.cat(zs), torch.cat(owns)
        # At least k + 2 points: the k inner ones of k + 2 evenly spaced indices are then >= 1
        # apart, so rounding cannot pick a point twice.
        keep = z[own.argsort(descending=True)[: max(k + 2, int((own > math.log(0.5)).sum()))]]
        axis = torch.linalg.eigh(cov)[1][:, -1]
        keep = keep[(keep @ axis).argsort()]
        picks = torch.linspace(0, len(keep) - 1, k + 2)[1:-1].round().long()  # avoid the extremes
        out.append(keep[picks])
    return torch.cat(out).float()


@torch.inference_mode()
def class_grid_rows(model, data, per_class: int = 5, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """The per-class grid's images, one row (per_class, 1, 28, 28) per class, and how they were
    drawn: samples from each class's region of latent space (`class_samples` on the codes of the
    test images); a conditional model's from its decoder, given the class, with codes from the prior."""
    device = model.device
    n_classes = len(data.classes)
    if model.conditional:
        gen = torch.Generator(device=device).manual_seed(seed)
        rows = [model.sample(per_class, generator=gen, condition=torch.full((per_class,), c, device=device)).cpu()
                for c in range(n_classes)]
        return rows, f"{per_class} samples per class: prior codes decoded with the class's label"
    mu, _ = encode_means(model, data.test_x)
    z = class_samples(mu, data.test_y, n_classes, per_class, seed=seed).to(device)
    decoded = model.decode(z).cpu()
    rows = [decoded[c * per_class : (c + 1) * per_class] for c in range(n_classes)]
    return rows, f"{per_class} samples per class from a Gaussian\nfitted to the class's test codes"


@torch.inference_mode()
def write_run_figures(run_dir: Path, model, data, seed: int = 0, n_scatter: int = 5000,
                      grid_size: int = 15, per_class: int = 5, keys: Sequence[str] | None = None) -> dict[str, Path]:
    """Every figure of a trained run into RUN/figures/, or only those named in `keys` (of
    FIGURE_FILES); returns name -> path. Each figure is drawn with its own random draws, so it is
    the same whichever others are drawn.

    The manifold is drawn only for 2-D latents; the scatter of higher-dimensional codes is a PCA
    projection, said on the plot.
    """
    wanted = set(FIGURE_FILES if keys is None else keys)
    if wanted - set(FIGURE_FILES):
        unknown = ", ".join(sorted(wanted - set(FIGURE_FILES)))
        raise KeyError(f"no figure {unknown}; the figures: {', '.join(FIGURE_FILES)}")
    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    model.eval()
    device = model.device
    name = model.name
    classes = list(data.classes)
    written: dict[str, Path] = {}
    path = lambda key: fig_dir / FIGURE_FILES[key]  # noqa: E731

    loss = loss_curves_figure(run_dir, model, path("loss_curves")) if "loss_curves" in wanted else None
    if loss is not None:
        written["loss_curves"] = loss

    if "latent_scatter" in wanted:
        # Latent scatter: reparameterized codes of random test images.
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.test_x), generator=g)[:n_scatter]
        labels = data.test_y[idx]
        # A conditional model's codes are of q(z|x, y): each image goes with its label.
        inputs = (data.test_x[idx], labels) if model.conditional else (data.test_x[idx],)
        codes = batched(lambda x, *y: model.latent(to_float(x), condition=y[0] if y else None).float(), *inputs,
                        batch_size=1000, device=device)
        if model.latent_dim == 2:
            points, axes, note = codes, ("z1", "z2"), None
        elif model.latent_dim == 1:
            points = torch.cat([codes, torch.rand(len(codes), 1, generator=g) - 0.5], 1)
            axes, note = ("z", "random jitter (no meaning)"), "1-D latent: the vertical axis is jitter"
        else:
            points, share = pca_2d(codes)
            axes = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
            note = f"PCA projection of the {model.latent_dim}-D codes onto their first two principal axes"
        written["latent_scatter"] = plots.plot_latent_scatter(
            points, labels, classes, path("latent_scatter"), axis_labels=axes, note=note,
            title=f"{name}: codes z of {len(idx)} test images ({data.name})")

    # Manifold over the 2-D latent plane (a conditional model's would need a class: not drawn).
    if "manifold" in wanted and model.latent_dim == 2 and not model.conditional:
        (xs, ys), how = latent_axis_values(model, grid_size)
        ys = ys[::-1]  # the top row is the largest z2
        zz = torch.tensor([[x, y] for y in ys for x in xs], dtype=torch.float32, device=device)
        written["manifold"] = plots.plot_manifold(
            model.decode(zz), xs, ys, path("manifold"),
            title=f"{name}: {grid_size}x{grid_size} images decoded over the latent plane\n({how})")

    if "class_grid" in wanted:
        rows, how = class_grid_rows(model, data, per_class, seed)
        written["class_grid"] = plots.plot_image_rows(rows, classes, path("class_grid"), title=f"{name}: {how}")

    if "samples" in wanted:
        if model.conditional:
            written["samples"] = conditional_samples_figure(model, classes, path("samples"), seed)
        else:
            samples = torch.cat(sample_rows(model, len(classes), seed))
            written["samples"] = plots.plot_image_grid(samples, path("samples"),
                                                       title=f"{name}: 100 samples from the prior")
    if "reconstructions" in wanted:
        written["reconstructions"] = reconstructions_figure(model, data.test_x, path("reconstructions"), seed,
                                                            test_y=data.test_y)

    if "interpolation" in wanted:
        # Interpolations between pairs of random test images, endpoints shown beside the path; a
        # conditional model's pairs share a class, the label both ends and the path are decoded with.
        pairs = random_test_images(data.test_x, 6, seed + 1, device)
        pair_labels = [None] * 3
        if model.conditional:
            firsts = random_test_images(data.test_x, 3, seed + 1, device)
            firsts_y = random_test_labels(data.test_y, 3, seed + 1, device)
            g_pair = torch.Generator().manual_seed(seed + 2)
            partners = []
            for y in firsts_y.tolist():
                same = torch.nonzero(data.test_y == y).flatten()
                partners.append(int(same[torch.randint(len(same), (1,), generator=g_pair)]))
            seconds = to_float(data.test_x[partners]).to(device)
            pairs = torch.stack([firsts, seconds], 1).flatten(0, 1)  # (3, 2, 1, 28, 28) -> a, b, a, b, a, b
            pair_labels = list(firsts_y[:, None])
        steps = 10
        rows = [torch.cat([a[None], model.interpolate(a[None], b[None], steps, condition=y), b[None]])
                for a, b, y in zip(pairs[0::2], pairs[1::2], pair_labels)]
        written["interpolation"] = plots.plot_image_rows(
            rows, [f"pair {i + 1}" for i in range(len(rows))], path("interpolation"),
            col_labels=["image A"] + [f"t={t:.2f}" for t in torch.linspace(0, 1, steps).tolist()] + ["image B"],
            title=f"{name}: decoding the straight line between the codes of two test images")
    return written
