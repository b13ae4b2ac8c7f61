"""Recipes: each reproduces one assignment as a whole — train its models, draw their figures,
measure them — and writes one self-contained `report.html`.

A recipe is data: a list of `Step`s (model name, config overrides, dataset, epochs for --quick
and for the full run) plus which figures the report shows and, where the assignment asks
questions, a function that answers them from the measured numbers. Adding a model to a recipe
is adding a `Step`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import plots
from .checkpoint import load_run, read_json, write_json
from .data import ImageData, load
from .errors import ConfigError, VaelabError
from .evaluate import EvalSettings, evaluate_run, generate, summary_rows
from .figures import random_test_images, read_history, write_run_figures
from .models import MODELS, make_config
from .report import Report
from .train import TrainConfig, is_run_folder, prepare_folder, train

RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class Step:
    """One model a recipe trains into DIR/<key>/."""

    key: str
    title: str
    model: str
    dataset: str
    epochs: tuple[int, int]  # (--quick, full)
    config: dict = field(default_factory=dict)  # model config fields
    train: dict = field(default_factory=dict)  # TrainConfig fields besides dataset and epochs
    seconds_per_epoch: float = 3.0  # measured on 2 CPU cores (for the time estimate)
    measure_seconds: float = 240.0  # metrics after a full run (IWAE, classifier), same machine
    figures: tuple[str, ...] = ("loss_curves", "samples", "reconstructions")


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    assignment: str  # what the assignment asks, one paragraph
    steps: tuple[Step, ...]
    quick_eval: EvalSettings
    full_eval: EvalSettings
    # Extra report sections written from every step's metrics (comparisons, answers).
    discussion: Callable[["RecipeResult", Report], None] | None = None


@dataclass
class StepResult:
    step: Step
    run_dir: Path
    metrics: dict
    figures: dict[str, Path]
    train_seconds: float


@dataclass
class RecipeResult:
    recipe: Recipe
    out: Path
    quick: bool
    steps: list[StepResult]
    datasets: dict[str, ImageData] = field(default_factory=dict)  # dataset name -> data used
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# What each figure shows and what to look for
# ---------------------------------------------------------------------------------------------

CAPTIONS: dict[str, tuple[str, str]] = {
    "loss_curves": (
        "Training curves: each loss term per epoch (train and test) and per iteration (train, "
        "raw and smoothed).",
        "the total loss should fall quickly and flatten; for a VAE the KL term usually rises as "
        "the decoder learns to use the code, while the reconstruction term falls. Train and test "
        "close together means no overfitting."),
    "latent_scatter": (
        "Codes z (sampled from q(z|x)) of 5000 random test images, coloured by their true class.",
        "clusters per class; how much classes overlap; whether the codes fill the N(0, I) prior "
        "evenly (a VAE) or spread anywhere (a plain autoencoder)."),
    "manifold": (
        "Images decoded on a 15x15 grid over the 2-D latent plane; the grid points are the "
        "quantiles of the prior, so each cell covers an equal share of its probability mass.",
        "smooth morphing between neighbouring cells and every class appearing somewhere; blurry "
        "cells lie between classes."),
    "class_grid": (
        "Five samples per class, decoded from a Gaussian fitted to the codes of that class's test "
        "images (points where another class is more likely are skipped).",
        "each row should show its class in varied styles (slant, thickness, shape)."),
    "samples": (
        "100 images decoded from random draws of the model's prior.",
        "sharpness and variety; how many are recognizable; which classes are missing or "
        "over-represented."),
    "reconstructions": (
        "10 random test images (top) and their reconstructions from the posterior mean (bottom).",
        "how much detail survives the bottleneck; a 2-D code keeps the class and the rough shape, "
        "not the details."),
    "interpolation": (
        "Decodes of evenly spaced points on the straight line between the codes of two test "
        "images (shown at either end).",
        "a gradual morph through plausible images; abrupt jumps or meaningless images in between "
        "mean holes in the latent space."),
}


# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------

QUICK_EVAL = EvalSettings(iw_samples=100, iw_images=500, n_samples=2000)
# Full recipes average the NLL over the first 2000 test images to keep their stated run times
# (several models each); `vaelab evaluate RUN` gives the whole test set.
FULL_EVAL = EvalSettings(iw_images=2000)


def _fashion_discussion(result: RecipeResult, report: Report) -> None:
    """The comparison table, the side-by-side images and the answers to the assignment's
    questions, from the measured numbers."""
    by_key = {r.step.key: r for r in result.steps}
    report.heading("Comparison of every model")
    rows = []
    for r in result.steps:
        q = r.metrics.get("sample_quality", {}).get("samples", {})
        iw = r.metrics.get("iwae")
        rows.append([r.step.title, r.step.model, r.metrics["latent_dim"],
                     q.get("frechet_distance", float("nan")), f"{q.get('confident_share', float('nan')):.1%}",
                     r.metrics["recon_mse"],
                     r.metrics["elbo"]["neg_elbo"] if "elbo" in r.metrics else "—",
                     f"{iw['nll']:.1f} ± {iw['se']:.1f}" if iw else "—"])
    floor = result.steps[0].metrics.get("sample_quality", {}).get("real_train", {})
    if floor:
        rows.append(["real training images (the floor)", "—", "—", floor["frechet_distance"],
                     f"{floor['confident_share']:.1%}", "—", "—", "—"])
    report.table(["model", "name", "latent dim", "Fréchet distance ↓", "share confident > 0.9 ↑",
                  "recon MSE ↓", "neg. ELBO (nats)", "IWAE NLL (nats)"], rows,
                 caption="Every model measured the same way: samples from its generator scored by the "
                         "Fashion-MNIST domain classifier; reconstructions and likelihoods on the test set.")
    report.paragraph("Fréchet distance: between the classifier's penultimate-layer features of the "
                     "model's samples and of the 10,000 test images (0 = indistinguishable "
                     "feature statistics; real training images give the floor). Confident share: "
                     "how many samples the classifier assigns to one class with probability > 0.9. "
                     "The likelihoods are on grey-level images, so they compare the VAEs here but "
                     "not with binarized-MNIST numbers elsewhere.")
    fig_dir = result.out / "figures"
    fig_dir.mkdir(exist_ok=True)
    models = {r.step.key: load_run(r.run_dir).model for r in result.steps}
    rows = [generate(m, 10, seed=0) for m in models.values()]
    titles = [r.step.title for r in result.steps]
    path = plots.plot_image_rows(rows, titles, fig_dir / "samples_side_by_side.png",
                                 title="10 samples from each model's generator")
    report.figure(path, "10 generated images per model, one model per row.",
                  "the naive autoencoder's samples against the normalized one's, and the VAE and "
                  "VAE-GANs against both: recognizable garments, sharpness, variety.")
    data = result.datasets[result.steps[0].step.dataset]
    x = random_test_images(data.test_x, 10, 0, "cpu")
    rows = [x] + [m.reconstruct(x.to(m.device)).cpu() for m in models.values()]
    path = plots.plot_image_rows(rows, ["original"] + titles, fig_dir / "reconstructions_side_by_side.png",
                                 title="The same 10 test images reconstructed by each model")
    report.figure(path, "10 random test images (top row) and their reconstruction by each model.",
                  "a 2-D bottleneck keeps the garment type and silhouette; the VAE-GANs trade "
                  "pixel accuracy for sharper texture.")

    report.heading("Answers to the assignment's questions")
    fd = {k: r.metrics.get("sample_quality", {}).get("samples", {}).get("frechet_distance") for k, r in by_key.items()}
    conf = {k: r.metrics.get("sample_quality", {}).get("samples", {}).get("confident_share") for k, r in by_key.items()}
    if fd.get("ae") is not None and fd.get("ae-normalized") is not None:
        better = "ae-normalized" if fd["ae-normalized"] < fd["ae"] else "ae"
        report.paragraph(
            f"Are the images of A) (naive generation from the plain autoencoder) and B) (N(0, I) "
            f"into the normalized bottleneck) different? Measured: Fréchet distance "
            f"{fd['ae']:.1f} for A against {fd['ae-normalized']:.1f} for B; confident share "
            f"{conf['ae']:.0%} against {conf['ae-normalized']:.0%}, so "
            f"{'B' if better == 'ae-normalized' else 'A'} is closer to real images. Why: the plain "
            f"autoencoder's codes lie wherever training put them — an irregular region with "
            f"empty gaps inside the box it spans — so random inputs drawn over that box often land "
            f"where the decoder never learned anything and decode to blends or smudges. "
            f"Normalizing the bottleneck pins each code neuron to mean 0 and variance 1, so N(0, I) "
            f"draws fall where the codes are; but nothing forces the codes to fill that "
            f"distribution (it matches only the first two moments), so holes remain.",
            css_class="answer")
    if fd.get("vae") is not None and fd.get("ae-normalized") is not None:
        report.paragraph(
            f"Does the VAE produce a different quality? Measured: Fréchet distance {fd['vae']:.1f} "
            f"for the VAE against {fd['ae']:.1f} (naive AE) and {fd['ae-normalized']:.1f} "
            f"(normalized AE); confident share {conf['vae']:.0%} against {conf['ae']:.0%} and "
            f"{conf['ae-normalized']:.0%}. The VAE's KL term pulls every code distribution "
            f"towards N(0, I) and its sampling noise makes the decoder work on whole regions "
            f"rather than points, so prior samples decode to plausible garments more reliably; "
            f"its images are blurrier, the price of the pixel-wise likelihood averaging over "
            f"what the 2-D code cannot pin down.", css_class="answer")
    gans = [k for k in by_key if by_key[k].step.model == "vae-gan"]
    if gans and fd.get("vae") is not None:
        parts = ", ".join(f"{by_key[k].step.title}: {fd[k]:.1f}" for k in gans if fd[k] is not None)
        report.paragraph(
            f"The VAE-GANs (Fréchet distance {parts}; VAE {fd['vae']:.1f}) keep the pixel-wise "
            f"BCE (in full for the encoder, down-weighted by gamma for the decoder) and add a "
            f"discriminator's judgement, which rewards sharp, realistic texture over pixel "
            f"accuracy: look for crisper samples in the side-by-side figure, and for "
            f"reconstructions that are less faithful in detail.", css_class="answer")


def _lstm_discussion(result: RecipeResult, report: Report) -> None:
    r = result.steps[0]
    hist = [h for h in read_history(r.run_dir) if h["split"] == "train"]
    if len(hist) >= 2:
        first, last = hist[0], hist[-1]
        report.heading("How the loss and the regularization term behave")
        report.paragraph(
            f"Over {len(hist)} epochs the training loss went from {float(first['loss']):.1f} to "
            f"{float(last['loss']):.1f} nats, the reconstruction term from "
            f"{float(first['recon']):.1f} to {float(last['recon']):.1f}, and the KL term from "
            f"{float(first['kl']):.1f} to {float(last['kl']):.1f}. At initialization the encoder's "
            f"q(z|x) is close to the prior, so the KL starts small; as the decoder learns to use "
            f"the code, the encoder spends more nats on it (KL rises) in exchange for a larger "
            f"fall in reconstruction error.", css_class="answer")


VAE_2D = Step("vae-2d", "MLP VAE 784-512-2", "vae", "mnist", (12, 50),
              config={"hidden_dims": [512], "latent_dim": 2}, seconds_per_epoch=3.0,
              figures=("loss_curves", "latent_scatter", "manifold", "class_grid", "samples",
                       "reconstructions", "interpolation"))

FASHION_FIGURES = ("loss_curves", "latent_scatter", "samples", "reconstructions")

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "vae-2d-mnist", "The 784-512-2 MLP VAE on MNIST",
        "A VAE with a 784-512-2 MLP encoder (mu and log sigma^2 heads), a 2-512-784 decoder, BCE "
        "plus KL, trained on the 60,000 MNIST training images: training curves, a scatter of the "
        "codes of 5000 images, a 15x15 manifold over the latent plane and a per-digit grid.",
        (VAE_2D,), QUICK_EVAL, FULL_EVAL),
    Recipe(
        "lstm-vae-mnist", "LSTM-encoder VAE with a transposed-convolution decoder on MNIST",
        "A VAE whose encoder is a single-layer LSTM reading the image as 28 rows of 28 pixels, "
        "whose decoder is transposed convolutions; BCE reconstruction plus the closed-form KL. "
        "Loss and KL curves, 100 generated images, reconstructions, metrics; the trained model "
        "stays in the run folder (model.safetensors).",
        (Step("lstm-vae", "LSTM-encoder VAE", "lstm-vae", "mnist", (3, 30),
              config={"lstm_hidden": 128, "latent_dim": 16}, seconds_per_epoch=25.0,
              figures=("loss_curves", "samples", "reconstructions", "latent_scatter", "interpolation")),),
        QUICK_EVAL, FULL_EVAL, discussion=_lstm_discussion),
    Recipe(
        "fashion-generative", "Autoencoders, a VAE and VAE-GANs as generators of Fashion-MNIST",
        "On Fashion-MNIST: an MSE autoencoder with a 2-neuron bottleneck (train/test curves, 10 "
        "reconstructions) and its naive generation from random decoder inputs; the autoencoder "
        "with a normalized bottleneck and generation from N(0, I); the VAE built from the same "
        "architecture; and the VAE-GAN (each keeping the VAE's pixel BCE): basic, with the "
        "discriminator feature loss, and convolutional. All models' samples are measured with "
        "the same domain classifier.",
        (Step("ae", "A) AE, naive generation (uniform over the code box)", "ae", "fashion-mnist", (4, 30),
              config={"hidden_dims": [512], "latent_dim": 2, "normalize_latent": False, "gen_prior": "box"},
              seconds_per_epoch=2.0, measure_seconds=40.0, figures=FASHION_FIGURES),
         Step("ae-normalized", "B) AE, normalized bottleneck, z ~ N(0, I)", "ae", "fashion-mnist", (4, 30),
              config={"hidden_dims": [512], "latent_dim": 2, "normalize_latent": True, "gen_prior": "normal"},
              seconds_per_epoch=2.0, measure_seconds=40.0, figures=FASHION_FIGURES),
         Step("vae", "VAE, same architecture", "vae", "fashion-mnist", (4, 30),
              config={"hidden_dims": [512], "latent_dim": 2}, seconds_per_epoch=2.0, measure_seconds=40.0,
              figures=FASHION_FIGURES),
         Step("vae-gan", "VAE-GAN, basic (L_prior + L_GAN + pixel BCE)", "vae-gan", "fashion-mnist", (3, 20),
              config={"arch": "mlp", "hidden_dims": [512], "latent_dim": 2, "feature_loss": False},
              seconds_per_epoch=8.0, measure_seconds=40.0, figures=FASHION_FIGURES),
         Step("vae-gan-feature", "VAE-GAN with feature loss (bonus 1)", "vae-gan", "fashion-mnist", (3, 20),
              config={"arch": "mlp", "hidden_dims": [512], "latent_dim": 2, "feature_loss": True},
              seconds_per_epoch=9.0, measure_seconds=40.0, figures=FASHION_FIGURES),
         Step("vae-gan-conv", "VAE-GAN, convolutional (bonus 2)", "vae-gan", "fashion-mnist", (2, 15),
              config={"arch": "conv", "feature_loss": True}, seconds_per_epoch=30.0, measure_seconds=60.0,
              figures=FASHION_FIGURES)),
        QUICK_EVAL, dataclasses.replace(FULL_EVAL, iw_samples=1000),
        discussion=_fashion_discussion),
)}


# ---------------------------------------------------------------------------------------------
# Running a recipe
# ---------------------------------------------------------------------------------------------


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


def estimate_seconds(recipe: Recipe, quick: bool) -> float:
    """Training time on 2 CPU cores from each step's measured seconds per epoch, plus metrics."""
    train_s = sum(s.epochs[0 if quick else 1] * s.seconds_per_epoch for s in recipe.steps)
    return train_s + sum(20 if quick else s.measure_seconds for s in recipe.steps)


