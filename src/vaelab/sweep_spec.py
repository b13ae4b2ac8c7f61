"""A sweep's YAML spec, read and checked whole before any trial starts (`vaelab sweep SPEC.yaml`).

    model: lstm-vae                    # a registered model
    fixed: {epochs: 10, latent_dim: 2} # training options and --set fields held for every trial
    sampler: grid                      # grid, random or tpe
    space:                             # the searched fields (training options or --set fields)
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (random, tpe)
      batch_norm: [false, true]                    # a list of values (any sampler; grid: all)
    variants:                          # optional: named whole assignments, searched as one field
      - {name: 4 layers, channels: [64, 32, 32, 16], ...}
    metric: test.loss                  # SPLIT.COLUMN of history.csv at the last epoch, or
                                       # metrics.KEY[.KEY] of metrics.json (evaluated after training)
    direction: minimize                # or maximize
    pruner: median                     # optional: stop trials whose metric per epoch is worse than
                                       # the median of earlier trials at that epoch
    evaluate: {iw_samples: 100}        # with a metrics.* metric: what `vaelab evaluate` measures
    trials: 20                         # random/tpe: how many (--trials overrides); grid: all points
    seed: 0                            # the sampler's seed

A key names a training option (TrainConfig's fields) or a field of the model's config; nothing
else. Every problem is a ConfigError naming the spec file and the key. Values a searched field
takes are checked by building the configs they make (every point of a grid; a range's ends), so
a typo or an impossible combination fails here, not in trial 37.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import config_from_dict
from .errors import ConfigError, VaelabError
from .evaluate import EvalSettings
from .memory import meta_model
from .models import get_model_class
from .reading import read_bytes
from .train_config import TrainConfig

SAMPLERS = ("grid", "random", "tpe")
DIRECTIONS = ("minimize", "maximize")
PRUNERS = ("none", "median")
SPEC_KEYS = ("model", "fixed", "sampler", "space", "variants", "metric", "direction", "pruner", "evaluate",
             "trials", "seed")
RANGE_KEYS = ("low", "high", "log", "step")
# metrics.json values a sweep may optimise: what `vaelab evaluate` writes for every model it
# applies to (evaluate.evaluate_run), and which evaluation setting must be on for it.
METRIC_PATHS = {
    "recon_mse": None, "elbo.neg_elbo": None, "elbo.recon": None, "elbo.kl": None,
    "latent.active_units": None, "iwae.nll": "iw_samples",
    **{f"sample_quality.samples.{k}": "samples" for k in ("fd", "kid", "precision", "recall", "coverage", "confident_share")},
}
EVALUATE_KEYS = {"iw_samples": "iw_samples", "iw_images": "iw_images", "samples": "n_samples", "seed": "seed"}
VARIANT = "variant"  # the searched field a spec's `variants` become
MAX_SPEC_BYTES = 1024 * 1024
MAX_GRID_POINTS = 10000


@dataclass
class Dimension:
    """One searched field: a list of `choices`, or a range low..high (`log`, integer `step`)."""

    name: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def labels(self) -> list:
        """The choices as Optuna stores them: None, bool, int, float or str; a list value as its
        JSON text (decoded again by `value`)."""
        return [c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c) for c in self.choices]

    def value(self, stored: Any) -> Any:
        if self.choices is None:
            return stored
        return self.choices[self.labels().index(stored)]


@dataclass
class SweepSpec:
    path: Path
    model: str
    fixed: dict
    sampler: str
    dimensions: list[Dimension]
    variants: dict[str, dict]  # name -> assignment
    metric: str
    direction: str
    pruner: str
    evaluate: EvalSettings | None
    trials: int | None
    seed: int
    raw: dict = field(default_factory=dict)  # the spec as read: stored with the study

    @property
    def grid(self) -> list[dict]:
        """Every point of a grid sampler's space, in order: {field: stored label}."""
        names = [d.name for d in self.dimensions]
        return [dict(zip(names, combo)) for combo in itertools.product(*(d.labels() for d in self.dimensions))]

    def assignment(self, params: dict) -> dict:
        """The fields one trial sets (fixed, its variant, its searched values) from its params."""
        values = dict(self.fixed)
        for d in self.dimensions:
            if d.name in params:
                if d.name == VARIANT and VARIANT not in self.fields:
                    values.update(self.variants[d.value(params[d.name])])
                else:
                    values[d.name] = d.value(params[d.name])
        return values

    @property
    def fields(self) -> set[str]:
        return field_names(self.model)[0] | field_names(self.model)[1]

    def configs(self, values: dict, where: str = ""):
        """(model config, TrainConfig) of an assignment; a bad one is a ConfigError naming `where`."""
        return build_configs(self.model, values, f"{self.path}: {where}" if where else str(self.path))


def field_names(model: str) -> tuple[set[str], set[str]]:
    """(training options, model config fields)."""
    return ({f.name for f in dataclasses.fields(TrainConfig)},
            {f.name for f in dataclasses.fields(get_model_class(model).config_class)})


