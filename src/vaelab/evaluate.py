"""Metrics of a trained run: test loss terms, the IWAE negative log-likelihood, sample quality
measured with a small domain classifier (Fréchet distance of its features, confidence, class
histogram), and how the latent dimensions are used.

Everything here is model-agnostic: a model whose encoder returns a log-variance is a VAE and
gets likelihood metrics; one without (an autoencoder) gets its reconstruction MSE. Decoders
produce Bernoulli logits (the base contract), which defines log p(x|z).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageData, cache_root, get_spec, to_float
from .errors import CheckpointError
from .losses import (bce_from_logits, bce_from_logits_shared_target, iwae_bound, kl_normal_per_dim,
                     log_normal, log_standard_normal, mse, reparameterize)

METRICS_FILE = "metrics.json"
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2: Var_x(E_q[z_d]) > 0.01
CONFIDENT = 0.9


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
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The IWAE estimate of log p(x) per image with K = k importance samples: (B, ...) -> (B,).

    log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016,
    eq. 8); the bound tightens as K grows. The K samples are drawn in chunks of about
    `chunk_rows` decoded images; their log-weights, (K, B) in float64, are small enough to keep
    whole and go to `losses.iwae_bound` at once.
    """
    post = model.encode(x)
    mu, logvar = post.mu, post.logvar
    b, d = mu.shape
    per_chunk = max(1, chunk_rows // b)
    log_ws = []
    std = torch.exp(0.5 * logvar)
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn(n, b, d, generator=generator, device=mu.device)
        z = mu + eps * std  # (n, B, D)
        logits = model.decode_logits(z.reshape(n * b, d))  # (n*B, ...)
        log_px = -bce_from_logits_shared_target(logits.view(n, b, *x.shape[1:]), x)  # (n, B)
        log_w = log_px + log_standard_normal(z) - log_normal(z, mu, logvar)  # (n, B)
        log_ws.append(log_w.double())
    return iwae_bound(torch.cat(log_ws))  # (K, B) -> (B,)


def iwae_nll(model, images: torch.Tensor, k: int, batch: int = 100, seed: int = 0,
             progress: bool = False) -> dict:
    """Mean IWAE negative log-likelihood (nats) over `images` with its standard error."""
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    values = []
    bar = tqdm(total=len(images), desc=f"IWAE NLL, K={k}", unit="img", disable=not progress,
               leave=False, file=sys.stderr)
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        values.append(-iwae_log_likelihood(model, x, k, generator=g).cpu())
        bar.update(len(x))
    bar.close()
    nll = torch.cat(values)
    se = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    return {"nll": nll.mean().item(), "se": se, "k": k, "images": len(nll),
            "seconds": round(time.perf_counter() - start, 1)}


@torch.inference_mode()
def latent_terms(model, images: torch.Tensor, targets: torch.Tensor, batch: int = 1000,
                 seed: int = 0) -> dict:
    """One pass over the test set: reconstruction MSE of the posterior-mean decode against
    `images` (grey levels) for every model; for VAEs also the single-sample negative ELBO,
    its reconstruction and KL terms (scored against `targets`), KL per latent dimension, the
    variance of mu per dimension and the number of active units."""
    device = model.device
    mus, sq_err, recon, kl = [], [], [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(device)
            t = targets[i : i + batch].to(device)
            post = model.encode(t)
            mus.append(post.mu.double().cpu())
            sq_err.append(mse(model.decode(model.encode(x).mu), x).double().cpu())
            if post.logvar is not None:
                z = reparameterize(post.mu, post.logvar)
                recon.append(bce_from_logits(model.decode_logits(z), t).double().cpu())
                kl.append(kl_normal_per_dim(post.mu, post.logvar).double().cpu())
    mu = torch.cat(mus)
    mu_var = mu.var(0)
    out: dict = {"recon_mse": torch.cat(sq_err).mean().item(),
                 "latent": {"mu_variance": mu_var.tolist()}}
    if kl:
        kl_dims = torch.cat(kl)
        r = torch.cat(recon)
        out["elbo"] = {"neg_elbo": (r + kl_dims.sum(1)).mean().item(), "recon": r.mean().item(),
                       "kl": kl_dims.sum(1).mean().item()}
        out["latent"]["kl_per_dim"] = kl_dims.mean(0).tolist()
        out["latent"]["active_units"] = int((mu_var > ACTIVE_UNIT_THRESHOLD).sum())
        out["latent"]["latent_dim"] = mu.shape[1]
    return out


# ---------------------------------------------------------------------------------------------
# The domain classifier and sample quality
# ---------------------------------------------------------------------------------------------

CLASSIFIER_VERSION = 2
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_INFO = "classifier.json"


class DomainClassifier(nn.Module):
    """A small conv net: two 3x3 conv + max-pool stages, a 128-unit penultimate layer whose
    activations are the features for the Fréchet distance, and 10 logits. Kept small (1.2 M
    multiply-adds per image) so that training it once takes well under a minute on 2 cores."""

    feature_dim = 128

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # -> (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> (B, 32, 7, 7)
        )
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.penultimate(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.inference_mode()
def classify(clf: DomainClassifier, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, 128) and class probabilities (N, C) of float images (N, 1, 28, 28)."""
    device = next(clf.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch):
        f = clf.features(images[i : i + batch].to(device))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(clf.head(f), 1).double().cpu())
    return torch.cat(feats), torch.cat(probs)


def train_classifier(data: ImageData, epochs: int = 2, seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[DomainClassifier, float]:
    """Train the domain classifier on the training set; returns it and its test accuracy."""
    torch.manual_seed(seed)
    clf = DomainClassifier(len(data.classes)).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    n = len(data.train_x)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        bar = tqdm(range(0, n, 128), desc=f"classifier epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False, file=sys.stderr)
        for i in bar:
            idx = order[i : i + 128]
            x = to_float(data.train_x[idx]).to(device)
            loss = nn.functional.cross_entropy(clf(x), data.train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    _, probs = classify(clf, to_float(data.test_x))
    accuracy = (probs.argmax(1) == data.test_y).double().mean().item()
    return clf, accuracy


def classifier_paths(dataset: str) -> tuple[Path, Path]:
    folder = cache_root() / get_spec(dataset).name
    return folder / CLASSIFIER_FILE, folder / CLASSIFIER_INFO


def load_or_train_classifier(data: ImageData, device: str | torch.device = "cpu",
                             progress: bool = False) -> tuple[DomainClassifier, dict]:
    """The dataset's domain classifier from the cache beside the data, trained (under a minute on
    2 cores) and cached on first use. A missing, stale or damaged cache is retrained."""
    from .checkpoint import load_tensors, load_state_into, save_tensors, write_json

    weights, info_path = classifier_paths(data.name)
    try:
        info = json.loads(info_path.read_text())
        if info.get("version") == CLASSIFIER_VERSION:
            tensors, _ = load_tensors(weights)
            clf = DomainClassifier(len(data.classes))
            load_state_into(clf, tensors, weights)
            return clf.to(device).eval(), info
    except (OSError, ValueError, CheckpointError):
        pass
    if progress:
        print(f"training the {data.name} domain classifier once (cached in {weights.parent}) ...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    epochs = 2
    clf, accuracy = train_classifier(data, epochs=epochs, device=device, progress=progress)
    info = {"version": CLASSIFIER_VERSION, "dataset": data.name, "epochs": epochs,
            "test_accuracy": accuracy, "train_seconds": round(time.perf_counter() - start, 1),
            "architecture": "conv3x3(16)-pool-conv3x3(32)-pool-fc128-fc10"}
    save_tensors(weights, dict(clf.state_dict()), {"format_version": CLASSIFIER_VERSION})
    write_json(info_path, info)
    if progress:
        print(f"  test accuracy {accuracy:.2%} in {info['train_seconds']} s", file=sys.stderr, flush=True)
    return clf.eval(), info


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (Heusel et al. 2017).

    The matrix square root is taken through symmetric eigendecompositions, which is exact for
    covariance matrices and needs no scipy.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(s_a)
    root_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * middle).item()


def quality(features: torch.Tensor, probs: torch.Tensor, test_features: torch.Tensor) -> dict:
    """Sample-quality figures of one image set against the test set's classifier features."""
    confidence, predicted = probs.max(1)
    counts = torch.bincount(predicted, minlength=probs.shape[1])
    return {"frechet_distance": frechet_distance(features, test_features),
            "confident_share": (confidence > CONFIDENT).double().mean().item(),
            "class_histogram": (counts.double() / len(predicted)).tolist(),
            "n": len(features)}


@torch.inference_mode()
def generate(model, n: int, seed: int = 0, batch: int = 1000) -> torch.Tensor:
    """n samples from the model's prior (n, 1, 28, 28) on the CPU."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    return torch.cat([model.sample(min(batch, n - i), generator=g).float().cpu() for i in range(0, n, batch)])


def sample_quality(model, data: ImageData, clf: DomainClassifier, n: int, seed: int = 0) -> dict:
    """Quality of n samples and, as the floor, of n real training images, against the test set."""
    test_f, _ = classify(clf, to_float(data.test_x))
    f, p = classify(clf, generate(model, n, seed))
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:n]
    rf, rp = classify(clf, to_float(data.train_x[idx]))
    return {"samples": quality(f, p, test_f), "real_train": quality(rf, rp, test_f)}


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------


def evaluate_run(run, data: ImageData, settings: EvalSettings | None = None, progress: bool = False) -> dict:
    """Every metric of a loaded run (see `checkpoint.load_run`) on `data`; also written to
    RUN/metrics.json."""
    from .checkpoint import write_json
    from .train import evaluate_terms

    settings = settings or EvalSettings()
    model = run.model.eval()
    cfg = run.train_config
    device = model.device
    seconds: dict[str, float] = {}
    metrics: dict = {"run": str(run.path), "model": model.name, "dataset": data.name,
                     "latent_dim": model.latent_dim, "settings": asdict(settings)}

    start = time.perf_counter()
    metrics["test_terms"] = evaluate_terms(model, data.test_x, cfg, device)
    targets, what = likelihood_images(data, cfg.binarize, settings.seed)
    metrics["likelihood_data"] = what
    metrics.update(latent_terms(model, to_float(data.test_x), targets, settings.batch_size, settings.seed))
    seconds["terms"] = time.perf_counter() - start

    if "elbo" in metrics and settings.iw_samples > 0:
        metrics["iwae"] = iwae_nll(model, targets[: settings.iw_images], settings.iw_samples,
                                   seed=settings.seed, progress=progress)
        seconds["iwae"] = metrics["iwae"]["seconds"]

    if settings.n_samples > 0:
        start = time.perf_counter()
        clf, info = load_or_train_classifier(data, device=device, progress=progress)
        metrics["classifier"] = {"test_accuracy": info["test_accuracy"], "epochs": info["epochs"],
                                 "path": str(classifier_paths(data.name)[0])}
        metrics["sample_quality"] = sample_quality(model, data, clf.to(device), settings.n_samples, settings.seed)
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
        rows.append((f"IWAE NLL, K={w['k']}, {w['images']} images (nats)", f"{w['nll']:.2f} ± {w['se']:.2f}"))
    rows.append(("reconstruction MSE per pixel", f"{metrics['recon_mse']:.5f}"))
    lat = metrics.get("latent", {})
    if "active_units" in lat:
        rows.append(("active units (Var[mu] > 0.01)", f"{lat['active_units']} of {lat['latent_dim']}"))
        rows.append(("KL per latent dimension", ", ".join(f"{v:.2f}" for v in lat["kl_per_dim"])))
    if "classifier" in metrics:
        rows.append(("domain classifier test accuracy", f"{metrics['classifier']['test_accuracy']:.2%}"))
        for key, label in (("samples", "samples"), ("real_train", "real training images (floor)")):
            q = metrics["sample_quality"][key]
            rows.append((f"Fréchet distance, {q['n']} {label}", f"{q['frechet_distance']:.2f}"))
            rows.append((f"share classified with confidence > {CONFIDENT}, {label}", f"{q['confident_share']:.1%}"))
        names = metrics.get("class_names") or [str(i) for i in range(10)]
        hist = metrics["sample_quality"]["samples"]["class_histogram"]
        rows.append(("class histogram of samples", ", ".join(f"{n} {h:.0%}" for n, h in zip(names, hist))))
    return rows


def format_table(metrics: dict) -> str:
    rows = summary_rows(metrics)
    width = max(len(k) for k, _ in rows)
    lines = [f"{metrics['model']} on {metrics['dataset']} ({metrics['run']})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if "iwae" in metrics and "grey-level" in metrics.get("likelihood_data", ""):
        lines.append("  note: " + metrics["likelihood_data"])
    return "\n".join(lines)
