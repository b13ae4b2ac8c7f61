"""`vaelab compare RUN...`: several runs side by side, from their files alone.

One table (a row per run: model, the settings that differ between the runs, the last epoch's
train and test loss with their terms, the best epoch by test loss, the NLL and sample metrics
where metrics.json has them, seconds) and the test loss per epoch of every run on one plot,
written as DIR/compare.html (self-contained) and DIR/curves.png; the table is also returned as
text for the terminal. A study folder (`vaelab sweep`) stands for its trials that trained at
least one epoch, an interrupted trial that was queued again by its retry.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write, together
from .checkpoint import CONFIG_FILE, parse_spec, read_run_config
from .config import config_to_dict
from .errors import ConfigError, VaelabError
from .evaluate import METRICS_FILE
from .history_files import missing_history, read_history
from .plots import plot_series
from .reading import read_bytes, read_json
from .report import Report, Table, table_text
from .sweep import STUDY_FILE, TRIALS_FILE  # what marks a sweep's folder; its trials' table
PAGE, CURVES = "compare.html", "curves.png"
# Settings that do not change what is trained: never a column of their own.
IGNORED_SETTINGS = ("log_every", "tensorboard")
# metrics.json values shown where present: (header, path).
METRIC_COLUMNS = (("IWAE NLL", ("iwae", "nll")), ("FD", ("sample_quality", "samples", "fd")),
                  ("precision", ("sample_quality", "samples", "precision")),
                  ("recall", ("sample_quality", "samples", "recall")),
                  ("coverage", ("sample_quality", "samples", "coverage")))
MISSING = "—"


@dataclass
class RunSummary:
    path: Path
    label: str
    model: str
    settings: dict  # model config and training options, flat
    history: list[dict]
    metrics: dict

    def last(self, split: str) -> dict:
        rows = [r for r in self.history if r["split"] == split]
        return rows[-1] if rows else {}

    def curve(self, split: str = "test") -> tuple[list[int], list[float]]:
        rows = [r for r in self.history if r["split"] == split and r.get("loss", "") != ""]
        return [r["epoch"] for r in rows], [float(r["loss"]) for r in rows]

    def best_epoch(self, split: str = "test") -> int | None:
        """The epoch of the lowest loss on `split` (the earliest of equals)."""
        epochs, losses = self.curve(split)
        return epochs[losses.index(min(losses))] if losses else None

    @property
    def seconds(self) -> float:
        return sum(float(r["seconds"]) for r in self.history if r.get("seconds", "") != "")


def expand(paths: list[Path]) -> list[Path]:
    """Run folders: each path, or a study folder's trials that have trained an epoch, but for an
    interrupted trial that was queued again (its retry stands for it)."""
    runs = []
    for path in paths:
        path = Path(path)
        if (path / STUDY_FILE).is_file() and not (path / CONFIG_FILE).exists():
            retried = _retried_runs(path)
            trials = sorted(p for p in path.glob("trial-*")
                            if (p / CONFIG_FILE).is_file() and p.name not in retried and _has_history(p))
            if not trials:
                raise ConfigError(f"{path}: a study folder with no trial that has trained an epoch yet")
            runs += trials
        elif not path.is_dir():
            raise ConfigError(f"{path}: no such run folder")
        elif not (path / CONFIG_FILE).exists():
            raise ConfigError(f"{path}: not a run folder (no {CONFIG_FILE}) nor a study folder (no {STUDY_FILE})")
        else:
            runs.append(path)
    return list(dict.fromkeys(runs))


def _trial_rows(study_dir: Path) -> list[dict]:
    """The rows of a study's trials.csv (none where the folder has none)."""
    path = study_dir / TRIALS_FILE
    if not path.is_file():
        return []
    return list(csv.DictReader(io.StringIO(read_bytes(path, 16 * 1024 * 1024, "trials table", ConfigError).decode())))


def _retried_runs(study_dir: Path) -> set[str]:
    """The run folders of a study's trials that a later trial retries (trials.csv's retry_of)."""
    rows = _trial_rows(study_dir)
    retried = {row.get("retry_of") for row in rows if row.get("retry_of")}
    return {row["run"] for row in rows if row.get("number") in retried and row.get("run")}


def _label(path: Path, trial_rows: list[dict]) -> str:
    """The run folder's name, and for a sweep's trial with a named variant (its study's
    `trial_rows`), the variant's name."""
    variant = next((row.get("variant") for row in trial_rows if row.get("run") == path.name), None)
    return f"{path.name} ({variant})" if variant else path.name


def _has_history(run_dir: Path) -> bool:
    try:
        return bool(read_history(run_dir))
    except VaelabError:
        return False


def read_run(path: Path, label: str | None = None) -> RunSummary:
    cfg = read_run_config(path)
    spec = parse_spec(cfg, path / CONFIG_FILE)
    history = read_history(path)
    if not any(r["split"] == "test" for r in history):
        raise ConfigError(missing_history(path)
                          or f"{path}: no history (history.csv has no test rows: has it trained an epoch?)")
    metrics = read_json(path / METRICS_FILE, finite=False) if (path / METRICS_FILE).is_file() else {}
    settings = {**config_to_dict(spec.model_config), **config_to_dict(spec.train)}
    return RunSummary(path, label or path.name, spec.model, settings, history, metrics)


