"""`vaelab sweep`: a hyperparameter search on Optuna, each trial an ordinary run folder.

    STUDY/study.json        the study's name, its storage (password hidden) and its spec
    STUDY/sweep.yaml        the spec file as it was when the study was created
    STUDY/study.journal     the Optuna storage, unless --storage names another (sqlite:///,
                            postgresql://...: workers on several machines share one database)
    STUDY/trial-0003/       trial 3's run folder, trained by `train.train` like any run
    STUDY/trials.csv        one row per trial: state, metric, params, error; rewritten after each

How trials are handed out: when the study is created, it is given every trial it will run as a
queued (WAITING) Optuna trial: a grid's points with their values, a random or TPE search's
trials empty (the sampler fills them when a worker takes them, from the trials finished by
then). A worker takes a queued trial by moving it to RUNNING in one conditional write
(`move_trial`), which only one worker wins, so K workers on any number of machines run each trial
once and the study ends with exactly the trials asked for.

An interrupted worker: on Ctrl-C or SIGTERM its trial saves its run folder, is marked FAIL
("interrupted") and its values are queued again as a new trial. A worker killed outright (SIGKILL,
a crash) leaves its trial RUNNING; each worker on the same machine, on starting and before each
trial, marks FAIL any RUNNING trial whose recorded process (host and PID) is gone ("worker died")
and queues its values again. A trial is queued again at most MAX_ATTEMPTS - 1 times; a trial that
fails by itself (divergence, an impossible config) is recorded FAIL with its error and not retried.
So re-running the same command continues a study: finished trials are kept, the lost ones run
again. A trial left RUNNING by a machine that never comes back stays RUNNING (run a worker on that
machine again, or mark it with Optuna's own tools).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from . import runtime
from .atomic import atomic_write, pid_alive
from .checkpoint import load_run, write_json
from .config import config_to_dict
from .data import load_training_data
from .devices import resolve_device
from .errors import ConfigError, TrainingInterrupted, VaelabError
from .evaluate import METRICS_FILE, evaluate_run
from .history_files import read_history
from .reading import read_json
from .sweep_spec import SweepSpec, load_spec
from .train import train

STUDY_FILE = "study.json"
SPEC_COPY = "sweep.yaml"
JOURNAL_FILE = "study.journal"
TRIALS_FILE = "trials.csv"
MAX_ATTEMPTS = 3  # a trial lost to an interruption runs again at most twice
TARGET_WAIT_S = 30.0  # how long a machine joining a new study waits for its creator to queue the trials
ERROR_CHARS = 500


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("vaelab sweep needs the optuna package, which is not installed: "
                          "pip install 'vaelab[sweep]' (`make install` includes it)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def trial_dir(study_dir: Path, number: int) -> Path:
    return Path(study_dir) / f"trial-{number:04d}"


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str):
    """An Optuna storage: a database URL (sqlite:///F.db, postgresql://...) or a journal file path."""
    optuna = require_optuna()
    try:
        if "://" in url:
            # SQLite waits 5 s for another process's write by default, then fails: too short for
            # workers sharing a file on a busy disk.
            engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
            for attempt in range(5):
                try:
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine)
                except ImportError:
                    raise
                except Exception:
                    # Workers started together on a new database race to create its tables: the
                    # loser's insert fails, and the tables are there when it looks again (at a
                    # moment of its own, so that two losers do not meet again).
                    if attempt == 4:
                        raise
                    time.sleep(random.SystemRandom().uniform(0.5, 1.5))
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except ImportError as e:  # a database driver that is not installed (psycopg2, pymysql)
        raise ConfigError(f"--storage {hide_password(url)}: needs {e.name or e}, which is not installed") from None
    except Exception as e:  # SQLAlchemy's and Optuna's errors are many types; each is one line here
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"--storage {hide_password(url)}: cannot open ({reason})") from None


@dataclass
class Study:
    """Where a sweep lives: its spec, its folder and its storage URL."""

    spec: SweepSpec
    name: str
    folder: Path
    storage: str

    def load(self):
        optuna = require_optuna()
        return optuna.load_study(study_name=self.name, storage=open_storage(self.storage),
                                 sampler=make_sampler(self.spec), pruner=make_pruner(self.spec))


def make_sampler(spec: SweepSpec):
    optuna = require_optuna()
    if spec.sampler == "tpe":
        # constant_liar: workers running side by side see each other's running trials as bad,
        # so they do not all sample the same spot.
        return optuna.samplers.TPESampler(seed=spec.seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=spec.seed)  # grid points are queued with their values


