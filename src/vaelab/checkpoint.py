"""The run folder: config.json + safetensors, versioned, written atomically, loaded without
executing anything from a file.

    RUN/config.json               model name, model config, training config, versions
    RUN/model.safetensors         the weights (what `load_run` needs to rebuild the model)
    RUN/checkpoint.safetensors    everything to resume: weights, optimizers, RNG states, history
    RUN/history.csv, steps.csv    derived from the checkpoint after each save (history_files.py)
    RUN/metrics.json              what `vaelab evaluate` measured (evaluate.py)
    RUN/figures/                  PNGs
    RUN/.lock                     locked (flock) while a process trains in RUN; holds its PID

A new run's folder is made (or an old one replaced) by run_folder.py.

A checkpoint is one file renamed into place, so a kill at any instant leaves either the previous
or the new one, both complete.

The weights and the checkpoint carry a copy of the run's config in their hashed metadata: they
are the source of truth. config.json is the readable copy; an edit of it that would change what
the weights mean or how the run trains is refused on loading, naming the field. Only the
training length and device (`--resume --epochs/--device`) and a model's generation-only fields
(its `generation_fields`, changed with `vaelab config`) may differ.
"""

from __future__ import annotations

import dataclasses
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

from .atomic import atomic_write, clean_stale_siblings, clean_stale_temps
from .config import apply_overrides, config_from_dict, config_to_dict
from .errors import CheckpointError, ConfigError, RunInUseError, VaelabError
from .memory import device_memory, meta_model, parameter_count, require_memory
from .models import build_model, get_model_class
from .reading import format_bytes, parse_json, read_bytes, read_json, require_fields
from .train_config import RESUMABLE_FIELDS, TrainConfig
from .version import __version__

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOCK_FILE = ".lock"
# A safetensors header larger than this is refused before it is read (the format's own cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# config.json is about 1 kB.
MAX_CONFIG_BYTES = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """JSON written atomically (a metric that could not be computed may be NaN: see
    `reading.read_json(..., finite=False)` to read such a file back)."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


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
    data = read_bytes(path, 2**62, "safetensors file")  # bounded by the memory check above
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


@dataclass
class RunSpec:
    """What a run is, parsed and type-checked: model name, model config, training config, and the
    size of the model (counted without building it)."""

    model: str
    model_config: Any
    train: Any
    parameters: int

    def to_dict(self) -> dict:
        return {"model": self.model, "model_config": config_to_dict(self.model_config),
                "train": config_to_dict(self.train)}


def run_config(model, train_config) -> dict:
    """The dict config.json holds and the weights and checkpoint carry in their metadata."""
    return {"model": model.name, "model_config": config_to_dict(model.config), "train": config_to_dict(train_config)}


def write_run_config(run_dir: Path, model, train_config) -> None:
    write_config_dict(run_dir, run_config(model, train_config))


def write_config_dict(run_dir: Path, cfg: dict) -> None:
    write_json(Path(run_dir) / CONFIG_FILE, {"format_version": FORMAT_VERSION, "vaelab_version": __version__,
                                             **{k: cfg[k] for k in ("model", "model_config", "train")}})


def save_model(run_dir: Path, model, config: dict | None = None) -> None:
    """model.safetensors; `config` (see `run_config`) is stored with the weights."""
    meta = {"format_version": FORMAT_VERSION, "model": model.name}
    if config is not None:
        meta["config"] = config
    save_tensors(Path(run_dir) / MODEL_FILE, dict(model.state_dict()), meta)


def read_run_config(run_dir: Path) -> dict:
    """config.json of `run_dir`, bounded and with its top-level types checked (a dict)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    path = run_dir / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{run_dir}: not a vaelab run folder (no {CONFIG_FILE})")
    cfg = read_json(path, MAX_CONFIG_BYTES)
    check_format(cfg, path)
    require_fields(cfg, {"model": str, "model_config": dict, "train": dict}, str(path))
    return cfg


def parse_spec(cfg: dict, path: Path) -> RunSpec:
    """Type-check a run config dict (config.json or a file's stored copy) and build its configs;
    any problem is a CheckpointError naming `path`. Builds the model on the meta device only."""
    require_fields(cfg, {"model": str, "model_config": dict, "train": dict}, str(path))
    try:
        train_config = config_from_dict(TrainConfig, cfg["train"], where="train")
        model = meta_model(cfg["model"], cfg["model_config"], stored=True)
    except VaelabError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return RunSpec(model.name, model.config, train_config, parameter_count(model))


