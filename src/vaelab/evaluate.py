"""Metrics of a trained run: test loss terms, the IWAE negative log-likelihood, sample quality
(measured in `metrics.py` with a domain classifier: FD, KID, precision and recall, confidence,
class histogram, each beside its real-data floor), and how the latent dimensions are used.

Everything here is model-agnostic: a model whose encoder returns a log-variance is a VAE and
gets likelihood metrics; one without (an autoencoder) gets its reconstruction MSE. Decoders
produce Bernoulli logits (the base contract), which defines log p(x|z).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm  # text bars, in a terminal and a notebook alike (see training_log.py)

from .checkpoint import MODEL_FILE, write_json
from .data import Batcher, ImageData, load, to_float
from . import distributed as dist
from .devices import autocast
from .inference import batched
from .losses import (bce_from_logits, bce_from_logits_shared_target, iwae_bound, kl_normal_per_dim,
                     log_normal, log_standard_normal, mse, reparameterize)
# The sample-quality names live in metrics.py; they stay importable from here.
from .metrics import (CONFIDENT, DomainClassifier, class_share, classifier_paths, classifier_summary,  # noqa: F401
                      classify, frechet_distance, load_or_train_classifier, quality, quality_rows, sample_quality,
                      sha256_hex, train_classifier)
from .train_config import TrainConfig

METRICS_FILE = "metrics.json"
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2: Var_x(E_q[z_d]) > 0.01


@dataclass
class EvalSettings:
    """How much work `evaluate_run` does; the defaults are the full, literature-comparable ones."""

    iw_samples: int = 5000  # K of the IWAE estimator
    # Test images the IWAE NLL is averaged over, the first N of the test set (the same ones for
    # every run, so runs compare pairwise); default the whole set. K = 5000 on 10,000 images
    # decodes 5*10^7 images: 4 min 40 s on 2 cores for the 784-512-2 MLP VAE (measured).
    iw_images: int = 10000
    n_samples: int = 10000  # generated (and real) images for the sample-quality figures
    seed: int = 0
    batch_size: int = 1000


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_terms(model, images: torch.Tensor, config: TrainConfig, device: torch.device,
                   seed: int = 1234, labels: torch.Tensor | None = None,
                   distributed: bool = False) -> dict[str, float]:
    """Mean loss and terms over a whole split (its `labels` go into the batches where given). Own
    RNG stream, so evaluating neither depends on nor disturbs the training randomness, and every
    epoch is scored on the same noise.

    `distributed`: called by every process of a data-parallel run, each evaluates its share of
    every batch (as in training, distributed.py) and the sums are added up across processes, so
    all return the means over the whole split."""
    was_training = model.training
    model.eval()
    part = (dist.rank(), dist.world_size()) if distributed else (0, 1)
    batches = Batcher(images, config.eval_batch_size, device, shuffle=False,
                      binarize="dynamic" if config.binarize == "dynamic" else "none", seed=seed,
                      labels=labels, part=part)
    names = ("loss", *model.term_names)
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + part[0])  # each process's own noise; the binarization is shared
        for batch in batches:
            with autocast(device, config.precision):
                out = model(batch)
            row = torch.stack([out.loss.detach(), *(out.terms[n] for n in model.term_names)])
            totals += row.double() * len(batch)
    model.train(was_training)
    if distributed:
        dist.all_sum(totals)
    return dict(zip(names, (totals / len(images)).tolist()))


# ---------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------


def likelihood_images(data: ImageData, binarize: str, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The test images the likelihood is measured on: (N, 1, 28, 28) floats, and what they are.

    A model trained on binarized images is scored on one fixed Bernoulli binarization of the
    test set (static binarization already binarized it at load time); otherwise on the grey
    levels, where the Bernoulli "likelihood" is a cross-entropy, not a normalized density.
    """
    x = to_float(data.test_x)
    if binarize == "dynamic":
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(x.shape, generator=g) < x).float(), "test set, binarized once (fixed seed)"
    if binarize == "static":
        return x, "statically binarized test set"
    return x, ("grey-level test set: BCE on grey levels is not a normalized likelihood, so the "
               "NLL is not comparable with binarized-MNIST results in the literature")


