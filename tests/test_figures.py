"""Every figure function writes a valid PNG of the expected size, on synthetic tensors."""

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab import plots
from vaelab.figures import FIGURE_FILES, class_samples, pca_2d, write_run_figures
from vaelab.models import make_config
from vaelab.train import train

from conftest import quick_config


def png_size(path):
    with Image.open(path) as img:
        img.verify()  # raises on a damaged file
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def images(n, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_image_grid_png_has_exact_pixel_size(tmp_path):
    w, h = png_size(plots.save_image_grid(images(100), tmp_path / "g.png", nrow=10, scale=2))
    assert (w, h) == (2 * (10 * 30 + 2), 2 * (10 * 30 + 2))


@pytest.mark.parametrize("draw, size", [
    (lambda p: plots.plot_image_grid(images(100), p, title="samples"), (200, 200)),
    (lambda p: plots.plot_image_rows([images(10), images(10, 1)], ["a", "b"], p, title="t",
                                     col_labels=[str(i) for i in range(10)]), (500, 150)),
    (lambda p: plots.plot_latent_scatter(torch.randn(500, 2), torch.randint(0, 10, (500,)),
                                         [f"class {i}" for i in range(10)], p, title="t",
                                         note="PCA projection"), (500, 400)),
    (lambda p: plots.plot_manifold(images(15 * 15), np.linspace(-2, 2, 15), np.linspace(2, -2, 15), p,
                                   title="t"), (450, 450)),
])
def test_each_plot_writes_a_png_at_least_this_big(tmp_path, draw, size):
    w, h = png_size(draw(tmp_path / "f.png"))
    assert w >= size[0] and h >= size[1]
    assert w < 4000 and h < 4000


@pytest.mark.parametrize("terms", [("recon", "kl"), ("enc_loss", "dec_loss", "dis_loss", "dis_acc_real", "kl")])
def test_loss_curves_draw_every_term_in_bands(tmp_path, terms):
    history = [{"epoch": e, "split": s, "loss": 10.0 / e, **{t: 1.0 / e for t in terms}}
               for e in (1, 2, 3) for s in ("train", "test")]
    cols = ["step", "epoch", "loss", *terms]
    steps = np.array([[i, 1 + i // 10, 5.0, *([0.5] * len(terms))] for i in range(1, 31)])
    w, h = png_size(plots.plot_loss_curves(history, steps, cols, tmp_path / "l.png", regularizer="kl",
                                           terms=["loss", *terms]))
    n = 1 + len(terms)
    assert w < 1600  # wrapped into bands of at most 4 columns
    assert h > 600 * ((n + 3) // 4) * 0.9  # two rows (epoch, iteration) per band


def test_pca_projection_keeps_the_main_axes():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(1000, 5, generator=g) * torch.tensor([5.0, 2.0, 0.1, 0.1, 0.1])
    points, share = pca_2d(codes)
    assert points.shape == (1000, 2)
    assert share[0] > 0.8 and share[0] + share[1] > 0.99


def test_class_samples_stay_in_their_class_region():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    labels = torch.arange(3).repeat_interleave(200)
    codes = centres[labels] + torch.randn(600, 2, generator=g)
    z = class_samples(codes, labels, 3, k=5)
    assert z.shape == (15, 2)
    nearest = torch.cdist(z, centres).argmin(1)
    assert nearest.tolist() == labels[::40].tolist()  # 5 per class, in class order


def test_class_samples_are_distinct_when_few_candidates_pass():
    # Class 1 is rare and lies inside class 0: almost no candidate is more likely its own.
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    codes = torch.randn(1020, 2, generator=g)
    z = class_samples(codes, labels, 2, k=5)
    assert z.shape == (10, 2)
    for row in z.view(2, 5, 2):
        assert len(torch.unique(row, dim=0)) == 5


@pytest.mark.parametrize("latent_dim", [2, 3])
def test_write_run_figures_on_a_tiny_run(tmp_path, tiny_data, latent_dim):
    trainer = train("vae", make_config("vae", hidden_dims=[16], latent_dim=latent_dim), quick_config(), tmp_path / "run",
                    progress=False, data=tiny_data)
    written = write_run_figures(tmp_path / "run", trainer.model, tiny_data, n_scatter=64, grid_size=5)
    expected = set(FIGURE_FILES) - ({"manifold"} if latent_dim != 2 else set())
    assert set(written) == expected
    for path in written.values():
        png_size(path)


def test_recipe_folder_rules(tmp_path):
    from vaelab.errors import ConfigError, RunExistsError
    from vaelab.recipes import RECIPES, estimate_seconds, get_recipe, prepare_out

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="already exists"):
        prepare_out(notes, overwrite=False)
    with pytest.raises(RunExistsError, match="refusing"):
        prepare_out(notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("nope")
    assert set(RECIPES) == {"vae-2d-mnist", "lstm-vae-mnist", "fashion-generative", "likelihood-mnist"}
    # The demo's budget: quick vae-2d-mnist estimated well under 2.5 minutes.
    assert estimate_seconds(RECIPES["vae-2d-mnist"], quick=True) < 150


def test_recipe_re_estimates_what_is_left_from_the_pace_so_far():
    """After each model the recipe scales the table's figures for the remaining steps by how much
    slower (or faster) this machine ran the finished ones: a busy machine's estimate holds."""
    from dataclasses import replace

    from vaelab.recipes import RECIPES, seconds_left, step_seconds

    recipe = RECIPES["fashion-generative"]
    steps = [replace(s, seconds_per_epoch=1.0, measure_seconds=10.0, epochs=(2, 5)) for s in recipe.steps[:3]]
    full, quick = [step_seconds(s, quick=False) for s in steps], [step_seconds(s, quick=True) for s in steps]
    assert full == [15.0, 15.0, 15.0]
    # the first step took 45 s against 15 planned: 3x, so the two left take 3 x 30 s
    assert seconds_left(full, done=1, elapsed=45.0) == (90.0, 3.0)
    # quick: 2 epochs + 20 s of metrics = 22 s a step; running at half the planned time
    assert seconds_left(quick, done=2, elapsed=22.0) == (11.0, 0.5)
    assert seconds_left(quick, done=3, elapsed=70.0)[0] == 0.0
    # resumed: a step with 3 of its 5 epochs done plans 2 more and its metrics; one already
    # measured plans what it has left to train, no metrics
    assert step_seconds(steps[0], quick=False, epochs_done=3) == 12.0
    assert step_seconds(steps[0], quick=False, epochs_done=5, measured=True) == 0.0
    assert seconds_left([0.0, 12.0, 15.0], done=2, elapsed=24.0) == (30.0, 2.0)


def test_the_plan_counts_each_classifier_the_cache_lacks_once_and_says_so(monkeypatch):
    """A recipe that measures samples trains the domain classifier of each of its datasets the
    cache lacks (minutes on a first run): the estimate adds it to the first step that will, and
    the plan line says how much of the total it is."""
    from dataclasses import replace

    from vaelab import recipes

    cached = {"mnist": False, "fashion-mnist": True}
    monkeypatch.setattr(recipes, "classifier_cached", lambda dataset: cached[dataset])
    seconds = {"mnist": 170.0, "fashion-mnist": 400.0}
    monkeypatch.setattr(recipes, "classifier_train_seconds", lambda dataset: seconds[dataset])
    step = recipes.RECIPES["vae-2d-mnist"].steps[0]
    steps = (replace(step, key="a", dataset="fashion-mnist"), replace(step, key="b"), replace(step, key="c"))
    recipe = recipes.Recipe("r", "R", "", steps, recipes.EvalSettings(n_samples=100), recipes.EvalSettings(n_samples=0))
    plan = [0.0, 0.0, 60.0]  # b finished (resumed): c, the next mnist step, trains the classifier
    assert recipes.classifiers_to_train(recipe, recipe.quick_eval, plan) == {"mnist": 170.0}
    assert plan == [0.0, 0.0, 230.0]
    plan = [0.0, 0.0, 60.0]
    assert recipes.classifiers_to_train(recipe, recipe.full_eval, plan) == {} and plan == [0.0, 0.0, 60.0]
    cached["mnist"] = True
    assert recipes.classifiers_to_train(recipe, recipe.quick_eval, plan) == {} and plan == [0.0, 0.0, 60.0]
    cached["fashion-mnist"] = cached["mnist"] = False
    plan = [30.0, 60.0, 60.0]
    assert recipes.classifiers_to_train(recipe, recipe.quick_eval, plan) == {"fashion-mnist": 400.0, "mnist": 170.0}
    assert plan == [430.0, 230.0, 60.0]

    monkeypatch.setattr(recipes, "physical_cores", lambda: 2)
    monkeypatch.setattr(recipes, "idle_cores", lambda: 2)
    assert recipes.describe_time(230.0, {"mnist": 170.0}) == (
        "about 4 min on 2 idle CPU cores (about 3 of them to train the mnist domain classifier, this once: "
        "later runs take it from the cache)")
    assert recipes.describe_time(720.0, {"fashion-mnist": 400.0, "mnist": 170.0}).startswith(
        "about 12 min on 2 idle CPU cores (about 10 of them to train the fashion-mnist and mnist domain classifiers")
    monkeypatch.setattr(recipes, "idle_cores", lambda: 1)
    assert recipes.describe_time(60.0) == ("about 1 min on 2 idle CPU cores; other processes keep 1 of this "
                                           "machine's 2 cores busy, so expect about 2 min")
    # on a GPU the CPU's minutes are an upper bound, however busy the CPU cores are
    assert recipes.describe_time(60.0, device=torch.device("cuda:0")) == (
        "about 1 min on 2 idle CPU cores; it trains on cuda:0, so expect less (the estimate is the CPU's)")
    assert recipes.describe_time(60.0, device=torch.device("cpu")).endswith("so expect about 2 min")


def test_drawing_figures_leaves_the_matplotlib_backend_alone(tmp_path):
    """A library does not change the process it is imported into: a notebook's inline backend
    (or any other) is the same after vaelab has drawn every kind of figure."""
    import os
    import subprocess
    import sys

    code = ("import matplotlib, torch\n"
            "from vaelab import plots, figures, recipes\n"
            "plots.plot_image_grid(torch.rand(4, 1, 28, 28), 'g.png', 'grid', nrow=2)\n"
            "plots.plot_series([('t', 'y', {'a': ([1, 2], [3, 4])})], 's.png', 'series')\n"
            "print(matplotlib.get_backend())\n")
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"
