"""The model registry: name -> model class (whose `config_class` sits beside it).

`@register("name")` fills `MODELS`; the CLI, the checkpoint loader and the tests read it.
Importing this package imports every model module, which registers them.
"""

from __future__ import annotations

from typing import Any

from ..config import apply_overrides, config_from_dict
from ..errors import ConfigError
from .base import GenerativeModel, ModelOutput, Posterior

MODELS: dict[str, type[GenerativeModel]] = {}


def register(name: str):
    def decorator(cls: type[GenerativeModel]) -> type[GenerativeModel]:
        if name in MODELS:
            raise RuntimeError(f"model {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return decorator


def get_model_class(name: str) -> type[GenerativeModel]:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}") from None


def make_config(name: str, overrides: list[str] | None = None, **fields: Any):
    """The default config of model `name`, with keyword fields and then `--set` strings applied."""
    cls = get_model_class(name).config_class
    config = config_from_dict(cls, {k: v for k, v in fields.items() if v is not None},
                              where=f"{name} config")
    return apply_overrides(config, overrides or [])


def build_model(name: str, config: Any | dict | None = None) -> GenerativeModel:
    cls = get_model_class(name)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = config_from_dict(cls.config_class, config, where=f"{name} config")
    return cls(config)


# Importing registers. Keep this list in sync with the files in this folder.
from . import ae, lstm_vae, vae, vae_gan  # noqa: E402,F401

__all__ = ["MODELS", "register", "get_model_class", "make_config", "build_model",
           "GenerativeModel", "ModelOutput", "Posterior"]
