"""The conditional VAE: the label reaches the encoder and the decoder (in the outputs and in the
gradients), the per-class figure holds the code fixed down each column, `generate --class`
draws the asked class and refuses, in one line, a class that does not exist or a model that
cannot take one; `evaluate` reports the share of samples the classifier assigns to their class;
`explore --export` writes an atlas per class."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab import figures, plots
from vaelab.batch import Batch, StepState
from vaelab.cli import main, parse_class
from vaelab.data import to_float
from vaelab.errors import ConfigError
from vaelab.metrics import class_share
from vaelab.models import build_model, make_config

from conftest import train_by_cli
from test_cli import one_line_error, run_cli

CONFIGS = {"mlp": {"hidden_dims": [32], "latent_dim": 3},
           "lstm-conv": {"encoder": "lstm", "decoder": "conv", "lstm_hidden": 16, "channels": [8, 4], "latent_dim": 3}}


def cvae(kind="mlp", **fields):
    torch.manual_seed(0)
    return build_model("cvae", make_config("cvae", **{**CONFIGS[kind], **fields}))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_label_changes_the_encoding_and_the_decoding(kind):
    model = cvae(kind).eval()
    x, z = torch.rand(4, 1, 28, 28), torch.randn(4, 3)
    three, seven = torch.full((4,), 3), torch.full((4,), 7)
    assert (model.encode(x, three).mu - model.encode(x, seven).mu).abs().min() > 0
    assert (model.decode(z, three) - model.decode(z, seven)).abs().amax((1, 2, 3)).min() > 1e-4
    # the same label, the same output: the difference above is the label's
    torch.testing.assert_close(model.decode(z, three), model.decode(z, three.clone()), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="pass condition="):
        model.decode(z)
    with pytest.raises(ConfigError, match="pass condition="):
        model.encode(x)


def test_a_training_step_reaches_the_label_inputs_of_both_networks():
    """Autograd check: with every label 3, the one-hot inputs' weights get a gradient in the
    column of class 3 only, in the encoder's first layer and in the decoder's."""
    model = cvae()
    model(Batch(torch.rand(16, 1, 28, 28), torch.full((16,), 3)), StepState()).loss.backward()
    enc_w = model.trunk.net[0].weight.grad[:, 784:]  # (H, 784 + 10): the one-hot's 10 columns
    dec_w = model.decoder.net[0].weight.grad[:, 3:]  # (H, 3 + 10): after the 3 latent columns
    for grad in (enc_w, dec_w):
        assert grad.shape[1] == 10
        norms = grad.abs().sum(0)
        assert norms[3] > 0 and torch.count_nonzero(norms) == 1


def test_the_conditional_grid_holds_each_columns_code_fixed(monkeypatch, tmp_path):
    model = cvae().eval()
    seen = {}
    monkeypatch.setattr(plots, "plot_image_rows", lambda rows, labels, path, **kw: seen.update(rows=rows, labels=labels))
    figures.conditional_samples_figure(model, [f"c{i}" for i in range(10)], tmp_path / "s.png", seed=5)
    rows = seen["rows"]
    assert len(rows) == 10 and all(r.shape == (10, 1, 28, 28) for r in rows) and seen["labels"][3] == "c3"
    z = model.prior_sample(10, generator=torch.Generator().manual_seed(5))
    for c, row in enumerate(rows):
        torch.testing.assert_close(row, model.decode(z, torch.full((10,), c)), rtol=0, atol=0)
    assert not torch.equal(rows[0], rows[1])


def test_class_names_and_numbers():
    assert [parse_class(t, "fashion-mnist") for t in ("sneaker", "SNEAKER", "Ankle boot", "ankle-boot", "t-shirt",
                                                      "top", "T-shirt/top", "3")] == [7, 7, 9, 9, 0, 0, 0, 3]
    assert [parse_class(t, "mnist") for t in ("0", "3", "9")] == [0, 3, 9]
    for bad, dataset in (("10", "mnist"), ("sneaker", "mnist"), ("sneakers", "fashion-mnist"), ("-1", "mnist")):
        with pytest.raises(ConfigError, match=f"--class '{bad}': not a class of {dataset}"):
            parse_class(bad, dataset)


def test_class_share_counts_each_asked_class():
    asked = torch.tensor([0, 0, 1, 1, 1, 2])
    probs = torch.eye(3)[torch.tensor([0, 1, 1, 1, 0, 2])].double()
    share = class_share(probs, asked)
    assert share["per_class"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert share["mean"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)


@pytest.fixture(scope="module")
def cvae_trained(tmp_path_factory):
    """One cvae run trained by `vaelab train` for the module."""
    run, out = train_by_cli(tmp_path_factory.mktemp("cvae_run"), "cvae", "cvae", "--set", "hidden_dims=[32]",
                            "--latent-dim", "3")
    assert "figures/samples.png" in out
    return run


@pytest.fixture
def cvae_run(cvae_trained, tmp_path, synthetic_mnist):
    """A copy of that run in this test's folder (the same synthetic data installed)."""
    return Path(shutil.copytree(cvae_trained, tmp_path / "cvae"))


