"""Sentences from numbers: the words of a report, computed from the values they describe.

Every comparative sentence here is a function of measured values and their uncertainties, the
way a test's failure message is built from the values it compared, so a report's words cannot
drift from its tables: swap the numbers and the sentences swap with them.

The rule for "better": a difference counts as clear only when it exceeds twice the combined
standard error of the two values, sqrt(se_a^2 + se_b^2) (independent measurements); inside
that, the sentence says "no clear difference". A metric measured without an uncertainty is
reported with its direction and size and the remark that its noise is unknown; it never makes
a verdict on its own. Where clear differences point both ways the verdict says the metrics
disagree instead of picking one. Explanations ("why") are chosen by the measured outcome: the
textbook reason is given only when the numbers went the textbook way.

Pure functions of plain numbers and mappings; no tensors, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

CLEAR_SES = 2.0  # a difference is "clear" beyond this many combined standard errors


# ---------------------------------------------------------------------------------------------
# Metrics and formatting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A measured quantity: where it is in a metrics mapping, how it reads, which way is better."""

    key: str
    label: str
    lower_is_better: bool
    se_key: str | None = None  # the key of its standard error (or std) in the same mapping
    # How values are written: "pct" a fraction as a percentage (differences in percentage
    # points), "fixed" with `digits` decimals, "sig" with `digits` significant digits (for
    # metrics whose scale depends on the feature space, such as FD and KID).
    style: str = "fixed"
    digits: int = 3

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_is_better else "↑"

    @property
    def share(self) -> bool:
        return self.style == "pct"

    def fmt(self, value: float) -> str:
        if self.style == "pct":
            return f"{value:.{self.digits}%}"
        if self.style == "sig":
            return significant(value, self.digits)
        return f"{value:.{self.digits}f}"

    def fmt_diff(self, diff: float) -> str:
        """An absolute difference (or an uncertainty): percentage points for shares."""
        if self.style == "pct":
            return f"{abs(diff) * 100:.{self.digits}f} percentage points"
        if self.style == "sig":
            return significant(abs(diff), 2)
        return f"{abs(diff):.{self.digits}f}"


def significant(value: float, digits: int) -> str:
    """`value` with `digits` significant digits, never in exponent notation: 0.0498, 191, 0.570."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


FD = Metric("fd", "Fréchet distance", True, "fd_std", style="sig")
KID = Metric("kid", "KID", True, "kid_std", style="sig")
PRECISION = Metric("precision", "precision", False, "precision_se")
RECALL = Metric("recall", "recall", False, "recall_se")
COVERAGE = Metric("coverage", "coverage", False, "coverage_se")
CONFIDENT = Metric("confident_share", "confident share", False, "confident_share_se", style="pct", digits=1)
SAMPLE_METRICS = (FD, KID, PRECISION, RECALL, COVERAGE, CONFIDENT)
RECON_MSE = Metric("recon_mse", "reconstruction MSE", True, "recon_mse_se", digits=4)


def number(values: Mapping | None, key: str | None) -> float | None:
    """values[key] as a finite float, or None where it is missing, None or NaN."""
    if values is None or key is None:
        return None
    v = values.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def with_uncertainty(metric: Metric, values: Mapping | None) -> str:
    """'62.1% ± 1.1%', '0.0412 ± 0.0031', '103.5' (no uncertainty measured) or '—' (missing)."""
    v = number(values, metric.key)
    if v is None:
        return "—"
    se = number(values, metric.se_key)
    if se is None:
        return metric.fmt(v)
    if metric.style == "sig" and se > 0:
        # the value to the decimals of its uncertainty's second significant digit
        spread = significant(se, 2)
        decimals = len(spread.split(".")[1]) if "." in spread else 0
        text = f"{v:.{decimals}f}"
        return f"{'0' if float(text) == 0 else text} ± {spread}"  # no "-0.0000"
    return f"{metric.fmt(v)} ± {metric.fmt(se)}"


def join(items: Sequence[str], word: str = "and") -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {word} {items[-1]}"


def combined_se(a: float | None, b: float | None) -> float | None:
    """The standard error of a difference of two independent measurements: sqrt(a^2 + b^2);
    None when either is unknown."""
    if a is None or b is None:
        return None
    return math.hypot(a, b)


# ---------------------------------------------------------------------------------------------
# One metric, two models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One metric measured on two models, A and B."""

    metric: Metric
    a: str
    b: str
    va: float
    vb: float
    se: float | None  # of the difference, combined from both sides; None if either is unknown

    @property
    def diff(self) -> float:
        return self.va - self.vb

    @property
    def better(self) -> str | None:
        """The name of the model with the better value (None when they are equal)."""
        if self.va == self.vb:
            return None
        a_lower = self.va < self.vb
        return self.a if a_lower == self.metric.lower_is_better else self.b

    @property
    def status(self) -> str:
        """'clear' (beyond CLEAR_SES combined SEs), 'noise' (within), 'unquantified' (no
        uncertainty known) or 'equal'."""
        if self.va == self.vb:
            return "equal"
        if self.se is None:
            return "unquantified"
        return "clear" if abs(self.diff) > CLEAR_SES * self.se else "noise"

    def sentence(self) -> str:
        m = self.metric
        head = f"{m.label} {m.arrow}: {self.a} {m.fmt(self.va)}, {self.b} {m.fmt(self.vb)}"
        status = self.status
        if status == "equal":
            return f"{head} — the same value."
        word = "lower" if (self.better == self.a) == (self.va < self.vb) else "higher"
        size = f"{word} by {m.fmt_diff(self.diff)}"
        band = ""
        if self.se is not None:
            band = f"{CLEAR_SES:g} combined standard errors = {m.fmt_diff(CLEAR_SES * self.se)}"
        if status == "clear":
            return f"{head} — {self.better} clearly better ({size}, beyond {band})."
        if status == "noise":
            return f"{head} — no clear difference ({m.fmt_diff(self.diff)} apart, within {band})."
        lesser = self.b if self.better == self.a else self.a
        rel = abs(self.diff) / abs(self.vb if self.better == self.a else self.va) if not m.share else None
        rel_text = f", {rel:.0%} of {lesser}'s value" if rel is not None and math.isfinite(rel) else ""
        return (f"{head} — {self.better} {size}{rel_text}; no uncertainty was measured for it, so "
                f"how much of this is noise is unknown.")


