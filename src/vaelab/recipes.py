"""Recipes: each reproduces one assignment as a whole — train its models, draw their figures,
measure them — and writes one self-contained `report.html`.

A recipe is data: a list of `Step`s (model name, config overrides, dataset, epochs for --quick
and for the full run) plus which figures the report shows and, where the assignment asks
questions, a function that answers them from the measured numbers. Adding a model to a recipe
is adding a `Step`.

Every sentence of a report that states or explains a result is computed by `vaelab.prose` from
this run's numbers (with their uncertainties); this module only gathers those numbers, including
the few the assignments need beyond metrics.json: whether reconstructions depend on their input,
and how the classifier reads the 100 samples a figure shows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import plots
from .checkpoint import (CHECKPOINT_FILE, CONFIG_FILE, RunSpec, config_differences, load_checkpoint, load_run,
                         load_tensors, parse_spec, read_json, read_run_config, save_tensors, write_json)
from .data import ImageData, load
from .devices import resolve_device
from .errors import ConfigError, TrainingInterrupted, VaelabError, WriteError
from .atomic import clean_stale_siblings, exchange, temp_path
from .evaluate import (ACTIVE_UNIT_THRESHOLD, METRICS_FILE, EvalSettings, evaluate_run, generate, summary_rows,
                       weights_digest)
from .explore import LatentSpace, export_page
from .figures import FIGURE_FILES, class_grid_rows, write_run_figures
from .gallery import random_test_images
from .history_files import read_history
from .inference import batched
from .losses import mse
from .metrics import (CONFIDENT, KID_SUBSET_SIZE, QUALITY_KEYS, classifier_cached, classifier_train_seconds, classify,
                      load_or_train_classifier)
from .models import MODELS, make_config
from .prose import (RECON_MSE, SAMPLE_METRICS, NLLGap, active_units_sentence, answer_basic_vaegan,
                    answer_naive_vs_normalized, answer_vae_quality, answer_vaegan_variant, combined_se,
                    comment_on_class_grid, comment_on_samples, comparison_details, describe_training,
                    figure_caption, input_dependence,
                    join, latent_size_note, leaders, nll_against_paper, nll_ordering, training_length_note,
                    verdict, verdict_sentence, with_uncertainty)
from .report import Report, Table
from .run_folder import check_target, is_run_folder, prepare_folder
from .runtime import idle_cores, physical_cores
from .train import resume as resume_run
from .train import train
from .train_config import TrainConfig
from .version import __version__

RECIPE_FILE = "recipe.json"
# Per-image IWAE NLLs behind a step's metrics.json mean, for paired comparisons between steps
# (kept so a resumed recipe compares as the uninterrupted one does).
PER_IMAGE_FILE = "iwae_per_image.safetensors"


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
    # The model's name in the report's sentences; "{latent_dim}" is filled from its metrics.
    short: str = ""
    # Also write the latent-space explorer (`vaelab explore RUN --export`) beside the report and
    # embed it there.
    explore: bool = False


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

    def step(self, key: str) -> Step:
        for s in self.steps:
            if s.key == key:
                return s
        raise ConfigError(f"recipe {self.name} has no step {key!r}; its steps: {', '.join(s.key for s in self.steps)}")


@dataclass
class StepResult:
    step: Step
    run_dir: Path
    metrics: dict
    figures: dict[str, Path]
    train_seconds: float
    prior: str = "N(0, I)"  # what the generator draws codes from, in words (the model's prior_name)
    # Facts a discussion measured beyond metrics.json, for the captions (e.g. "input_dependent").
    facts: dict = field(default_factory=dict)
    # Comments a discussion computed for a figure, shown under it: figure key -> paragraphs.
    notes: dict[str, list[str]] = field(default_factory=dict)
    explore_page: Path | None = None  # the exported explorer, beside report.html


@dataclass
class RecipeResult:
    recipe: Recipe
    out: Path
    quick: bool
    steps: list[StepResult]
    datasets: dict[str, ImageData] = field(default_factory=dict)  # dataset name -> data used
    seconds: float = 0.0
    resumed: bool = False  # made by `--resume`: `seconds` is that last invocation's alone


# ---------------------------------------------------------------------------------------------
# Numbers the report's sentences are computed from
# ---------------------------------------------------------------------------------------------

# Terms of a model's own loss that the per-model table leaves out: bookkeeping (the fraction of
# steps each VAE-GAN network trained is not a test metric), or quantities the table already has
# under another name (an AE's loss and recon are its reconstruction MSE; a VAE's loss, recon and
# kl are the negative ELBO and its parts).
BOOKKEEPING_TERMS = frozenset({"dec_updated", "dis_updated"})
TERMS_SHOWN_ELSEWHERE = {"with_elbo": frozenset({"recon", "kl"}), "ae": frozenset({"loss", "recon"})}


def table_metrics(metrics: dict, config: dict | None = None) -> dict:
    """`metrics` with the test terms the per-model table should show: one row per quantity.
    `config`: the model's config (its config.json "model_config"), where it decides what a term is."""
    terms = dict(metrics.get("test_terms", {}))
    config = config or {}
    drop = set(BOOKKEEPING_TERMS)
    if "elbo" in metrics:
        drop |= TERMS_SHOWN_ELSEWHERE["with_elbo"]
        # loss = recon + kl: the negative ELBO again; not so for IWAE training, whose loss is -L_k
        if set(terms) <= {"loss", "recon", "kl"} and config.get("iwae_k", 1) == 1:
            drop.add("loss")
        if "dis_loss" in terms:  # a VAE-GAN
            drop.add("loss")  # enc_loss + dis_loss, both listed
            if not config.get("feature_loss", False):
                drop.add("feature")  # not a term of this model (always 0)
            if config.get("objective") == "basic":
                drop.add("enc_loss")  # L_prior alone: the KL
            elif not config.get("feature_loss", False) and config.get("pixel_weight", 1.0) == 1.0:
                drop.add("enc_loss")  # KL + BCE: the negative ELBO
    elif set(terms) <= {"loss", "recon"}:
        drop |= TERMS_SHOWN_ELSEWHERE["ae"]
    return {**metrics, "test_terms": {k: v for k, v in terms.items() if k not in drop}}


def model_config(r: StepResult) -> dict:
    """The run's whole model config (defaults included), or the step's overrides if unreadable."""
    try:
        return read_run_config(r.run_dir)["model_config"]
    except VaelabError:
        return dict(r.step.config)


def samples_quality(metrics: dict) -> dict | None:
    return metrics.get("sample_quality", {}).get("samples")


def short_name(r: StepResult) -> str:
    return r.step.short.format(latent_dim=r.metrics.get("latent_dim", "?")) if r.step.short else r.step.title


@torch.inference_mode()
def reconstruction_dependence(model, images: torch.Tensor, batch: int = 500) -> tuple[float, float, float]:
    """Whether reconstructions depend on their input: the mean per-pixel squared error of each
    reconstruction to its own image and to another image (its neighbour in `images`, which
    should be in random order), and the standard error of their paired difference."""
    recon = batched(lambda x: model.reconstruct(x).float(), images, batch_size=batch, device=model.device)
    own = mse(recon, images)  # (N,)
    other = mse(recon, images.roll(1, 0))  # (N,): reconstruction i against image i - 1
    gap = (other - own).double()
    se = gap.std().item() / math.sqrt(len(gap)) if len(gap) > 1 else float("nan")
    return own.mean().item(), other.mean().item(), se


def classify_figure_samples(model, data: ImageData, seed: int = 0, n: int = 100,
                            threshold: float = CONFIDENT) -> tuple[list[int], list[int]]:
    """Classify the n samples the run's samples figure shows (same seed, so the same images):
    per class, how many samples it is the most probable class of, and how many of those with
    probability > threshold."""
    clf, _ = load_or_train_classifier(data, device=model.device)
    _, probs = classify(clf, generate(model, n, seed=seed))
    conf, best = probs.max(1)
    c = probs.shape[1]
    return (torch.bincount(best, minlength=c).tolist(),
            torch.bincount(best[conf > threshold], minlength=c).tolist())