def test_generate_draws_the_asked_class(cvae_run, tmp_path, capsys):
    # on the CPU, as the expected images are drawn (a CUDA device's random stream is another)
    from vaelab.checkpoint import load_run
    from vaelab.evaluate import generate

    code, out, _ = run_cli(capsys, "generate", str(cvae_run), "-n", "12", "--class", "3", "--npy",
                           str(tmp_path / "three.npy"), "--out", str(tmp_path / "three.png"), "--device", "cpu")
    assert code == 0 and "12 samples of class 3" in out and (tmp_path / "three.png").is_file()
    model = load_run(cvae_run).model.eval()
    expected = generate(model, 12, seed=0, labels=torch.full((12,), 3))[:, 0].numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "three.npy"), expected)
    # without --class: every class in turn, in order
    run_cli(capsys, "generate", str(cvae_run), "-n", "20", "--npy", str(tmp_path / "all.npy"), "--device", "cpu")
    expected = generate(model, 20, seed=0, labels=torch.arange(20) // 2)[:, 0].numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), expected)


def test_generate_refuses_an_unknown_class_in_one_line(cvae_run, capsys):
    for bad in ("10", "sneaker", "three"):
        code, _, err = run_cli(capsys, "generate", str(cvae_run), "--class", bad)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"vaelab: error: --class '{bad}': not a class of mnist; choose 0-9 or one of 0, 1,")
    assert not (cvae_run / "figures" / "generated.png").exists()


def test_generate_class_on_an_unconditional_model_is_one_line(tmp_path, synthetic_mnist, capsys):
    run = tmp_path / "vae"
    assert run_cli(capsys, "train", "vae", "--epochs", "1", "--out", str(run), "--device", "cpu",
                   "--set", "hidden_dims=[16]", "--quiet")[0] == 0
    code, _, err = run_cli(capsys, "generate", str(run), "--class", "3")
    assert code == 2 and err.count("\n") == 1 and "vae, which is unconditional" in err
    one_line_error(capsys, "generate", str(run), "--class")  # argparse: the flag needs a value


def test_evaluate_and_plot_a_conditional_run(cvae_run, capsys):
    code = main(["evaluate", str(cvae_run), "--iw-samples", "5", "--iw-images", "20", "--samples", "200",
                 "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "samples of class k classified as k" in out and "IWAE NLL given the labels" in out
    m = json.loads((cvae_run / "metrics.json").read_text())
    share = m["class_share"]
    assert len(share["per_class"]) == 10 and share["samples_per_class"] == [20.0] * 10
    assert share["mean"] == pytest.approx(np.mean(share["per_class"]))
    assert main(["plot", str(cvae_run), "--device", "cpu"]) == 0
    assert "--grid" not in capsys.readouterr().out  # none asked for, none mentioned
    for name in ("class_grid", "samples", "latent_scatter", "interpolation", "reconstructions"):
        assert (cvae_run / "figures" / f"{name}.png").is_file(), name
    assert not (cvae_run / "figures" / "manifold.png").exists()


def test_a_trained_cvae_draws_the_asked_class_on_synthetic_data(tiny_data, tmp_path):
    """Each synthetic class is a bar at its own angle: after training, the samples of class k lie
    nearest the mean image of class k for most k (chance: 1 in 10). A 1-D code leaves the class
    to the label; 160 steps, about a second."""
    from vaelab.train import train

    from conftest import quick_config

    trainer = train("cvae", make_config("cvae", hidden_dims=[64], latent_dim=1),
                    quick_config(epochs=10, batch_size=16, lr=3e-3), tmp_path / "run", progress=False, data=tiny_data)
    model = trainer.model.eval()
    means = torch.stack([to_float(tiny_data.train_x[tiny_data.train_y == k]).mean(0) for k in range(10)])
    samples = model.sample(100, generator=torch.Generator().manual_seed(0), condition=torch.arange(100) // 10)
    nearest = torch.cdist(samples.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == torch.arange(100) // 10).float().mean() >= 0.8


def test_explore_exports_a_conditional_run_with_an_atlas_per_class(cvae_run, tmp_path, capsys):
    """`vaelab explore RUN --export` on a 3-D cvae: a PCA plane through the codes given their own
    labels, and ten atlases, each the decoder's images of the grid as its class
    (tests/test_explore.py checks the page, the API and the selector in detail)."""
    from vaelab.checkpoint import load_run
    from vaelab.data import load
    from vaelab.explore import LatentSpace

    from test_explore import atlases_of, close, reference_decode, tiles_of

    code, out, _ = run_cli(capsys, "explore", str(cvae_run), "--export", str(tmp_path / "x.html"))
    assert code == 0 and "wrote" in out and "one atlas per class" in out
    n, sheets = atlases_of((tmp_path / "x.html").read_text())
    assert n == 20 and len(sheets) == 10
    model = load_run(cvae_run).model.eval()
    space = LatentSpace.from_run(load_run(cvae_run), load("mnist"))  # the same plane as the command's
    for label in (0, 3, 9):
        assert close(tiles_of(sheets[label], n), reference_decode(model, space.grid_points(n), label))


@pytest.mark.parametrize("n_classes", [5, 12])
def test_a_cvae_whose_classes_differ_from_the_datasets_is_refused_before_anything_is_written(
        tmp_path, synthetic_mnist, capsys, n_classes):
    run = tmp_path / "cvae"
    code, _, err = run_cli(capsys, "train", "cvae", "--epochs", "1", "--out", str(run), "--device", "cpu",
                           "--set", f"n_classes={n_classes}", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"n_classes={n_classes}" in err and "has 10 classes" in err
    assert not run.exists()