def compare(metric: Metric, a: str, values_a: Mapping | None, b: str, values_b: Mapping | None) -> Comparison | None:
    """The comparison of `metric` between A and B, or None when either lacks it."""
    va, vb = number(values_a, metric.key), number(values_b, metric.key)
    if va is None or vb is None:
        return None
    se = combined_se(number(values_a, metric.se_key), number(values_b, metric.se_key))
    return Comparison(metric, a, b, va, vb, se)


# ---------------------------------------------------------------------------------------------
# Several metrics, two models: a verdict
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Every available metric compared between A and B."""

    a: str
    b: str
    comparisons: tuple[Comparison, ...]
    missing: tuple[str, ...]  # labels of metrics one side lacks

    def clear_for(self, name: str) -> list[Comparison]:
        return [c for c in self.comparisons if c.status == "clear" and c.better == name]

    @property
    def within_noise(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.status in ("noise", "equal")]

    @property
    def unquantified(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.status == "unquantified"]

    @property
    def outcome(self) -> str:
        """'a' or 'b' (clear differences all favour that model), 'disagree' (clear differences
        both ways), 'none' (no clear difference) or 'unmeasured' (nothing to compare)."""
        for_a, for_b = self.clear_for(self.a), self.clear_for(self.b)
        if for_a and for_b:
            return "disagree"
        if for_a:
            return "a"
        if for_b:
            return "b"
        return "none" if self.comparisons else "unmeasured"

    @property
    def winner(self) -> str | None:
        return {"a": self.a, "b": self.b}.get(self.outcome)

    @property
    def lean(self) -> str | None:
        """'a' or 'b': the model that clearly wins, or, where the metrics disagree, the one more
        of them clearly favour; None when neither."""
        if self.outcome in ("a", "b"):
            return self.outcome
        na, nb = len(self.clear_for(self.a)), len(self.clear_for(self.b))
        return "a" if na > nb else "b" if nb > na else None

    def value(self, metric_key: str, name: str) -> float | None:
        for c in self.comparisons:
            if c.metric.key == metric_key:
                return c.va if name == self.a else c.vb
        return None

    def favours(self, name: str, metric_key: str) -> bool:
        """Whether `metric_key` clearly favours model `name`."""
        return any(c.metric.key == metric_key for c in self.clear_for(name))


def verdict(metrics: Sequence[Metric], a: str, values_a: Mapping | None, b: str,
            values_b: Mapping | None) -> Verdict:
    comps, missing = [], []
    for m in metrics:
        c = compare(m, a, values_a, b, values_b)
        if c is None:
            missing.append(m.label)
        else:
            comps.append(c)
    return Verdict(a, b, tuple(comps), tuple(missing))


def _labels(comps: Sequence[Comparison]) -> str:
    return join([c.metric.label for c in comps])


def verdict_sentence(v: Verdict) -> str:
    """One or two sentences: who measured better, on which metrics, clearly or not."""
    for_a, for_b = v.clear_for(v.a), v.clear_for(v.b)
    noise, unq = v.within_noise, v.unquantified
    outcome = v.outcome
    if outcome == "unmeasured":
        return (f"{v.a} and {v.b} cannot be compared: "
                f"{join(list(v.missing)) or 'no metric'} missing for at least one of them.")
    if outcome == "disagree":
        text = (f"The metrics disagree: {_labels(for_a)} clearly favour{'s' if len(for_a) == 1 else ''} "
                f"{v.a}; {_labels(for_b)} clearly favour{'s' if len(for_b) == 1 else ''} {v.b}.")
        if v.lean is not None:
            many = for_a if v.lean == "a" else for_b
            ahead = v.a if v.lean == "a" else v.b
            text += f" On balance {ahead}: {len(many)} of {len(v.comparisons)} metrics."
        caveat = recognisability_caveat(v)
        for extra in (tradeoff(v, conclude=caveat is None), caveat):
            if extra:
                text += " " + extra
    elif outcome in ("a", "b"):
        win, lose = (v.a, v.b) if outcome == "a" else (v.b, v.a)
        clear = for_a or for_b
        text = f"{win} measured better than {lose}: clearly on {_labels(clear)}"
        if noise:
            text += f"; no clear difference on {_labels(noise)}"
        text += "."
    else:
        measured = [c for c in v.comparisons if c.status != "unquantified"]
        if measured:
            text = (f"No clear difference between {v.a} and {v.b}: {_labels(measured)} "
                    f"{'differ' if len(measured) > 1 else 'differs'} by less than "
                    f"{CLEAR_SES:g} combined standard errors.")
        else:
            text = f"No metric with a measured uncertainty separates {v.a} and {v.b}."
    if unq:
        leaning = join([f"{c.metric.label} ({c.better} {'lower' if c.metric.lower_is_better else 'higher'})"
                        if c.better else f"{c.metric.label} (equal)" for c in unq])
        text += f" Without a measured uncertainty: {leaning}."
    if v.missing and outcome != "unmeasured":
        text += f" Not measured for both: {join(list(v.missing))}."
    return text


def tradeoff(v: Verdict, conclude: bool = True) -> str | None:
    """The precision/recall reading where the two clearly point to different models; `conclude`
    adds which is the more faithful and which the more varied (left out where a caveat says the
    feature metrics are not to be trusted here)."""
    for x, y in ((v.a, v.b), (v.b, v.a)):
        if v.favours(x, "precision") and v.favours(y, "recall") and v.favours(x, "coverage"):
            # Recall's balls are drawn around the samples, so stray samples far from every real
            # image raise it; coverage's are drawn around real images only (metrics.coverage).
            return (f"More of {x}'s samples fall among real images' features (precision), and they "
                    f"also have more real images near them (coverage); {y}'s higher recall, which "
                    f"coverage does not bear out, is what samples far from every real image produce.")
        if v.favours(x, "precision") and v.favours(y, "recall"):
            end = f": {x} is the more faithful, {y} the more varied." if conclude else "."
            return (f"More of {x}'s samples fall among real images' features (precision), while "
                    f"{y}'s samples cover more of the real images (recall){end}")
    return None


DISTANCE_KEYS = ("fd", "kid", "precision")  # metrics computed from feature distances alone


def recognisability_caveat(v: Verdict) -> str | None:
    """Where feature-distance metrics clearly favour one model and the classifier's confidence
    clearly favours the other: a warning that close feature statistics are not recognizable
    images."""
    for x, y in ((v.a, v.b), (v.b, v.a)):
        dist = [c for c in v.clear_for(x) if c.metric.key in DISTANCE_KEYS]
        if dist and v.favours(y, "confident_share"):
            cx, cy = v.value("confident_share", x), v.value("confident_share", y)
            return (f"Yet the classifier recognizes fewer of {x}'s samples with confidence "
                    f"({cx:.0%} against {cy:.0%}): samples whose features lie close to real ones "
                    f"need not be recognizable, so look at the samples before trusting "
                    f"{_labels(dist)} here.")
    return None


def comparison_details(v: Verdict) -> str:
    """Every metric's comparison, one sentence each."""
    return " ".join(c.sentence() for c in v.comparisons)


