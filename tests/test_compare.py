"""`vaelab compare`: on hand-made run folders whose numbers make a wrong answer visible: the
settings columns are exactly those that differ, the best epoch is the test loss's (not the
train loss's, nor the last epoch), metrics.json values appear where measured; the page and the
figure are written together; a study folder stands for its trained trials; mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vaelab.checkpoint import write_config_dict, write_json
from vaelab.cli import main
from vaelab.compare import comparison_table, default_out, load_runs
from vaelab.config import config_to_dict
from vaelab.history_files import write_history
from vaelab.models import make_config
from vaelab.train_config import TrainConfig


def make_run(folder: Path, test_losses: list[float], train_losses: list[float] | None = None,
             overrides: list[str] = (), model: str = "vae", metrics: dict | None = None, **train) -> Path:
    """A run folder with config.json and history.csv (loss = recon + kl) and nothing else."""
    train_losses = train_losses or [t + 5 for t in test_losses]
    config = TrainConfig(**{"epochs": len(test_losses), "device": "cpu", **train})
    write_config_dict(folder, {"model": model, "model_config": config_to_dict(make_config(model, list(overrides))),
                               "train": config_to_dict(config)})
    rows = []
    for epoch, (tr, te) in enumerate(zip(train_losses, test_losses), start=1):
        rows.append({"epoch": epoch, "split": "train", "loss": tr, "recon": tr - 1, "kl": 1.0, "seconds": 2.0})
        rows.append({"epoch": epoch, "split": "test", "loss": te, "recon": te - 2, "kl": 2.0, "seconds": 0.5})
    write_history(folder, rows, ("loss", "recon", "kl"))
    if metrics is not None:
        write_json(folder / "metrics.json", metrics)
    return folder


@pytest.fixture
def three_runs(tmp_path) -> list[Path]:
    root = tmp_path / "runs"
    return [
        # Test loss lowest at epoch 2 of 4; train loss lowest at the last epoch.
        make_run(root / "a", [110.0, 100.0, 104.0, 107.0], [120.0, 115.0, 112.0, 109.0], lr=1e-3,
                 metrics={"iwae": {"nll": 98.5}}),
        make_run(root / "b", [130.0, 125.0, 121.0, 120.0], lr=1e-2),
        make_run(root / "c", [115.0, 113.0, 112.5, 112.0], lr=1e-3, seed=7),
    ]


def test_the_table_shows_exactly_the_settings_that_differ_and_the_best_test_epoch(three_runs):
    table = comparison_table(load_runs(three_runs))
    headers = list(table.headers)
    # lr and seed differ; hidden_dims, latent_dim, batch_size, epochs... are the same in all three.
    assert headers[:4] == ["run", "model", "lr", "seed"]
    assert "hidden_dims" not in headers and "batch_size" not in headers
    rows = {row[0]: dict(zip(headers, row)) for row in table.rows}
    assert [rows[r]["best epoch (test loss)"] for r in "abc"] == [2, 4, 4]
    assert rows["a"]["test loss"] == 107.0 and rows["a"]["train loss"] == 109.0  # the last epoch's
    assert rows["a"]["test kl"] == 2.0 and rows["b"]["train recon"] == 124.0
    assert (rows["a"]["lr"], rows["b"]["lr"], rows["c"]["seed"]) == (1e-3, 1e-2, 7)
    assert rows["a"]["IWAE NLL"] == 98.5 and rows["b"]["IWAE NLL"] == "—"
    assert "FD" not in headers  # measured in no run
    assert rows["a"]["seconds"] == pytest.approx(4 * 2.5)
    assert "models" not in table.caption  # one model: its losses are one quantity


def test_different_models_show_the_fields_only_one_has(tmp_path):
    runs = [make_run(tmp_path / "vae", [100.0, 90.0]),
            make_run(tmp_path / "lstm", [95.0, 97.0], model="lstm-vae", overrides=["batch_norm=true"])]
    table = comparison_table(load_runs(runs))
    assert "batch_norm" in table.headers and "hidden_dims" in table.headers
    rows = {row[0]: dict(zip(table.headers, row)) for row in table.rows}
    assert rows["vae"]["batch_norm"] == "—" and rows["lstm"]["batch_norm"] is True
    assert rows["vae"]["hidden_dims"] == "[512]" and rows["lstm"]["best epoch (test loss)"] == 1
    assert "The runs are of 2 models (vae, lstm-vae): each loss is its model's own objective" in table.caption
    # both ran 2 epochs, so no epochs setting column; a 3-epoch run adds one beside "epochs trained"
    runs.append(make_run(tmp_path / "long", [99.0, 98.0, 97.0]))
    table = comparison_table(load_runs(runs))
    assert "epochs" in table.headers and "epochs trained" in table.headers
    assert "Columns between model and epochs trained: the settings that differ" in table.caption


def test_compare_writes_the_page_and_the_curves_and_prints_the_table(three_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, three_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best epoch (test loss)" in printed and f"wrote {out / 'compare.html'}" in printed
    page = (out / "compare.html").read_text()
    assert page.count("<tr>") == 4 and "data:image/png;base64," in page  # header + 3 runs, the figure inside
    # One bullet per run folder; the table in a box that scrolls sideways, names on one line.
    assert page.count("<li>") == 3 and all(f": {p}</li>" in page for p in three_runs)
    assert '<div class="scroll"><table>' in page and '<td class="short">' in page
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The default: compare/ beside the runs.
    assert default_out(load_runs(three_runs)).resolve() == (three_runs[0].parent / "compare").resolve()


def test_a_study_folder_stands_for_its_trained_trials(tmp_path, capsys):
    study = tmp_path / "study"
    (study).mkdir()
    (study / "study.json").write_text(json.dumps({"study": "s"}))
    make_run(study / "trial-0000", [100.0, 90.0], lr=1e-3)
    make_run(study / "trial-0001", [100.0, 95.0], lr=2e-3)
    # A trial killed before its first epoch: config.json, no history. Left out, not an error.
    write_config_dict(study / "trial-0002", {"model": "vae", "model_config": config_to_dict(make_config("vae")),
                                             "train": config_to_dict(TrainConfig())})
    assert main(["compare", str(study)]) == 0
    assert [r.label for r in load_runs([study])] == ["trial-0000", "trial-0001"]
    assert (study / "compare" / "compare.html").exists()  # the default folder: inside the study


def test_a_study_folder_leaves_out_an_interrupted_trial_that_was_queued_again(tmp_path):
    """trials.csv says trial 1 was interrupted after an epoch and retried as trial 3: the retry
    stands for it, so the variant is one row with its full training, not two."""
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"study": "s"}))
    make_run(study / "trial-0000", [100.0, 90.0], lr=1e-3)
    make_run(study / "trial-0001", [100.0], lr=2e-3)  # stopped after its first epoch
    make_run(study / "trial-0002", [100.0, 92.0], lr=3e-3)
    make_run(study / "trial-0003", [100.0, 95.0], lr=2e-3)
    (study / "trials.csv").write_text(
        "number,state,test.loss,lr,run,seconds,attempt,retry_of,error\n"
        "0,COMPLETE,90.0,0.001,trial-0000,5.0,1,,\n"
        "1,FAIL,,0.002,trial-0001,2.0,1,,interrupted (SIGINT); queued again\n"
        "2,COMPLETE,92.0,0.003,trial-0002,5.0,1,,\n"
        "3,COMPLETE,95.0,0.002,trial-0003,5.0,2,1,\n")
    assert [r.label for r in load_runs([study])] == ["trial-0000", "trial-0002", "trial-0003"]
    # named on its own, the interrupted run folder is still compared
    assert [r.label for r in load_runs([study / "trial-0001"])] == ["trial-0001"]


def test_a_trial_of_named_variants_is_labelled_with_its_variant(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"study": "s"}))
    make_run(study / "trial-0000", [100.0, 90.0], lr=1e-3)
    make_run(study / "trial-0001", [100.0, 95.0], lr=2e-3)
    (study / "trials.csv").write_text("number,state,test.loss,variant,run,seconds,attempt,retry_of,error\n"
                                      "0,COMPLETE,90.0,slow,trial-0000,5.0,1,,\n"
                                      "1,COMPLETE,95.0,fast,trial-0001,5.0,1,,\n")
    assert [r.label for r in load_runs([study])] == ["trial-0000 (slow)", "trial-0001 (fast)"]


@pytest.mark.parametrize("case, expected", [
    ("not a run", "not a run folder (no config.json) nor a study folder"),
    ("missing", "no such run folder"),
    ("no history", "no history"),
    ("history deleted", "history.csv: missing (deleted?; `vaelab train --resume"),
])
def test_mistakes_are_one_line_naming_the_path_and_nothing_is_written(tmp_path, capsys, case, expected):
    good = make_run(tmp_path / "good", [100.0])
    bad = tmp_path / "bad"
    if case == "not a run":
        bad.mkdir()
    elif case == "no history":
        write_config_dict(bad, {"model": "vae", "model_config": config_to_dict(make_config("vae")),
                                "train": config_to_dict(TrainConfig())})
    elif case == "history deleted":  # the checkpoint still holds it
        make_run(bad, [100.0])
        (bad / "history.csv").unlink()
        (bad / "checkpoint.safetensors").write_bytes(b"")
    assert main(["compare", str(good), str(bad), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}" in err and expected in err, err
    assert not (tmp_path / "cmp").exists()


def test_report_tables_keep_short_cells_on_one_line_and_let_sentences_wrap():
    from vaelab.report import SHORT_CELL, Table, table_html

    short, sentence = "trial-0010 (4 layers, leaky 0.01, no bn, no heads)", "word " * SHORT_CELL
    page = table_html(Table(["run", "note", "loss"], [[short, sentence, 101.25]]))
    assert f'<td class="short">{short}</td>' in page and f"<td>{sentence}</td>" in page
    assert '<td class="num">101.2</td>' in page and page.startswith('<div class="scroll">')


def test_compare_needs_a_run(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
