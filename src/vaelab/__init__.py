"""vaelab: autoencoder-family generative models on MNIST-like images.

The public API, re-exported in one place:

    from vaelab import load, build_model, make_config, train, TrainConfig, load_run

The library never changes process-wide settings by itself; `vaelab.runtime.configure()` applies
the command line's (threads, denormal flushing, the allocator) to a program that wants them.
"""

from .version import __version__
from .batch import Batch, StepState
from .checkpoint import Run, load_run
from .data import DATASETS, ImageData, fetch, load
from .errors import (
    CheckpointError, ConfigError, DataError, DivergenceError, RunExistsError, VaelabError,
)
from . import runtime
from .models import MODELS, GenerativeModel, ModelOutput, build_model, make_config
from .train import train
from .train_config import TrainConfig

__all__ = [
    "__version__", "Batch", "StepState", "Run", "load_run", "DATASETS", "ImageData", "fetch", "load",
    "CheckpointError", "ConfigError", "DataError", "DivergenceError", "RunExistsError",
    "VaelabError", "MODELS", "GenerativeModel", "ModelOutput", "build_model", "make_config",
    "TrainConfig", "train", "runtime",
]