def leaders(metrics: Sequence[Metric], values: Mapping[str, Mapping | None]) -> str | None:
    """Per metric, which model leads among `values` (name -> metrics mapping) and whether clearly
    ahead of the runner-up; None when fewer than two models have any of the metrics."""
    parts, clear_leaders = [], set()
    for m in metrics:
        have = [(name, number(v, m.key)) for name, v in values.items() if number(v, m.key) is not None]
        if len(have) < 2:
            continue
        ranked = sorted(have, key=lambda t: t[1], reverse=not m.lower_is_better)
        (first, v1), (second, _) = ranked[0], ranked[1]
        c = compare(m, first, values[first], second, values[second])
        best = "lowest" if m.lower_is_better else "highest"
        if c.status == "clear":
            tail = f"clearly ahead of {second} ({m.fmt(c.vb)})"
            clear_leaders.add(first)
        elif c.status == "unquantified":
            tail = f"ahead of {second} ({m.fmt(c.vb)}) by a margin of unknown noise"
        else:
            tied = [n for n, _ in ranked[1:] if compare(m, first, values[first], n, values[n]).status != "clear"]
            tail = f"not clearly ahead of {join(tied)}"
        parts.append(f"{best} {m.label}: {first} ({m.fmt(v1)}), {tail}")
    if not parts:
        return None
    text = "Per metric, the leader: " + "; ".join(parts) + "."
    if len(clear_leaders) > 1:
        text += (f" Different models clearly lead different metrics ({join(sorted(clear_leaders))}), "
                 f"so no model is best on all of them.")
    return text


# ---------------------------------------------------------------------------------------------
# Tables and captions
# ---------------------------------------------------------------------------------------------


def latent_size_note(dims: Mapping[str, int]) -> str | None:
    """A sentence for a comparison whose models differ in latent size; None when they agree."""
    sizes: dict[int, list[str]] = {}
    for name, d in dims.items():
        sizes.setdefault(int(d), []).append(name)
    if len(sizes) <= 1:
        return None
    groups = join([f"{d} for {join(names)}" for d, names in sorted(sizes.items())], word="and")
    return (f"The latent sizes differ ({groups}), so comparisons across them are not "
            f"like-for-like: a larger code can carry more of each image, which helps "
            f"reconstructions, and its prior is a different distribution to sample from.")