def is_recipe_folder(folder: Path) -> bool:
    """A recipe's output (its recipe.json parses) or a vaelab run, such as an older `make demo`."""
    try:
        return isinstance(read_json(folder / RECIPE_FILE).get("recipe"), str)
    except (VaelabError, AttributeError):
        return is_run_folder(folder)


def prepare_out(out: Path, overwrite: bool) -> None:
    prepare_folder(out, overwrite, is_recipe_folder, "recipe")


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run_recipe(name: str, out: str | Path, quick: bool = False, overwrite: bool = False,
               progress: bool = True, device: str = "auto", data_override=None) -> RecipeResult:
    """Train, draw and measure every step of recipe `name` into `out`, then write
    `out/report.html`. `data_override` (an ImageData) replaces every dataset: tests only."""
    recipe = get_recipe(name)
    missing = sorted({s.model for s in recipe.steps} - set(MODELS))
    if missing:
        raise ConfigError(f"recipe {name} needs model(s) {', '.join(missing)}, which this build "
                          f"does not have (see `vaelab models`)")
    out = Path(out)
    # Every config is checked before anything is written or trained.
    configs = [(s, make_config(s.model, **s.config),
                TrainConfig(dataset=s.dataset, epochs=s.epochs[0 if quick else 1], device=device, **s.train))
               for s in recipe.steps]
    for _, _, tc in configs:
        tc.validate()
    prepare_out(out, overwrite)
    write_json(out / RECIPE_FILE, {"recipe": name, "quick": quick,
                                   "steps": [s.key for s in recipe.steps]})
    mode = "quick" if quick else "full"
    _log(f"recipe {name} ({mode}): {len(recipe.steps)} model(s); about "
         f"{estimate_seconds(recipe, quick) / 60:.0f} min on 2 CPU cores", progress)
    settings = recipe.quick_eval if quick else recipe.full_eval
    start = time.perf_counter()
    datasets: dict = {}
    results = []
    for step, model_config, train_config in configs:
        if step.dataset not in datasets:
            datasets[step.dataset] = data_override or load(step.dataset, quiet=not progress)
        data = datasets[step.dataset]
        _log(f"[{step.key}] training {step.model} for {train_config.epochs} epoch(s) on {data.name}", progress)
        t0 = time.perf_counter()
        train(step.model, model_config, train_config, out / step.key, progress=progress, data=data)
        train_s = time.perf_counter() - t0
        run = load_run(out / step.key)
        figures = write_run_figures(run.path, run.model, data)
        _log(f"[{step.key}] measuring", progress)
        metrics = evaluate_run(run, data, settings, progress=progress)
        results.append(StepResult(step, run.path, metrics, figures, train_s))
    result = RecipeResult(recipe, out, quick, results, datasets, time.perf_counter() - start)
    write_report(result)
    return result