def build_spec(spec: RunSpec, path: Path, training: bool = False, device=None):
    """The model of `spec`, built for real once its size is known to fit in memory."""
    per_parameter = 16 if training else 4  # fp32 weights (+ gradients and Adam's two moments)
    what = "weights, gradients and Adam's moments" if training else "weights"
    require_memory(per_parameter * spec.parameters,
                   f"{path}: a {spec.model} of {spec.parameters:,} parameters ({what})",
                   available=device_memory(device) if device is not None else None, error=CheckpointError)
    return build_model(spec.model, spec.model_config)


def build_from_config(cfg: dict, path: Path):
    spec = parse_spec(cfg, path)
    return build_spec(spec, path), spec.train


def generation_fields(model_name: str) -> tuple[str, ...]:
    """The model's config fields that only affect generation (e.g. the AE's `gen_prior`):
    they may change after training, through `vaelab config`."""
    return tuple(getattr(get_model_class(model_name), "generation_fields", ()))


def config_differences(spec: RunSpec, stored: RunSpec) -> list[tuple[str, Any, Any]]:
    """(field, in config.json, stored) for every field where `spec` differs from `stored` and
    the difference would change what the weights mean or how the run trains."""
    if spec.model != stored.model:
        return [("model", spec.model, stored.model)]
    diffs = []
    free = set(generation_fields(spec.model))
    a, b = config_to_dict(spec.model_config), config_to_dict(stored.model_config)
    diffs += [(f"model_config.{k}", a.get(k), b.get(k)) for k in b if k not in free and a.get(k) != b.get(k)]
    a, b = config_to_dict(spec.train), config_to_dict(stored.train)
    diffs += [(f"train.{k}", a.get(k), b.get(k)) for k in b if k not in RESUMABLE_FIELDS and a.get(k) != b.get(k)]
    return diffs


def check_unchanged(spec: RunSpec, meta: dict, config_path: Path, stored_path: Path) -> None:
    """Refuse a config.json edited where it must not be (see the module docstring). Files
    written before the config was stored in them carry none: config.json is then trusted."""
    if "config" not in meta:
        return
    stored = parse_spec(meta["config"], stored_path)
    diffs = config_differences(spec, stored)
    if diffs:
        field, now, then = diffs[0]
        free = generation_fields(stored.model)
        hint = (f"; only {', '.join(free)} may change (`vaelab config {config_path.parent} KEY=VALUE`)"
                if free else "")
        raise CheckpointError(f"{config_path}: {field} is {now!r} but {stored_path} says {then!r}; config.json "
                              f"cannot change a trained run (edited by hand? put it back){hint}")


def update_config(run_dir: str | Path, assignments: list[str]) -> list[tuple[str, Any, Any]]:
    """Change generation-only fields of a trained run (`vaelab config RUN KEY=VALUE ...`):
    checked against the weights, validated by the model's config class, written atomically to
    config.json under the run's lock. Returns (field, old, new) for each field set."""
    run_dir = resolve_run_dir(run_dir)
    read_run_config(run_dir)  # a folder that is not a run gets no lock file
    with RunLock(run_dir):
        clean_run_folder(run_dir)
        config_path = run_dir / CONFIG_FILE
        spec = parse_spec(read_run_config(run_dir), config_path)
        weights_path = run_dir / MODEL_FILE
        if weights_path.exists():
            check_unchanged(spec, load_tensors(weights_path)[1], config_path, weights_path)
        free = generation_fields(spec.model)
        for item in assignments:
            key = item.partition("=")[0].strip()
            if key not in free:
                allowed = f"only {', '.join(free)} can" if free else f"no field of a {spec.model} can"
                raise ConfigError(f"{key}: {allowed} change after training (the weights depend on the rest; "
                                  f"train a new run for other settings)")
        new_config = apply_overrides(spec.model_config, assignments, flag="vaelab config")
        before, after = config_to_dict(spec.model_config), config_to_dict(new_config)
        changed = [(k, before[k], after[k]) for k in after if before[k] != after[k]]
        if changed and weights_path.exists():  # the trained weights must support the new setting
            model = build_spec(dataclasses.replace(spec, model_config=new_config), config_path)
            load_state_into(model, load_tensors(weights_path)[0], weights_path)
            try:
                model.check_generation()
            except ConfigError as e:
                raise ConfigError(f"{run_dir}: {e}") from None
        if changed:
            write_config_dict(run_dir, {**spec.to_dict(), "model_config": after})
        return changed