def figure_caption(key: str, *, latent_dim: int, variational: bool, prior: str = "N(0, I)",
                   recon_mse: float | None = None, item: str = "image", active_units: int | None = None,
                   input_dependent: bool | None = None, adversarial: bool = False,
                   scatter_images: int = 5000) -> tuple[str, str] | None:
    """(what the figure shows, what to look for) for figure `key` of a model with this latent
    size; `variational`: the encoder outputs a distribution q(z|x) (a VAE), not one code (an
    autoencoder). Measured facts where known: `active_units` (latent dimensions whose mean
    varies over the test set), `input_dependent` (whether reconstructions were measured to depend
    on their input), `adversarial` (trained against a discriminator), `scatter_images` (the test
    images the latent scatter shows). None where the figure does not apply (the manifold of a
    latent that is not 2-D)."""
    d = latent_dim
    if key == "loss_curves":
        look = ("the total loss should fall quickly and flatten; train and test close together mean "
                "no overfitting.")
        if adversarial:
            look += (" The discriminator's accuracies on real and on fake images show who is "
                     "winning: both near 100% mean the discriminator wins and the decoder learns "
                     "little from it; near 50%, a balanced game.")
        elif variational:
            look += (" The KL term usually rises while the decoder learns to use the code and the "
                     "reconstruction term falls.")
        return ("Training curves: each loss term per epoch (train and test) and per iteration "
                "(train, raw and smoothed).", look)
    if key == "latent_scatter":
        if variational:
            codes = "Codes z (sampled from q(z|x))"
            look = "whether the codes fill the N(0, I) prior evenly, leaving no empty regions."
        else:
            codes = "The encoder's codes"
            look = (f"where the codes lie against where the generator draws from ({prior}): "
                    f"regions it draws from that no code occupies decode to images the decoder "
                    f"never learned.")
        where = (f", {d}-D, projected onto their first two principal axes" if d > 2 else
                 ", on the 1-D axis (the vertical axis is jitter)" if d == 1 else "")
        what = f"{codes} of {scatter_images} random test images{where}, coloured by their true class."
        if active_units == 0:
            return what, (f"none of the {d} latent dimensions is active (the code's mean does not vary "
                          f"over the test set): the codes carry no class information, so expect one "
                          f"cloud, classes mixed.")
        return what, "clusters per class; how much classes overlap; " + look
    if key == "manifold":
        if d != 2:
            return None
        return ("Images decoded on a 15x15 grid over the 2-D latent plane; the grid points are the "
                "quantiles of the prior, so each cell covers an equal share of its probability mass.",
                "smooth morphing between neighbouring cells and every class appearing somewhere; "
                "blurry cells lie between classes.")
    if key == "class_grid":
        return (f"Five samples per class, decoded from a Gaussian fitted to the {d}-D codes of that "
                f"class's test images (points where another class is more likely are skipped).",
                "each row should show its class in varied styles (slant, thickness, shape).")
    if key == "samples":
        return (f"100 images decoded from random draws of the generator's prior ({prior}, "
                f"{d}-D).",
                f"sharpness and variety; how many are recognizable as a {item}; which classes are "
                f"missing or over-represented.")
    if key == "reconstructions":
        how = ("decoded from the mean of q(z|x)" if variational else "decoded from the encoder's code")
        mse = f" Reconstruction MSE per pixel on the test set: {recon_mse:.4f}." if recon_mse is not None else ""
        look = (f"how much detail survives the {d}-D bottleneck"
                + (": a code this small keeps the class and the rough shape, not the details."
                   if d <= 2 else "."))
        if input_dependent is False:
            look = ("these reconstructions were measured not to depend on their input (see the "
                    "input-dependence table): expect images unrelated to the originals above them.")
        return f"10 random test images (top) and their reconstructions, {how} (bottom).{mse}", look
    if key == "interpolation":
        code = "means of q(z|x)" if variational else "codes"
        return (f"Decodes of evenly spaced points on the straight line between the {code} of two "
                f"test images (shown at either end).",
                "a gradual morph through plausible images; abrupt jumps or meaningless images in "
                "between mean holes in the latent space.")
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Assignment answers (Fashion-MNIST generators)
# ---------------------------------------------------------------------------------------------


def answer_naive_vs_normalized(v: Verdict, quick: bool, latent_dim: int = 2) -> str:
    """Why A (uniform draws over the box of the plain AE's codes) and B (N(0, I) draws into the
    normalized bottleneck) differ, given how they measured. v.a is A, v.b is B; `latent_dim`:
    their code neurons."""
    head = verdict_sentence(v)
    outcome = v.outcome
    if outcome == "disagree" and v.lean is not None:
        outcome = v.lean  # explained as the side most metrics favour; the head says they disagree
    short = "; and --quick's short training leaves both decoders rough" if quick else ""
    if outcome == "b":
        why = ("Why: the plain autoencoder's codes lie wherever training put them, in clusters "
               "with empty gaps inside the box they span, so uniform draws over that box often "
               "land where the decoder never learned anything and decode to blends or smudges. "
               "Normalizing the bottleneck pins each code neuron to mean 0 and variance 1, so "
               "N(0, I) draws fall where the codes are; nothing forces the codes to fill that "
               "distribution (only the first two moments match), so some holes remain.")
    elif outcome == "a":
        why = ("The expected advantage of the normalized bottleneck did not show here. Possible "
               "reasons: A's box is not arbitrary, it spans exactly the extremes of its training "
               f"codes, so with {latent_dim} code neuron{'s' if latent_dim != 1 else ''} much of it "
               "may be covered by codes; B's "
               "normalization matches only each neuron's mean and variance, so N(0, I) draws "
               f"still fall between its class clusters and beyond their edges{short}. The latent "
               "scatters of A and B below show where each model's codes lie.")
    elif outcome == "disagree":  # as many metrics each way
        why = ("So the two generators differ in kind rather than one being better: both decoders "
               "only know the region their codes occupy, A draws from the box spanning its codes "
               "and B from N(0, I), which matches its codes' mean and variance; which of the two "
               "covers the codes better decides each metric differently.")
    elif outcome == "none":
        why = ("The expected advantage of the normalized bottleneck (draws landing where the codes "
               "are) did not show as a clear difference in this run. Possible reasons: A's box "
               "spans exactly its codes' extremes, so it is less naive than arbitrary random "
               f"inputs, and B's N(0, I) matches its codes in mean and variance only{short}.")
    else:
        why = ""
    return f"{head} {why}".strip()


def _relation(v: Verdict) -> str:
    """How v.a measured against v.b, as a phrase."""
    if v.outcome in ("a", "b"):
        return f"{'better' if v.outcome == 'a' else 'worse'} than {v.b}"
    if v.lean is not None:
        return f"{'better' if v.lean == 'a' else 'worse'} than {v.b} on balance"
    if v.outcome == "unmeasured":
        return f"not comparable with {v.b}"
    if v.outcome == "none":
        return f"not clearly different from {v.b}"
    return f"better than {v.b} on some metrics and worse on as many others"


