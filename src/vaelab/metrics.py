"""Sample quality: a domain classifier per dataset and the metrics computed in its feature space.

Every metric compares an image set with the real test set through the classifier's features
(see `DomainClassifier`), and comes with its *floor*: the same metric for as many real training
images, which is what a perfect generator would score at that sample size.

    fd                Fréchet distance (Heusel et al. 2017)               lower is better, floor ~0
    kid, kid_std      kernel distance (Bińkowski et al. 2018), unbiased   lower is better, floor ~0
    precision/recall  improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds
                      with k = 3: how many samples look real / how much of the real data the
                      samples cover                                        higher is better
    coverage          Naeem et al. 2020: the share of real images with a sample inside their k-NN
                      ball (k = 5); unlike recall, samples far from every real image cannot
                      raise it                                             higher is better
    confident_share   share classified with probability > 0.9, and the class histogram

FD alone is fooled: it compares only two moments of the features, so images that are unlike
anything real but land near the real features' mean (a failing GAN's high-contrast blobs) can
score well. Precision asks whether each sample lies inside the real data's k-NN manifold, and
KID compares whole distributions through a cubic kernel, without FD's Gaussian assumption.

Why two feature blocks, the pooled last conv stage beside the hidden layer: each alone is fooled.
Measured on MNIST, 2000 images per set against 8000 other test images, five trainings of the
classifier (seeds and widths): in the hidden layer alone, trained only to separate classes, noise
lands inside class clusters, so pixel-shuffled digits scored precision 0.07-0.51 and blurred
digits up to 0.89, above real ones (0.85); in the pooled conv stage alone, blurred digits and
blobs were nearly alike, FD and KID ranked them either way round. With both blocks, FD and
precision (neither depends on the features' overall scale) ranked real < blurred < blobs <
shuffled (precision the other way round) in all five, and so did KID at unit block norm; at the
scale used here (RMS 1, see `calibrate`) KID was checked on the cached CPU-trained classifier.

The classifier is trained once per dataset (random shifts of up to 2 pixels, horizontal flips
for Fashion-MNIST only) and cached beside the data with the SHA-256 of its weights and of its
training settings; either changing means it is retrained.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # text bars, in a terminal and a notebook alike (see training_log.py)

from .atomic import folder_lock
from .checkpoint import load_state_into, load_tensors, save_tensors, write_json
from .data import ImageData, cache_root, get_spec, load, to_float
from .errors import DataError, VaelabError
from .inference import batched
from .memory import require_memory
from .reading import read_bytes, read_json, require_fields

CONFIDENT = 0.9  # a sample is "confidently classified" above this top-class probability
PR_K = 3  # Kynkäänniemi et al. 2019 use k = 3 (section 3)
COVERAGE_K = 5  # Naeem et al. 2020 recommend k = 5 (section 4)
KID_SUBSETS = 50  # random pairs of subsets of KID_SUBSET_SIZE images; ~0.1 s each for 160 features
KID_SUBSET_SIZE = 1000
FD_BOOTSTRAP = 20  # resamples behind fd_std
MAX_PR_IMAGES = 10000  # precision/recall use at most this many images per set (O(n^2) distances)
# Fewest images a set may have: the k-NN radius needs k other points (precision and recall), the
# unbiased MMD^2 needs two per subset. Below ~1000 images every figure is dominated by noise and
# FD by its small-sample bias; the floor, computed at the same n, shows how much.
MIN_IMAGES = max(PR_K, COVERAGE_K) + 1
CHUNK_ROWS = 1024  # rows of a distance matrix computed at once: 1024 x 10000 float64 = 80 MB


# ---------------------------------------------------------------------------------------------
# The domain classifier
# ---------------------------------------------------------------------------------------------

CLASSIFIER_VERSION = 4
CALIBRATION_IMAGES = 10000  # training images that fix the feature blocks' scales
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_INFO = "classifier.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """How a dataset's domain classifier is built and trained (all of it goes into the settings
    hash, so changing any field retrains the cached classifier)."""

    widths: tuple[int, int] = (16, 32)  # channels of the two conv stages
    hidden: int = 128  # the fully connected layer between the conv blocks and the logits
    # (the features are widths[1] + hidden values: the pooled second stage and this layer)
    dropout: float = 0.3
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule (Adam)
    weight_decay: float = 1e-4
    shift: int = 2  # random translations of up to this many pixels
    hflip: bool = False  # random horizontal flips: garments, never digits
    seed: int = 0
    target_accuracy: float = 0.99  # test accuracy the metrics assume; below it, a warning


CLASSIFIER_CONFIGS = {
    # Test accuracy measured on a GPU with this code: MNIST 99.53% after 3 epochs, 99.54% after
    # 4, 99.58% after 6; Fashion-MNIST 92.26-92.36% after 8, 92.75% after 12. Widths (24, 48) or
    # (32, 64) gained at most 0.4 points on Fashion-MNIST at 2-3 times the cost on a CPU.
    "mnist": ClassifierConfig(epochs=4, target_accuracy=0.993),
    "fashion-mnist": ClassifierConfig(epochs=10, hflip=True, target_accuracy=0.92),
}
# Seconds to train each classifier on 2 idle CPU cores, for time estimates (measured 2026-11-23,
# 2 threads: 80 s and 185 s). Kept apart from the configs, whose fields key the cache.
CLASSIFIER_TRAIN_SECONDS = {"mnist": 80.0, "fashion-mnist": 185.0}


class DomainClassifier(nn.Module):
    """A small VGG-style net: two stages of two 3x3 conv + batch-norm + ReLU layers and a max-pool,
    then a hidden layer on the flattened maps and the logits.

    Its features, for every metric, are two blocks side by side: the global average of the last
    conv stage (w2 values: stroke and texture statistics) and the hidden layer (`hidden` values:
    what the classifier makes of the whole image), each scaled by a constant fixed after
    training (`calibrate`) so that both blocks weigh the same and each coordinate has an RMS of
    about 1 on real images."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig(), n_classes: int = 10):
        super().__init__()
        self.config = config
        w1, w2 = config.widths
        self.feature_dim = w2 + config.hidden

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.convs = nn.Sequential(
            *conv(1, w1), *conv(w1, w1), nn.MaxPool2d(2),  # -> (B, w1, 14, 14)
            *conv(w1, w2), *conv(w2, w2), nn.MaxPool2d(2),  # -> (B, w2, 7, 7)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout),  # -> (B, w2 * 49)
            nn.Linear(w2 * 49, config.hidden, bias=False), nn.BatchNorm1d(config.hidden), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.hidden, n_classes),
        )
        self.register_buffer("block_scale", torch.ones(2))  # (pooled, hidden), set by `calibrate`
        # oneDNN runs NHWC convolutions without layout reorders; a (B, 1, 28, 28) batch already is one.
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def architecture(config: ClassifierConfig) -> str:
        w1, w2 = config.widths
        return (f"2x[conv3x3({w1})-bn-relu]-pool-2x[conv3x3({w2})-bn-relu]-pool-dropout({config.dropout})-"
                f"fc{config.hidden}-bn-relu-dropout-fc10; features: [global average of the second stage, "
                f"fc{config.hidden}], each block scaled to a mean squared norm of {(w2 + config.hidden) // 2} "
                f"on 10000 training images")

    def blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unscaled feature blocks and logits: (B, 1, 28, 28) -> (B, w2), (B, hidden), (B, C)."""
        maps = self.convs(x)  # (B, w2, 7, 7)
        hidden = self.head[:5](maps)  # flatten, dropout, linear, batch norm, ReLU
        return maps.mean((2, 3)), hidden, self.head[5:](hidden)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, hidden, logits = self.blocks(x)
        return torch.cat([pooled * self.block_scale[0], hidden * self.block_scale[1]], 1), logits  # (B, F), (B, C)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))


@torch.inference_mode()
def calibrate(clf: DomainClassifier, images: torch.Tensor, batch: int = 1000) -> None:
    """Fix `block_scale` from real images (N, 1, 28, 28): each block's mean squared norm becomes
    feature_dim / 2. Equal weights keep either block from deciding the k-NN distances alone;
    coordinates of RMS about 1 put x.y/d in the range where the cubic KID kernel's higher terms
    count (as for Inception features, the setting of Bińkowski et al.)."""
    def block_sums(x):
        pooled, hidden, _ = clf.blocks(x)
        return torch.stack([pooled.double().pow(2).sum(), hidden.double().pow(2).sum()])[None]  # (1, 2)

    clf.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for chunk_sums in batched(block_sums, images, batch_size=batch, device=next(clf.parameters()).device):
        sums += chunk_sums  # in order, chunk by chunk: the same rounding as ever
    mean_sq = (sums / len(images)).clamp_min(1e-12)  # a dead block (all zeros) keeps a finite scale
    clf.block_scale.copy_((clf.feature_dim / 2 / mean_sq).sqrt().to(clf.block_scale))


def classify(clf: DomainClassifier, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and class probabilities (N, C), float64 on the CPU, of float images
    (N, 1, 28, 28) in [0, 1]."""
    def features_and_probabilities(x):
        f, logits = clf.features_and_logits(x)
        return f.double(), torch.softmax(logits, 1).double()

    return batched(features_and_probabilities, images, batch_size=batch, device=next(clf.parameters()).device,
                   model=clf)