def write_report(result: RecipeResult) -> Path:
    recipe = result.recipe
    report = Report(f"{recipe.title} — vaelab recipe {recipe.name}")
    report.paragraph(recipe.assignment)
    settings = recipe.quick_eval if result.quick else recipe.full_eval
    mode = ("--quick: short training and cheap metrics (IWAE with K = "
            f"{settings.iw_samples} on {settings.iw_images} test images; {settings.n_samples} "
            "samples for the classifier figures, whose Fréchet distances are therefore biased "
            "upwards against the 10,000-sample figures). Numbers show the method works, not how "
            "good the model can get; run without --quick for that."
            if result.quick else
            f"Full run: IWAE with K = {settings.iw_samples} on the first {settings.iw_images} test "
            f"images; {settings.n_samples} samples and as many real training images for the "
            f"classifier figures.")
    report.paragraph(mode, css_class="note")
    report.table(["model", "folder", "epochs", "training time", "model config"],
                 [[r.step.title, f"{r.run_dir.name}/", r.step.epochs[0 if result.quick else 1],
                   f"{r.train_seconds:.0f} s", json.dumps(r.step.config)] for r in result.steps],
                 caption=f"Total wall time {result.seconds / 60:.1f} min.")
    if recipe.discussion is not None:
        recipe.discussion(result, report)
    for r in result.steps:
        report.heading(f"{r.step.title} ({r.step.model})")
        report.table(["metric", "value"], summary_rows(r.metrics))
        if "grey-level" in r.metrics.get("likelihood_data", "") and "iwae" in r.metrics:
            report.paragraph("Likelihoods here are measured on grey-level images: " + r.metrics["likelihood_data"],
                             css_class="note")
        for key in r.step.figures:
            if key in r.figures:
                what, look_for = CAPTIONS[key]
                report.figure(r.figures[key], what, look_for)
    report.paragraph(f"Generated by vaelab {__import__('vaelab').__version__}; every run folder "
                     f"beside this file holds its config, weights, history and metrics.json.")
    return report.write(result.out / "report.html")


def describe_recipes() -> str:
    """The recipe list for `vaelab recipe --help`."""
    lines = []
    for r in RECIPES.values():
        q, f = estimate_seconds(r, True), estimate_seconds(r, False)
        lines.append(f"  {r.name:<20} {r.title} (quick ~{q / 60:.0f} min, full ~{f / 60:.0f} min)")
    return "\n".join(lines)