def answer_vae_quality(vs_a: Verdict, vs_b: Verdict, mse: Mapping[str, float | None], quick: bool) -> str:
    """Does the VAE produce a different quality than the two autoencoders? vs_a: VAE (as .a)
    against A; vs_b: VAE against B. `mse`: reconstruction MSE by model name."""
    vae = vs_a.a
    text = f"Against {vs_a.b}: {verdict_sentence(vs_a)} Against {vs_b.b}: {verdict_sentence(vs_b)}"
    outcomes = {vs_a.outcome, vs_b.outcome}
    leans = {vs_a.lean, vs_b.lean}
    if outcomes == {"a"}:
        why = ("So yes, the VAE's samples are measured better than both autoencoders'. Why: its "
               "KL term pulls every code distribution towards N(0, I), the very distribution "
               "samples are drawn from, and its sampling noise trains the decoder on whole "
               "regions of the latent space rather than on points, so prior draws land where the "
               "decoder has learned to produce garments.")
    elif outcomes == {"b"}:
        why = ("So the VAE's samples are measured worse than both autoencoders'; the expected "
               "advantage of its KL term (codes pulled onto the prior that samples are drawn "
               "from) did not show in these metrics.")
    elif leans == {"a"}:
        why = "So on balance the VAE's samples measure better than both autoencoders', though not on every metric."
    elif leans == {"b"}:
        why = ("So on balance the VAE's samples measure worse than both autoencoders', though not "
               "on every metric; the expected advantage of its KL term did not show as better samples overall.")
    elif leans == {"a", "b"}:
        better = vs_a.b if vs_a.lean == "a" else vs_b.b
        worse = vs_a.b if vs_a.lean == "b" else vs_b.b
        why = (f"So the VAE's quality lies between the autoencoders': better than {better}, "
               f"worse than {worse}.")
    elif outcomes <= {"none", "unmeasured"}:
        why = ("So this run shows no clear difference in sample quality between the VAE and the "
               "autoencoders.")
    else:
        why = f"So the VAE's samples measure {_relation(vs_a)} and {_relation(vs_b)}."
    if any(v.favours(vae, "recall") and v.favours(v.b, "precision") for v in (vs_a, vs_b)):
        why += (" A reading consistent with the recall and precision measured: the KL term spreads "
                "the VAE's codes over the prior it samples from, so its samples reach more of the "
                "data's variety, while its sampling noise blurs them, which costs precision.")
    text += " " + why
    m_vae = mse.get(vae)
    others = {k: v for k, v in mse.items() if k != vae and v is not None}
    if m_vae is not None and others:
        if all(m_vae > v for v in others.values()):
            text += (f" Its reconstructions are less accurate than both autoencoders' (MSE "
                     f"{m_vae:.4f} against {join([f'{v:.4f} ({k})' for k, v in others.items()])}): the "
                     f"price of the KL term and the sampling noise, and the blur of a pixel-wise "
                     f"likelihood averaging over what a small code cannot pin down.")
            if "b" in leans:
                text += (" Blurry images sit far from real ones in the classifier's features, "
                         "which is a likely reason its samples did not measure better.")
        elif all(m_vae <= v for v in others.values()):
            text += (f" Its reconstructions are at least as accurate as both autoencoders' (MSE "
                     f"{m_vae:.4f} against {join([f'{v:.4f} ({k})' for k, v in others.items()])}).")
        else:
            text += (f" Its reconstruction MSE ({m_vae:.4f}) lies between the autoencoders' "
                     f"({join([f'{v:.4f} ({k})' for k, v in others.items()])}).")
    if quick and vs_a.outcome != "a" and vs_b.outcome != "a":
        text += " With --quick's short training these differences may still change."
    return text


def input_dependence(name: str, own: float, other: float, se: float | None) -> tuple[bool, str]:
    """Whether a model's reconstructions depend on their input, from the mean squared error of
    each reconstruction to its own image (`own`) and to a different test image (`other`), with
    the standard error `se` of their paired difference. Returns (depends, sentence)."""
    gap = other - own
    clear = se is not None and gap > CLEAR_SES * se
    ratio = own / other if other > 0 else float("nan")
    if clear:
        return True, (f"{name}'s reconstructions are closer to their own images (MSE {own:.4f}) "
                      f"than to other test images ({other:.4f}; {ratio:.0%} of that distance): they "
                      f"carry information about the input.")
    se_text = (f"a difference within {CLEAR_SES:g} standard errors = {CLEAR_SES * se:.4f}" if se is not None
               else "no uncertainty measured")
    return False, (f"{name}'s reconstructions are no closer to their own images (MSE {own:.4f}) than "
                   f"to other test images ({other:.4f}; {se_text}): they ignore the input.")


def answer_basic_vaegan(name: str, depends: bool, dependence_sentence: str, kl: float | None,
                        reference: str, reference_kl: float | None, mse: float | None,
                        reference_mse: float | None) -> str:
    """What the basic VAE-GAN (L = L_prior + L_GAN) produces, from its measurements against a
    reference model (the VAE)."""
    parts = [dependence_sentence]
    if kl is not None:
        ref = f", against {reference_kl:.2f} for {reference}" if reference_kl is not None else ""
        parts.append(f"Its average KL(q(z|x) || p(z)) is {kl:.2f} nats{ref}; the average KL "
                     f"bounds the information a code carries about its image.")
    if mse is not None and reference_mse is not None and reference_mse > 0:
        parts.append(f"Its reconstruction MSE is {mse:.4f}, {mse / reference_mse:.1f} times "
                     f"{reference}'s {reference_mse:.4f}.")
    if not depends:
        parts.append("This is what L = L_prior + L_GAN asks for: nothing in it rewards the encoder "
                     "for keeping information about x, so L_prior pulls every q(z|x) onto N(0, I), "
                     "and the decoder, trained only to fool the discriminator, turns any code into "
                     "an image unrelated to x. Its \"reconstructions\" are samples; only its "
                     "samples can be judged, in the sample-quality columns.")
    else:
        parts.append("Unexpected for L = L_prior + L_GAN, where no term rewards the encoder for "
                     "keeping information about x: the measured dependence on the input must "
                     "come from the adversarial term reaching the encoder, or from training too "
                     "short for L_prior to have pulled q(z|x) onto the prior.")
    return " ".join(parts)


