"""The CLI through main([...]) into temp folders, error paths included."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from vaelab.cli import main

from conftest import train_by_cli


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, code=2):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained_by_cli(tmp_path_factory):
    """One run trained by `vaelab train` for the module, and what the command printed."""
    return train_by_cli(tmp_path_factory.mktemp("cli_run"), "vae", "run", "--set", "hidden_dims=[32]",
                        "--latent-dim", "2")


@pytest.fixture
def trained_run(trained_by_cli, tmp_path, synthetic_mnist):
    """A copy of that run in this test's folder (the same synthetic data installed), to change at will."""
    run, out = trained_by_cli
    return Path(shutil.copytree(run, tmp_path / "run")), out


def test_train_writes_run_and_summary(trained_run):
    run, out = trained_run
    assert "wrote" in out and "model.safetensors" in out
    for f in ("config.json", "model.safetensors", "history.csv", "steps.csv",
              "figures/loss_curves.png", "figures/samples.png", "figures/reconstructions.png"):
        assert (run / f).is_file(), f


def test_generate_png_and_npy(trained_run, tmp_path, capsys):
    run, _ = trained_run
    code, out, _ = run_cli(capsys, "generate", str(run), "-n", "30", "--out", str(tmp_path / "s.png"),
                           "--npy", str(tmp_path / "s.npy"), "--device", "cpu")
    assert code == 0 and (tmp_path / "s.png").is_file()
    arr = np.load(tmp_path / "s.npy")
    assert arr.shape == (30, 28, 28) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    run_cli(capsys, "generate", str(run), "-n", "30", "--npy", str(tmp_path / "t.npy"), "--device", "cpu")
    np.testing.assert_array_equal(arr, np.load(tmp_path / "t.npy"))  # same seed, same samples


def test_reconstruct(trained_run, tmp_path, capsys):
    run, _ = trained_run
    code, _, _ = run_cli(capsys, "reconstruct", str(run), "-n", "10", "--out", str(tmp_path / "r.png"))
    assert code == 0 and (tmp_path / "r.png").is_file()


def test_models_lists_vae(capsys):
    code, out, _ = run_cli(capsys, "models")
    names = [line.split()[0] for line in out.splitlines() if line[:1].strip()]
    assert code == 0 and "vae" in names and names == sorted(names)


@pytest.mark.parametrize("argv, message", [
    (["train", "nope", "--epochs", "1"], "unknown model"),
    (["train", "vae", "--dataset", "cifar"], "unknown dataset"),
    (["train", "vae", "--epochs", "0"], "epochs must be at least 1"),
    (["train", "vae", "--latent-dim", "0"], "latent_dim must be at least 1"),
    (["train", "vae", "--set", "nope=1"], "unknown field"),
    (["train", "vae", "--set", "latent_dim=2.5"], "expected an integer"),
    (["train", "vae", "--device", "tpu"], "device must be"),
    (["train"], "name a model"),
    (["generate", "/nonexistent/run"], "no such run folder"),
    (["data", "fetch", "cifar"], "unknown dataset"),
])
def test_user_errors_are_one_line(capsys, argv, message, synthetic_mnist):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_argparse_errors_are_one_line(capsys):
    err = one_line_error(capsys, "train", "vae", "--epochs", "x")
    assert "invalid int value" in err
    one_line_error(capsys, "frobnicate")