def make_pruner(spec: SweepSpec):
    optuna = require_optuna()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def prepare(spec_path: Path, name: str | None, folder: Path | None, storage: str | None,
            trials: int | None) -> Study:
    """Check the spec, then create the study (or load it, refusing a changed spec) and queue the
    trials it lacks. Nothing is written before the spec and the storage check out."""
    optuna = require_optuna()
    spec = load_spec(spec_path)
    name = name or Path(spec_path).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"--study {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    folder = Path(folder) if folder is not None else Path("runs") / name
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder")
    wanted = trials or spec.trials
    if spec.sampler == "grid":
        if wanted is not None and wanted > len(spec.grid):
            raise ConfigError(f"--trials {wanted}: the grid of {spec.path} has {len(spec.grid)} points")
        wanted = wanted or len(spec.grid)
    elif wanted is None:
        raise ConfigError(f"{spec.path}: trials: say how many trials a {spec.sampler} search runs "
                          f"(trials: N in the spec, or --trials N)")
    url = storage or str(folder / JOURNAL_FILE)
    study_file = folder / STUDY_FILE
    if study_file.exists():
        stored = read_json(study_file, error=ConfigError)
        if stored.get("study") != name:
            raise ConfigError(f"{folder}: holds the study {stored.get('study')!r}, not {name!r}; "
                              f"name another --out or --study {stored.get('study')}")
        if stored.get("spec") != json.loads(json.dumps(_comparable(spec.raw))):
            changed = sorted(k for k in set(stored.get("spec") or {}) | set(_comparable(spec.raw))
                             if (stored.get("spec") or {}).get(k) != json.loads(json.dumps(_comparable(spec.raw))).get(k))
            raise ConfigError(f"{spec.path}: {', '.join(changed) or 'the spec'} differs from the spec the study "
                              f"{name} was created with ({folder / SPEC_COPY}); restore it, or start another "
                              f"--study")
    folder.mkdir(parents=True, exist_ok=True)
    store = open_storage(url)
    directions = [spec.direction]
    try:
        study = optuna.create_study(study_name=name, storage=store, direction=spec.direction,
                                    sampler=make_sampler(spec), pruner=make_pruner(spec))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=make_sampler(spec),
                                  pruner=make_pruner(spec))
        created = False
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(f"{spec.path}: direction: the study {name} in {hide_password(url)} "
                              f"{study.directions[0].name.lower()}s")
        if study.user_attrs.get("spec", _comparable(spec.raw)) != json.loads(json.dumps(_comparable(spec.raw))):
            raise ConfigError(f"{spec.path}: differs from the spec the study {name} in {hide_password(url)} "
                              f"was created with; restore it, or start another --study")
    if created:
        study.set_user_attr("spec", _comparable(spec.raw))
    if not study_file.exists():
        atomic_write(folder / SPEC_COPY, Path(spec_path).read_bytes())
        write_json(study_file, {"study": name, "storage": hide_password(url), "model": spec.model,
                                "metric": spec.metric, "direction": spec.direction,
                                "spec": _comparable(spec.raw)})
    # The creator's target is set once, to what it queues: a machine joining the study reads it
    # and queues nothing (an intermediate target of 0 would let both queue every trial).
    target = 0 if created else _target(study, url)
    if wanted > target:
        # The target first, then the queue: a worker that loads the study meanwhile queues nothing.
        study.set_user_attr("trials", wanted)
        queue_trials(study, spec, wanted - target)
    return Study(spec, name, folder, url)


def _comparable(raw: dict) -> dict:
    """The spec's keys that define the study (`trials` may grow between runs)."""
    return json.loads(json.dumps({k: v for k, v in raw.items() if k != "trials"}, default=str))


def _target(study, url: str) -> int:
    """How many trials the study was asked for so far; a study another process has just created
    gets a moment to say so (it sets the target right after creating the study)."""
    deadline = time.monotonic() + TARGET_WAIT_S
    while "trials" not in study.user_attrs:
        if time.monotonic() > deadline:
            if "spec" in study.user_attrs:
                return 0  # vaelab's creator stopped between creating the study and queueing its trials
            raise ConfigError(f"--storage {hide_password(url)}: the study {study.study_name} has no trial target "
                              f"(not made by vaelab sweep?)")
        time.sleep(0.2)
    return int(study.user_attrs["trials"])