def answer_vaegan_variant(v: Verdict, accuracies: tuple[float | None, float | None], quick: bool,
                          differences: Sequence[str] = ()) -> str:
    """One VAE-GAN variant (v.a) against the VAE (v.b), with its discriminator's test accuracies
    on real and on fake images. `differences`: what else sets the variant apart from the VAE
    (e.g. "a 16-D latent against 2"); where there is any, the outcome is not put down to the
    adversarial term."""
    text = verdict_sentence(v)
    real, fake = accuracies
    acc = ""
    if real is not None and fake is not None:
        acc = (f" Its discriminator labels {real:.0%} of real test images real and {fake:.0%} of "
               f"the decoder's images fake")
        if real > 0.9 and fake > 0.9:
            acc += ": it wins easily, so the decoder gets little useful adversarial signal."
        elif real < 0.6 and fake < 0.6:
            acc += ": close to chance, so the adversarial game is balanced or the discriminator is weak."
        else:
            acc += "."
    outcome = v.outcome
    if differences and outcome != "disagree":
        why = (f" It differs from the VAE in more than the adversarial term ({join(list(differences), word='and')}), "
               f"so the difference cannot be put down to that term alone.")
    elif outcome == "a":
        why = (" The discriminator's judgement rewards images that look real over pixel-wise "
               "averages, which is the expected gain.")
    elif outcome == "b":
        why = (" The adversarial term did not improve on the VAE here; adversarial training is "
               "unstable and slow to settle" + (", and --quick trains it briefly." if quick else "."))
    elif outcome == "disagree":
        why = ""
    else:
        why = " The adversarial term made no clear difference to sample quality here."
    return text + acc + why


# ---------------------------------------------------------------------------------------------
# Assignment answers (LSTM VAE on MNIST)
# ---------------------------------------------------------------------------------------------


def comment_on_samples(predicted: Sequence[int], confident: Sequence[int], class_names: Sequence[str],
                       class_shares: Sequence[float] | None = None, threshold: float = 0.9,
                       item: str = "digit", population: Mapping | None = None) -> str:
    """A comment on n generated images from their classification by the domain classifier.

    predicted[c]: samples whose most probable class is c; confident[c]: of those, how many have
    that probability > threshold. class_shares: the classes' shares of the training set (the
    shares a perfect generator would reproduce); uniform when None. population: the sample-
    quality figures of a larger draw (confident_share, its se, n), to say whether these n are
    typical of it.
    """
    n = sum(predicted)
    k = sum(confident)
    if n == 0:
        return "No samples were classified."
    nc = len(class_names)
    shares = list(class_shares) if class_shares is not None else [1 / nc] * nc
    parts = [f"Of the {n} generated images above, the domain classifier recognizes {k} ({k / n:.0%}) as a "
             f"{item} with confidence > {threshold:g}; the other {n - k} are unrecognisable by that "
             f"standard (highest class probability ≤ {threshold:g})."]
    share, big_n = number(population, "confident_share"), number(population, "n")
    if share is not None and big_n is not None and big_n > n:
        mine = k / n
        se = combined_se(math.sqrt(mine * (1 - mine) / n), number(population, "confident_share_se"))
        if se is None:  # the larger draw's own error is small beside these n samples'
            se = math.sqrt(share * (1 - share) / n)
        band = f"{CLEAR_SES:g} standard errors, {CLEAR_SES * se * 100:.0f} percentage points"
        if abs(mine - share) <= CLEAR_SES * se:
            typical = f"typical of the model (the difference is within {band})"
        else:
            typical = (f"{'a better' if mine > share else 'a worse'} draw than the model's average "
                       f"(the difference exceeds {band})")
        parts.append(f"Over the metrics' {big_n:.0f} samples the share is {share:.0%}, so these {n} are "
                     f"{typical}.")
    parts.append("Confidently recognized, per " + item + ": "
                 + ", ".join(f"{name}: {c}" for name, c in zip(class_names, confident)) + ".")
    # If the generator drew each class as often as the data has it, a class's confident count
    # would be binomial(k, share): flag counts more than 2 standard deviations from that.
    often, rare, never, absent = [], [], [], []
    for name, c, p in zip(class_names, confident, shares):
        mean, sd = k * p, math.sqrt(k * p * (1 - p))
        if c == 0:
            (never if mean - 2 * sd > 0 else absent).append(name)
        elif c > mean + 2 * sd:
            often.append(f"{name} ({c})")
        elif c < mean - 2 * sd:
            rare.append(f"{name} ({c})")
    even = max(shares) - min(shares) < 0.03
    expected = (f"about {k / nc:.0f} confident samples of each" if even else
                "confident samples in the data's proportions")
    if often or rare or never:
        named = lambda names: join([f"{item} {x}" for x in names])  # noqa: E731
        pieces = []
        if often:
            pieces.append(f"{named(often)} {'comes' if len(often) == 1 else 'come'} out more often")
        if rare:
            pieces.append(f"{named(rare)} rarely")
        if never:
            pieces.append(f"{named(never)} never")
        parts.append(f"A generator that drew every {item} as often as the data has it would give "
                     f"{expected} (give or take 2 standard deviations of chance); here {join(pieces)}.")
    else:
        parts.append(f"Every {item} comes out confidently about as often as in the data "
                     f"({expected}, within 2 standard deviations of chance).")
    if absent:
        parts.append(f"No confident sample is a {join(absent, 'or')}, which chance alone could "
                     f"explain with only {k} confident samples.")
    # How cleanly a class is drawn: of the samples whose best guess is c, the confident share.
    clean = [(c / p, name, c, p) for name, c, p in zip(class_names, confident, predicted) if p >= 3]
    if clean:
        clean.sort()
        worst = [f"{name} ({c} of {p})" for r, name, c, p in clean if r < 0.5]
        best = [f"{name} ({c} of {p})" for r, name, c, p in reversed(clean) if r >= 0.9]
        if best:
            parts.append(f"Drawn cleanly (≥ 90% of the samples whose best guess is that {item} are "
                         f"confident): {join(best[:5])}.")
        else:
            top = [f"{name} ({c} of {p})" for r, name, c, p in reversed(clean) if r >= 0.5][:3]
            if top:
                parts.append(f"No {item} is drawn cleanly (≥ 90% of the samples whose best guess it is "
                             f"confident); the cleanest: {join(top)}.")
        if worst:
            parts.append(f"Drawn poorly (fewer than half confident): {join(worst)}.")
        # the lists above leave these out; said, so that they do not read as complete
        few = [f"{name} ({c} of {p})" for name, c, p in zip(class_names, confident, predicted) if 0 < p < 3]
        if few:
            parts.append(f"Too few samples to judge how cleanly (fewer than 3 whose best guess it is): {join(few)}.")
    return " ".join(parts)


