"""Sizes checked against memory before anything is allocated: a request that cannot fit is one
line with the estimate, not an allocator error (or the OOM killer) minutes later."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError, VaelabError
from .models import build_model
from .reading import format_bytes


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device) -> int | None:
    """Free bytes on `device` (a torch.device): CUDA's free memory, else the host's."""
    if getattr(device, "type", "cpu") == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    return available_memory()


def require_memory(need: float, what: str, available: int | None = None,
                   error: type[VaelabError] = ConfigError) -> None:
    """Refuse `what` if it needs more than the memory available: `what` names what was asked for,
    e.g. "generate -n 10000000 (10000000 images and a 94860-pixel-wide grid)"."""
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise error(f"{what} needs about {format_bytes(need)} of memory, more than the "
                    f"{format_bytes(available)} available")


def meta_model(model_name: str, config, stored: bool = False):
    """Model `model_name` built on the meta device, where building allocates nothing: its config
    validated and its size known before any memory is spent (`stored` as for `build_model`)."""
    try:
        with torch.device("meta"):
            return build_model(model_name, config, stored=stored)
    except (RuntimeError, OverflowError, ValueError) as e:  # a layer whose size overflows int64
        raise ConfigError(f"{model_name} config: too large to build ({str(e).splitlines()[0][:100]})") from None


def parameter_count(model) -> int:
    """Parameters and buffers of a (meta) model."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))
