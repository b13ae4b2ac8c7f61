"""The models: the registry (`registry.py`) and every model module, imported here, which
registers them. `from vaelab.models import MODELS, build_model, make_config` is the public way in.
"""

from __future__ import annotations

from .base import GenerativeModel, ModelOutput, Posterior
from .registry import MODELS, build_model, get_model_class, make_config, register

# Importing registers. Keep this list in sync with the files in this folder.
from . import ae, cvae, lstm_vae, vae, vae_gan  # noqa: F401

__all__ = ["MODELS", "register", "get_model_class", "make_config", "build_model",
           "GenerativeModel", "ModelOutput", "Posterior"]