def build_configs(model: str, values: dict, where: str):
    train_fields, model_fields = field_names(model)
    try:
        train = config_from_dict(TrainConfig, {k: v for k, v in values.items() if k in train_fields}, where="train")
        model_config = config_from_dict(get_model_class(model).config_class,
                                        {k: v for k, v in values.items() if k in model_fields}, where=model)
        meta_model(model, model_config)  # the decoder's shape rules and a size that fits int64
    except VaelabError as e:
        raise ConfigError(f"{where}: {e}") from None
    return model_config, train


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check `path` (see the module docstring)."""
    path = Path(path)
    try:
        import yaml
    except ImportError:
        raise ConfigError("vaelab sweep needs PyYAML and optuna, which are not installed: "
                          "pip install 'vaelab[sweep]' (`make install` includes it)") from None
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(read_bytes(path, MAX_SPEC_BYTES, "sweep spec", ConfigError).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).replace("\n", " ")
        raise ConfigError(f"{path}: not a YAML file ({' '.join(first.split())[:160]})") from None
    return parse_spec(raw, path)


def parse_spec(raw: Any, path: Path) -> SweepSpec:
    def fail(key: str, message: str):
        raise ConfigError(f"{path}: {key}: {message}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys ({', '.join(SPEC_KEYS)})")
    for key in raw:
        if key not in SPEC_KEYS:
            fail(str(key), f"unknown key (known: {', '.join(SPEC_KEYS)})")
    if not isinstance(raw.get("model"), str):
        fail("model", "name a registered model (see `vaelab models`)")
    try:
        get_model_class(raw["model"])
    except ConfigError as e:
        fail("model", str(e))
    model = raw["model"]
    train_fields, model_fields = field_names(model)
    known = train_fields | model_fields

    def check_field(key: str, name: Any) -> None:
        if not isinstance(name, str) or name not in known:
            fail(f"{key}.{name}", f"not a training option nor a field of {model}'s config "
                                  f"(see `vaelab models --fields` and `vaelab train --help`)")

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "expected a mapping of field: value")
    for name in fixed:
        check_field("fixed", name)

    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        fail("sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        fail("space", "expected a mapping of field: [values] or {low, high}")
    dimensions = []
    for name, entry in space.items():
        check_field("space", name)
        if name in fixed:
            fail(f"space.{name}", "also in fixed: a field is either held or searched")
        dimensions.append(_dimension(name, entry, sampler, f"space.{name}", fail))

    variants: dict[str, dict] = {}
    raw_variants = raw.get("variants")
    if raw_variants is not None:
        if not isinstance(raw_variants, list) or not raw_variants:
            fail("variants", "expected a non-empty list of mappings (field: value, and an optional name)")
        for i, variant in enumerate(raw_variants):
            if not isinstance(variant, dict):
                fail(f"variants[{i}]", "expected a mapping of field: value")
            name = str(variant.get("name", f"variant-{i + 1}"))
            if name in variants:
                fail(f"variants[{i}].name", f"{name!r} names two variants")
            assignment = {k: v for k, v in variant.items() if k != "name"}
            for key in assignment:
                check_field(f"variants[{i}]", key)
                if key in space:
                    fail(f"variants[{i}].{key}", "also in space: a field is set by the variant or searched")
            variants[name] = assignment
        dimensions.insert(0, Dimension(VARIANT, choices=list(variants)))
    if not dimensions:
        fail("space", "nothing to search: give space or variants")

    metric = raw.get("metric", "test.loss")
    evaluate = _evaluate_settings(raw.get("evaluate"), metric, fail)
    _check_metric(metric, model, {**fixed}, space, variants, evaluate, fail)
    direction = raw.get("direction", "minimize")
    if direction not in DIRECTIONS:
        fail("direction", f"{direction!r} is not one of {', '.join(DIRECTIONS)}")
    pruner = raw.get("pruner", "none") or "none"
    if pruner not in PRUNERS:
        fail("pruner", f"{pruner!r} is not one of {', '.join(PRUNERS)}")
    if pruner != "none" and metric.startswith("metrics."):
        fail("pruner", "prunes by the metric per epoch, so it needs a history.csv metric (such as test.loss)")
    trials = raw.get("trials")
    if trials is not None and (type(trials) is not int or trials < 1):
        fail("trials", f"expected a whole number of trials, at least 1, got {trials!r}")
    seed = raw.get("seed", 0)
    if type(seed) is not int or seed < 0:
        fail("seed", f"expected a non-negative whole number, got {seed!r}")

    spec = SweepSpec(path, model, fixed, sampler, dimensions, variants, metric, direction, pruner, evaluate,
                     trials, seed, raw)
    _check_values(spec, fail)
    return spec


def _dimension(name: str, entry: Any, sampler: str, key: str, fail) -> Dimension:
    if isinstance(entry, list):
        if not entry:
            fail(key, "an empty list of values")
        labels = Dimension(name, choices=entry).labels()
        if len(set(map(json.dumps, labels))) != len(labels):
            fail(key, "a value is listed twice")
        return Dimension(name, choices=entry)
    if not isinstance(entry, dict):
        fail(key, "expected a list of values or a range {low, high[, log][, step]}")
    if sampler == "grid":
        fail(key, "a grid sampler takes lists of values, not ranges")
    for k in entry:
        if k not in RANGE_KEYS:
            fail(f"{key}.{k}", f"unknown range key (known: {', '.join(RANGE_KEYS)})")
    low, high, log, step = entry.get("low"), entry.get("high"), entry.get("log", False), entry.get("step")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (number(low) and number(high)):
        fail(key, f"a range needs numbers low and high, got {low!r} and {high!r}")
    if not low < high:
        fail(key, f"a range needs low < high, got {low} and {high}")
    if not isinstance(log, bool):
        fail(f"{key}.log", f"expected true or false, got {log!r}")
    if log and low <= 0:
        fail(f"{key}.log", f"a log range needs low > 0, got {low}")
    if step is not None and (not number(step) or step <= 0):
        fail(f"{key}.step", f"expected a positive number, got {step!r}")
    if step is not None and log:
        fail(f"{key}.step", "a log range takes no step")
    integer = all(type(v) is int for v in (low, high)) and (step is None or type(step) is int)
    return Dimension(name, low=low, high=high, log=log, step=step, integer=integer)


def _evaluate_settings(raw: Any, metric: Any, fail) -> EvalSettings | None:
    if not isinstance(metric, str) or not metric.startswith("metrics."):
        if raw is not None:
            fail("evaluate", "only with a metrics.* metric (the evaluation is run for it)")
        return None
    raw = raw or {}
    if not isinstance(raw, dict):
        fail("evaluate", f"expected a mapping of {', '.join(EVALUATE_KEYS)}")
    values = {}
    for k, v in raw.items():
        if k not in EVALUATE_KEYS:
            fail(f"evaluate.{k}", f"unknown key (known: {', '.join(EVALUATE_KEYS)})")
        if type(v) is not int or v < 0 or (k == "iw_images" and v < 1):
            fail(f"evaluate.{k}", f"expected a whole number, at least {1 if k == 'iw_images' else 0}, got {v!r}")
        values[EVALUATE_KEYS[k]] = v
    # Cheaper than `vaelab evaluate`'s defaults: a trial measures, a final comparison re-measures.
    return EvalSettings(**{"iw_samples": 100, "iw_images": 1000, "n_samples": 0, **values})


def _check_metric(metric: Any, model: str, fixed: dict, space: dict, variants: dict, evaluate, fail) -> None:
    if not isinstance(metric, str):
        fail("metric", "expected SPLIT.COLUMN (test.loss) or metrics.KEY (metrics.iwae.nll)")
    if metric.startswith("metrics."):
        path = metric[len("metrics."):]
        if path.startswith("test_terms."):
            column = path[len("test_terms."):]
            if column not in ("loss", *get_model_class(model).term_names):
                fail("metric", f"{model} has no loss term {column!r} (terms: loss, "
                               f"{', '.join(get_model_class(model).term_names)})")
            return
        if path not in METRIC_PATHS:
            fail("metric", f"{metric!r} is not a metrics.json value a sweep reads (known: metrics.test_terms.TERM, "
                           + ", ".join(f"metrics.{p}" for p in METRIC_PATHS) + ")")
        needs = METRIC_PATHS[path]
        if needs is not None and getattr(evaluate, {"iw_samples": "iw_samples", "samples": "n_samples"}[needs]) == 0:
            fail("metric", f"{metric} needs evaluate.{needs} above 0")
        return
    split, _, column = metric.partition(".")
    columns = ("loss", *get_model_class(model).term_names, "seconds")
    val_sizes = [fixed.get("val_size", 0), *(v.get("val_size", 0) for v in variants.values())]
    splits = ("train", "test", "val") if any(val_sizes) or "val_size" in space else ("train", "test")
    if split not in splits or column not in columns:
        fail("metric", f"{metric!r} is not a history.csv column of {model}: SPLIT.COLUMN with SPLIT one of "
                       f"{', '.join(splits)} and COLUMN one of {', '.join(columns)}; or metrics.KEY")


def _check_values(spec: SweepSpec, fail) -> None:
    """Build the configs of every grid point (or every listed value, and each range's ends, each
    with the other fields at their first value) so that a bad value fails before any trial."""
    first = {d.name: (d.labels()[0] if d.choices is not None else d.low) for d in spec.dimensions}
    if spec.sampler == "grid":
        points = spec.grid
        if spec.trials is not None and spec.trials > len(points):
            fail("trials", f"{spec.trials} trials, but the grid has {len(points)} points")
        if len(points) > MAX_GRID_POINTS:
            fail("space", f"a grid of {len(points)} points (at most {MAX_GRID_POINTS})")
    else:
        points = []
        for d in spec.dimensions:
            tried = d.labels() if d.choices is not None else [d.low, d.high]
            points += [{**first, d.name: v} for v in tried]
    for point in points:
        changed = ", ".join(f"{k}={spec.dimensions[[d.name for d in spec.dimensions].index(k)].value(v)!r}"
                            for k, v in point.items())
        spec.configs(spec.assignment(point), f"the trial {changed}")
