"""vaelab: autoencoder-family generative models on MNIST-like images.

The public API, re-exported in one place (the README's "Python API" shows it at work, and the
notebooks in examples/ use nothing else):

    data       load, subset, fetch, ImageData, DATASETS; to_float (uint8 images -> model inputs)
    models     make_config, build_model, MODELS, GenerativeModel, ModelOutput
    training   TrainConfig, train, resume; load_run (a run folder's model and configs), Run
    using a model   generate (samples from its prior); model.reconstruct, .encode, .decode
    measuring  evaluate_run, EvalSettings, format_table; load_or_train_classifier, classify
    figures    write_run_figures (every figure of a run, as PNGs in its figures/), class_grid_rows
    recipes    get_recipe, run_recipe, run_step (one model of a recipe: trained, drawn, measured),
               StepResult; the assignments' answers computed from measured steps:
               training_comment, samples_comment, class_grid_comment, answer_a_vs_b,
               answer_vae_vs_autoencoders, answer_vaegan_vs_vae, answer_latent_sizes; tables:
               summary_table, comparison_table, comparison_summary, dependence_table, Table;
               side_by_side_figures
    notebooks  show_figures, show_figure, show_table, show_answer (inline, with plain-text twins)

The figure, recipe and notebook names load matplotlib (about 0.4 s) and are imported on first
use, so `import vaelab`, and every `vaelab` command that draws nothing, stays as quick as before.

The library never changes process-wide settings by itself; `vaelab.runtime.configure()` applies
the command line's (threads, denormal flushing, the allocator) to a program that wants them.
"""

import importlib

from .version import __version__
from .batch import Batch, StepState
from .checkpoint import Run, load_run
from .data import DATASETS, ImageData, fetch, load, subset, to_float
from .errors import (
    CheckpointError, ConfigError, DataError, DivergenceError, RunExistsError, VaelabError,
)
from . import runtime
from .evaluate import EvalSettings, evaluate_run, format_table, generate
from .metrics import classify, load_or_train_classifier
from .models import MODELS, GenerativeModel, ModelOutput, build_model, make_config
from .report import Table
from .train import resume, train
from .train_config import TrainConfig

# name -> the module that defines it, imported when the name is first used (PEP 562).
_ON_FIRST_USE = {
    **dict.fromkeys(("write_run_figures", "class_grid_rows"), "figures"),
    **dict.fromkeys(("RECIPES", "get_recipe", "run_recipe", "run_step", "StepResult", "training_comment",
                     "samples_comment", "class_grid_comment", "answer_a_vs_b", "answer_vae_vs_autoencoders",
                     "answer_vaegan_vs_vae", "answer_latent_sizes", "summary_table", "comparison_table",
                     "comparison_summary", "dependence_table", "side_by_side_figures"), "recipes"),
    **dict.fromkeys(("show_figures", "show_figure", "show_table", "show_answer"), "notebook"),
}


def __getattr__(name: str):
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later uses find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_FIRST_USE})


__all__ = [
    "__version__", "Batch", "StepState", "Run", "load_run", "DATASETS", "ImageData", "fetch", "load", "subset",
    "to_float", "CheckpointError", "ConfigError", "DataError", "DivergenceError", "RunExistsError",
    "VaelabError", "MODELS", "GenerativeModel", "ModelOutput", "build_model", "make_config",
    "TrainConfig", "train", "resume", "runtime", "EvalSettings", "evaluate_run", "format_table", "generate",
    "classify", "load_or_train_classifier", "Table", *_ON_FIRST_USE,
]