def augment(x: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by its own random (dy, dx) in [-shift, shift] (zero fill) and, with
    `hflip`, mirrored with probability 1/2: (B, 1, H, W) -> (B, 1, H, W)."""
    b, _, h, w = x.shape
    if shift:
        padded = nn.functional.pad(x, (shift, shift, shift, shift))  # (B, 1, H + 2s, W + 2s)
        dy = torch.randint(0, 2 * shift + 1, (b, 1), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (b, 1), generator=generator).to(x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def train_classifier(data: ImageData, config: ClassifierConfig, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[DomainClassifier, float]:
    """Train a domain classifier on `data`'s training set; return it (eval mode) and its test
    accuracy. Adam with a one-cycle learning rate (Smith & Topin 2019); the caller's global RNG
    state is left as it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # initialisation and dropout
        clf = DomainClassifier(config, len(data.classes)).to(device)
        g = torch.Generator().manual_seed(config.seed)  # batch order and augmentation
        n = len(data.train_x)
        steps_per_epoch = math.ceil(n / config.batch_size)
        opt = torch.optim.AdamW(clf.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr,
                                                       total_steps=config.epochs * steps_per_epoch)
        clf.train()
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=g)
            bar = tqdm(range(0, n, config.batch_size), desc=f"classifier epoch {epoch + 1}/{config.epochs}",
                       disable=not progress, leave=False, file=sys.stderr)
            for i in bar:
                idx = order[i : i + config.batch_size]
                x = augment(to_float(data.train_x[idx]), config.shift, config.hflip, g).to(device)
                loss = nn.functional.cross_entropy(clf(x), data.train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    calibrate(clf, to_float(data.train_x[:CALIBRATION_IMAGES]))
    _, probs = classify(clf, to_float(data.test_x))
    accuracy = (probs.argmax(1) == data.test_y).double().mean().item()
    return clf, accuracy


def classifier_paths(dataset: str) -> tuple[Path, Path]:
    folder = cache_root() / get_spec(dataset).name
    return folder / CLASSIFIER_FILE, folder / CLASSIFIER_INFO


def classifier_config(dataset: str) -> ClassifierConfig:
    return CLASSIFIER_CONFIGS.get(get_spec(dataset).name, ClassifierConfig())


def classifier_train_seconds(dataset: str) -> float:
    """About how long training the dataset's classifier takes on 2 idle CPU cores."""
    return CLASSIFIER_TRAIN_SECONDS.get(get_spec(dataset).name, max(CLASSIFIER_TRAIN_SECONDS.values()))


def classifier_settings(dataset: str, n_classes: int = 10) -> dict:
    """Everything that decides the trained weights, as JSON; its SHA-256 keys the cache."""
    config = classifier_config(dataset)
    return {"version": CLASSIFIER_VERSION, "dataset": get_spec(dataset).name, "n_classes": n_classes,
            "architecture": DomainClassifier.architecture(config), **asdict(config)}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settings_hash(settings: dict) -> str:
    return sha256_hex(json.dumps(settings, sort_keys=True).encode())


def _warn(message: str) -> None:
    print(f"vaelab: warning: {message}", file=sys.stderr, flush=True)


def _shortfall(info: dict) -> str | None:
    if info["test_accuracy"] >= info["target_accuracy"]:
        return None
    return (f"the {info['dataset']} domain classifier reached {info['test_accuracy']:.2%} test accuracy, "
            f"short of its {info['target_accuracy']:.2%} target: its sample metrics are less trustworthy")


CLASSIFIER_INFO_FIELDS = {"settings_sha256": str, "weights_sha256": str, "test_accuracy": float,
                          "target_accuracy": float, "dataset": str, "epochs": int}
MAX_CLASSIFIER_BYTES = 64 * 1024 * 1024  # the weights are about 1 MB


def _cached_classifier(weights: Path, info_path: Path, settings: dict, n_classes: int):
    """The cached classifier and its info, or (None, why not)."""
    if not info_path.exists():
        return None, "not trained yet"
    try:
        info = require_fields(read_json(info_path), CLASSIFIER_INFO_FIELDS, str(info_path))
        if info["settings_sha256"] != settings_hash(settings):
            return None, "its training settings changed"
        if sha256_hex(read_bytes(weights, MAX_CLASSIFIER_BYTES, "classifier")) != info["weights_sha256"]:
            return None, f"{weights.name} does not match the SHA-256 in {info_path.name}"
        tensors, _ = load_tensors(weights)
        clf = DomainClassifier(classifier_config(settings["dataset"]), n_classes)
        load_state_into(clf, tensors, weights)
    except VaelabError as e:  # damaged, malformed or mismatched: retrained
        return None, str(e)
    return clf.eval(), info


def classifier_cached(dataset: str, n_classes: int = 10) -> bool:
    """Whether the dataset's domain classifier is in the cache as `load_or_train_classifier` would
    use it (nothing to train first)."""
    weights, info_path = classifier_paths(dataset)
    return _cached_classifier(weights, info_path, classifier_settings(dataset, n_classes), n_classes)[0] is not None


def load_or_train_classifier(data: ImageData, device: str | torch.device = "cpu",
                             progress: bool = False) -> tuple[DomainClassifier, dict]:
    """The dataset's domain classifier from the cache beside the data, trained and cached on
    first use (`CLASSIFIER_TRAIN_SECONDS`: 80 s for MNIST, 185 s for Fashion-MNIST on 2 idle
    cores). A missing, damaged or malformed cache, one whose weights do not match their recorded
    SHA-256, or one trained with other settings, is retrained. A classifier short of its target
    accuracy is used, with a warning on stderr (and `meets_target: false` in classifier.json)."""
    weights, _ = classifier_paths(data.name)
    # Two processes that start at once (two evaluations, parallel tests) train it once: the
    # second waits, then loads what the first cached.
    def waiting() -> None:
        if progress:
            print(f"waiting for another process to finish the {data.name} domain classifier "
                  f"({weights.parent}) ...", file=sys.stderr, flush=True)

    with folder_lock(weights.parent, on_wait=waiting):
        clf, info = _load_or_train(data, device, progress)
    message = _shortfall(info)
    if message:
        _warn(message)
    return clf.to(device).eval(), info


def _load_or_train(data: ImageData, device, progress: bool) -> tuple[DomainClassifier, dict]:
    n_classes = len(data.classes)
    weights, info_path = classifier_paths(data.name)
    settings = classifier_settings(data.name, n_classes)
    clf, info = _cached_classifier(weights, info_path, settings, n_classes)
    if clf is None:
        if progress:
            print(f"training the {data.name} domain classifier ({info}; cached in {weights.parent}) ...",
                  file=sys.stderr, flush=True)
        # Always the full canonical training set: a run's validation split or binarization must
        # not decide what the shared cached classifier is.
        canonical = load(data.name, quiet=True)
        config = classifier_config(data.name)
        start = time.perf_counter()
        clf, accuracy = train_classifier(canonical, config, device=device, progress=progress)
        seconds = round(time.perf_counter() - start, 1)
        save_tensors(weights, dict(clf.state_dict()), {"format_version": CLASSIFIER_VERSION})
        info = {"version": CLASSIFIER_VERSION, "dataset": data.name, "epochs": config.epochs,
                "test_accuracy": accuracy, "target_accuracy": config.target_accuracy,
                "meets_target": accuracy >= config.target_accuracy, "train_seconds": seconds,
                "torch_threads": torch.get_num_threads(),
                "architecture": settings["architecture"], "settings": settings,
                "settings_sha256": settings_hash(settings), "weights_sha256": sha256_hex(weights.read_bytes())}
        write_json(info_path, info)  # after the weights: a kill in between leaves a mismatch, retrained
        if progress:
            print(f"  test accuracy {accuracy:.2%} in {seconds} s", file=sys.stderr, flush=True)
    return clf, info


def classifier_summary(dataset: str, info: dict) -> dict:
    """What metrics.json and `vaelab score` record about the classifier they used."""
    return {"test_accuracy": info["test_accuracy"], "target_accuracy": info["target_accuracy"],
            "meets_target": info["test_accuracy"] >= info["target_accuracy"], "epochs": info["epochs"],
            "weights_sha256": info["weights_sha256"], "settings_sha256": info["settings_sha256"],
            "path": str(classifier_paths(dataset)[0])}


# ---------------------------------------------------------------------------------------------
# Metrics on feature sets
# ---------------------------------------------------------------------------------------------


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(s)
    return evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T


def _frechet(mu_a: torch.Tensor, s_a: torch.Tensor, root_a: torch.Tensor, mu_b: torch.Tensor,
             s_b: torch.Tensor) -> float:
    # tr (S_a S_b)^1/2 = tr (S_a^1/2 S_b S_a^1/2)^1/2: the same eigenvalues, and the latter is
    # symmetric positive semi-definite, so a symmetric eigendecomposition is exact.
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * middle).item()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (Heusel et al. 2017, eq. 6).

    The matrix square root is taken through symmetric eigendecompositions, which is exact for
    covariance matrices and needs no scipy.
    """
    a, b = a.double(), b.double()
    s_a = torch.cov(a.T)
    return _frechet(a.mean(0), s_a, _sqrtm_psd(s_a), b.mean(0), torch.cov(b.T))


def frechet_distance_bootstrap(features: torch.Tensor, reference: torch.Tensor, resamples: int = FD_BOOTSTRAP,
                               generator: torch.Generator | None = None) -> tuple[float, float]:
    """FD of `features` against `reference`, and its standard deviation over `resamples` bootstrap
    resamples of `features` (drawn with replacement, the reference fixed): the spread that comes
    from which images were drawn. It leaves out the reference set's own sampling noise and FD's
    upward bias at small n (the floor at the same n shows that)."""
    ref = reference.double()
    s_r = torch.cov(ref.T)
    mu_r, root_r = ref.mean(0), _sqrtm_psd(s_r)
    x = features.double()
    fd = _frechet(mu_r, s_r, root_r, x.mean(0), torch.cov(x.T))
    values = []
    for _ in range(resamples):
        xb = x[torch.randint(0, len(x), (len(x),), generator=generator)]
        values.append(_frechet(mu_r, s_r, root_r, xb.mean(0), torch.cov(xb.T)))
    return fd, (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x^T y / d + 1)^3 (Bińkowski et al. 2018, section 4): (N, d), (M, d) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimate of MMD^2 with the cubic polynomial kernel (Gretton et al. 2012, eq. 3;
    Bińkowski et al. 2018, eq. 3):
    1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j).
    It can be slightly negative when the two distributions are equal."""
    m, n = len(x), len(y)
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return (term_xx + term_yy - 2 * polynomial_kernel(x, y).mean()).item()