def comment_on_class_grid(best: Sequence[Sequence[int]], confident: Sequence[Sequence[bool]],
                          class_names: Sequence[str], threshold: float = 0.9, item: str = "digit") -> str:
    """Whether each row of a per-class grid shows its class, from the domain classifier's reading
    of its images: best[c][j] is the most probable class of image j of row c (the row drawn for
    class c), confident[c][j] whether that probability exceeds `threshold`."""
    n = sum(len(row) for row in best)
    if n == 0:
        return "The grid has no images to classify."
    own = [sum(b == c for b in row) for c, row in enumerate(best)]
    sure = [sum(b == c and s for b, s in zip(row, conf)) for c, (row, conf) in enumerate(zip(best, confident))]
    hits, sure_hits = sum(own), sum(sure)
    parts = [f"Of the {n} images of the per-{item} grid, the domain classifier reads {hits} ({hits / n:.0%}) as "
             f"their row's {item}, {sure_hits} of them with confidence > {threshold:g}."]
    weak = []
    for c, row in enumerate(best):
        if own[c] * 2 < len(row):  # fewer than half: the row does not show its class
            others = {}
            for b in row:
                if b != c:
                    others[b] = others.get(b, 0) + 1
            read = join([f"{class_names[b]} ({k})" for b, k in sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))])
            weak.append(f"{class_names[c]} ({own[c]} of {len(row)}; the others read as {read})")
    clean = [class_names[c] for c, row in enumerate(best) if row and sure[c] == len(row)]
    if weak:
        parts.append(f"Rows where fewer than half the images read as their {item}: {join(weak)}; the "
                     f"regions fitted to these classes' codes overlap other classes' (see the latent scatter).")
    else:
        parts.append(f"Every row shows its {item} in at least half of its images.")
    if clean:
        parts.append(f"Rows read as their {item} with confidence in every image: {join(clean)}.")
    return " ".join(parts)


def describe_training(first: Mapping[str, float], last: Mapping[str, float], epochs: int,
                      kl_peak: tuple[int, float] | None = None,
                      test_last: Mapping[str, float] | None = None) -> str:
    """The training loss, reconstruction and KL terms from the first to the last epoch (train
    means), with the reading that matches their directions."""
    def move(key: str) -> str:
        a, b = float(first[key]), float(last[key])
        verb = "rose" if b > a else "fell" if b < a else "stayed"
        if verb == "stayed":
            return f"stayed at {a:.1f}"
        # One decimal, unless that would show a change as two equal numbers (a KL near 0).
        x, y = (f"{a:.1f}", f"{b:.1f}") if f"{a:.1f}" != f"{b:.1f}" else (significant(a, 3), significant(b, 3))
        return f"{verb} from {x} to {y}"

    text = (f"Over {epochs} epochs the training loss {move('loss')} nats, the reconstruction term "
            f"{move('recon')} and the KL term {move('kl')}.")
    kl_up = float(last["kl"]) > float(first["kl"])
    recon_down = float(last["recon"]) < float(first["recon"])
    if kl_up and recon_down:
        text += (" The usual trade: as the decoder learns to use the code, the encoder spends more "
                 "nats on it (the KL rises) in exchange for a larger fall in reconstruction error.")
    elif not kl_up and recon_down:
        peak = ""
        if kl_peak is not None and kl_peak[0] not in (1, epochs) and kl_peak[1] > float(first["kl"]):
            peak = f" (it peaked at {kl_peak[1]:.1f} in epoch {kl_peak[0]})"
        text += (f" The KL fell while the reconstruction improved{peak}: the first epoch's average "
                 f"includes the early steps where the encoder spent many nats on an untrained "
                 f"decoder; afterwards the KL penalty trims information the reconstruction does "
                 f"not need.")
    elif not recon_down:
        text += (" The reconstruction term did not fall, so the model did not improve at "
                 "reconstructing over these epochs; more epochs or a different learning rate "
                 "are needed.")
    if test_last is not None and "loss" in test_last:
        gap = float(test_last["loss"]) - float(last["loss"])
        rel = gap / abs(float(last["loss"])) if float(last["loss"]) else float("nan")
        if abs(rel) < 0.02:
            text += (f" The final test loss ({float(test_last['loss']):.1f}) is within 2% of the "
                     f"training loss: no sign of overfitting.")
        elif gap > 0:
            text += (f" The final test loss ({float(test_last['loss']):.1f}) is {rel:.0%} above the "
                     f"training loss: some overfitting.")
        else:
            text += (f" The final test loss ({float(test_last['loss']):.1f}) is below the training "
                     f"loss's epoch average, which includes the earlier, worse steps of the epoch: "
                     f"no sign of overfitting.")
    return text


# ---------------------------------------------------------------------------------------------
# A likelihood table against a paper's (the likelihood-mnist recipe: Burda et al. 2016)
# ---------------------------------------------------------------------------------------------


def nll_against_paper(name: str, nll: float, se: float | None, paper: float, band: float) -> tuple[str, str]:
    """(status, sentence): a measured NLL (nats, lower is better) against the paper's value for
    the same model, and whether it lies within `band` nats of it. The status is 'within' (even
    2 standard errors further out it would be), 'outside' (even 2 standard errors closer it
    would not be), or 'edge' (the band's border lies within 2 standard errors)."""
    diff = nll - paper
    spread = CLEAR_SES * (se or 0.0)
    side = "above (worse than)" if diff > 0 else "below (better than)" if diff < 0 else "equal to"
    where = f"{abs(diff):.2f} nats {side} the paper's {paper:.2f}" if diff else f"equal to the paper's {paper:.2f}"
    measured = f"{name}: {nll:.2f}" + (f" ± {se:.2f}" if se is not None else "") + f" nats, {where}"
    if abs(diff) + spread <= band:
        return "within", f"{measured}: within the {band:g}-nat target."
    if abs(diff) - spread > band:
        if diff > 0:
            return "outside", f"{measured}: outside the {band:g}-nat target."
        return "outside", (f"{measured}: more than {band:g} nats better than the paper reports for the same "
                           f"architecture, which is unexpected; check the evaluation before trusting it.")
    return "edge", (f"{measured}: at the border of the {band:g}-nat target (within {CLEAR_SES:g} standard "
                    f"errors of it), so neither inside nor outside it clearly.")