def test_existing_out_is_refused_and_kept(trained_run, capsys):
    run, _ = trained_run
    before = (run / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", "vae", "--epochs", "1", "--out", str(run), "--quiet")
    assert code == 2 and "already exists" in err
    assert (run / "model.safetensors").read_bytes() == before


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", str(tmp_path))
    assert code == 2 and "not a vaelab run folder" in err


def test_a_folder_holding_one_run_stands_for_it(trained_run, tmp_path, capsys):
    """`vaelab generate runs/demo` works on a one-model recipe folder; several runs are listed."""
    run, _ = trained_run
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    run.rename(recipe / "only")
    code, out, _ = run_cli(capsys, "generate", str(recipe), "-n", "4", "--npy", str(tmp_path / "g.npy"))
    assert code == 0 and str(recipe / "only") in out and np.load(tmp_path / "g.npy").shape == (4, 28, 28)
    import shutil

    shutil.copytree(recipe / "only", recipe / "second")
    code, _, err = run_cli(capsys, "generate", str(recipe), "-n", "4")
    assert code == 2 and "holds 2 runs (only/, second/)" in err


def test_overwrite_never_deletes_a_folder_that_only_looks_like_a_run(tmp_path, synthetic_mnist, capsys):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    (fake / "notes.txt").write_text("precious")
    code, _, err = run_cli(capsys, "train", "vae", "--epochs", "1", "--out", str(fake), "--overwrite", "--quiet")
    assert code == 2 and "not a vaelab run folder" in err
    assert (fake / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("bad", [["--device", "cuda"], ["--set", "hidden_dims=[0]"]])
def test_a_bad_option_leaves_no_folder_and_keeps_the_run_it_would_replace(trained_run, tmp_path, capsys, bad):
    import torch

    if bad[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, _ = run_cli(capsys, "train", "vae", "--epochs", "1", "--out", str(tmp_path / "new"), "--quiet", *bad)
    assert code == 2 and not (tmp_path / "new").exists()
    run, _ = trained_run
    before = (run / "model.safetensors").read_bytes()
    code, _, _ = run_cli(capsys, "train", "vae", "--epochs", "1", "--out", str(run), "--overwrite", "--quiet", *bad)
    assert code == 2 and (run / "model.safetensors").read_bytes() == before


def test_unwritable_outputs_are_one_line(trained_run, tmp_path, capsys):
    run, _ = trained_run
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "generate", str(run), "-n", "2", "--npy", str(blocker / "s.npy"))
    assert code == 2 and err.count("\n") == 1 and str(blocker) in err
    for argv, message in ((["reconstruct", str(run), "-n", "101"], "at most 100"),
                          (["reconstruct", str(run), "--out", "r.txt"], "name it *.png"),
                          (["generate", str(run), "--out", "g.jpg"], "name it *.png")):
        err = one_line_error(capsys, *argv)
        assert message in err


def test_resume_refuses_options_it_would_not_honour(trained_run, capsys):
    run, _ = trained_run
    for flag in (["--clip-grad", "1"], ["--batch-size", "8"], ["--precision", "bf16"], ["--seed", "3"], ["--seed", "0"], ["--val-size", "0"]):
        code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", *flag)
        assert code == 2 and f"drop {flag[0]}" in err


def test_models_one_line_each_and_fields_on_request(capsys):
    from vaelab.models import MODELS

    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and len(out.splitlines()) == len(MODELS)
    code, out, _ = run_cli(capsys, "models", "--fields")
    assert "latent_dim=2" in out and sum("--set fields:" in line for line in out.splitlines()) == len(MODELS)
    # Fields declared with `config.option` print their help, one line each: the KL and IWAE
    # options of every Gaussian VAE among them.
    for option in ("kl_warmup_steps", "free_bits", "iwae_k"):
        documented = [line for line in out.splitlines() if line.strip().startswith(f"{option}: ")]
        assert len(documented) == 3, option  # vae, lstm-vae, cvae


def test_evaluation_of_a_statically_binarized_run_uses_the_binarized_test_set(tmp_path, synthetic_mnist, capsys):
    import json

    run = tmp_path / "bin"
    assert run_cli(capsys, "train", "vae", "--epochs", "1", "--binarize", "static", "--set", "hidden_dims=[16]",
                   "--out", str(run), "--quiet", "--device", "cpu")[0] == 0
    code, _, _ = run_cli(capsys, "evaluate", str(run), "--iw-samples", "4", "--iw-images", "16", "--samples", "0",
                         "--quiet", "--device", "cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    assert code == 0 and "statically binarized" in json.dumps(metrics)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
@pytest.mark.parametrize("command", [["train", "vae"], ["recipe", "vae-2d-mnist"]], ids=["train", "recipe"])
def test_threads_below_one_or_not_a_number_is_a_one_line_error(capsys, tmp_path, command, value):
    err = one_line_error(capsys, *command, "--out", str(tmp_path / "nowhere"), "--threads", value)
    assert "--threads" in err and (f"got {value}" in err or f"got '{value}'" in err)
    assert not (tmp_path / "nowhere").exists()


def test_threads_sets_the_thread_count_and_goes_with_resume(trained_run, capsys):
    import torch

    from vaelab.runtime import physical_cores

    run, _ = trained_run
    before = torch.get_num_threads()
    torch.set_num_threads(physical_cores() + 1)
    try:
        code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--threads", "1", "--quiet")
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# A value other than the default for each TrainConfig field, as typed on the command line and as
# the config holds it. A new field without an entry here fails the test below: give it one.
FLAG_VALUES = {"dataset": ("fashion-mnist", "fashion-mnist"), "epochs": ("3", 3), "batch_size": ("7", 7),
               "lr": ("0.5", 0.5), "lr_decay": ("0.9", 0.9), "seed": ("5", 5), "device": ("cpu", "cpu"), "val_size": ("10", 10),
               "binarize": ("dynamic", "dynamic"), "precision": ("bf16", "bf16"), "clip_grad": ("2.5", 2.5),
               "eval_batch_size": ("33", 33), "log_every": ("9", 9), "compile": (None, True),
               "tensorboard": (None, "tb")}  # the flag alone: the run folder's tb/


def test_every_train_config_field_is_a_train_flag_and_refused_with_resume(tmp_path, monkeypatch, capsys):
    """Each field of TrainConfig reaches the config `vaelab train` trains with, through its flag
    (`batch_size` -> `--batch-size`, with the field's help), and each one --resume may not change
    is refused there by name."""
    import dataclasses
    import sys

    from vaelab.cli import build_parser
    from vaelab.train_config import RESUMABLE_FIELDS, TrainConfig

    class Captured(Exception):
        pass

    def fake_train(model_name, model_config, config, run_dir, **kwargs):
        raise Captured(config)

    monkeypatch.setattr(sys.modules["vaelab.train"], "train", fake_train)  # `vaelab.train` is the function
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    fields = dataclasses.fields(TrainConfig)
    assert set(FLAG_VALUES) == {f.name for f in fields}, "give each TrainConfig field a value in FLAG_VALUES"
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        typed, expected = FLAG_VALUES[field.name]
        assert expected != field.default and flag in train_help
        assert " ".join(field.metadata["help"].split())[:30] in " ".join(train_help.split()), field.name
        argv = [flag] if typed is None else [flag, typed]
        with pytest.raises(Captured) as caught:
            main(["train", "vae", *argv, "--out", str(tmp_path / "run"), "--quiet"])
        assert getattr(caught.value.args[0], field.name) == expected, field.name
        if field.name not in RESUMABLE_FIELDS:
            code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "run"), *argv)
            assert code == 2 and err.endswith(f"drop {flag}\n"), err