def caption(r: StepResult, key: str, item: str) -> tuple[str, str] | None:
    m = r.metrics
    return figure_caption(key, latent_dim=int(m["latent_dim"]), variational="elbo" in m, prior=r.prior,
                          recon_mse=m.get("recon_mse"), item=item,
                          active_units=m.get("latent", {}).get("active_units"),
                          input_dependent=r.facts.get("input_dependent"),
                          adversarial="dis_loss" in m.get("test_terms", {}),
                          scatter_images=r.facts.get("scatter_images", SCATTER_IMAGES))


ITEMS = {"mnist": "digit", "fashion-mnist": "garment"}
SCATTER_IMAGES = 5000  # test images in a run's latent scatter (all of them where there are fewer)


# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------

QUICK_EVAL = EvalSettings(iw_samples=100, iw_images=500, n_samples=2000)
# Full recipes average the NLL over the first 2000 test images to keep their stated run times
# (several models each); `vaelab evaluate RUN` gives the whole test set.
FULL_EVAL = EvalSettings(iw_images=2000)


# ---------------------------------------------------------------------------------------------
# The assignments' answers, each a function of measured steps: the report writes them, and the
# example notebooks (examples/) print them under the question they answer.
# ---------------------------------------------------------------------------------------------


def training_comment(r: StepResult) -> str | None:
    """How the loss, the reconstruction and the KL terms moved from the first epoch to the last
    (train means, with the test loss of the last), with the reading that fits; None for a run of
    one epoch, or a model without those terms."""
    history = read_history(r.run_dir)
    train_rows = [h for h in history if h["split"] == "train"]
    test_rows = [h for h in history if h["split"] == "test"]
    if len(train_rows) < 2 or not {"loss", "recon", "kl"} <= set(train_rows[0]):
        return None
    peak = max(train_rows, key=lambda h: float(h["kl"]))
    return describe_training(train_rows[0], train_rows[-1], len(train_rows), kl_peak=(peak["epoch"], float(peak["kl"])),
                             test_last=test_rows[-1] if test_rows else None)


def samples_comment(r: StepResult, data: ImageData) -> str:
    """A comment on the 100 samples of the run's samples figure from their classification by the
    domain classifier: how many are recognisable, which classes come out more or less often than
    chance explains, whether these 100 are typical of the metrics' larger draw."""
    model = load_run(r.run_dir).model.eval()
    predicted, confident = classify_figure_samples(model, data)
    shares = (torch.bincount(data.train_y, minlength=len(data.classes)).double() / len(data.train_y)).tolist()
    return comment_on_samples(predicted, confident, list(data.classes), shares, CONFIDENT,
                              ITEMS.get(data.name, "image"), population=samples_quality(r.metrics))


@torch.inference_mode()
def classify_class_grid(model, data: ImageData, per_class: int = 5, seed: int = 0,
                        threshold: float = CONFIDENT) -> tuple[list[list[int]], list[list[bool]]]:
    """Classify the images of the run's per-class grid (the same seed, so the same images): per
    row, each image's most probable class and whether its probability exceeds `threshold`."""
    rows, _ = class_grid_rows(model, data, per_class, seed)
    clf, _ = load_or_train_classifier(data, device=model.device)
    _, probs = classify(clf, torch.cat(rows))
    conf, best = probs.max(1)
    sizes = [len(row) for row in rows]
    return ([b.tolist() for b in best.split(sizes)], [(c > threshold).tolist() for c in conf.split(sizes)])


def class_grid_comment(r: StepResult, data: ImageData) -> str:
    """Whether each row of the run's per-class grid shows its class, as the domain classifier
    reads the grid's images."""
    best, sure = classify_class_grid(load_run(r.run_dir).model.eval(), data)
    return comment_on_class_grid(best, sure, list(data.classes), CONFIDENT, ITEMS.get(data.name, "image"))


def summary_table(r: StepResult) -> Table:
    """Every metric of one step, one row per quantity (the per-model table of the report)."""
    return Table(["metric", "value"], summary_rows(table_metrics(r.metrics, model_config(r))))


def comparison_table(results: Sequence[StepResult]) -> Table:
    """Every model's sample quality, reconstruction error and likelihoods, side by side, with the
    real training images' sample quality as the floor."""
    rows = []
    for r in results:
        q = samples_quality(r.metrics)
        iw = r.metrics.get("iwae")
        rows.append([short_name(r), r.metrics["latent_dim"],
                     *(with_uncertainty(m, q) for m in SAMPLE_METRICS),
                     f"{r.metrics['recon_mse']:.4f}",
                     f"{r.metrics['elbo']['neg_elbo']:.1f}" if "elbo" in r.metrics else "—",
                     f"{iw['nll']:.1f} ± {iw['se']:.1f}" if iw else "—"])
    floor = results[0].metrics.get("sample_quality", {}).get("real_train") if results else None
    if floor:
        rows.append(["real training images (the floor)", "—", *(with_uncertainty(m, floor) for m in SAMPLE_METRICS),
                     "—", "—", "—"])
    return Table(["model", "latent dim", *(f"{m.label} {m.arrow}" for m in SAMPLE_METRICS),
                  f"{RECON_MSE.label} {RECON_MSE.arrow}", "neg. ELBO (nats)", "IWAE NLL (nats)"], rows,
                 "Every model measured the same way: samples from its generator scored by the "
                 "domain classifier; reconstructions and likelihoods on the test set. "
                 "± : the standard error for precision, recall, coverage and confident share; the "
                 "bootstrap standard deviation for FD; the standard deviation over "
                 f"{KID_SUBSET_SIZE}-image subsets for KID (larger than the standard error "
                 "of their mean, so a cautious yardstick).")


def comparison_summary(results: Sequence[StepResult]) -> tuple[str | None, str | None]:
    """(which model leads on each sample metric, a warning where the latent sizes differ); each
    None where there is nothing to say."""
    lead = leaders(SAMPLE_METRICS, {short_name(r): samples_quality(r.metrics) for r in results})
    return lead, latent_size_note({short_name(r): r.metrics["latent_dim"] for r in results})


DEPENDENCE_IMAGES = 1000  # random test images the input-dependence check reconstructs


def input_dependence_of(r: StepResult, data: ImageData) -> tuple[bool, str]:
    """Whether the step's reconstructions depend on their input at all, and the sentence saying
    so: measured once on DEPENDENCE_IMAGES random test images (the same for every step) and kept
    in `r.facts`, where the figure captions read it."""
    if "dependence" not in r.facts:
        probe = random_test_images(data.test_x, DEPENDENCE_IMAGES, 1, "cpu")
        model = load_run(r.run_dir).model.eval()
        r.facts["dependence"] = reconstruction_dependence(model, probe)
        depends, sentence = input_dependence(short_name(r), *r.facts["dependence"])
        r.facts["input_dependent"], r.facts["dependence_sentence"] = depends, sentence
    return r.facts["input_dependent"], r.facts["dependence_sentence"]


def dependence_table(results: Sequence[StepResult], data: ImageData) -> Table:
    """Each model's reconstructions against their own images and against other test images."""
    for r in results:
        input_dependence_of(r, data)
    return Table(["model", "MSE to its own image ↓", "MSE to another test image", "own ÷ other",
                  "depends on the input"],
                 [[short_name(r), f"{o:.4f}", f"{t:.4f}", f"{o / t:.0%}" if t > 0 else "—",
                   "yes" if r.facts["input_dependent"] else "no"]
                  for r in results for o, t, _ in [r.facts["dependence"]]],
                 f"Each model's reconstructions of {min(DEPENDENCE_IMAGES, len(data.test_x))} random test images, "
                 f"compared with their own images and with another test image. 'yes' where the first is smaller "
                 f"by more than 2 standard errors of the paired difference.")