def counted(trials) -> list:
    """The study's trials that count towards --trials: every one but those lost to an interruption
    and queued again (the copy counts instead)."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.number not in retried]


def queue_trials(study, spec: SweepSpec, count: int) -> int:
    """Queue `count` more trials; returns how many were queued. A grid queues its points not yet
    in the study, in order."""
    if spec.sampler == "grid":
        taken = {json.dumps(_fixed(t), sort_keys=True) for t in study.get_trials(deepcopy=False)}
        points = [p for p in spec.grid if json.dumps(p, sort_keys=True) not in taken][:count]
        for point in points:
            study.enqueue_trial(point, skip_if_exists=False)
        return len(points)
    for _ in range(count):
        study.enqueue_trial({}, skip_if_exists=False)
    return count


def _fixed(trial) -> dict:
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def recover_lost(study) -> list[int]:
    """Trials RUNNING on this machine in a process that is gone: marked FAIL ("worker died") and
    queued again (at most MAX_ATTEMPTS in all). Returns their numbers."""
    optuna = require_optuna()
    RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
    host, lost = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid_alive(pid):
            continue
        try:  # the error first: a finished trial's attributes can no longer be set
            study._storage.set_trial_user_attr(t._trial_id, "error", f"worker died: process {pid} on {host} "
                                                                      f"ended during the trial (killed?)")
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if not move_trial(study._storage, t._trial_id, RUNNING, FAIL):
            continue
        requeue(study, t)
        lost.append(t.number)
    return lost


def requeue(study, trial) -> None:
    attempt = trial.user_attrs.get("attempt", 1)
    if attempt < MAX_ATTEMPTS:
        study.enqueue_trial(_fixed(trial), user_attrs={"retry_of": trial.number, "attempt": attempt + 1},
                            skip_if_exists=False)


def take_trial(study):
    """A queued trial, now RUNNING and this worker's (None when the queue is empty)."""
    optuna = require_optuna()
    WAITING, RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING
    for t in study.get_trials(deepcopy=False, states=(WAITING,)):
        if move_trial(study._storage, t._trial_id, WAITING, RUNNING):
            return optuna.trial.Trial(study, t._trial_id)
    return None


def move_trial(storage, trial_id: int, old, new) -> bool:
    """Move a trial from state `old` to `new`; True for the one caller, of any number racing on
    any number of machines, that did.

    Optuna's RDB storage reads the state and then writes it, relying on SELECT ... FOR UPDATE,
    which SQLite ignores: two processes on one SQLite file both read WAITING and both take the
    trial. A single UPDATE ... WHERE state = old is atomic in every SQL database. The journal
    storage checks and writes under its file lock, so its own call is already exact."""
    optuna = require_optuna()
    backend = getattr(storage, "_backend", storage)  # load_study wraps an RDBStorage in a cache
    if isinstance(backend, optuna.storages.RDBStorage):
        import sqlalchemy
        from optuna.storages._rdb.models import TrialModel

        values = {"state": new}
        if new == optuna.trial.TrialState.RUNNING:
            values["datetime_start"] = datetime.now()
        if new.is_finished():
            values["datetime_complete"] = datetime.now()
        with backend.engine.begin() as connection:
            moved = connection.execute(sqlalchemy.update(TrialModel)
                                       .where(TrialModel.trial_id == trial_id, TrialModel.state == old)
                                       .values(**values))
        return moved.rowcount == 1
    try:
        if storage.get_trial(trial_id).state != old:
            return False
        return storage.set_trial_state_values(trial_id, state=new)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


class PruneOnEpoch:
    """A trainer observer: reports the metric after each saved epoch and stops a hopeless trial
    (optuna.TrialPruned) at that epoch, its run folder complete up to it."""

    def __init__(self, trial, metric: str):
        self.trial = trial
        self.split, _, self.column = metric.partition(".")

    def on_saved(self, trainer) -> None:
        optuna = require_optuna()
        row = [r for r in trainer.history if r["split"] == self.split and r["epoch"] == trainer.epoch][-1]
        self.trial.report(float(row[self.column]), trainer.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {trainer.epoch}")


def metric_value(run_dir: Path, metric: str, study: Study) -> float:
    """The trial's metric: history.csv's last epoch, or metrics.json after evaluating the run."""
    if not metric.startswith("metrics."):
        split, _, column = metric.partition(".")
        rows = [r for r in read_history(run_dir) if r["split"] == split]
        if not rows or rows[-1].get(column, "") == "":
            raise ConfigError(f"{run_dir}: history.csv has no {metric}")
        return float(rows[-1][column])
    run = load_run(run_dir)
    # measured where it trained: on a GPU an IWAE estimate takes seconds, on the CPU minutes
    run.model.to(resolve_device(run.train_config.device))
    metrics = evaluate_run(run, load_training_data(run.train_config, quiet=True), study.spec.evaluate)
    value = metrics
    for key in metric[len("metrics."):].split("."):
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"{run_dir / METRICS_FILE}: has no {metric} (not measured for a {run.model.name})")
        value = value[key]
    return float(value)


