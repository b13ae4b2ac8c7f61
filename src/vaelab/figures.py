"""Which figures a run gets: reads a run's history and model, calls the pure plots."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import plots
from .data import to_float
from .history_files import read_history, read_steps
from .inference import batched


def random_test_images(test_x: torch.Tensor, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test_x), generator=g)[:n]
    return to_float(test_x[idx]).to(device)


def write_training_figures(run_dir: Path, model, test_x: torch.Tensor, seed: int = 0) -> list[Path]:
    """Loss curves, a 10x10 samples grid and reconstructions of 10 random test images."""
    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    loss = loss_curves_figure(run_dir, model, fig_dir / "loss_curves.png")
    if loss is not None:
        written.append(loss)
    model.eval()
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    written.append(plots.save_image_grid(model.sample(100, generator=g), fig_dir / "samples.png", nrow=10))
    written.append(reconstructions_figure(model, test_x, fig_dir / "reconstructions.png", seed))
    return written


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
                                  terms=["loss", *model.term_names], title=f"{model.name}: training curves")


def reconstructions_figure(model, test_x: torch.Tensor, path: Path, seed: int = 0, n: int = 10) -> Path:
    x = random_test_images(test_x, n, seed, model.device)
    return plots.plot_image_rows(
        [x, model.reconstruct(x)], ["original", "reconstruction"], path,
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


def encode_means(model, images_uint8: torch.Tensor, batch: int = 1000):
    """Posterior means (codes) and, for VAEs, log-variances of uint8 images, batched."""
    def encode(x):
        post = model.encode(to_float(x))
        return post.mu.float(), (None if post.logvar is None else post.logvar.float())

    return batched(encode, images_uint8, batch_size=batch, device=model.device)


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
def write_run_figures(run_dir: Path, model, data, seed: int = 0, n_scatter: int = 5000,
                      grid_size: int = 15, per_class: int = 5) -> dict[str, Path]:
    """Every figure of a trained run into RUN/figures/; returns name -> path (see FIGURE_FILES).

    The manifold is drawn only for 2-D latents; the scatter of higher-dimensional codes is a PCA
    projection, said on the plot.
    """
    fig_dir = Path(run_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    model.eval()
    device = model.device
    name = model.name
    classes = list(data.classes)
    written: dict[str, Path] = {}
    path = lambda key: fig_dir / FIGURE_FILES[key]  # noqa: E731

    loss = loss_curves_figure(run_dir, model, path("loss_curves"))
    if loss is not None:
        written["loss_curves"] = loss

    # Latent scatter: reparameterized codes of random test images.
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.test_x), generator=g)[:n_scatter]
    codes = batched(lambda x: model.latent(to_float(x)).float(), data.test_x[idx], batch_size=1000, device=device)
    labels = data.test_y[idx]
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

    # Manifold over the 2-D latent plane.
    if model.latent_dim == 2:
        (xs, ys), how = latent_axis_values(model, grid_size)
        ys = ys[::-1]  # the top row is the largest z2
        zz = torch.tensor([[x, y] for y in ys for x in xs], dtype=torch.float32, device=device)
        written["manifold"] = plots.plot_manifold(
            model.decode(zz), xs, ys, path("manifold"),
            title=f"{name}: {grid_size}x{grid_size} images decoded over the latent plane\n({how})")

    # Per-class grid: samples from each class's region of latent space.
    mu, _ = encode_means(model, data.test_x)
    z = class_samples(mu, data.test_y, len(classes), per_class, seed=seed).to(device)
    decoded = model.decode(z).cpu()
    rows = [decoded[c * per_class : (c + 1) * per_class] for c in range(len(classes))]
    written["class_grid"] = plots.plot_image_rows(
        rows, classes, path("class_grid"),
        title=f"{name}: {per_class} samples per class from a Gaussian\nfitted to the class's test codes")

    gen = torch.Generator(device=device).manual_seed(seed)
    written["samples"] = plots.plot_image_grid(model.sample(100, generator=gen), path("samples"),
                                               title=f"{name}: 100 samples from the prior")
    written["reconstructions"] = reconstructions_figure(model, data.test_x, path("reconstructions"), seed)

    # Interpolations between pairs of random test images, endpoints shown beside the path.
    pairs = random_test_images(data.test_x, 6, seed + 1, device)
    steps = 10
    rows = [torch.cat([a[None], model.interpolate(a[None], b[None], steps), b[None]])
            for a, b in zip(pairs[0::2], pairs[1::2])]
    written["interpolation"] = plots.plot_image_rows(
        rows, [f"pair {i + 1}" for i in range(len(rows))], path("interpolation"),
        col_labels=["image A"] + [f"t={t:.2f}" for t in torch.linspace(0, 1, steps).tolist()] + ["image B"],
        title=f"{name}: decoding the straight line between the codes of two test images")
    return written