def side_by_side_figures(results: Sequence[StepResult], data: ImageData, fig_dir: Path) -> list[tuple[Path, str, str]]:
    """10 samples of every model, one row each, and the same 10 test images reconstructed by every
    model, into `fig_dir`: [(path, what it shows, what to look for)]."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    models = [load_run(r.run_dir).model.eval() for r in results]
    names = [short_name(r) for r in results]
    rows = [generate(m, 10, seed=0) for m in models]
    samples = plots.plot_image_rows(rows, names, fig_dir / "samples_side_by_side.png",
                                    title="10 samples from each model's generator")
    x = random_test_images(data.test_x, 10, 0, "cpu")
    rows = [x] + [m.reconstruct(x.to(m.device)).cpu() for m in models]
    recon = plots.plot_image_rows(rows, ["original", *names], fig_dir / "reconstructions_side_by_side.png",
                                  title="The same 10 test images reconstructed by each model")
    look = "which models keep each garment's type and silhouette and which keep its details."
    for r in results:
        if not input_dependence_of(r, data)[0]:
            inactive = r.metrics.get("latent", {}).get("active_units") == 0
            look += (f" {short_name(r)}'s reconstructions do not depend on the input (table above): "
                     + ("no latent dimension is active, so every input gets the same code mean "
                        "and its row repeats one image." if inactive else
                        "its row shows images unrelated to the originals."))
    return [(samples, "10 generated images per model, one model per row.",
             "the naive autoencoder's samples against the normalized one's, and the VAE and "
             "VAE-GANs against both: recognizable garments, sharpness, variety."),
            (recon, "10 random test images (top row) and their reconstruction by each model.", look)]


QUESTION_A_VS_B = (
    "Are the images of A) (uniform draws over the box spanned by the plain autoencoder's training "
    "codes) and B) (N(0, I) draws into the normalized bottleneck) different?")
QUESTION_VAE_QUALITY = "Does the VAE produce a different quality?"


def answer_a_vs_b(a: StepResult, b: StepResult, quick: bool) -> str:
    """QUESTION_A_VS_B answered from A's and B's sample quality."""
    v = verdict(SAMPLE_METRICS, short_name(a), samples_quality(a.metrics), short_name(b), samples_quality(b.metrics))
    return f"Measured: {comparison_details(v)} {answer_naive_vs_normalized(v, quick, a.metrics['latent_dim'])}"


def answer_vae_vs_autoencoders(vae: StepResult, a: StepResult, b: StepResult, quick: bool) -> str:
    """QUESTION_VAE_QUALITY answered from the VAE's sample quality and reconstruction error
    against the two autoencoders'."""
    q = samples_quality(vae.metrics)
    vs_a = verdict(SAMPLE_METRICS, short_name(vae), q, short_name(a), samples_quality(a.metrics))
    vs_b = verdict(SAMPLE_METRICS, short_name(vae), q, short_name(b), samples_quality(b.metrics))
    mses = {short_name(r): r.metrics.get("recon_mse") for r in (vae, a, b)}
    return answer_vae_quality(vs_a, vs_b, mses, quick)


def answer_vaegan_vs_vae(gan: StepResult, vae: StepResult, data: ImageData, quick: bool) -> str:
    """What a VAE-GAN produces against the VAE: its samples' quality, its discriminator's
    accuracies, and for the basic objective (no reconstruction term) whether its reconstructions
    depend on their input at all."""
    name = short_name(gan)
    v = verdict(SAMPLE_METRICS, name, samples_quality(gan.metrics), short_name(vae), samples_quality(vae.metrics))
    terms = gan.metrics.get("test_terms", {})
    acc = (terms.get("dis_acc_real"), terms.get("dis_acc_fake"))
    depends, sentence = input_dependence_of(gan, data)
    if gan.step.config.get("objective") == "basic":
        text = answer_basic_vaegan(name, depends, sentence, gan.metrics.get("elbo", {}).get("kl"), short_name(vae),
                                   vae.metrics.get("elbo", {}).get("kl"), gan.metrics.get("recon_mse"),
                                   vae.metrics.get("recon_mse"))
        return text + f" Its samples against the VAE's: {answer_vaegan_variant(v, acc, quick)}"
    differences = []
    if gan.metrics.get("latent_dim") != vae.metrics.get("latent_dim"):
        differences.append(f"a {gan.metrics.get('latent_dim')}-D latent against {vae.metrics.get('latent_dim')}")
    if gan.step.config.get("arch", "conv") != "mlp":
        differences.append("convolutional networks against the VAE's MLP")
    text = f"{name} against the VAE: {answer_vaegan_variant(v, acc, quick, differences)}"
    return text if depends else f"{text} {sentence}"


def answer_latent_sizes(a: StepResult, b: StepResult) -> str:
    """The same model at two latent sizes: which samples measure better, and the caveat that
    the comparison is not like-for-like."""
    v = verdict(SAMPLE_METRICS, short_name(a), samples_quality(a.metrics), short_name(b), samples_quality(b.metrics))
    note = latent_size_note({short_name(a): a.metrics["latent_dim"], short_name(b): b.metrics["latent_dim"]})
    return f"{verdict_sentence(v)} {note or ''}"


METRICS_EXPLAINED = (
    "Fréchet distance and KID: between the classifier's features (its pooled last convolutional "
    "stage and its hidden layer) of the model's samples and of the test images (0 = "
    "indistinguishable feature statistics; real training images give the floor). Precision: the "
    "share of samples that fall within the real images' feature manifold (fidelity); recall: the "
    "share of real images within the samples' manifold (variety). A sample counts as inside when "
    "it is near any one real image, so samples crowded onto a few real images can score a high "
    "precision with a recall near 0: read the two together. Coverage: the share of real images "
    "with a sample near them (within the distance to their 5th-nearest real neighbour); unlike "
    "recall, which stray samples far from every real image raise, it counts only samples near real "
    "ones. Confident share: samples the "
    "classifier assigns to one class with probability > 0.9. The likelihoods are on grey-level "
    "images, so they compare the VAEs here but not with binarized-MNIST numbers elsewhere. A "
    "difference is called clear only beyond 2 combined standard errors.")


def _fashion_discussion(result: RecipeResult, report: Report) -> None:
    """The comparison table, the side-by-side images and the answers to the assignment's
    questions, every sentence computed from the measured numbers."""
    by_key = {r.step.key: r for r in result.steps}
    report.heading("Comparison of every model")
    report.table(*comparison_table(result.steps))
    lead, note = comparison_summary(result.steps)
    if lead:
        report.paragraph(lead)
    if note:
        report.paragraph(note, css_class="note")
    report.paragraph(METRICS_EXPLAINED)
    data = result.datasets[result.steps[0].step.dataset]

    report.heading("Do the reconstructions depend on the input?", level=3)
    report.table(*dependence_table(result.steps, data))
    for path, what, look in side_by_side_figures(result.steps, data, result.out / "figures"):
        report.figure(path, what, look)

    report.heading("Answers to the assignment's questions")
    if "ae" in by_key and "ae-normalized" in by_key:
        report.paragraph(f"{QUESTION_A_VS_B} "
                         f"{answer_a_vs_b(by_key['ae'], by_key['ae-normalized'], result.quick)}",
                         css_class="answer")
    if {"vae", "ae", "ae-normalized"} <= set(by_key):
        answer = answer_vae_vs_autoencoders(by_key["vae"], by_key["ae"], by_key["ae-normalized"], result.quick)
        report.paragraph(f"{QUESTION_VAE_QUALITY} {answer}", css_class="answer")
    gans = [r for r in result.steps if r.step.model == "vae-gan"]
    if gans and "vae" in by_key:
        report.paragraph(
            "The VAE-GANs against the VAE (the same MLP architecture and 2-D latent unless the "
            "table says otherwise):", css_class="answer")
        for r in gans:
            report.paragraph(answer_vaegan_vs_vae(r, by_key["vae"], data, result.quick), css_class="answer")
        convs = [r for r in gans if r.step.config.get("arch") == "conv"]
        if len(convs) == 2:
            report.paragraph(f"The convolutional VAE-GAN at two latent sizes: {answer_latent_sizes(*convs)}",
                             css_class="answer")