def load_runs(paths: list[Path]) -> list[RunSummary]:
    folders = expand(paths)
    trial_rows = {parent: _trial_rows(parent) for parent in {p.parent for p in folders}}  # each study's, once
    runs = [read_run(p, _label(p, trial_rows[p.parent])) for p in folders]
    if not runs:
        raise ConfigError("name at least one run folder or study folder")
    labels = [r.label for r in runs]
    for r in runs:  # two runs of one name (trial-0001 of two studies): their paths tell them apart
        if labels.count(r.label) > 1:
            r.label = str(r.path)
    return runs


def differing_settings(runs: list[RunSummary]) -> list[str]:
    """The settings whose values are not the same in every run (a field a run's model lacks
    counts as a value of its own), in the order they first appear."""
    names = list(dict.fromkeys(k for r in runs for k in r.settings if k not in IGNORED_SETTINGS))
    text = lambda r, k: json.dumps(r.settings.get(k, MISSING), sort_keys=True)  # noqa: E731
    return [k for k in names if len({text(r, k) for r in runs}) > 1]


def _cell(value) -> object:
    if value is None:
        return MISSING
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def _number(row: dict, key: str):
    value = row.get(key, "")
    return MISSING if value in ("", None) else float(value)


def _metric(metrics: dict, path: tuple[str, ...]):
    value = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else MISSING


def comparison_table(runs: list[RunSummary]) -> Table:
    settings = differing_settings(runs)
    terms = list(dict.fromkeys(k for r in runs for row in r.history for k in row
                               if k not in ("epoch", "split", "seconds")))
    metrics = [(h, p) for h, p in METRIC_COLUMNS if any(_metric(r.metrics, p) != MISSING for r in runs)]
    # "epochs trained", not "epochs": runs that differ in their epochs setting show that column too
    headers = ["run", "model", *settings, "epochs trained", *(f"train {t}" for t in terms),
               *(f"test {t}" for t in terms), "best epoch (test loss)", *(h for h, _ in metrics), "seconds"]
    rows = []
    for r in runs:
        train, test = r.last("train"), r.last("test")
        rows.append([r.label, r.model, *(_cell(r.settings.get(k)) for k in settings), test.get("epoch", MISSING),
                     *(_number(train, t) for t in terms), *(_number(test, t) for t in terms), r.best_epoch(),
                     *(_metric(r.metrics, p) for _, p in metrics), round(r.seconds, 1)])
    same = "" if len(runs) == 1 else (" Columns between model and epochs trained: the settings that differ "
                                      "between the runs" + ("" if settings else " (none)") + ".")
    return Table(headers, rows, f"{len(runs)} run{'s' if len(runs) > 1 else ''}: losses of the last epoch, "
                                f"seconds of training and evaluation.{same}{models_note(runs)}")


def models_note(runs: list[RunSummary]) -> str:
    """A warning where the runs are of different models, whose losses need not be one quantity."""
    models = list(dict.fromkeys(r.model for r in runs))
    if len(models) < 2:
        return ""
    return (f" The runs are of {len(models)} models ({', '.join(models)}): each loss is its model's own objective "
            f"(the README's Models section), so losses and their curves compare across models only where the "
            f"objectives are the same quantity; the IWAE NLL and the sample metrics are measured alike for all.")


def default_out(runs: list[RunSummary]) -> Path:
    """compare/ in the runs' nearest common folder (a study's folder, or runs/)."""
    parents = [str(r.path.resolve().parent) for r in runs]
    common = Path(os.path.commonpath(parents))
    cwd = Path.cwd()
    try:
        common = common.relative_to(cwd)
    except ValueError:
        pass
    return common / "compare"


def write_comparison(paths: list[Path], out: Path | None = None) -> tuple[Path, str]:
    """Read the runs, write OUT/compare.html and OUT/curves.png (both or neither); returns OUT
    and the table as text."""
    runs = load_runs(paths)
    out = Path(out) if out is not None else default_out(runs)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    table = comparison_table(runs)
    series = {r.label: r.curve("test") for r in runs}
    with tempfile.TemporaryDirectory() as scratch:
        # The figure is drawn aside first: the page embeds it, and nothing in a together() block
        # may read back a file it wrote.
        drawn = plot_series([("one line per run", "test loss", series)],
                            Path(scratch) / CURVES, f"Test loss per epoch, {len(runs)} runs")
        page = Report(f"Comparison of {len(runs)} runs")
        page.items("Run folders:", [f"{r.label}: {r.path}" for r in runs])
        page.table(table.headers, table.rows, table.caption)
        page.figure(drawn, "Test loss per epoch, one line per run." + models_note(runs),
                    "which run ends lowest, and whether a run was still falling when it stopped.")
        png = read_bytes(drawn, 64 * 1024 * 1024, "figure")
        with together():  # both files or neither
            atomic_write(out / CURVES, png)
            page.write(out / PAGE)
    return out, table_text(table)
