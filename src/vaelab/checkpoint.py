"""The run folder: config.json + safetensors, versioned, written atomically, loaded without
executing anything from a file.

    RUN/config.json               model name, model config, training config, versions
    RUN/model.safetensors         the weights (what `load_run` needs to rebuild the model)
    RUN/checkpoint.safetensors    everything to resume: weights, optimizers, RNG states, history
    RUN/history.csv, steps.csv    derived from the checkpoint after each save
    RUN/figures/                  PNGs
    RUN/.lock                     locked (flock) while a process trains in RUN; holds its PID

A checkpoint is one file renamed into place, so a kill at any instant leaves either the previous
or the new one, both complete.

The weights and the checkpoint carry a copy of the run's config in their hashed metadata: they
are the source of truth. config.json is the readable copy; an edit of it that would change what
the weights mean or how the run trains is refused on loading, naming the field. Only the
training length and device (`--resume --epochs/--device`) and a model's generation-only fields
(its `generation_fields`, changed with `vaelab config`) may differ.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .atomic import atomic_write
from .config import config_from_dict, config_to_dict
from .errors import CheckpointError, RunInUseError, VaelabError
from .memory import available_memory, parameter_count, require_memory
from .reading import format_bytes, parse_json, read_bytes, read_json, require_fields

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOCK_FILE = ".lock"
# A safetensors header larger than this is refused before it is read (the format's own cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# config.json is about 1 kB.
MAX_CONFIG_BYTES = 1024 * 1024
# What --resume may change in a stored training config (see the module docstring).
RESUMABLE_TRAIN_FIELDS = ("epochs", "device")


# ---------------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """JSON written atomically; NaN and infinities are refused (vaelab never reads them back)."""
    atomic_write(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


# `reading.read_json`: a bounded, depth-checked JSON object (a CheckpointError naming the file
# otherwise), re-exported here where the run-folder code has always found it.
read_json = read_json


# ---------------------------------------------------------------------------------------------
# Nested state <-> (JSON, tensors)
# ---------------------------------------------------------------------------------------------


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure (optimizer state, RNG states...) into JSON and named tensors.

    Tensors become {"__tensor__": key}; dicts with non-string keys become {"__items__": [...]}
    so optimizer states (keyed by int) come back with int keys.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, np.ndarray):
            o = torch.from_numpy(o.copy())
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {k: walk(v, f"{path}/{k}") for k, v in o.items()}
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {path}")

    return walk(obj, prefix), tensors


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint lacks tensor {key}")
            return tensors[key]
        if "__items__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# safetensors files with JSON metadata
# ---------------------------------------------------------------------------------------------


def content_digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata and every tensor's name, dtype, shape and bytes: a flipped bit
    anywhere in a file is caught on load instead of silently changing weights or RNG states."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # One metadata key: safetensors writes several in no fixed order, and equal states should
    # give equal files. The digest covers the metadata as serialised without it.
    meta = {**meta, "sha256": content_digest(json.dumps(meta), tensors)}
    data = save_safetensors_bytes(tensors, metadata={"vaelab": json.dumps(meta)})
    atomic_write(path, data)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file written by `save_tensors`; any damage is a CheckpointError.

    The file must fit in memory twice (its bytes and the tensors made from them), checked
    before it is read; its metadata must carry the SHA-256 `save_tensors` writes, which must
    match: a file with the hash removed is refused, not loaded unverified."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_bytes names the problem
    require_memory(2 * size, f"loading {path} ({format_bytes(size)})", error=CheckpointError)
    data = read_bytes(path, max(size, 1) if size else 2**62, "safetensors file")
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated (not a safetensors file)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
    header = parse_json(data[8 : 8 + header_len], f"{path}: safetensors header")
    try:
        text = header["__metadata__"]["vaelab"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a vaelab safetensors file (metadata missing or corrupt)") from None
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: not a vaelab safetensors file (metadata missing or corrupt)")
    meta = parse_json(text, f"{path}: vaelab metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt vaelab metadata")
    digest = meta.pop("sha256", None)
    if not isinstance(digest, str):
        raise CheckpointError(f"{path}: no SHA-256 in its metadata (edited by hand, or written by a vaelab "
                              f"older than its integrity check); refusing weights that cannot be verified")
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # the safetensors parser's errors are not one public type
        raise CheckpointError(f"{path}: corrupt safetensors data ({(str(e).splitlines() or [''])[0][:120]})") from None
    if digest != content_digest(json.dumps(meta), tensors):
        raise CheckpointError(f"{path}: corrupt (content does not match its SHA-256)")
    return tensors, meta


def check_format(meta: dict, path: Path) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported by vaelab {__version__} "
            f"(expects {FORMAT_VERSION})"
        )


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A loaded run folder: the rebuilt model (eval mode) and its stored configuration."""

    path: Path
    model: Any
    train_config: Any
    meta: dict