def _lstm_discussion(result: RecipeResult, report: Report) -> None:
    r = result.steps[0]
    text = training_comment(r)
    if text is not None:
        report.heading("How the loss and the regularization term behave")
        report.paragraph(text, css_class="answer")
    data = result.datasets.get(r.step.dataset)
    if data is not None and "samples" in r.figures:
        r.notes.setdefault("samples", []).append("Comment on the performance: " + samples_comment(r, data))


def _vae_2d_discussion(result: RecipeResult, report: Report) -> None:
    """The training curves and the per-digit grid read from the numbers: how the terms moved, and
    whether the classifier reads each row of the grid as its digit."""
    r = result.steps[0]
    text = training_comment(r)
    if text is not None:
        r.notes.setdefault("loss_curves", []).append(text)
    data = result.datasets.get(r.step.dataset)
    if data is not None and "class_grid" in r.figures and r.metrics.get("classifier"):
        r.notes.setdefault("class_grid", []).append(class_grid_comment(r, data))

VAE_2D = Step("vae-2d", "MLP VAE 784-512-2", "vae", "mnist", (12, 50),
              config={"hidden_dims": [512], "latent_dim": 2}, seconds_per_epoch=3.0,
              figures=("loss_curves", "latent_scatter", "manifold", "class_grid", "samples",
                       "reconstructions", "interpolation"), explore=True)

FASHION_FIGURES = ("loss_curves", "latent_scatter", "samples", "reconstructions")

# Burda et al. 2016, section 5: the one-stochastic-layer networks, 784-200-200-50 with tanh, and
# a Bernoulli decoder mirroring the encoder; trained on dynamically binarised MNIST with Adam
# (beta 0.9, 0.999) in batches of 20.
BURDA_MLP = {"hidden_dims": [200, 200], "latent_dim": 50, "activation": "tanh"}
# Their table 1 (MNIST, one stochastic layer): step key -> (test NLL, the IWAE estimate with
# K = 5000; active units), each model after 3^i passes at each of 8 rates, i = 0..7: 3280 passes.
BURDA_TABLE = {"vae": (86.76, 19), "iwae-5": (85.54, 22), "iwae-50": (84.78, 25)}
BURDA_PASSES = 3280
NLL_TARGET_BAND = 1.5  # nats: the target for each reproduced NLL
LIKELIHOOD_QUICK_EVAL = EvalSettings(iw_samples=100, iw_images=500, n_samples=0)
LIKELIHOOD_FULL_EVAL = EvalSettings(iw_samples=5000, iw_images=10000, n_samples=0)


def _likelihood_step(key: str, title: str, k: int, epochs: tuple[int, int], seconds_per_epoch: float,
                     measure_seconds: float) -> Step:
    """One model of the likelihood table. The paper's schedule is 3280 passes at a rate falling
    tenfold in 8 steps (1e-3 * 10^(-i/7) for 3^i passes, i = 0..7); a full run here has a small
    fraction of those passes, so its rate falls tenfold over its own length, smoothly: 1e-3 *
    lr_decay^(e-1) in epoch e, 1e-4 in the last."""
    decay = 0.1 ** (1 / (epochs[1] - 1))
    return Step(key, title, "vae", "mnist", epochs, config={**BURDA_MLP, "iwae_k": k},
                train={"binarize": "dynamic", "batch_size": 20, "lr": 1e-3, "lr_decay": round(decay, 6)},
                seconds_per_epoch=seconds_per_epoch, measure_seconds=measure_seconds,
                figures=("loss_curves", "samples", "reconstructions"), short=title)


def nll_gap(a: StepResult, b: StepResult, paper_diff: float) -> NLLGap:
    """b's IWAE NLL minus a's with its standard error: from the per-image differences where both
    were measured on the same images with the same K (the estimates of two models on one image are
    correlated, so this is far tighter than the two errors combined), else combined."""
    ia, ib = a.metrics["iwae"], b.metrics["iwae"]
    va, vb = a.facts.get("nll_per_image"), b.facts.get("nll_per_image")
    if (va is not None and vb is not None and len(va) == len(vb) == ia["images"] == ib["images"] > 1
            and ia["k"] == ib["k"]):
        d = (vb - va).double()
        return NLLGap(short_name(a), short_name(b), d.mean().item(), d.std().item() / math.sqrt(len(d)), True,
                      paper_diff)
    return NLLGap(short_name(a), short_name(b), ib["nll"] - ia["nll"], combined_se(ia.get("se"), ib.get("se")),
                  False, paper_diff)


