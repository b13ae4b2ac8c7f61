"""The model registry: name -> model class (whose `config_class` sits beside it).

`@register("name")` fills `MODELS`; the CLI, the checkpoint loader and the tests read it. A module
of its own, imported by each model module and by the package, so the package's `__init__` can
import the model modules (which registers them) without their importing it back.
"""

from __future__ import annotations

from typing import Any

from ..config import apply_overrides, config_from_dict
from ..errors import ConfigError
from .base import GenerativeModel

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


def build_model(name: str, config: Any | dict | None = None, stored: bool = False) -> GenerativeModel:
    """The model `name` from its config (a dataclass, a dict, or None for the defaults).

    stored=True: the dict was saved with a run, perhaps by an older vaelab; fields it lacks take
    the config class's `legacy_defaults` (the values that rebuild runs saved before those fields
    existed) rather than today's defaults.
    """
    cls = get_model_class(name)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        if stored:
            legacy = getattr(cls.config_class, "legacy_defaults", {})
            config = {**{k: v for k, v in legacy.items() if k not in config}, **config}
        config = config_from_dict(cls.config_class, config, where=f"{name} config")
    return cls(config)