def run_trial(study: Study, optuna_study, trial, say) -> str:
    """Train one trial into its run folder and tell the study how it ended; returns the state."""
    optuna = require_optuna()
    spec = study.spec
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    run_dir = trial_dir(study.folder, trial.number)
    trial.set_user_attr("run", run_dir.name)
    params = {}
    for d in spec.dimensions:
        if d.choices is not None:
            params[d.name] = trial.suggest_categorical(d.name, d.labels())
        elif d.integer:
            params[d.name] = trial.suggest_int(d.name, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            params[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    shown = ", ".join(f"{k}={spec.dimensions[[d.name for d in spec.dimensions].index(k)].value(v)!r}"
                      for k, v in params.items())
    start = time.perf_counter()
    try:
        model_config, train_config = spec.configs(spec.assignment(params), f"trial {trial.number} ({shown})")
        trial.set_user_attr("settings", {**config_to_dict(model_config), **config_to_dict(train_config)})
        observers = [PruneOnEpoch(trial, spec.metric)] if spec.pruner != "none" else []
        train(spec.model, model_config, train_config, run_dir, progress=False, observers=observers)
        value = metric_value(run_dir, spec.metric, study)
    except optuna.TrialPruned as e:
        optuna_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        say(f"trial {trial.number} ({shown}): {e}")
        return "PRUNED"
    except TrainingInterrupted as e:
        trial.set_user_attr("error", f"interrupted ({e.signal_name or 'signal'}); queued again")
        optuna_study.tell(trial, state=optuna.trial.TrialState.FAIL)
        requeue(optuna_study, optuna_study.trials[trial.number])
        # The trainer's advice (`vaelab train --resume` of the run folder) is not the study's.
        raise TrainingInterrupted(f"{e.signal_name or 'signal'}: the sweep stopped in trial {trial.number}, which is "
                                  f"queued again; the same `vaelab sweep` command continues the study "
                                  f"({study.folder})", e.signal_name) from None
    except Exception as e:  # recorded, not retried: the next trial goes on
        message = str(e) if isinstance(e, VaelabError) else f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", " ".join(message.split())[:ERROR_CHARS])
        if not isinstance(e, VaelabError):
            trial.set_user_attr("traceback", traceback.format_exc()[-ERROR_CHARS * 4:])
        optuna_study.tell(trial, state=optuna.trial.TrialState.FAIL)
        say(f"trial {trial.number} ({shown}) failed: {' '.join(message.split())[:200]}")
        return "FAIL"
    optuna_study.tell(trial, value)
    say(f"trial {trial.number} ({shown}): {spec.metric} {value:.6g} ({time.perf_counter() - start:.0f} s)")
    return "COMPLETE"


def work(study: Study, say=print, on_trial=None) -> int:
    """One worker: recover lost trials, then take queued trials until none is left; returns how
    many this worker ran."""
    optuna_study = study.load()
    ran = 0
    while True:
        for number in recover_lost(optuna_study):
            say(f"trial {number}: its worker died; marked FAIL and queued again")
        trial = take_trial(optuna_study)
        if trial is None:
            return ran
        try:
            run_trial(study, optuna_study, trial, say)
        finally:
            write_trials_csv(study, optuna_study)
        ran += 1
        if on_trial is not None:
            on_trial()


def _worker_main(spec_path: str, name: str, folder: str, storage: str, index: int, threads: int) -> None:
    """A worker process of `--workers K` (started with multiprocessing's spawn: a fresh Python)."""
    runtime.configure(threads=threads)
    study = Study(load_spec(spec_path), name, Path(folder), storage)
    try:
        work(study, say=lambda text: print(f"[worker {index}] {text}", flush=True))
    except TrainingInterrupted as e:
        print(f"[worker {index}] {e}", file=sys.stderr, flush=True)
        sys.exit(130)
    except VaelabError as e:
        print(f"[worker {index}] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_workers(study: Study, workers: int, threads: int, progress: bool = True) -> list[int]:
    """K worker processes sharing the study's storage; a progress bar over its trials meanwhile.
    Returns their exit codes."""
    context = multiprocessing.get_context("spawn")  # fork after torch's OpenMP threads can hang
    procs = [context.Process(target=_worker_main, args=(str(study.spec.path), study.name, str(study.folder),
                                                        study.storage, i + 1, threads))
             for i in range(workers)]
    for p in procs:
        p.start()
    optuna_study = study.load()
    bar = trials_bar(study.name, optuna_study, progress)
    try:
        while any(p.is_alive() for p in procs):
            # Wakes at least once a second to refresh the bar, and at once when a worker ends.
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
            bar.n = finished_count(optuna_study)
            bar.set_postfix_str(running_epochs(study, optuna_study), refresh=False)
            bar.refresh()
    finally:
        for p in procs:
            p.join()
        bar.n = finished_count(optuna_study)
        bar.close()
    return [p.exitcode for p in procs]


def trials_bar(name: str, optuna_study, progress: bool = True):
    """The bar over the study's trials. Trials a resumed sweep finished before start it off
    (tqdm's `initial`) rather than being counted as done in its first second, which would make
    its rate and time left wrong by hours."""
    from tqdm import tqdm

    trials = counted(optuna_study.get_trials(deepcopy=False))
    return tqdm(total=len(trials), desc=f"sweep {name}", unit="trial", disable=not progress, file=sys.stderr,
                initial=sum(t.state.is_finished() for t in trials))


def running_epochs(study: Study, optuna_study) -> str:
    """Where each running trial stands, from its run folder: "trial 3: epoch 4/10, ..." (a trial
    of a long training moves the trial count rarely)."""
    optuna = require_optuna()
    parts = []
    for t in optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run, epochs = t.user_attrs.get("run"), t.user_attrs.get("settings", {}).get("epochs")
        if run is None or epochs is None:
            continue
        try:
            done = sum(row["split"] == "train" for row in read_history(study.folder / run))
        except (VaelabError, OSError):
            continue
        parts.append(f"trial {t.number}: epoch {done}/{epochs}")
    return ", ".join(parts)


def finished_count(optuna_study) -> int:
    return sum(t.state.is_finished() for t in counted(optuna_study.get_trials(deepcopy=False)))


# ---------------------------------------------------------------------------------------------
# What a study holds
# ---------------------------------------------------------------------------------------------


def trial_rows(study: Study, optuna_study) -> tuple[list[str], list[dict]]:
    spec = study.spec
    names = [d.name for d in spec.dimensions]
    by_name = {d.name: d for d in spec.dimensions}
    header = ["number", "state", spec.metric, *names, "run", "seconds", "attempt", "retry_of", "error"]
    rows = []
    for t in optuna_study.get_trials(deepcopy=False):
        values = _fixed(t)
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        rows.append({"number": t.number, "state": t.state.name, spec.metric: t.value,
                     **{n: by_name[n].value(values[n]) if n in values else None for n in names},
                     "run": t.user_attrs.get("run"), "seconds": None if seconds is None else round(seconds, 1),
                     "attempt": t.user_attrs.get("attempt", 1), "retry_of": t.user_attrs.get("retry_of"),
                     "error": t.user_attrs.get("error")})
    return header, rows


def write_trials_csv(study: Study, optuna_study) -> Path:
    header, rows = trial_rows(study, optuna_study)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
    path = study.folder / TRIALS_FILE
    atomic_write(path, buf.getvalue().encode())
    return path


def summary(study: Study, optuna_study) -> str:
    """Lines for the terminal: the trials by state and the best one."""
    trials = optuna_study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    lines = [f"study {study.name}: {len(trials)} trials (" + ", ".join(f"{n} {s.lower()}" for s, n in states.items())
             + f") in {hide_password(study.storage)}"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if complete:
        best = optuna_study.best_trial
        spec = study.spec
        values = _fixed(best)
        shown = ", ".join(f"{d.name}={d.value(values[d.name])!r}" for d in spec.dimensions if d.name in values)
        lines.append(f"best: trial {best.number} ({trial_dir(study.folder, best.number)}), {spec.metric} "
                     f"{best.value:.6g} ({spec.direction}d), {shown}")
    for t in trials:
        if t.state.name == "FAIL":
            lines.append(f"  trial {t.number} failed: {t.user_attrs.get('error', '(no error recorded)')}")
    return "\n".join(lines)