@dataclass(frozen=True)
class NLLGap:
    """Model `b` (the larger k) against model `a` on the same test images: the mean of NLL_b - NLL_a
    (negative: b is better) with its standard error, computed from the per-image differences
    when `paired` (else combined from the two means' errors), and the paper's difference."""

    a: str
    b: str
    diff: float
    se: float | None
    paired: bool
    paper_diff: float

    @property
    def status(self) -> str:
        """'b' or 'a' (that model clearly better: beyond CLEAR_SES standard errors), 'noise', or
        'unquantified'."""
        if self.se is None:
            return "unquantified"
        if abs(self.diff) <= CLEAR_SES * self.se:
            return "noise"
        return "b" if self.diff < 0 else "a"


def nll_ordering(gaps: Sequence[NLLGap]) -> str:
    """Whether the NLL falls from each model to the next as in the paper (each gap's b had the
    lower NLL there), one clause per pair, then the overall reading."""
    parts, agree = [], []
    for g in gaps:
        errors = "the per-image differences" if g.paired else "the two estimates (combined)"
        lower = "lower" if g.paper_diff < 0 else "higher"
        paper = f"the paper has {g.b} {abs(g.paper_diff):.2f} nats {lower}"
        status = g.status
        if status == "unquantified":
            parts.append(f"{g.b} against {g.a}: {abs(g.diff):.2f} nats {'lower' if g.diff < 0 else 'higher'}, "
                         f"with no uncertainty measured ({paper})")
            agree.append(None)
            continue
        band = (f"{CLEAR_SES:g} standard errors of {errors}, {CLEAR_SES:g} × {significant(g.se, 2)} = "
                f"{significant(CLEAR_SES * g.se, 2)}")
        if status == "noise":
            parts.append(f"{g.b} against {g.a}: no clear difference ({abs(g.diff):.2f} nats apart, within {band}; "
                         f"{paper})")
            agree.append(None)
        else:
            better, worse = (g.b, g.a) if status == "b" else (g.a, g.b)
            as_paper = (status == "b") == (g.paper_diff < 0)
            parts.append(f"{better} clearly better than {worse} by {abs(g.diff):.2f} nats (beyond {band}), "
                         f"{'as in' if as_paper else 'the reverse of'} the paper, where {g.b} is "
                         f"{abs(g.paper_diff):.2f} nats {lower}")
            agree.append(as_paper)
    text = "; ".join(parts) + "."
    if agree and all(a is True for a in agree):
        return f"As in the paper, the NLL falls as k grows: {text}"
    if any(a is False for a in agree):
        return f"Unlike the paper, at least one pair is clearly ordered the other way: {text}"
    if any(a is True for a in agree):
        return f"Part of the paper's ordering shows clearly, part is within the noise: {text}"
    return f"No gap between the models shows clearly beyond the noise, unlike the paper's: {text}"


def active_units_sentence(names: Sequence[str], ours: Sequence[int], paper: Sequence[int], latent_dim: int,
                          threshold: float) -> str:
    """The active-unit counts (Burda et al.'s criterion) against the paper's, in order of k, and
    whether they rise with k as the paper's do."""
    listed = join([f"{n} {u}" for n, u in zip(names, ours)])
    head = (f"Active units (Burda et al.'s criterion: unit u is active when Cov_x(E_q(z|x)[z_u]) > "
            f"{threshold:g}) of the {latent_dim}: {listed}; the paper: {join([str(p) for p in paper])}.")
    rising = all(b > a for a, b in zip(ours, ours[1:]))
    steps_down = [f"{names[i + 1]} ({ours[i + 1]}) against {names[i]} ({ours[i]})"
                  for i in range(len(ours) - 1) if ours[i + 1] < ours[i]]
    if rising:
        tail = "They rise with k, as in the paper: importance weighting keeps more of the latent space in use."
    elif steps_down:
        tail = f"They do not rise with k as in the paper: fewer for {join(steps_down)}."
    else:
        tail = "They do not fall with k, but do not rise at every step as the paper's do (some counts tie)."
    diffs = [u - p for u, p in zip(ours, paper)]
    if all(d < 0 for d in diffs):
        tail += " Every model uses fewer units than the paper's."
    elif all(d > 0 for d in diffs):
        tail += " Every model uses more units than the paper's."
    return f"{head} {tail}"


def training_length_note(names: Sequence[str], epochs: Sequence[int], paper_passes: int) -> str:
    """How long the models trained against the paper's passes, and what unequal training means for
    comparing them (names and epochs in order of k)."""
    share = max(epochs) / paper_passes
    text = (f"Trained for {join([f'{e}' for e in epochs])} passes over the training set ({join(names)}), "
            f"against the paper's {paper_passes:,} each: at most {significant(100 * share, 2)}% of its training, so part of "
            f"each gap to the paper's NLL is training the paper did and this run did not.")
    if len(set(epochs)) > 1:
        fewer = all(b <= a for a, b in zip(epochs, epochs[1:]))
        more = all(b >= a for a, b in zip(epochs, epochs[1:]))
        if fewer:
            text += (" The models with more importance samples had fewer passes (they cost more per pass), "
                     "which works against them in the comparison across k: a gain they show is not "
                     "due to longer training.")
        elif more:
            text += (" The models with more importance samples had more passes, so part of a gain they "
                     "show may be longer training.")
        else:
            text += " The passes differ between the models, so the comparison across k is not at equal training."
    return text