def _likelihood_discussion(result: RecipeResult, report: Report) -> None:
    """Burda et al.'s table beside this run's: the NLLs against the paper's and the 1.5-nat
    target, the ordering across k with paired standard errors, the active units, the training
    length, and the test curves of every model in one figure."""
    steps = [r for r in result.steps if "iwae" in r.metrics and r.step.key in BURDA_TABLE]
    if not steps:
        return
    report.heading("The likelihood table (Burda et al. 2016, table 1, one stochastic layer)")
    rows, sentences, statuses = [], [], []
    word = {"within": "yes", "outside": "no", "edge": "at the border"}
    for r in steps:
        paper_nll, paper_units = BURDA_TABLE[r.step.key]
        iw, lat = r.metrics["iwae"], r.metrics.get("latent", {})
        status, sentence = nll_against_paper(short_name(r), iw["nll"], iw.get("se"), paper_nll, NLL_TARGET_BAND)
        statuses.append(status)
        sentences.append(sentence)
        bound = r.metrics.get("test_terms", {}).get("loss")
        rows.append([short_name(r), r.step.config.get("iwae_k", 1), r.step.epochs[0 if result.quick else 1],
                     f"{iw['nll']:.2f} ± {iw['se']:.2f}", f"{paper_nll:.2f}", f"{iw['nll'] - paper_nll:+.2f}",
                     word[status], f"{lat.get('active_units', '—')} / {paper_units}",
                     "—" if bound is None else f"{bound:.2f}", f"{r.metrics['elbo']['neg_elbo']:.2f}"])
    iw0 = steps[0].metrics["iwae"]
    report.table(["model", "k", "epochs", "test NLL (nats)", "paper", "difference", f"within {NLL_TARGET_BAND:g} nats",
                  "active units / paper", "test −L_k", "test −ELBO"], rows,
                 caption=f"NLL: the IWAE estimate with K = {iw0['k']:,} importance samples per image on "
                         f"{iw0['images']:,} test images ({steps[0].metrics.get('likelihood_data', '')}), ± its "
                         f"standard error over images; the paper's: K = 5000 on the 10,000 test images after "
                         f"{BURDA_PASSES:,} passes. −L_k: each model's own training bound on the test set "
                         f"after its last epoch (k = 1: the negative ELBO; on the per-epoch evaluation's own "
                         f"binarisation of the test set, so at k = 1 it differs from the next column by that "
                         f"draw); −ELBO: the single-sample negative ELBO. Active units: "
                         f"Var over the test images of the posterior mean > {ACTIVE_UNIT_THRESHOLD:g}, of "
                         f"{steps[0].metrics['latent_dim']}.")
    schedules = []
    for r in steps:
        t, epochs = r.step.train, r.step.epochs[0 if result.quick else 1]
        lr, decay = t.get("lr", 1e-3), t.get("lr_decay", 1.0)
        schedules.append(f"{short_name(r)} {epochs} epoch{'s' if epochs != 1 else ''} from {lr:g} to "
                         f"{lr * decay ** (epochs - 1):.2g} (lr_decay {decay:g})")
    batches = sorted({r.step.train.get("batch_size", 128) for r in steps})
    binarize = sorted({r.step.train.get("binarize", "none") for r in steps})
    images = "dynamically binarised images" if binarize == ["dynamic"] else f"images (binarize: {join(binarize)})"
    report.paragraph(f"Training: Adam in batches of {join(map(str, batches))} on {images}, the rate in epoch e "
                     f"the initial rate times lr_decay^(e−1): {'; '.join(schedules)}.", css_class="note")
    n_within = statuses.count("within")
    report.paragraph(f"{n_within} of {len(steps)} model{'s' if len(steps) != 1 else ''} within the "
                     f"{NLL_TARGET_BAND:g}-nat target. " + " ".join(sentences), css_class="answer")
    gaps = [nll_gap(a, b, BURDA_TABLE[b.step.key][0] - BURDA_TABLE[a.step.key][0])
            for a, b in zip(steps, steps[1:])]
    if gaps:
        report.paragraph(nll_ordering(gaps), css_class="answer")
    units = [r.metrics.get("latent", {}).get("active_units") for r in steps]
    if all(u is not None for u in units):
        report.paragraph(active_units_sentence([short_name(r) for r in steps], units,
                                               [BURDA_TABLE[r.step.key][1] for r in steps],
                                               int(steps[0].metrics["latent_dim"]), ACTIVE_UNIT_THRESHOLD),
                         css_class="answer")
    report.paragraph(training_length_note([short_name(r) for r in steps],
                                          [r.step.epochs[0 if result.quick else 1] for r in steps], BURDA_PASSES),
                     css_class="answer")

    curves: dict[str, dict] = {"bound": {}, "elbo": {}}
    for r in steps:
        test = [h for h in read_history(r.run_dir) if h["split"] == "test"]
        if test:
            epochs = [h["epoch"] for h in test]
            curves["bound"][short_name(r)] = (epochs, [float(h["loss"]) for h in test])
            curves["elbo"][short_name(r)] = (epochs, [float(h["recon"]) + float(h["kl"]) for h in test])
    if curves["bound"]:
        fig_dir = result.out / "figures"
        fig_dir.mkdir(exist_ok=True)
        path = plots.plot_series(
            [("test −L_k, each model's training objective", "nats", curves["bound"]),
             ("test negative ELBO (reconstruction + KL)", "nats", curves["elbo"])],
            fig_dir / "likelihood_curves.png", "Test curves of the likelihood table's models",
            levels={short_name(r): BURDA_TABLE[r.step.key][0] for r in steps})
        report.figure(path, "Each model's test bound −L_k (left; the dashed lines: the paper's NLL for the model "
                            "of that colour) and its negative ELBO (right), after every epoch; the test images "
                            "binarised with one fixed draw per evaluation.",
                      "the bounds still falling at the last epoch mean more training would help; the IWAE's "
                      "bound lies below its own ELBO by what the extra samples gain, and its ELBO can be "
                      "worse than the VAE's while its likelihood is better.")

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "vae-2d-mnist", "The 784-512-2 MLP VAE on MNIST",
        "A VAE with a 784-512-2 MLP encoder (mu and log sigma^2 heads), a 2-512-784 decoder, BCE "
        "plus KL, trained on the 60,000 MNIST training images: training curves, a scatter of the "
        "codes of 5000 images, a 15x15 manifold over the latent plane and a per-digit grid.",
        (VAE_2D,), QUICK_EVAL, FULL_EVAL, discussion=_vae_2d_discussion),
    Recipe(
        "lstm-vae-mnist", "LSTM-encoder VAE with a transposed-convolution decoder on MNIST",
        "A VAE whose encoder is a single-layer LSTM reading the image as 28 rows of 28 pixels, "
        "whose decoder is transposed convolutions; BCE reconstruction plus the closed-form KL. "
        "Loss and KL curves, 100 generated images, reconstructions, metrics; the trained model "
        "stays in the run folder (model.safetensors).",
        (Step("lstm-vae", "LSTM-encoder VAE", "lstm-vae", "mnist", (3, 30),
              config={"lstm_hidden": 128, "latent_dim": 16}, seconds_per_epoch=25.0, measure_seconds=960.0,
              figures=("loss_curves", "samples", "reconstructions", "latent_scatter", "interpolation"),
              short="LSTM VAE"),),
        QUICK_EVAL, FULL_EVAL, discussion=_lstm_discussion),
    Recipe(
        "fashion-generative", "Autoencoders, a VAE and VAE-GANs as generators of Fashion-MNIST",
        "On Fashion-MNIST: A) an MSE autoencoder with a 2-neuron bottleneck (train/test curves, 10 "
        "reconstructions) and its naive generation from random decoder inputs (uniform over the "
        "box its training codes span); B) the autoencoder with a normalized bottleneck (each code "
        "neuron mean 0, variance 1) and generation from N(0, I); the VAE built from the same "
        "architecture; and the VAE-GAN: the assignment's basic objective L = L_prior + L_GAN (no "
        "reconstruction term), the VAE-GAN that adds the pixel BCE, the one that adds the "
        "discriminator feature loss (bonus 1), and the convolutional one (bonus 2), with the same "
        "2-D latent as the others and with its default latent size; each VAE-GAN generates from "
        "p(z) = N(0, I), as the assignment asks. Every model's samples are "
        "measured with the same domain classifier and every answer below is computed from those "
        "measurements.",
        (Step("ae", "A) AE, naive generation (uniform over the code box)", "ae", "fashion-mnist", (4, 30),
              config={"hidden_dims": [512], "latent_dim": 2, "normalize_latent": False, "gen_prior": "box"},
              seconds_per_epoch=2.0, measure_seconds=40.0, figures=FASHION_FIGURES, short="A"),
         Step("ae-normalized", "B) AE, normalized bottleneck, z ~ N(0, I)", "ae", "fashion-mnist", (4, 30),
              config={"hidden_dims": [512], "latent_dim": 2, "normalize_latent": True, "gen_prior": "normal"},
              seconds_per_epoch=2.0, measure_seconds=40.0, figures=FASHION_FIGURES, short="B"),
         Step("vae", "VAE, same architecture", "vae", "fashion-mnist", (4, 30),
              config={"hidden_dims": [512], "latent_dim": 2}, seconds_per_epoch=2.0, measure_seconds=40.0,
              figures=FASHION_FIGURES, short="VAE"),
         # Every VAE-GAN here draws from p(z) = N(0, I), as the assignment asks ("generate 10 images
         # from p(z)"); vaelab's default draws from a mixture fitted to the codes (docs/vae-gan.md).
         Step("vae-gan-basic", "VAE-GAN, basic: L = L_prior + L_GAN", "vae-gan", "fashion-mnist", (3, 20),
              config={"arch": "mlp", "hidden_dims": [512], "latent_dim": 2, "objective": "basic", "fakes": "both",
                      "gen_prior": "normal"},
              seconds_per_epoch=8.0, measure_seconds=40.0, figures=FASHION_FIGURES, short="basic VAE-GAN"),
         Step("vae-gan", "VAE-GAN with the pixel BCE: L_prior + L_GAN + BCE", "vae-gan", "fashion-mnist", (3, 20),
              config={"arch": "mlp", "hidden_dims": [512], "latent_dim": 2, "feature_loss": False, "fakes": "both",
                      "gen_prior": "normal"},
              seconds_per_epoch=8.0, measure_seconds=40.0, figures=FASHION_FIGURES, short="pixel VAE-GAN"),
         Step("vae-gan-feature", "VAE-GAN with feature loss (bonus 1): L_prior + L_GAN + BCE + L_Dis_l",
              "vae-gan", "fashion-mnist", (3, 20),
              config={"arch": "mlp", "hidden_dims": [512], "latent_dim": 2, "feature_loss": True, "fakes": "both",
                      "gen_prior": "normal"},
              seconds_per_epoch=9.0, measure_seconds=40.0, figures=FASHION_FIGURES, short="feature VAE-GAN"),
         # The conv default (dec_hidden=1024) measured on one thread at load 2.5: 263 ms a step of
         # 128 (123 s for an epoch's 469 steps) and 2.4 images/s for the IWAE with K = 1000 (830 s
         # for 2000 images); the figures below assume 2 idle cores do both about 1.6x as fast.
         Step("vae-gan-conv-2d", "VAE-GAN, convolutional (bonus 2), 2-D latent like the others", "vae-gan",
              "fashion-mnist", (2, 10), config={"arch": "conv", "latent_dim": 2, "gen_prior": "normal"},
              seconds_per_epoch=80.0, measure_seconds=520.0, figures=FASHION_FIGURES,
              short="conv VAE-GAN (latent {latent_dim})"),
         Step("vae-gan-conv", "VAE-GAN, convolutional (bonus 2), its default latent size", "vae-gan",
              "fashion-mnist", (2, 10), config={"arch": "conv", "gen_prior": "normal"}, seconds_per_epoch=80.0,
              measure_seconds=520.0, figures=FASHION_FIGURES, short="conv VAE-GAN (latent {latent_dim})")),
        QUICK_EVAL, dataclasses.replace(FULL_EVAL, iw_samples=1000),
        discussion=_fashion_discussion),
    Recipe(
        "likelihood-mnist", "Burda et al.'s likelihood table: the VAE and the IWAE on binarised MNIST",
        "Burda et al. 2016 (Importance Weighted Autoencoders), section 5 and table 1: the "
        "one-stochastic-layer model, encoder 784-200-200-50 and decoder 50-200-200-784 with tanh "
        "hidden units and a Bernoulli output, trained on dynamically binarised MNIST (each image "
        "binarised afresh every time it is seen) as a VAE (k = 1) and as an IWAE with k = 5 and "
        "k = 50 importance samples; each model's test negative log-likelihood (the IWAE estimate "
        "with K = 5000 on the whole test set) and its active units beside the paper's.",
        # seconds per epoch: 1 thread, CPU seconds (benchmarks/likelihood_timing.py): training at
        # batch 20 plus the per-epoch test evaluation; measuring: the K = 5000 NLL, about 9 min each.
        (_likelihood_step("vae", "VAE (k = 1)", 1, (1, 140), 12.1, 560.0),
         _likelihood_step("iwae-5", "IWAE (k = 5)", 5, (1, 90), 19.1, 540.0),
         _likelihood_step("iwae-50", "IWAE (k = 50)", 50, (1, 45), 99.1, 540.0)),
        LIKELIHOOD_QUICK_EVAL, LIKELIHOOD_FULL_EVAL, discussion=_likelihood_discussion),
)}