def write_run_config(run_dir: Path, model, train_config) -> None:
    write_json(Path(run_dir) / CONFIG_FILE, {
        "format_version": FORMAT_VERSION,
        "vaelab_version": __version__,
        "model": model.name,
        "model_config": config_to_dict(model.config),
        "train": config_to_dict(train_config),
    })


def save_model(run_dir: Path, model) -> None:
    save_tensors(Path(run_dir) / MODEL_FILE, dict(model.state_dict()),
                 {"format_version": FORMAT_VERSION, "model": model.name})


def read_run_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir}: not a vaelab run folder (no {CONFIG_FILE})")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a vaelab run config")
    check_format(cfg, path)
    for key in ("model", "model_config", "train"):
        if key not in cfg:
            raise CheckpointError(f"{path}: missing {key!r}")
    return cfg


def build_from_config(cfg: dict, path: Path):
    from .models import build_model  # the registry imports every model; only needed here
    from .train import TrainConfig

    try:
        model = build_model(cfg["model"], cfg["model_config"], stored=True)
        train_config = config_from_dict(TrainConfig, cfg["train"], where="train")
    except VaelabError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model, train_config


def load_state_into(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load weights strictly; a mismatch names the file and the first differing keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit a {model.name} with this config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in tensors.items():
        if own[k].shape != v.shape or own[k].dtype != v.dtype:
            raise CheckpointError(f"{path}: weights do not fit a {model.name} with this config ({k} has shape "
                                  f"{tuple(v.shape)} {v.dtype}, expected {tuple(own[k].shape)} {own[k].dtype})")
    model.load_state_dict(tensors)


def resolve_run_dir(path: str | Path) -> Path:
    """A run folder, or a folder holding exactly one (a one-model recipe such as `runs/demo`):
    the run folder itself. A folder holding several runs is an error that lists them."""
    path = Path(path)
    if (path / CONFIG_FILE).exists() or not path.is_dir():
        return path
    runs = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file())
    if len(runs) > 1:
        raise CheckpointError(f"{path} holds {len(runs)} runs ({', '.join(p.name + '/' for p in runs)}); "
                              f"name one, e.g. {runs[0]}")
    return runs[0] if runs else path


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a trained model from its run folder (or a folder holding exactly one run);
    nothing but config.json and weights are read."""
    run_dir = resolve_run_dir(run_dir)
    cfg = read_run_config(run_dir)
    model, train_config = build_from_config(cfg, run_dir / CONFIG_FILE)
    weights_path = run_dir / MODEL_FILE
    tensors, meta = load_tensors(weights_path)
    check_format(meta, weights_path)
    if meta.get("model") != cfg["model"]:
        raise CheckpointError(f"{weights_path}: holds a {meta.get('model')!r} model, config says {cfg['model']!r}")
    load_state_into(model, tensors, weights_path)
    model.to(device).eval()
    return Run(run_dir, model, train_config, cfg)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write the full training state as one safetensors file (tensors) with JSON metadata."""
    meta, tensors = flatten_state(state)
    save_tensors(Path(run_dir) / CHECKPOINT_FILE, tensors, {"format_version": FORMAT_VERSION, "state": meta})


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT_FILE
    tensors, meta = load_tensors(path)
    check_format(meta, path)
    if "state" not in meta:
        raise CheckpointError(f"{path}: not a training checkpoint")
    try:
        state = unflatten_state(meta["state"], tensors)
    except (TypeError, ValueError, KeyError) as e:  # malformed "__items__" / "__tensor__" entries
        raise CheckpointError(f"{path}: corrupt training state ({e})") from None
    if not (isinstance(state, dict) and type(state.get("epoch")) is int and type(state.get("step")) is int):
        raise CheckpointError(f"{path}: corrupt training state (no epoch and step)")
    return state
