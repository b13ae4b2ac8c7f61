"""vaelab: autoencoder-family generative models on MNIST-like images.

The public API, re-exported in one place:

    from vaelab import load, build_model, make_config, train, TrainConfig, load_run

The library never changes process-wide settings by itself; `vaelab.runtime.configure()` applies
the command line's (threads, denormal flushing, the allocator) to a program that wants them.
"""

__version__ = "0.1.0"

from .batch import Batch, StepState  # noqa: E402
from .checkpoint import Run, load_run  # noqa: E402
from .data import DATASETS, ImageData, fetch, load  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError, ConfigError, DataError, DivergenceError, RunExistsError, VaelabError,
)
from . import runtime  # noqa: E402
from .models import MODELS, GenerativeModel, ModelOutput, build_model, make_config  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

__all__ = [
    "__version__", "Batch", "StepState", "Run", "load_run", "DATASETS", "ImageData", "fetch", "load",
    "CheckpointError", "ConfigError", "DataError", "DivergenceError", "RunExistsError",
    "VaelabError", "MODELS", "GenerativeModel", "ModelOutput", "build_model", "make_config",
    "TrainConfig", "train", "runtime",
]