def kernel_inception_distance(features: torch.Tensor, reference: torch.Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, section 4): the unbiased MMD^2 averaged over `subsets` pairs of
    random subsets of min(subset_size, N, M) images, each drawn without replacement; returns the
    mean and the standard deviation over the subsets (the spread of one subset's estimate, as
    their code reports it, not the standard error of the mean)."""
    x, y = features.double(), reference.double()
    size = min(subset_size, len(x), len(y))
    values = [mmd2_unbiased(x[torch.randperm(len(x), generator=generator)[:size]],
                            y[torch.randperm(len(y), generator=generator)[:size]]) for _ in range(subsets)]
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if subsets > 1 else float("nan"))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 for (N, F), (M, F) -> (N, M), through |a|^2 + |b|^2 - 2 a.b in float64."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def knn_radii(x: torch.Tensor, k: int = PR_K, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Squared distance from each point of x (N, F) to its k-th nearest *other* point: (N,).
    The k+1 smallest distances of a row include the point itself (0), so the k-th other point is
    the (k+1)-th smallest; duplicates count as neighbours at distance 0."""
    x = x.double()
    return batched(lambda rows: _squared_distances(rows, x).topk(k + 1, dim=1, largest=False).values[:, k], x,
                   batch_size=chunk, to=None)


def precision_recall(features: torch.Tensor, reference: torch.Tensor, k: int = PR_K,
                     chunk: int = CHUNK_ROWS) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2). A point q lies in the
    k-NN manifold of a set P when |q - p| <= |p - NN_k(p, P)| for some p in P (eq. 1); precision
    is the share of samples inside the real images' manifold, recall the share of real images
    inside the samples' manifold. Both sets should have the same size (the paper's setting).

    The sample-to-real distances are computed once, `chunk` sample rows at a time, and serve both."""
    if min(len(features), len(reference)) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} points per set")
    fake, real = features.double(), reference.double()
    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)  # squared radii

    def memberships(samples, radii):
        d = _squared_distances(samples, real)  # (chunk, M)
        # These samples in the real manifold; the real images in these samples' balls, (1, M).
        return (d <= r_real[None, :]).any(1), (d <= radii[:, None]).any(0)[None]

    inside, covered = batched(memberships, fake, r_fake, batch_size=chunk, to=None)
    return inside.double().mean().item(), covered.any(0).double().mean().item()


def coverage(features: torch.Tensor, reference: torch.Tensor, k: int = COVERAGE_K,
             chunk: int = CHUNK_ROWS) -> float:
    """Coverage (Naeem et al. 2020, eq. 5): the share of real images whose k-NN ball (radius: the
    distance to the k-th nearest other real image) holds at least one sample.

    Recall draws its balls around the *samples*, so a few samples far from every real image grow
    large balls that take in real images they look nothing like: a generator's stray outputs
    raise its recall. Coverage draws balls around real images only; a stray sample falls in none
    and changes nothing. (Their density, the mean number of real balls a sample lies in, is left
    out: samples crowding the few large balls of patterned real garments fool it as they fool
    precision, see README.)"""
    if len(reference) <= k:
        raise ValueError(f"coverage with k = {k} needs more than {k} real points")
    fake, real = features.double(), reference.double()
    r_real = knn_radii(real, k, chunk)
    covered = batched(lambda rows: (_squared_distances(rows, real) <= r_real[None, :]).any(0)[None], fake,
                      batch_size=chunk, to=None)
    return covered.any(0).double().mean().item()


def binomial_se(p: float, n: int) -> float:
    """Standard error of a share p measured on n independent trials: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def _subset(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return x if len(x) <= n else x[torch.randperm(len(x), generator=generator)[:n]]


# What `quality` measures; a result stored without one of these predates it (recipes measure again).
QUALITY_KEYS = ("fd", "fd_std", "kid", "kid_std", "precision", "precision_se", "recall", "recall_se",
                "coverage", "coverage_se", "confident_share", "confident_share_se", "class_histogram", "n")


def quality(features: torch.Tensor, probs: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> dict:
    """Every sample-quality figure of one image set (its classifier features and probabilities)
    against the reference (real test) features.

    Precision, recall and coverage compare equal-sized sets, m = min(N, M, MAX_PR_IMAGES)
    random images of each; the standard errors of the shares are binomial over those m images, with
    the manifolds fixed.
    """
    n = len(features)
    if n < MIN_IMAGES or len(reference) < MIN_IMAGES:
        raise ValueError(f"sample quality needs at least {MIN_IMAGES} images per set, got {n} and {len(reference)}")
    g = torch.Generator().manual_seed(seed)
    fd, fd_std = frechet_distance_bootstrap(features, reference, generator=g)
    kid, kid_std = kernel_inception_distance(features, reference, generator=g)
    m = min(n, len(reference), MAX_PR_IMAGES)
    fake_m, real_m = _subset(features, m, g), _subset(reference, m, g)
    precision, recall = precision_recall(fake_m, real_m)
    covered = coverage(fake_m, real_m)
    confidence, predicted = probs.max(1)
    confident = (confidence > CONFIDENT).double().mean().item()
    counts = torch.bincount(predicted, minlength=probs.shape[1])
    return {"fd": fd, "fd_std": fd_std, "kid": kid, "kid_std": kid_std,
            "precision": precision, "precision_se": binomial_se(precision, m),
            "recall": recall, "recall_se": binomial_se(recall, m),
            "coverage": covered, "coverage_se": binomial_se(covered, m),
            "confident_share": confident, "confident_share_se": binomial_se(confident, n),
            "class_histogram": (counts.double() / n).tolist(), "n": n}


def sample_quality(images: torch.Tensor, data: ImageData, clf: DomainClassifier, seed: int = 0) -> dict:
    """Quality of float images (N, 1, 28, 28) in [0, 1] and, as the floor, of N real training images
    (all of them if N is larger), both against the test set: {"samples": ..., "real_train": ...}."""
    test_f, _ = classify(clf, to_float(data.test_x))
    f, p = classify(clf, images)
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[: len(images)]
    rf, rp = classify(clf, to_float(data.train_x[idx]))
    return {"samples": quality(f, p, test_f, seed), "real_train": quality(rf, rp, test_f, seed)}


def class_share(probs: torch.Tensor, asked: torch.Tensor) -> dict:
    """How often a conditional model draws what it is asked for: for samples drawn with the labels
    `asked` (N,) and the classifier's probabilities `probs` (N, C), the share of class k's samples
    assigned to k, per class (nan for a class never asked), and their mean over the classes asked."""
    hits = (probs.argmax(1) == asked.to(probs.device)).double()
    n_classes = probs.shape[1]
    asked_counts = torch.bincount(asked, minlength=n_classes).double()
    per_class = torch.bincount(asked, weights=hits, minlength=n_classes) / asked_counts  # 0/0 = nan
    return {"per_class": per_class.tolist(), "mean": per_class[asked_counts > 0].mean().item(),
            "samples_per_class": asked_counts.tolist()}


# One row per quantity: (label, key, format, its spread's key, whether lower is better).
QUALITY_ROWS = (
    ("Fréchet distance (FD)", "fd", "{:.2f}", "fd_std", True),
    ("kernel distance (KID)", "kid", "{:.4f}", "kid_std", True),
    (f"precision (k={PR_K})", "precision", "{:.3f}", "precision_se", False),
    (f"recall (k={PR_K})", "recall", "{:.3f}", "recall_se", False),
    (f"coverage (k={COVERAGE_K})", "coverage", "{:.3f}", "coverage_se", False),
    (f"share classified with confidence > {CONFIDENT}", "confident_share", "{:.1%}", "confident_share_se", False),
)


def quality_rows(samples: dict, floor: dict, what: str = "samples") -> list[tuple[str, str]]:
    """(metric, "value ± spread | floor ± spread") rows comparing an image set with its real floor."""

    def cell(q: dict, key: str, fmt: str, spread: str) -> str:
        if q.get(key) is None:
            return "—"  # measured before vaelab had this metric
        text = fmt.format(q[key])
        if spread in q and math.isfinite(q[spread]):
            text += " ± " + fmt.format(q[spread]).rstrip("%") + ("%" if fmt.endswith("%}") else "")
        return text

    rows = []
    for label, key, fmt, spread, lower in QUALITY_ROWS:
        if samples.get(key) is None and floor.get(key) is None:
            continue
        arrow = "↓" if lower else "↑"
        rows.append((f"{label} {arrow}, {samples['n']} {what} | {floor['n']} real (floor)",
                     f"{cell(samples, key, fmt, spread)} | {cell(floor, key, fmt, spread)}"))
    return rows


# ---------------------------------------------------------------------------------------------
# Image files for `vaelab score`
# ---------------------------------------------------------------------------------------------

NPZ_NAMES = ("images", "x", "arr_0")  # the array an .npz with several is scored on, in this order
SCORE_DTYPES = "uint8 (0-255) or float16/32/64 in [0, 1]"


def _check_header(path: Path, shape: tuple, dtype: np.dtype) -> None:
    """Refuse a wrong shape, dtype or size from the array's header, before any data is read."""
    if not (dtype == np.uint8 or dtype.kind == "f"):
        raise DataError(f"{path}: images must be {SCORE_DTYPES}, got dtype {dtype}")
    if not (len(shape) == 3 and shape[1:] == (28, 28) or len(shape) == 4 and shape[1:] == (1, 28, 28)):
        raise DataError(f"{path}: images must have shape (n, 28, 28) or (n, 1, 28, 28), got {tuple(shape)}")
    n = shape[0]
    if n < MIN_IMAGES:
        raise DataError(f"{path}: {n} images; precision and recall (k = {PR_K}), coverage (k = {COVERAGE_K}) and KID need at least {MIN_IMAGES}")
    # The file's array, its float32 copy, as many real images for the floor (uint8 and float32)
    # and the classifier's activations of one batch.
    require_memory(n * 784 * (dtype.itemsize + 4 + 5) + 256 * 1024 * 1024,
                   f"{path}: {n} images of {dtype} (the file, a float32 copy and as many real images)",
                   error=DataError)


def _read_checked(path: Path, opener) -> np.ndarray:
    """One .npy stream (`opener()` opens it from its start): header checked, then the data read."""
    with opener() as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)  # 3.0 differs only in field-name encoding
        shape, _, dtype = read_header(f)
    _check_header(path, shape, dtype)
    with opener() as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read_images(path: str | Path) -> torch.Tensor:
    """Images to score from an .npy or .npz file -> float32 (N, 1, 28, 28) in [0, 1].

    An .npz holds one array or names it `images`, `x` or `arr_0`. Nothing is unpickled; the
    shape, dtype and size are checked from the header before the data is read. Any problem is a
    DataError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():  # a folder, or a FIFO that would block the read
        raise DataError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: expected an .npy or .npz file of images")
    try:
        if suffix == ".npy":
            array = _read_checked(path, lambda: open(path, "rb"))
        else:
            with zipfile.ZipFile(path) as archive:
                members = [m[:-4] for m in archive.namelist() if m.endswith(".npy")]
                chosen = members[0] if len(members) == 1 else next((m for m in NPZ_NAMES if m in members), None)
                if chosen is None:
                    raise DataError(f"{path}: holds arrays {members[:8]}; name the images 'images', 'x' or "
                                    f"'arr_0', or save only one array")
                array = _read_checked(path, lambda: archive.open(chosen + ".npy"))
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: too large to load into memory") from None
    except Exception as e:  # numpy's header parser and zipfile raise many types (tokenize.TokenError too)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{path}: not a readable numpy image array ({reason})") from None
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise DataError(f"{path}: {int((~finite).sum())} values are NaN or infinite")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1:
            raise DataError(f"{path}: float images must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] "
                            f"(uint8 files are read as 0-255)")
        images = torch.from_numpy(array.astype(np.float32, copy=False))
    else:
        images = torch.from_numpy(array).float().div_(255)
    return images.reshape(len(images), 1, 28, 28)  # (N, 28, 28) or (N, 1, 28, 28) -> (N, 1, 28, 28)


def score_file(path: str | Path, dataset: str, device: str | torch.device = "cpu", seed: int = 0,
               progress: bool = False) -> dict:
    """`vaelab score`: the quality figures of an image file and, under "real_floor", those of as
    many real training images; plus what was scored with which classifier."""
    get_spec(dataset)  # an unknown dataset fails before the file is read
    images = read_images(path)
    data = load(dataset, quiet=not progress)
    clf, info = load_or_train_classifier(data, device=device, progress=progress)
    q = sample_quality(images, data, clf, seed)
    return {**q["samples"], "real_floor": q["real_train"], "file": str(path), "dataset": data.name,
            "class_names": list(data.classes), "seed": seed, "classifier": classifier_summary(data.name, info)}


def format_score(result: dict) -> str:
    """The printed table of `vaelab score`: each metric of the file beside its real floor."""
    c = result["classifier"]
    short = "" if c["meets_target"] else f", SHORT of its {c['target_accuracy']:.1%} target"
    rows = quality_rows(result, result["real_floor"], what="images")
    names = result.get("class_names") or [str(i) for i in range(len(result["class_histogram"]))]
    rows.append(("class histogram of the images",
                 ", ".join(f"{n} {h:.0%}" for n, h in zip(names, result["class_histogram"]))))
    width = max(len(k) for k, _ in rows)
    lines = [f"{result['file']}: {result['n']} images against the {result['dataset']} test set, in the "
             f"features of its domain classifier ({c['test_accuracy']:.2%} test accuracy{short})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