def load_state_into(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load weights strictly (but for the model's `optional_state`, which older runs may lack); a
    mismatch names the file and the first differing keys."""
    own = model.state_dict()
    optional = tuple(getattr(model, "optional_state", ()))
    missing = sorted(k for k in set(own) - set(tensors) if not (optional and k.startswith(optional)))
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
    model.load_state_dict(tensors, strict=False)  # checked above: only optional state may be missing
    model.absent_state = tuple(sorted(set(own) - set(tensors)))


def resolve_run_dir(path: str | Path) -> Path:
    """A run folder, or a folder holding exactly one (a one-model recipe such as `runs/demo`):
    the run folder itself. A folder holding several runs is an error that lists them."""
    path = Path(path)
    if (path / CONFIG_FILE).exists() or not path.is_dir():
        return path
    try:
        runs = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot list ({e.strerror or e})") from None
    if len(runs) > 1:
        raise CheckpointError(f"{path} holds {len(runs)} runs ({', '.join(p.name + '/' for p in runs)}); "
                              f"name one, e.g. {runs[0]}")
    return runs[0] if runs else path


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a trained model from its run folder (or a folder holding exactly one run);
    nothing but config.json and weights are read."""
    run_dir = resolve_run_dir(run_dir)
    cfg = read_run_config(run_dir)
    config_path = run_dir / CONFIG_FILE
    spec = parse_spec(cfg, config_path)
    weights_path = run_dir / MODEL_FILE
    tensors, meta = load_tensors(weights_path)
    check_format(meta, weights_path)
    if meta.get("model") != spec.model:
        raise CheckpointError(f"{weights_path}: holds a {meta.get('model')!r} model, config says {spec.model!r}")
    check_unchanged(spec, meta, config_path, weights_path)
    model = build_spec(spec, config_path, device=torch.device(device))
    load_state_into(model, tensors, weights_path)
    model.to(device).eval()
    return Run(run_dir, model, spec.train, cfg)


def save_checkpoint(run_dir: Path, state: dict, config: dict | None = None) -> None:
    """Write the full training state as one safetensors file (tensors) with JSON metadata;
    `config` (see `run_config`) is stored with it."""
    meta, tensors = flatten_state(state)
    stored = {"format_version": FORMAT_VERSION, "state": meta}
    if config is not None:
        stored["config"] = config
    save_tensors(Path(run_dir) / CHECKPOINT_FILE, tensors, stored)


def load_checkpoint(run_dir: Path, with_meta: bool = False):
    """The training state of `run_dir` (and, with `with_meta`, the file's metadata as well)."""
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
    return (state, meta) if with_meta else state


# ---------------------------------------------------------------------------------------------
# The lock of a run folder
# ---------------------------------------------------------------------------------------------


class RunLock:
    """An advisory lock (`fcntl.flock`) on RUN/.lock, held while a process trains in RUN (or
    rewrites its config). The holder writes its PID into the file, so a refused command can
    name it. The lock ends with the process however it ends (even SIGKILL); the file stays."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise CheckpointError(f"{self.folder}: cannot lock the run folder ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunInUseError(in_use_message(self.folder, holder)) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the PID; a refused command then says "unknown"
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file stays (unlinking would race)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_run_folder(run_dir: Path) -> None:
    """What killed processes left: temp files in the run folder and figures/, and the sibling
    folders of an `--overwrite` that never finished. Called by the command that holds the lock."""
    run_dir = Path(run_dir)
    clean_stale_temps(run_dir)
    clean_stale_temps(run_dir / "figures")
    clean_stale_siblings(run_dir)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def in_use_message(folder: Path, holder: str) -> str:
    return (f"{folder} is in use: process {holder} is training in it "
            f"(wait for it to finish, or stop it first)")


def lock_holder(folder: Path) -> str | None:
    """The PID (as text) of the process holding `folder`'s lock, or None; creates nothing."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # also releases the shared lock just taken
    return None
