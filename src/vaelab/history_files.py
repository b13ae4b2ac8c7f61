"""history.csv and steps.csv: a run's loss terms per epoch (train and each evaluated split) and
per optimizer step, as text tables.

The trainer rewrites both from its checkpointed state after every save, so they only ever hold
rows of epochs that are complete and saved; the checkpoint is their source of truth, and a damaged
table is rewritten by `vaelab train --resume`. The figures and the recipes read them back here.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .checkpoint import CHECKPOINT_FILE
from .errors import CheckpointError
from .reading import read_bytes

HISTORY_FILE = "history.csv"
STEPS_FILE = "steps.csv"
# history.csv and steps.csv hold one row per epoch and per step; 256 MB is ~10^6 epochs of steps.
MAX_TABLE_BYTES = 256 * 1024 * 1024


def write_history(run_dir: Path, rows: list[dict], term_names: tuple[str, ...]) -> None:
    """history.csv: epoch, split, the loss terms, seconds; one row per epoch and split."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["epoch", "split", *term_names, "seconds"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(run_dir) / HISTORY_FILE, buf.getvalue().encode())


def write_steps(run_dir: Path, steps: torch.Tensor, term_names: tuple[str, ...]) -> None:
    """steps.csv from (steps, 2 + terms) rows of step, epoch, loss terms."""
    buf = io.StringIO()
    buf.write(",".join(["step", "epoch", *term_names]) + "\n")
    for row in steps.tolist():
        buf.write(f"{int(row[0])},{int(row[1])}," + ",".join(f"{v:.6g}" for v in row[2:]) + "\n")
    atomic_write(Path(run_dir) / STEPS_FILE, buf.getvalue().encode())


def read_history(run_dir: Path) -> list[dict]:
    """history.csv as rows (epoch an int, the loss terms as text), or [] if the run has none;
    a damaged file is a CheckpointError naming it."""
    path = Path(run_dir) / HISTORY_FILE
    text = _read_table(path)
    if text is None:
        return []
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or header[:2] != ["epoch", "split"] or "loss" not in header:
        raise CheckpointError(f"{path}: no epoch,split,loss... header{_repair(run_dir)}")
    rows = []
    for line, values in enumerate(reader, start=2):
        if len(values) != len(header):
            raise CheckpointError(f"{path}: line {line} has {len(values)} fields, the header {len(header)}"
                                  f"{_repair(run_dir)}")
        row = dict(zip(header, values))
        try:
            row["epoch"] = int(row["epoch"])
            for key in header[2:]:
                if row[key] != "":
                    float(row[key])
        except ValueError:
            raise CheckpointError(f"{path}: line {line} holds a value that is not a number{_repair(run_dir)}") from None
        rows.append(row)
    return rows


def read_steps(run_dir: Path) -> tuple[np.ndarray, list[str]]:
    """steps.csv as an array (rows, columns) and its column names; empty if the run has none."""
    path = Path(run_dir) / STEPS_FILE
    text = _read_table(path)
    if text is None:
        return np.zeros((0, 0)), []
    header, _, body = text.partition("\n")
    columns = header.strip().split(",")
    if columns[:2] != ["step", "epoch"]:
        raise CheckpointError(f"{path}: no step,epoch,... header{_repair(run_dir)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": a run saved before its first step
            values = np.loadtxt(io.StringIO(body), delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a table of numbers ({str(e).splitlines()[0][:80]})"
                              f"{_repair(run_dir)}") from None
    if values.size == 0:
        return np.zeros((0, len(columns))), columns
    if values.shape[1] != len(columns):
        raise CheckpointError(f"{path}: rows of {values.shape[1]} numbers under {len(columns)} columns{_repair(run_dir)}")
    return values, columns


def _read_table(path: Path) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    data = read_bytes(path, MAX_TABLE_BYTES, "history table")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text{_repair(path.parent)}") from None


def _repair(run_dir: Path, what: str = "damaged") -> str:
    return f" ({what}; `vaelab train --resume {run_dir}` rewrites it from the checkpoint)"


def missing_history(run_dir: Path) -> str | None:
    """Why a run folder has no history to show, where its history.csv is gone but its checkpoint
    holds it; None otherwise (a run that never finished an epoch has none to show either)."""
    run_dir = Path(run_dir)
    if (run_dir / HISTORY_FILE).exists() or not (run_dir / CHECKPOINT_FILE).exists():
        return None
    return f"{run_dir / HISTORY_FILE}: missing{_repair(run_dir, 'deleted?')}"
