"""`vaelab sweep`: the spec checked whole before any trial, each grid point run once (by one
worker or by two sharing the storage), the best trial reported, a failing trial recorded with its
error, and a sweep whose worker was killed mid-trial (SIGKILL) finished by running it again.

In-process sweeps use the `synthetic_mnist` fixture; the subprocess ones `tests/_synthetic_cli.py`
(the real CLI on a synthetic "mnist"; its spawned workers take the same data)."""

from __future__ import annotations

import csv
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from vaelab.cli import main
from vaelab.errors import DivergenceError
from vaelab.history_files import read_history
from vaelab.train import train

from _forkserver import Process, spawn
from conftest import quick_config, write_dataset_files

optuna = pytest.importorskip("optuna", reason="vaelab sweep needs the sweep extra (optuna)")

SCRIPT = Path(__file__).resolve().parent / "_synthetic_cli.py"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "lstm-decoders.yaml"
N_TRAIN, BATCH = 192, 64  # 3 steps per epoch

GRID = """\
model: vae
fixed: {{epochs: 2, batch_size: 64, device: cpu, hidden_dims: [16], log_every: 1}}
sampler: grid
space:
  lr: [0.001, 0.01]
  latent_dim: [2, 3]
metric: {metric}
direction: {direction}
"""


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def read_trials(study: Path) -> list[dict]:
    with open(study / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def grid_points(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted((r["lr"], r["latent_dim"]) for r in rows)


EXPECTED_POINTS = sorted((lr, d) for lr in ("0.001", "0.01") for d in ("2", "3"))


# --- the spec ------------------------------------------------------------------------------------

BAD_SPECS = [
    ("unknown top-level key", "model: vae\nspace: {lr: [0.001]}\nsampl: grid\n", "sampl: unknown key"),
    ("unknown field", "model: vae\nspace: {learning_rate: [0.001]}\n", "space.learning_rate: not a training option"),
    ("unknown fixed field", "model: vae\nfixed: {hidden: [16]}\nspace: {lr: [0.001]}\n", "fixed.hidden: not"),
    ("range low >= high", "model: vae\nsampler: tpe\nspace: {lr: {low: 0.1, high: 0.01}}\n",
     "space.lr: a range needs low < high"),
    ("log range from 0", "model: vae\nsampler: random\nspace: {lr: {low: 0, high: 0.1, log: true}}\n",
     "space.lr.log: a log range needs low > 0"),
    ("a range in a grid", "model: vae\nsampler: grid\nspace: {lr: {low: 0.001, high: 0.1}}\n",
     "space.lr: a grid sampler takes lists"),
    ("unknown metric column", "model: vae\nspace: {lr: [0.001]}\nmetric: test.elbo\n", "metric: 'test.elbo' is not"),
    ("unknown metrics.json value", "model: vae\nspace: {lr: [0.001]}\nmetric: metrics.nll\n",
     "metric: 'metrics.nll' is not"),
    ("a value the config refuses", "model: vae\nsampler: grid\nspace: {latent_dim: [2, 0]}\n",
     "latent_dim=0"),
    ("an impossible decoder", "model: lstm-vae\nsampler: grid\nspace: {strides: [[2, 2], [2, 1]]}\n",
     "decoder"),
    ("a wrong type", "model: vae\nsampler: grid\nspace: {batch_size: [64, 'many']}\n", "batch_size"),
    ("pruning a metrics.json metric", "model: vae\nspace: {lr: [0.001]}\nmetric: metrics.recon_mse\n"
                                      "pruner: median\n", "pruner: prunes by the metric per epoch"),
    ("not a mapping", "- model: vae\n", "expected a mapping"),
    ("unknown model", "model: vea\nspace: {lr: [0.001]}\n", "model: unknown model 'vea'"),
]


@pytest.mark.parametrize("text, expected", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_a_bad_spec_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text, expected):
    spec = write_spec(tmp_path, text)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "study"), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{spec}:" in err and expected in err, err
    assert not (tmp_path / "study").exists()  # nothing written


def test_a_search_without_a_trial_count_and_a_missing_spec_are_one_line(tmp_path, capsys):
    spec = write_spec(tmp_path, "model: vae\nsampler: random\nspace: {lr: {low: 0.0001, high: 0.01, log: true}}\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "study")]) == 2
    assert "trials: say how many trials" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: no such spec file" in capsys.readouterr().err


def test_the_lstm_decoder_example_validates_and_its_first_trial_runs(synthetic_mnist, tmp_path, capsys):
    """The example's grid of the report's ten decoder variants as written (10 epochs) is checked
    whole; its first trial runs with 1 epoch."""
    from vaelab.sweep_spec import load_spec

    spec = load_spec(EXAMPLE)
    assert spec.model == "lstm-vae" and spec.sampler == "grid" and spec.fixed["epochs"] == 10
    assert len(spec.grid) == len(spec.variants) == 10
    short = write_spec(tmp_path, EXAMPLE.read_text().replace("epochs: 10", "epochs: 1"), "lstm-decoders.yaml")
    assert main(["sweep", str(short), "--out", str(tmp_path / "study"), "--trials", "1", "--quiet"]) == 0
    rows = read_trials(tmp_path / "study")
    assert [r["state"] for r in rows] == ["COMPLETE"] and rows[0]["variant"] == "4 layers, leaky 0.01, no bn, heads"
    assert len(read_history(tmp_path / "study" / "trial-0000")) == 2  # one epoch: train and test rows


# --- running it ----------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_a_grid_runs_every_point_once_and_reports_the_best(synthetic_mnist, tmp_path, capsys, direction):
    spec = write_spec(tmp_path, GRID.format(metric="test.kl", direction=direction))
    study = tmp_path / "study"
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = read_trials(study)
    assert grid_points(rows) == EXPECTED_POINTS and {r["state"] for r in rows} == {"COMPLETE"}
    # The metric of each trial is its run folder's last test kl, and the best is the lowest (or highest).
    for r in rows:
        last = [h for h in read_history(study / r["run"]) if h["split"] == "test"][-1]
        assert float(r["test.kl"]) == pytest.approx(float(last["kl"]))
    pick = min if direction == "minimize" else max
    best = pick(rows, key=lambda r: float(r["test.kl"]))
    assert f"best: trial {best['number']} ({study / best['run']})" in out
    assert len({float(r["test.kl"]) for r in rows}) == 4  # a wrong pick would show
    # Running it again runs nothing more: the study is complete.
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 0
    assert len(read_trials(study)) == 4
    # A changed spec is refused, naming what changed.
    spec.write_text(spec.read_text().replace("[0.001, 0.01]", "[0.001, 0.02]"))
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 2
    assert "space differs from the spec the study" in capsys.readouterr().err


def test_a_failing_trial_is_recorded_with_its_error_and_the_others_run(synthetic_mnist, tmp_path, monkeypatch):
    import vaelab.sweep

    def failing_train(model, model_config, config, run_dir, **kwargs):
        if config.lr == 0.01 and model_config.latent_dim == 3:
            raise DivergenceError("training diverged at epoch 1, step 2: loss is nan")
        return train(model, model_config, config, run_dir, **kwargs)

    monkeypatch.setattr(vaelab.sweep, "train", failing_train)
    spec = write_spec(tmp_path, GRID.format(metric="test.loss", direction="minimize"))
    study = tmp_path / "study"
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 0
    rows = {(r["lr"], r["latent_dim"]): r for r in read_trials(study)}
    assert len(rows) == 4
    failed = rows[("0.01", "3")]
    assert failed["state"] == "FAIL" and "training diverged at epoch 1" in failed["error"]
    assert [r["state"] for k, r in sorted(rows.items()) if k != ("0.01", "3")] == ["COMPLETE"] * 3
    # Not retried: running the command again leaves it failed.
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 0
    assert len(read_trials(study)) == 4


def test_ctrl_c_in_a_trial_queues_it_again_and_says_how_to_continue_the_study(synthetic_mnist, tmp_path,
                                                                               monkeypatch, capsys):
    """The trainer's own advice (`vaelab train --resume` of one run folder) would finish that
    folder outside the study: the sweep's last line says the same command continues it."""
    import vaelab.sweep
    from vaelab.errors import TrainingInterrupted

    calls = {"n": 0}

    def interrupted_train(model, model_config, config, run_dir, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise TrainingInterrupted(f"SIGINT: saved {run_dir} in epoch 1 after 1/3 batches; continue with "
                                      f"`vaelab train --resume {run_dir}`", "SIGINT")
        return train(model, model_config, config, run_dir, **kwargs)

    monkeypatch.setattr(vaelab.sweep, "train", interrupted_train)
    spec = write_spec(tmp_path, GRID.format(metric="test.loss", direction="minimize"))
    study = tmp_path / "study"
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert (f"SIGINT: the sweep stopped in trial 1, which is queued again; the same `vaelab sweep` command "
            f"continues the study ({study})") in err and "vaelab train --resume" not in err
    rows = read_trials(study)
    assert rows[1]["state"] == "FAIL" and rows[1]["error"] == "interrupted (SIGINT); queued again"
    assert main(["sweep", str(spec), "--out", str(study), "--quiet"]) == 0
    assert sorted(r["state"] for r in read_trials(study)) == ["COMPLETE"] * 4 + ["FAIL"]


def test_an_observer_raising_after_a_save_stops_the_run_at_a_complete_epoch(tiny_data, tmp_path):
    """The hook a sweep's pruner uses: the run folder keeps every epoch up to the stop."""

    class Stop(Exception):
        pass

    class StopAfterFirst:
        def on_saved(self, trainer):
            raise Stop(trainer.epoch)

    with pytest.raises(Stop):
        train("vae", __import__("vaelab").models.make_config("vae", ["hidden_dims=[16]"]),
              quick_config(epochs=3), tmp_path / "run", progress=False, data=tiny_data,
              observers=[StopAfterFirst()])
    assert [r["epoch"] for r in read_history(tmp_path / "run")] == [1, 1]
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


# --- processes -----------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path):
    write_dataset_files(tmp_path / "data", n_train=N_TRAIN, n_test=32)
    env = {**os.environ, "VAELAB_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    return tmp_path, env


def cli(workspace, *args, pause: list[str] = ()) -> Process:
    root, env = workspace
    return spawn([sys.executable, SCRIPT, "--data", root / "data", "--n-train", N_TRAIN, *pause, "--", *args], env=env)


def finish(proc: Process, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_two_workers_on_one_storage_run_each_trial_once(workspace):
    root, _ = workspace
    spec = write_spec(root, GRID.format(metric="test.loss", direction="minimize"))
    # Both workers reach their first trial before either takes one: otherwise, on a busy machine,
    # the first started may run all four while the second still imports torch.
    barrier = ["--trial-barrier", f"{root / 'barrier'}:2"]
    code, out, err = finish(cli(workspace, "sweep", str(spec), "--out", str(root / "study"), "--workers", "2",
                                "--quiet", pause=barrier))
    assert code == 0, err[-2000:]
    rows = read_trials(root / "study")
    assert grid_points(rows) == EXPECTED_POINTS and {r["state"] for r in rows} == {"COMPLETE"}
    assert {"[worker 1]", "[worker 2]"} <= {line.split(" trial")[0] for line in out.splitlines()}
    assert len(list((root / "barrier").iterdir())) == 2  # two worker processes met there
    assert sorted(p.name for p in (root / "study").glob("trial-*")) == [f"trial-000{i}" for i in range(4)]


def test_two_machines_sharing_a_database_run_each_trial_once(workspace):
    """Two commands started together on one SQLite URL, each with its own folder (as two
    machines would): the study is created once and its four trials split between them."""
    root, _ = workspace
    spec = write_spec(root, GRID.format(metric="test.loss", direction="minimize"))
    url = f"sqlite:///{root / 'shared.db'}"
    procs = [cli(workspace, "sweep", str(spec), "--study", "shared", "--storage", url,
                 "--out", str(root / f"machine{i}"), "--quiet") for i in (1, 2)]
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    runs = sorted(p.name for i in (1, 2) for p in (root / f"machine{i}").glob("trial-*"))
    assert runs == [f"trial-000{i}" for i in range(4)]  # each trial once, on one machine or the other
    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert sorted((str(t.params["lr"]), str(t.params["latent_dim"])) for t in trials) == EXPECTED_POINTS
    assert {t.state.name for t in trials} == {"COMPLETE"}


def test_a_trial_is_taken_once_when_another_machine_takes_it_mid_claim(tmp_path):
    """The race CI once lost: machine A reads the queued trial as WAITING, machine B takes it,
    then A writes. SQLite ignores SELECT ... FOR UPDATE, so a read-then-write claim gives the
    trial to both; the claim must be one conditional write that only B's succeeds."""
    import sqlalchemy

    from vaelab.sweep import open_storage, take_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="s", storage=url).enqueue_trial({"x": 1})
    machine_a, machine_b = (optuna.load_study(study_name="s", storage=open_storage(url)) for _ in "ab")
    taken_by_b = []

    def b_takes_it_first(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE TRIALS") and not taken_by_b:
            taken_by_b.append(take_trial(machine_b))

    engine_a = machine_a._storage._backend.engine
    sqlalchemy.event.listen(engine_a, "before_cursor_execute", b_takes_it_first)
    taken_by_a = take_trial(machine_a)
    sqlalchemy.event.remove(engine_a, "before_cursor_execute", b_takes_it_first)
    assert taken_by_b and taken_by_b[0] is not None and taken_by_b[0].number == 0
    assert taken_by_a is None
    assert [t.state.name for t in machine_a.get_trials()] == ["RUNNING"]


def test_a_journal_trial_taken_by_another_process_is_not_taken_again(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    from vaelab.sweep import open_storage, take_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = str(tmp_path / "study.journal")
    optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(path))
                        ).enqueue_trial({"x": 1})
    first, second = (optuna.load_study(study_name="s", storage=open_storage(path)) for _ in "ab")
    assert [t.state.name for t in second.get_trials()] == ["WAITING"]  # second has read it as queued
    assert take_trial(first).number == 0
    assert take_trial(second) is None


def test_a_machine_joining_a_new_study_waits_for_its_trials_and_queues_none(tmp_path, monkeypatch):
    """The joining machine finds the study created but its trials not yet queued: it waits for the
    creator's target and queues nothing itself, so the study holds each grid point once. A creator
    that never sets its target (stopped right after creating the study) is taken over instead."""
    import threading

    from vaelab import sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = write_spec(tmp_path, GRID.format(metric="test.loss", direction="minimize"))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    creator = optuna.create_study(study_name="s", storage=url)
    creator.set_user_attr("spec", sweep._comparable(sweep.load_spec(spec).raw))

    def creator_queues_late():
        time.sleep(0.5)
        creator.set_user_attr("trials", 4)
        sweep.queue_trials(creator, sweep.load_spec(spec), 4)

    late = threading.Thread(target=creator_queues_late)
    late.start()
    sweep.prepare(spec, "s", tmp_path / "joiner", url, None)
    late.join()
    assert len(creator.trials) == 4

    orphan = optuna.create_study(study_name="orphan", storage=url)
    orphan.set_user_attr("spec", sweep._comparable(sweep.load_spec(spec).raw))
    monkeypatch.setattr(sweep, "TARGET_WAIT_S", 0.3)
    sweep.prepare(spec, "orphan", tmp_path / "rerun", url, None)
    assert len(orphan.trials) == 4 and orphan.user_attrs["trials"] == 4


def test_a_sweep_killed_mid_trial_finishes_when_run_again(workspace):
    """SIGKILL in the second epoch of trial 0; the same command again marks trial 0 FAIL
    ("worker died"), queues its values again and ends with every grid point complete."""
    root, _ = workspace
    spec = write_spec(root, GRID.format(metric="test.loss", direction="minimize"))
    study, marker = root / "study", root / "marker"
    args = ["sweep", str(spec), "--out", str(study), "--quiet"]
    proc = cli(workspace, *args, pause=["--pause-at-step", "4", "--marker", str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    marker.unlink()
    assert [h["epoch"] for h in read_history(study / "trial-0000")] == [1, 1]  # killed in epoch 2

    code, out, err = finish(cli(workspace, *args))
    assert code == 0, err[-2000:]
    rows = read_trials(study)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert grid_points(complete) == EXPECTED_POINTS
    lost = [r for r in rows if r["state"] == "FAIL"]
    assert len(lost) == 1 and lost[0]["number"] == "0" and "worker died" in lost[0]["error"]
    again = [r for r in complete if r["retry_of"] == "0"]
    assert len(again) == 1 and again[0]["attempt"] == "2" and (again[0]["lr"], again[0]["latent_dim"]) == (
        lost[0]["lr"], lost[0]["latent_dim"])
    assert "trial 0: its worker died; marked FAIL and queued again" in err


def test_a_resumed_sweep_s_bar_starts_at_its_finished_trials_and_times_only_the_rest():
    """Two of four trials finished before: the bar starts at 2 of 4, and one trial finished a
    second later makes a rate of one trial in that second, not three."""
    import io

    from vaelab.sweep import trials_bar

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    trials = [study.ask() for _ in range(4)]
    for t in trials[:2]:
        study.tell(t, 1.0)
    bar = trials_bar("s", study)
    bar.fp = io.StringIO()
    assert (bar.n, bar.total) == (2, 4)
    bar.n = 3
    meter = bar.format_meter(**{**bar.format_dict, "elapsed": 1.0})
    assert "3/4" in meter and "1.00trial/s" in meter and "00:01<00:01" in meter, meter  # not 3 trials/s
    bar.close()


def test_the_progress_bar_says_which_epoch_each_running_trial_is_in(tmp_path):
    """A trial trains for minutes: the bar's note reads each running trial's epoch from its run
    folder (0 before its first epoch) and leaves out finished trials."""
    import types

    from vaelab.history_files import write_history
    from vaelab.sweep import running_epochs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    running, fresh, done = study.ask(), study.ask(), study.ask()
    for trial, name in ((running, "trial-0000"), (fresh, "trial-0001"), (done, "trial-0002")):
        trial.set_user_attr("run", name)
        trial.set_user_attr("settings", {"epochs": 10})
    rows = [{"epoch": e, "split": split, "loss": 1.0, "seconds": 1.0} for e in (1, 2, 3) for split in ("train", "test")]
    (tmp_path / "trial-0000").mkdir()
    write_history(tmp_path / "trial-0000", rows, ("loss",))
    (tmp_path / "trial-0002").mkdir()
    write_history(tmp_path / "trial-0002", rows, ("loss",))
    study.tell(done, 1.0)
    assert running_epochs(types.SimpleNamespace(folder=tmp_path), study) == "trial 0: epoch 3/10, trial 1: epoch 0/10"


def test_a_metrics_objective_is_measured_on_the_device_the_trial_trained_on(tiny_data, tmp_path, monkeypatch):
    """A sweep on a GPU evaluates its trials there, not on the CPU (where an IWAE estimate takes
    many times as long): the run's stored device is resolved and the model moved to it."""
    from types import SimpleNamespace

    from vaelab import sweep
    from vaelab.evaluate import EvalSettings
    from vaelab.models import make_config

    train("vae", make_config("vae", ["hidden_dims=[16]"]), quick_config(device="cpu"), tmp_path / "run",
          progress=False, data=tiny_data)
    asked = []
    monkeypatch.setattr(sweep, "resolve_device", lambda name: asked.append(name) or __import__("torch").device("cpu"))
    monkeypatch.setattr(sweep, "load_training_data", lambda config, quiet: tiny_data)
    study = SimpleNamespace(spec=SimpleNamespace(evaluate=EvalSettings(iw_samples=4, iw_images=20, n_samples=0)))
    value = sweep.metric_value(tmp_path / "run", "metrics.iwae.nll", study)
    assert asked == ["cpu"] and value > 0