@torch.inference_mode()
def iwae_log_likelihood(model, x: torch.Tensor, k: int, chunk_rows: int = 8192,
                        generator: torch.Generator | None = None,
                        condition: torch.Tensor | None = None) -> torch.Tensor:
    """The IWAE estimate of log p(x) per image with K = k importance samples: (B, ...) -> (B,).

    log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016,
    eq. 8); the bound tightens as K grows. The K samples are drawn in chunks of about
    `chunk_rows` decoded images; their log-weights, (K, B) in float64, are small enough to keep
    whole and go to `losses.iwae_bound` at once. A conditional model's `condition` (B,) makes it
    the estimate of log p(x|y).
    """
    given = () if condition is None else (condition,)  # an unconditional model is called as before
    post = model.encode(x, *given)
    mu, logvar = post.mu, post.logvar
    b, d = mu.shape
    per_chunk = max(1, chunk_rows // b)
    log_ws = []
    std = torch.exp(0.5 * logvar)
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn(n, b, d, generator=generator, device=mu.device)
        z = mu + eps * std  # (n, B, D)
        cond = () if condition is None else (condition.repeat(n),)  # sample-major, as z's rows
        logits = model.decode_logits(z.reshape(n * b, d), *cond)  # (n*B, ...)
        log_px = -bce_from_logits_shared_target(logits.view(n, b, *x.shape[1:]), x)  # (n, B)
        log_w = log_px + log_standard_normal(z) - log_normal(z, mu, logvar)  # (n, B)
        log_ws.append(log_w.double())
    return iwae_bound(torch.cat(log_ws))  # (K, B) -> (B,)


def iwae_nll(model, images: torch.Tensor, k: int, batch: int = 100, seed: int = 0,
             progress: bool = False, labels: torch.Tensor | None = None, keep_values: bool = False) -> dict:
    """Mean IWAE negative log-likelihood (nats) over `images` with its standard error; a
    conditional model is given the images' `labels`. `keep_values`: also the per-image NLLs,
    (N,) float64, under "values" (not JSON: for a caller comparing models image by image)."""
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=len(images), desc=f"IWAE NLL, K={k}", unit="img", disable=not progress,
               leave=False, file=sys.stderr)
    # A conditional model's labels travel with their images, chunked alike.
    inputs = (images,) if labels is None else (images, labels)
    nll = batched(lambda x, *y: -iwae_log_likelihood(model, x, k, generator=g, condition=y[0] if y else None),
                  *inputs, batch_size=batch, device=device, progress=bar)
    bar.close()
    se = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    out = {"nll": nll.mean().item(), "se": se, "k": k, "images": len(nll),
           "seconds": round(time.perf_counter() - start, 1)}
    if keep_values:
        out["values"] = nll.cpu()
    return out


@torch.inference_mode()
def latent_terms(model, images: torch.Tensor, targets: torch.Tensor, batch: int = 1000,
                 seed: int = 0, labels: torch.Tensor | None = None) -> dict:
    """One pass over the test set: reconstruction MSE of the posterior-mean decode against
    `images` (grey levels) for every model; for VAEs also the single-sample negative ELBO,
    its reconstruction and KL terms (scored against `targets`), KL per latent dimension, the
    variance of mu per dimension and the number of active units."""
    device = model.device

    def terms(x, t, *y):  # y: a conditional model's labels, () for any other model
        post = model.encode(t, *y)
        sq_err = mse(model.decode(model.encode(x, *y).mu, *y), x).double()
        if post.logvar is None:
            return post.mu.double(), sq_err, None, None
        z = reparameterize(post.mu, post.logvar)
        return (post.mu.double(), sq_err, bce_from_logits(model.decode_logits(z, *y), t).double(),
                kl_normal_per_dim(post.mu, post.logvar).double())

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inputs = (images, targets) if labels is None else (images, targets, labels)
        mu, sq_err, r, kl_dims = batched(terms, *inputs, batch_size=batch, device=device)
    mu_var = mu.var(0)
    out: dict = {"recon_mse": sq_err.mean().item(),
                 "latent": {"mu_variance": mu_var.tolist()}}
    if kl_dims is not None:
        out["elbo"] = {"neg_elbo": (r + kl_dims.sum(1)).mean().item(), "recon": r.mean().item(),
                       "kl": kl_dims.sum(1).mean().item()}
        out["latent"]["kl_per_dim"] = kl_dims.mean(0).tolist()
        out["latent"]["active_units"] = int((mu_var > ACTIVE_UNIT_THRESHOLD).sum())
        out["latent"]["latent_dim"] = mu.shape[1]
    return out


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def balanced_labels(n: int, n_classes: int) -> torch.Tensor:
    """(n,) labels taking every class in turn, in blocks of about n / n_classes, in order: a
    conditional model's samples when no class is asked for (rows of a grid of n / 10 columns)."""
    return torch.arange(n) * n_classes // n