# ---------------------------------------------------------------------------------------------
# Running a recipe
# ---------------------------------------------------------------------------------------------


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


def step_seconds(step: Step, quick: bool, epochs_done: int = 0, measured: bool = False) -> float:
    """One step's time on 2 idle CPU cores: its measured seconds per epoch, plus its metrics;
    for a resumed step, only the epochs and measurements it has left."""
    epochs = max(step.epochs[0 if quick else 1] - epochs_done, 0)
    return epochs * step.seconds_per_epoch + (0 if measured else 20 if quick else step.measure_seconds)


def estimate_seconds(recipe: Recipe, quick: bool) -> float:
    """The whole recipe's time on 2 idle CPU cores."""
    return sum(step_seconds(s, quick) for s in recipe.steps)


def classifiers_to_train(recipe: Recipe, settings: EvalSettings, plan: list[float]) -> dict[str, float]:
    """The domain classifiers the recipe trains before it can measure samples: those of the
    datasets of its steps still to do that the cache lacks, with their seconds on 2 idle CPU
    cores. Each one's seconds are added to `plan`, on the first step that will train it."""
    if settings.n_samples <= 0:
        return {}
    todo = {}
    for i, (step, seconds) in enumerate(zip(recipe.steps, plan)):
        if seconds > 0 and step.dataset not in todo and not classifier_cached(step.dataset):
            todo[step.dataset] = classifier_train_seconds(step.dataset)
            plan[i] += todo[step.dataset]
    return todo


def seconds_left(plan: Sequence[float], done: int, elapsed: float) -> tuple[float, float]:
    """(seconds the remaining steps should take, how many times the idle-machine estimate the
    first `done` steps took): the steps' planned seconds (`plan`, from `step_seconds`) for what
    is left, scaled by how this machine, at its load, has actually run so far."""
    planned = sum(plan[:done])
    pace = elapsed / planned if planned > 0 else 1.0
    return pace * sum(plan[done:]), pace


def resumed_plan(configs, out: Path, quick: bool, settings: EvalSettings) -> list[float]:
    """Each step's planned seconds when the recipe resumes in `out`: what it has left to do."""
    plan = []
    for step, _, train_config in configs:
        run_dir = out / step.key
        state, done = training_state(run_dir, train_config.epochs)
        measured = state == "trained" and kept_measurements(run_dir, settings) is not None
        plan.append(step_seconds(step, quick, done, measured))
    return plan


def is_recipe_folder(folder: Path) -> bool:
    """A recipe's output (its recipe.json parses) or a vaelab run, such as an older `make demo`."""
    try:
        return isinstance(read_json(folder / RECIPE_FILE).get("recipe"), str)
    except (VaelabError, AttributeError):
        return is_run_folder(folder)


def prepare_out(out: Path, overwrite: bool) -> Path:
    """The folder the recipe builds in: `out` itself when it is new or empty; with --overwrite of
    an existing recipe folder, a hidden sibling that replaces it only once the whole recipe has
    finished, so a failed or interrupted run leaves the previous output as it was."""
    if not check_target(out, overwrite, is_recipe_folder, "recipe"):
        prepare_folder(out, overwrite, is_recipe_folder, "recipe")
        return out
    clean_stale_siblings(out)
    work = temp_path(out, ".new")
    work.mkdir()
    return work