def generate(model, n: int, seed: int = 0, batch: int = 1000, labels: torch.Tensor | None = None) -> torch.Tensor:
    """n samples from the model's prior (n, 1, 28, 28) on the CPU; a conditional model draws
    sample i with `labels[i]` ((n,) class labels)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    if labels is None:
        return batched(lambda m: model.sample(m, generator=g).float(), n, batch_size=batch)
    return batched(lambda y: model.sample(len(y), generator=g, condition=y).float(), labels[:n], batch_size=batch,
                   device=model.device)


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------


def weights_digest(run_dir: Path) -> str:
    """SHA-256 of RUN/model.safetensors: which weights a metrics.json measured (a recipe resumed
    later reuses the metrics only of the weights still there)."""
    return sha256_hex((Path(run_dir) / MODEL_FILE).read_bytes())


def evaluate_run(run, data: ImageData, settings: EvalSettings | None = None, progress: bool = False,
                 per_image: dict | None = None) -> dict:
    """Every metric of a loaded run (see `checkpoint.load_run`) on `data`; also written to
    RUN/metrics.json. `per_image`, where given, receives the values behind the means that a
    caller may compare run against run on the same images: "iwae_nll", the (N,) per-image NLLs
    (float64, the first `settings.iw_images` test images, in order)."""
    settings = settings or EvalSettings()
    model = run.model.eval()
    cfg = run.train_config
    device = model.device
    seconds: dict[str, float] = {}
    metrics: dict = {"run": str(run.path), "model": model.name, "dataset": data.name,
                     "latent_dim": model.latent_dim, "settings": asdict(settings),
                     "weights_sha256": weights_digest(run.path)}

    start = time.perf_counter()
    metrics["test_terms"] = evaluate_terms(model, data.test_x, cfg, device, labels=data.test_y)
    targets, what = likelihood_images(data, cfg.binarize, settings.seed)
    metrics["likelihood_data"] = what
    # A conditional model is measured given the test labels: its ELBO and NLL are of log p(x|y).
    labels = data.test_y if model.conditional else None
    metrics.update(latent_terms(model, to_float(data.test_x), targets, settings.batch_size, settings.seed,
                                labels=labels))
    seconds["terms"] = time.perf_counter() - start

    if "elbo" in metrics and settings.iw_samples > 0:
        metrics["iwae"] = iwae_nll(model, targets[: settings.iw_images], settings.iw_samples,
                                   seed=settings.seed, progress=progress,
                                   labels=None if labels is None else labels[: settings.iw_images],
                                   keep_values=per_image is not None)
        if per_image is not None:
            per_image["iwae_nll"] = metrics["iwae"].pop("values")
        metrics["iwae"]["conditional"] = model.conditional
        seconds["iwae"] = metrics["iwae"]["seconds"]

    if settings.n_samples > 0:
        start = time.perf_counter()
        clf, info = load_or_train_classifier(data, device=device, progress=progress)
        metrics["classifier"] = classifier_summary(data.name, info)
        # Samples are compared with the real grey-level images, whatever binarization or
        # validation split the model was trained with.
        real = load(data.name, quiet=True)
        # A conditional model draws every class equally often, each sample judged against its label.
        asked = balanced_labels(settings.n_samples, len(data.classes)) if model.conditional else None
        images = generate(model, settings.n_samples, settings.seed, labels=asked)
        metrics["sample_quality"] = sample_quality(images, real, clf, settings.seed)
        if asked is not None:
            metrics["class_share"] = class_share(classify(clf, images)[1], asked)
        metrics["class_names"] = list(data.classes)
        seconds["sample_quality"] = time.perf_counter() - start
    metrics["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    write_json(Path(run.path) / METRICS_FILE, metrics)
    return metrics


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
    """(metric, value) rows for the printed table and the HTML report."""
    rows: list[tuple[str, str]] = []
    for name, value in metrics.get("test_terms", {}).items():
        rows.append((f"test {name} (model's own terms)", f"{value:.4f}"))
    if "elbo" in metrics:
        e = metrics["elbo"]
        rows += [("negative ELBO (nats)", f"{e['neg_elbo']:.2f}"), ("  reconstruction (BCE)", f"{e['recon']:.2f}"),
                 ("  KL(q(z|x) || p(z))", f"{e['kl']:.2f}")]
    if "iwae" in metrics:
        w = metrics["iwae"]
        given = " given the labels" if w.get("conditional") else ""
        rows.append((f"IWAE NLL{given}, K={w['k']}, {w['images']} images (nats)", f"{w['nll']:.2f} ± {w['se']:.2f}"))
    rows.append(("reconstruction MSE per pixel", f"{metrics['recon_mse']:.5f}"))
    lat = metrics.get("latent", {})
    if "active_units" in lat:
        rows.append(("active units (Var[mu] > 0.01)", f"{lat['active_units']} of {lat['latent_dim']}"))
        rows.append(("KL per latent dimension", ", ".join(f"{v:.2f}" for v in lat["kl_per_dim"])))
    if "classifier" in metrics:
        c = metrics["classifier"]
        short = "" if c.get("meets_target", True) else f" (short of its {c['target_accuracy']:.1%} target)"
        rows.append(("domain classifier test accuracy", f"{c['test_accuracy']:.2%}{short}"))
        q = metrics["sample_quality"]
        rows += quality_rows(q["samples"], q["real_train"])
        names = metrics.get("class_names") or [str(i) for i in range(10)]
        hist = metrics["sample_quality"]["samples"]["class_histogram"]
        rows.append(("class histogram of samples", ", ".join(f"{n} {h:.0%}" for n, h in zip(names, hist))))
        if "class_share" in metrics:
            share = metrics["class_share"]
            rows.append(("samples of class k classified as k, mean", f"{share['mean']:.1%}"))
            rows.append(("  per class", ", ".join(f"{n} {v:.0%}" for n, v in zip(names, share["per_class"]))))
    return rows


def format_table(metrics: dict) -> str:
    rows = summary_rows(metrics)
    width = max(len(k) for k, _ in rows)
    lines = [f"{metrics['model']} on {metrics['dataset']} ({metrics['run']})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if "iwae" in metrics and "grey-level" in metrics.get("likelihood_data", ""):
        lines.append("  note: " + metrics["likelihood_data"])
    return "\n".join(lines)