def swap_in(work: Path, out: Path) -> None:
    """Put the finished build folder `work` in place of `out` in one step, then drop the old one."""
    if work == out:
        return
    try:
        exchange(out, work)  # `work` now holds the previous output
    except OSError as e:
        raise WriteError(f"{out}: cannot replace it with the finished recipe in {work} ({e.strerror or e}); "
                         f"the previous output is unchanged") from None
    shutil.rmtree(work, ignore_errors=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run_recipe(name: str, out: str | Path, quick: bool = False, overwrite: bool = False,
               progress: bool = True, device: str = "auto", data_override=None,
               resume: bool = False) -> RecipeResult:
    """Train, draw and measure every step of recipe `name` into `out`, then write
    `out/report.html`. `resume`: continue an interrupted run of the same recipe in `out`, keeping
    every step it finished (see `_make_step`). `data_override` (an ImageData) replaces every
    dataset: tests only."""
    if resume and overwrite:
        raise ConfigError("--resume continues the recipe in its folder, --overwrite starts it again: choose one")
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
    if resume:
        check_resumable(recipe, quick, configs, out)
        final = out
    else:
        final, out = out, prepare_out(out, overwrite)
    try:
        result = _run_steps(recipe, configs, out, quick, progress, data_override, resume)
    except BaseException as e:
        if out != final:
            shutil.rmtree(out, ignore_errors=True)
            kept = f"{final}: left as it was (the new run did not finish)"
        elif (out / RECIPE_FILE).exists():
            kept = (f"{out}: what finished is kept; `vaelab recipe {name} --out {out}{' --quick' if quick else ''} "
                    f"--resume` continues from there")
        else:
            raise
        if isinstance(e, TrainingInterrupted):
            # The step's own advice (`vaelab train --resume` of one run) is not the recipe's.
            raise TrainingInterrupted(f"{e.signal_name}: the recipe stopped; {kept}", e.signal_name) from None
        _log(kept, progress)
        raise
    swap_in(out, final)
    result.out = final
    for r in result.steps:
        r.run_dir = final / r.run_dir.name
        if r.explore_page is not None:
            r.explore_page = final / r.explore_page.name
        if r.metrics.get("run") not in (None, str(r.run_dir)):
            r.metrics["run"] = str(r.run_dir)  # it was measured in the build folder
            write_json(r.run_dir / METRICS_FILE, r.metrics)
    return result


def _run_steps(recipe: Recipe, configs, out: Path, quick: bool, progress: bool, data_override,
               resume: bool = False) -> RecipeResult:
    name = recipe.name
    write_json(out / RECIPE_FILE, {"recipe": name, "quick": quick,
                                   "steps": [s.key for s in recipe.steps]})
    mode = "quick" if quick else "full"
    settings = recipe.quick_eval if quick else recipe.full_eval
    plan = resumed_plan(configs, out, quick, settings) if resume else [step_seconds(s, quick) for s in recipe.steps]
    classifiers = classifiers_to_train(recipe, settings, plan)
    devices = {resolve_device(tc.device) for _, _, tc in configs}
    device = devices.pop() if len(devices) == 1 else None
    what = "; resumed, what is left takes" if resume else ";"
    # The plan is printed even without progress output (`--quiet`): what runs and for how long.
    _log(f"recipe {name} ({mode}): {len(recipe.steps)} model(s){what} {describe_time(sum(plan), classifiers, device)}",
         True)
    start = time.perf_counter()
    datasets: dict = {}
    results = []
    for step, model_config, train_config in configs:
        if step.dataset not in datasets:
            datasets[step.dataset] = data_override or load(step.dataset, quiet=not progress)
        data = datasets[step.dataset]
        results.append(_make_step(step, model_config, train_config, out / step.key, data, settings, progress,
                                  resume=resume))
        if step.explore:
            page = out / f"explore-{step.key}.html"
            results[-1].explore_page = export_page(LatentSpace.from_run(load_run(out / step.key), data), page)
        if len(results) < len(configs):
            left, pace = seconds_left(plan, len(results), time.perf_counter() - start)
            _log(f"[{step.key}] done; {len(configs) - len(results)} model(s) to go, about {_duration(left)} "
                 f"at this pace ({pace:.1f}x the idle-machine figures)", progress)
    result = RecipeResult(recipe, out, quick, results, datasets, time.perf_counter() - start, resumed=resume)
    write_report(result)
    return result


def _make_step(step: Step, model_config, train_config: TrainConfig, run_dir: Path, data: ImageData,
               settings: EvalSettings, progress: bool, overwrite: bool = False,
               figures: Sequence[str] | None = None, resume: bool = False) -> StepResult:
    """Train one step into `run_dir`, draw the run's `figures` (default every one), measure it.
    With `resume`, what a previous run of the recipe left in `run_dir` is continued or kept: its
    training resumes from its last checkpoint, and its measurements are kept where they were made
    with these settings on the weights still there."""
    state = training_state(run_dir, train_config.epochs)[0] if resume else "new"
    if state == "new":
        _log(f"[{step.key}] training {step.model} for {train_config.epochs} epoch(s) on {data.name}", progress)
        train(step.model, model_config, train_config, run_dir, overwrite=overwrite, progress=progress, data=data)
    elif state == "partial":
        _log(f"[{step.key}] resuming {step.model} from {run_dir}'s last checkpoint", progress)
        resume_run(run_dir, device=train_config.device, progress=progress, data=data)
    else:
        _log(f"[{step.key}] already trained for its {train_config.epochs} epoch(s): kept", progress)
    # Drawn and measured where it trained: the IWAE estimate of a GPU-trained model takes seconds
    # on the GPU and many minutes on the CPU.
    run = load_run(run_dir, device=resolve_device(train_config.device))
    drawn = write_run_figures(run.path, run.model, data, n_scatter=SCATTER_IMAGES, keys=figures)
    kept = kept_measurements(run_dir, settings) if resume else None
    if kept is not None:
        _log(f"[{step.key}] measured before with these settings and weights: kept", progress)
        metrics, per_image = kept
    else:
        _log(f"[{step.key}] measuring", progress)
        per_image = {}
        metrics = evaluate_run(run, data, settings, progress=progress, per_image=per_image)
        if "iwae_nll" in per_image:
            save_tensors(run_dir / PER_IMAGE_FILE, {"iwae_nll": per_image["iwae_nll"]},
                         {"weights_sha256": metrics["weights_sha256"], "settings": metrics["settings"]})
    result = StepResult(step, run.path, metrics, drawn, trained_seconds(run_dir), prior=run.model.prior_name)
    if "iwae_nll" in per_image:  # for comparisons image by image (a discussion's paired errors)
        result.facts["nll_per_image"] = per_image["iwae_nll"]
    result.facts["scatter_images"] = min(SCATTER_IMAGES, len(data.test_x))  # for the scatter's caption
    return result


def run_step(recipe: str | Recipe, key: str, out: str | Path, data: ImageData | None = None, quick: bool = False,
             *, epochs: int | None = None, settings: EvalSettings | None = None, figures: Sequence[str] | None = None,
             device: str = "auto", overwrite: bool = False, progress: bool = True) -> StepResult:
    """One model of a recipe, made as the recipe makes it, without the report: the step `key`
    trained on `data` (default: the step's whole dataset) into out/<key>/, its figures drawn into
    the run's figures/, and the run measured (metrics.json). `epochs`: the step's --quick or full
    count unless given; `settings`: the recipe's --quick or full evaluation unless given;
    `figures`: which figures to draw (keys of figures.FIGURE_FILES; default those the recipe's
    report shows for the step); `overwrite`: replace the run a previous call left in out/<key>/.
    The example notebooks make their models this way, then ask the answer functions above about
    them."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    step = recipe.step(key)
    model_config = make_config(step.model, **step.config)
    if epochs is None:
        epochs = step.epochs[0 if quick else 1]
    train_config = TrainConfig(dataset=step.dataset, epochs=epochs, device=device, **step.train)
    train_config.validate()
    if data is None:
        data = load(step.dataset, quiet=not progress)
    elif data.name != step.dataset:
        raise ConfigError(f"step {key} of recipe {recipe.name} trains on {step.dataset}, not on {data.name}")
    if settings is None:
        settings = recipe.quick_eval if quick else recipe.full_eval
    figures = step.figures if figures is None else tuple(figures)
    unknown = [f for f in figures if f not in FIGURE_FILES]
    if unknown:
        raise ConfigError(f"no figure {', '.join(unknown)}; the figures: {', '.join(FIGURE_FILES)}")
    return _make_step(step, model_config, train_config, Path(out) / key, data, settings, progress, overwrite, figures)


def training_state(run_dir: Path, epochs: int) -> tuple[str, int]:
    """("new", 0) when nothing is there; else ("partial" or "trained", the epochs its checkpoint
    completed): partial is a run that has not finished its `epochs`, or has no checkpoint yet."""
    if not run_dir.exists():
        return "new", 0
    if not (run_dir / CHECKPOINT_FILE).exists():
        return "partial", 0
    state = load_checkpoint(run_dir)
    return ("trained" if state["epoch"] >= epochs and not state.get("partial") else "partial"), state["epoch"]


def trained_seconds(run_dir: Path) -> float:
    """The seconds the run's epochs took (training and test passes), from its history.csv: the
    same figure whether the run trained in one go or was resumed."""
    return sum(float(row.get("seconds") or 0) for row in read_history(run_dir))


def trained_on(run_dir: Path) -> str:
    """" on cuda" where the run was asked to train on a GPU (a model trained there and measured
    here by --resume keeps its GPU training time), else ""."""
    device = read_run_config(run_dir)["train"].get("device", "auto")
    return f" on {device}" if device.startswith("cuda") else ""


def kept_measurements(run_dir: Path, settings: EvalSettings) -> tuple[dict, dict] | None:
    """RUN/metrics.json (and the per-image NLLs beside it) when they were measured with
    `settings` on the weights in RUN now; None when anything is missing, stale or unreadable
    (they are then measured again: they are derived from the weights)."""
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    try:
        metrics = read_json(run_dir / METRICS_FILE)
        if not (isinstance(metrics, dict) and metrics.get("settings") == wanted
                and metrics.get("weights_sha256") == weights_digest(run_dir)):
            return None
        quality = metrics.get("sample_quality") or {}
        if any(not set(QUALITY_KEYS) <= set(q) for q in quality.values()):
            return None  # measured before vaelab had one of its sample metrics
        per_image = {}
        if "iwae" in metrics:
            tensors, meta = load_tensors(run_dir / PER_IMAGE_FILE)
            if meta.get("weights_sha256") != metrics["weights_sha256"] or meta.get("settings") != wanted:
                return None
            per_image["iwae_nll"] = tensors["iwae_nll"]
    except (VaelabError, OSError, KeyError):
        return None
    return metrics, per_image


def check_resumable(recipe: Recipe, quick: bool, configs, out: Path) -> None:
    """--resume: `out` holds this recipe's output in the same mode, and every step folder in it
    was trained with the settings this recipe gives the step. Checked before anything runs."""
    mode = lambda q: "--quick" if q else "full"
    if not out.is_dir():
        raise ConfigError(f"{out}: nothing to resume (no such folder); run the recipe without --resume")
    try:
        info = read_json(out / RECIPE_FILE)
    except VaelabError:
        raise ConfigError(f"{out}: not a recipe's folder (no readable {RECIPE_FILE}): nothing to resume") from None
    if not isinstance(info, dict) or info.get("recipe") != recipe.name or info.get("quick") is not quick:
        found = f"{info.get('recipe')} ({mode(info.get('quick'))})" if isinstance(info, dict) else "something else"
        raise ConfigError(f"{out}: holds recipe {found}, not {recipe.name} ({mode(quick)}): nothing to resume")
    for step, model_config, train_config in configs:
        run_dir = out / step.key
        if not run_dir.exists():
            continue
        stored = parse_spec(read_run_config(run_dir), run_dir / CONFIG_FILE)
        diffs = config_differences(RunSpec(step.model, model_config, train_config, 0), stored)
        if stored.train.epochs != train_config.epochs:
            diffs.append(("train.epochs", train_config.epochs, stored.train.epochs))
        if diffs:
            field_name, wanted, found = diffs[0]
            raise ConfigError(f"{run_dir}: trained with {field_name}={found!r}, but this recipe's step {step.key} has "
                              f"{wanted!r} (a different vaelab?); --overwrite starts the recipe again")


def write_report(result: RecipeResult) -> Path:
    recipe = result.recipe
    report = Report(f"{recipe.title} — vaelab recipe {recipe.name}")
    report.paragraph(recipe.assignment)
    settings = recipe.quick_eval if result.quick else recipe.full_eval
    test_size = min((len(d.test_x) for d in result.datasets.values()), default=settings.iw_images)
    images = (f"all {test_size:,}" if settings.iw_images >= test_size else f"the first {settings.iw_images:,}")
    if result.quick:
        samples = (f"; {settings.n_samples} samples for the classifier figures, whose Fréchet distances are "
                   f"therefore biased upwards against the 10,000-sample figures" if settings.n_samples else "")
        mode = (f"--quick: short training and cheap metrics (IWAE with K = {settings.iw_samples} on {images} "
                f"test images{samples}). Numbers show the method works, not how good the model can get; "
                f"run without --quick for that.")
    else:
        samples = (f"; {settings.n_samples} samples and as many real training images for the classifier "
                   f"figures" if settings.n_samples else "")
        mode = f"Full run: IWAE with K = {settings.iw_samples} on {images} test images{samples}."
    report.paragraph(mode, css_class="note")
    report.table(["model", "folder", "epochs", "training time", "model config"],
                 [[r.step.title, f"{r.run_dir.name}/", r.step.epochs[0 if result.quick else 1],
                   f"{r.train_seconds:.0f} s{trained_on(r.run_dir)}", json.dumps(r.step.config)] for r in result.steps],
                 caption=(f"Resumed (--resume): this last invocation took {result.seconds / 60:.1f} min; the "
                          f"training times are each model's own, from its history." if result.resumed
                          else f"Total wall time {result.seconds / 60:.1f} min."))
    if recipe.discussion is not None:
        recipe.discussion(result, report)
    for r in result.steps:
        report.heading(f"{r.step.title} ({r.step.model})")
        report.table(*summary_table(r))
        if "grey-level" in r.metrics.get("likelihood_data", "") and "iwae" in r.metrics:
            report.paragraph("Likelihoods here are measured on grey-level images: " + r.metrics["likelihood_data"],
                             css_class="note")
        item = ITEMS.get(r.step.dataset, "image")
        for key in r.step.figures:
            text = caption(r, key, item) if key in r.figures else None
            if text is not None:
                report.figure(r.figures[key], *text)
                for note in r.notes.get(key, []):
                    report.paragraph(note, css_class="answer")
        if r.explore_page is not None:
            report.heading("Explore the latent space", level=3)
            report.page(r.explore_page.read_text(encoding="utf-8"),
                        "Move the mouse over the plane: the image is the decoder's output at that point "
                        "(the nearest of a grid of precomputed decodes); click two points for the "
                        "interpolation between them. `vaelab explore RUN` serves the same page with the "
                        "model behind it, and a drawing pad.", link=r.explore_page.name)
    report.paragraph(f"Generated by vaelab {__version__}; every run folder "
                     f"beside this file holds its config, weights, history and metrics.json.")
    return report.write(result.out / "report.html")


def describe_time(quiet_seconds: float, classifiers: dict[str, float] | None = None,
                  device: torch.device | None = None) -> str:
    """The estimate in words, scaled to this machine's current load: the steps' seconds were
    measured on 2 idle cores, and with some of them busy training runs on the free ones only.
    `classifiers` {dataset: seconds}: the domain classifiers trained on the way (included in
    `quiet_seconds`), said apart, as later runs take them from the cache. On a GPU `device` the
    CPU's figure is said as an upper bound: the models trained about 2 to 14 times faster on an H100
    (benchmarks/RESULTS.md), by how much depends on the model and the card."""
    cores, free = physical_cores(), idle_cores()
    text = f"about {quiet_seconds / 60:.0f} min on 2 idle CPU cores"
    if classifiers:
        names = " and ".join(classifiers)
        several = len(classifiers) > 1
        text += (f" (about {sum(classifiers.values()) / 60:.0f} of them to train the {names} domain "
                 f"classifier{'s' if several else ''}, this once: later runs take {'them' if several else 'it'} "
                 f"from the cache)")
    if device is not None and device.type != "cpu":
        return text + f"; it trains on {device}, so expect less (the estimate is the CPU's)"
    if free < cores:
        text += (f"; other processes keep {cores - free} of this machine's {cores} cores busy, "
                 f"so expect about {quiet_seconds * cores / free / 60:.0f} min")
    return text


def describe_recipes() -> str:
    """The recipe list for `vaelab recipe --help`."""
    lines = []
    for r in RECIPES.values():
        q, f = estimate_seconds(r, True), estimate_seconds(r, False)
        lines.append(f"  {r.name:<20} {r.title} (quick ~{q / 60:.0f} min, full ~{f / 60:.0f} min)")
    return "\n".join(lines)

