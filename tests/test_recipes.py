"""Recipes' reports: their sentences, captions and tables follow the measured numbers.

The reports are written from untrained tiny models in real run folders and fabricated metrics
dicts (in metrics.json's format), so nothing here trains; what matters is the words."""

import dataclasses
import json
import html
import re

import pytest
import torch

from vaelab import plots, recipes
from vaelab.checkpoint import save_model, write_run_config
from vaelab.models import build_model, make_config
from vaelab.recipes import RECIPES, RecipeResult, StepResult, table_metrics, write_report
from vaelab.train import TrainConfig


def quality(fd=100.0, kid=0.05, precision=0.5, recall=0.5, confident=0.5, se=0.01, n=2000):
    return {"fd": fd, "fd_std": 1.0, "kid": kid, "kid_std": 0.002, "precision": precision,
            "precision_se": se, "recall": recall, "recall_se": se, "confident_share": confident,
            "confident_share_se": se, "class_histogram": [0.1] * 10, "n": n}


GOOD = quality(fd=50.0, kid=0.02, precision=0.7, recall=0.6, confident=0.8)
BAD = quality(fd=150.0, kid=0.09, precision=0.4, recall=0.3, confident=0.5)
FLOOR = quality(fd=0.3, kid=0.0001, precision=0.75, recall=0.75, confident=0.95)
GAN_TERMS = {"loss": 90.0, "enc_loss": 80.0, "dec_loss": 9.0, "dis_loss": 1.2, "dis_acc_real": 0.7,
             "dis_acc_fake": 0.6, "kl": 5.0, "recon": 75.0, "feature": 0.0, "dec_updated": 0.9,
             "dis_updated": 0.8}


def metrics(model: str, latent_dim: int, samples: dict, recon_mse: float = 0.03) -> dict:
    m = {"model": model, "dataset": "fashion-mnist", "latent_dim": latent_dim, "recon_mse": recon_mse,
         "sample_quality": {"samples": samples, "real_train": FLOOR}, "likelihood_data": "grey-level test set"}
    if model == "ae":
        m["test_terms"] = {"loss": recon_mse, "recon": recon_mse}
    else:
        m["elbo"] = {"neg_elbo": 250.0, "recon": 240.0, "kl": 10.0}
        m["iwae"] = {"nll": 245.0, "se": 0.8, "k": 100, "images": 500}
        m["test_terms"] = dict(GAN_TERMS) if model == "vae-gan" else {"loss": 250.0, "recon": 240.0, "kl": 10.0}
    return m


def tiny_config(step):
    """The step's model, shrunk: the report needs a model of the right kind, not a good one."""
    cfg = dict(step.config)
    if step.model == "lstm-vae":
        cfg["lstm_hidden"] = 8
    elif cfg.get("arch") != "conv":
        cfg["hidden_dims"] = [16]
    return make_config(step.model, **cfg)


@pytest.fixture(autouse=True)
def quick_plots(monkeypatch, tmp_path):
    """Side-by-side figures as one small PNG: the plots have their own tests, these are about words."""
    png = plots.save_image_grid(torch.rand(4, 1, 28, 28), tmp_path / "rows.png", nrow=2)
    monkeypatch.setattr(recipes.plots, "plot_image_rows", lambda rows, labels, path, **kw: png)


def fake_result(tmp_path, recipe, data, quality_by_key, quick=True) -> RecipeResult:
    png = plots.save_image_grid(torch.rand(4, 1, 28, 28), tmp_path / "figure.png", nrow=2)
    steps = []
    for step in recipe.steps:
        model = build_model(step.model, tiny_config(step))
        run_dir = tmp_path / "out" / step.key
        run_dir.mkdir(parents=True)
        write_run_config(run_dir, model, TrainConfig(dataset=step.dataset, epochs=1, device="cpu"))
        save_model(run_dir, model)
        m = metrics(step.model, model.latent_dim, quality_by_key.get(step.key, BAD))
        steps.append(StepResult(step, run_dir, m, {key: png for key in step.figures}, 1.0,
                                prior=model.prior_name))
    return RecipeResult(recipe, tmp_path / "out", quick, steps, {s.dataset: data for s in recipe.steps})


def text_of(page: str) -> str:
    page = re.sub(r'src="data:[^"]*"', "", page)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def answer_paragraphs(page: str) -> list[str]:
    return [text_of(p) for p in re.findall(r'<p class="answer">(.*?)</p>', page, flags=re.S)]


# --- tables ---------------------------------------------------------------------------------------


def test_per_model_table_has_one_row_per_quantity():
    gan = table_metrics(metrics("vae-gan", 2, GOOD), {"feature_loss": True})["test_terms"]
    assert "dec_updated" not in gan and "dis_updated" not in gan
    assert "kl" not in gan and "recon" not in gan  # the ELBO rows have them
    assert "loss" not in gan  # enc_loss + dis_loss
    assert set(gan) == {"enc_loss", "dec_loss", "dis_loss", "dis_acc_real", "dis_acc_fake", "feature"}
    # pixel BCE only: enc_loss is the negative ELBO and feature is always 0
    pixel = table_metrics(metrics("vae-gan", 2, GOOD), {"feature_loss": False})["test_terms"]
    assert set(pixel) == {"dec_loss", "dis_loss", "dis_acc_real", "dis_acc_fake"}
    basic = table_metrics(metrics("vae-gan", 2, GOOD), {"objective": "basic", "pixel_weight": 1.0})["test_terms"]
    assert "enc_loss" not in basic  # L_prior alone: the KL row
    assert table_metrics(metrics("vae", 2, GOOD))["test_terms"] == {}  # loss, recon, kl = the ELBO rows
    assert table_metrics(metrics("ae", 2, GOOD))["test_terms"] == {}  # loss = recon = recon MSE


# --- the fashion recipe --------------------------------------------------------------------------


def test_fashion_recipe_has_every_variant_the_assignment_asks_for():
    steps = {s.key: s for s in RECIPES["fashion-generative"].steps}
    assert list(steps) == ["ae", "ae-normalized", "vae", "vae-gan-basic", "vae-gan", "vae-gan-feature",
                           "vae-gan-conv-2d", "vae-gan-conv"]
    assert steps["vae-gan-basic"].config["objective"] == "basic"
    assert steps["vae-gan"].config.get("objective", "full") == "full" and not steps["vae-gan"].config["feature_loss"]
    assert steps["vae-gan-feature"].config["feature_loss"]
    assert steps["vae-gan-conv-2d"].config["latent_dim"] == 2 and "latent_dim" not in steps["vae-gan-conv"].config
    for s in steps.values():
        make_config(s.model, **s.config).validate()
        if s.config.get("arch") != "conv":
            assert s.config["latent_dim"] == 2 and s.config["hidden_dims"] == [512]  # same architecture


@pytest.mark.parametrize("b_better", [True, False])
def test_fashion_report_answers_follow_the_numbers(tmp_path, tiny_data, b_better):
    recipe = RECIPES["fashion-generative"]
    q = {"ae": BAD, "ae-normalized": GOOD} if b_better else {"ae": GOOD, "ae-normalized": BAD}
    q["vae"] = quality(fd=191.0, kid=0.12, precision=0.2, recall=0.1, confident=0.3)  # worse than both AEs
    result = fake_result(tmp_path, recipe, tiny_data, q)
    page = write_report(result).read_text()
    answers = answer_paragraphs(page)
    ab = next(a for a in answers if a.startswith("Are the images of A)"))
    if b_better:
        assert "B measured better than A" in ab and "pins each code neuron" in ab
    else:
        assert "A measured better than B" in ab and "did not show" in ab and "pins each code neuron" not in ab
    vae = next(a for a in answers if a.startswith("Does the VAE produce a different quality?"))
    assert "worse than both" in vae and "more reliably" not in vae
    text = text_of(page)
    # one table row per quantity: no bookkeeping, no term twice
    assert "dec_updated" not in text and "dis_updated" not in text
    assert "Do the reconstructions depend on the input?" in text
    # the conv VAE-GAN at its default latent size makes the comparison not like-for-like
    conv_dim = make_config("vae-gan", arch="conv").latent_dim
    assert "2 for A, B, VAE" in text and f"{conv_dim} for conv VAE-GAN (latent {conv_dim})" in text
    assert "not like-for-like" in text
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)


def test_autoencoder_captions_speak_of_codes_not_posteriors(tmp_path, tiny_data):
    recipe = dataclasses.replace(RECIPES["fashion-generative"], steps=RECIPES["fashion-generative"].steps[:1],
                                 discussion=None)
    page = write_report(fake_result(tmp_path, recipe, tiny_data, {})).read_text()
    captions = html.unescape(" ".join(re.findall(r"<figcaption>(.*?)</figcaption>", page, flags=re.S)))
    assert captions and "q(z|x)" not in captions and "posterior" not in captions
    assert "the encoder's code" in captions and "uniform over the training codes' box" in captions


# --- the LSTM recipe ------------------------------------------------------------------------------


class FakeClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_lstm_report_comments_on_its_100_samples(tmp_path, tiny_data, monkeypatch):
    seen = {}

    def fake_classify(clf, images):
        seen["images"] = images
        probs = torch.full((len(images), 10), 0.05 / 9)
        probs[:, 1] = 0.95  # every sample a confident 1 ...
        probs[:10] = 0.1  # ... but the first ten unrecognisable
        return torch.zeros(len(images), 4), probs.double()

    monkeypatch.setattr(recipes, "load_or_train_classifier", lambda data, device="cpu": (FakeClassifier(), {}))
    monkeypatch.setattr(recipes, "classify", fake_classify)
    recipe = RECIPES["lstm-vae-mnist"]
    result = fake_result(tmp_path, recipe, tiny_data, {})
    r = result.steps[0]
    r.metrics["sample_quality"]["samples"] = quality()
    (r.run_dir / "history.csv").write_text(
        "epoch,split,loss,recon,kl,seconds\n1,train,180,170,10,1\n1,test,150,138,12,1\n"
        "2,train,140,125,15,1\n2,test,135,119,16,1\n3,train,130,113,17,1\n3,test,131,114,17,1\n")
    page = write_report(result).read_text()
    text = text_of(page)
    # the samples the figure shows: seed 0, as figures.write_run_figures draws them
    model = recipes.load_run(r.run_dir).model
    figure_samples = model.sample(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["images"], figure_samples)
    comment = next(a for a in answer_paragraphs(page) if a.startswith("Comment on the performance"))
    assert "recognizes 90 (90%)" in comment and "the other 10 are unrecognisable" in comment
    assert "digit 1 (90) comes out more often" in comment
    # the comment sits under the samples figure
    samples_fig = page.index("100 images decoded from random draws")
    assert samples_fig < page.index("Comment on the performance") < page.index("10 random test images")
    training = next(a for a in answer_paragraphs(page) if a.startswith("Over 3 epochs"))
    assert "KL term rose from 10.0 to 17.0" in training and "The usual trade" in training
    latent = model.latent_dim
    assert f"{latent}-D bottleneck" in text and "2-D" not in text.replace("2-D latent plane", "")


def test_vae_2d_report_reads_its_per_digit_grid_and_its_training_curves(tmp_path, tiny_data, monkeypatch):
    seen = {}

    def fake_classify(clf, images):
        seen["images"] = images
        probs = torch.full((len(images), 10), 0.01)
        for i in range(len(images)):
            row = i // 5
            probs[i, 9 if row == 4 else row] = 0.95  # row 4's images all read as 9
        return torch.zeros(len(images), 4), probs.double()

    monkeypatch.setattr(recipes, "load_or_train_classifier", lambda data, device="cpu": (FakeClassifier(), {}))
    monkeypatch.setattr(recipes, "classify", fake_classify)
    result = fake_result(tmp_path, RECIPES["vae-2d-mnist"], tiny_data, {})
    r = result.steps[0]
    r.metrics["classifier"] = {"test_accuracy": 0.995, "target_accuracy": 0.993, "meets_target": True}
    (r.run_dir / "history.csv").write_text(
        "epoch,split,loss,recon,kl,seconds\n1,train,180,176,4,1\n1,test,160,155,5,1\n"
        "2,train,150,144,6,1\n2,test,148,142,6,1\n")
    page = write_report(result).read_text()
    # the images classified are the grid's own (figures.class_grid_rows, seed 0)
    from vaelab.figures import class_grid_rows

    rows, _ = class_grid_rows(recipes.load_run(r.run_dir).model, tiny_data)
    assert torch.equal(seen["images"], torch.cat(rows))
    grid = next(a for a in answer_paragraphs(page) if a.startswith("Of the 50 images of the per-digit grid"))
    assert "reads 45 (90%) as their row's digit, 45 of them with confidence > 0.9" in grid
    assert "4 (0 of 5; the others read as 9 (5))" in grid
    training = next(a for a in answer_paragraphs(page) if a.startswith("Over 2 epochs"))
    assert "KL term rose from 4.0 to 6.0" in training
    # each comment sits under its figure
    assert page.index("Training curves:") < page.index("Over 2 epochs") < page.index("Codes z")
    assert page.index("Five samples per class") < page.index("Of the 50 images") < page.index("100 images decoded")


def test_run_step_refuses_an_unknown_step_and_another_dataset_before_training(tmp_path, tiny_data):
    from vaelab.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="has no step 'vae'; its steps: vae-2d"):
        recipes.run_step("vae-2d-mnist", "vae", out, tiny_data)
    fashion = dataclasses.replace(tiny_data, name="fashion-mnist")
    with pytest.raises(ConfigError, match="trains on mnist, not on fashion-mnist"):
        recipes.run_step("vae-2d-mnist", "vae-2d", out, fashion)
    with pytest.raises(ConfigError, match="no figure scatter; the figures: loss_curves, latent_scatter"):
        recipes.run_step("vae-2d-mnist", "vae-2d", out, tiny_data, figures=["samples", "scatter"])
    assert not out.exists()


def test_recipe_overwrite_keeps_the_old_output_until_the_new_one_finishes(tmp_path, monkeypatch):
    """--overwrite builds beside the old recipe folder and swaps it in only at the end: a run
    that fails (or is interrupted) leaves the previous output exactly as it was."""
    from vaelab.checkpoint import write_json

    out = tmp_path / "out"

    def steps_writing(marker, fail=False):
        def run_steps(recipe, configs, work, quick, progress, data_override, resume=False):
            write_json(work / recipes.RECIPE_FILE, {"recipe": recipe.name, "quick": quick, "steps": []})
            (work / "report.html").write_text(marker)
            if fail:
                raise KeyboardInterrupt
            return RecipeResult(recipe, work, quick, [], {})
        return run_steps

    monkeypatch.setattr(recipes, "_run_steps", steps_writing("first"))
    recipes.run_recipe("vae-2d-mnist", out, quick=True, progress=False)
    assert (out / "report.html").read_text() == "first"

    monkeypatch.setattr(recipes, "_run_steps", steps_writing("half-made", fail=True))
    with pytest.raises(KeyboardInterrupt):
        recipes.run_recipe("vae-2d-mnist", out, quick=True, overwrite=True, progress=False)
    assert (out / "report.html").read_text() == "first"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left behind

    monkeypatch.setattr(recipes, "_run_steps", steps_writing("second"))
    result = recipes.run_recipe("vae-2d-mnist", out, quick=True, overwrite=True, progress=False)
    assert (out / "report.html").read_text() == "second" and result.out == out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- resuming an interrupted recipe ---------------------------------------------------------------


def tiny_recipe(hidden: int = 16) -> recipes.Recipe:
    """Two small VAEs of two epochs each on `tiny_data` (4 steps an epoch), measured cheaply."""
    train = {"batch_size": 64, "eval_batch_size": 50, "log_every": 2}
    steps = tuple(recipes.Step(key, key, "vae", "mnist", (2, 2), config={"hidden_dims": [hidden], "latent_dim": z},
                               train=train, figures=("loss_curves", "samples"))
                  for key, z in (("first", 2), ("second", 3)))
    cheap = recipes.EvalSettings(iw_samples=4, iw_images=20, n_samples=0, batch_size=50)
    return recipes.Recipe("tiny", "Tiny", "Two small VAEs.", steps, cheap, cheap)


def measured_numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("run", "seconds")}


def test_an_interrupted_recipe_resumes_to_the_output_of_a_straight_run(tmp_path, tiny_data, monkeypatch, capsys):
    """Ctrl-C in the second model's second epoch, then --resume: the first model is kept as it
    was (neither trained nor measured again), the second resumes from its checkpoint, and every
    weight and number equals the same recipe run straight."""
    import os
    import signal

    from vaelab.checkpoint import load_run
    from vaelab.errors import TrainingInterrupted
    from vaelab.models import get_model_class

    monkeypatch.setitem(recipes.RECIPES, "tiny", tiny_recipe())
    run = lambda out, **kw: recipes.run_recipe("tiny", out, quick=True, progress=False,  # noqa: E731
                                               data_override=tiny_data, device="cpu", **kw)
    straight = run(tmp_path / "straight")

    cls = get_model_class("vae")
    original, calls = cls.training_step, {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8 + 6:  # the first model's 8 steps, then batch 2 of the second's epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(cls, "training_step", step_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted, match=f"SIGINT: the recipe stopped; {out}: what finished is kept; "
                                                  f"`vaelab recipe tiny --out {out} --quick --resume`"):
        run(out)
    assert (out / "first" / recipes.METRICS_FILE).exists() and not (out / "second" / recipes.METRICS_FILE).exists()
    first_metrics = (out / "first" / recipes.METRICS_FILE).read_bytes()

    measured = []
    evaluate = recipes.evaluate_run
    monkeypatch.setattr(recipes, "evaluate_run", lambda run, *a, **kw: measured.append(run.path.name)
                        or evaluate(run, *a, **kw))
    calls["n"] = -100
    resumed = run(out, resume=True)
    assert measured == ["second"]
    assert (out / "first" / recipes.METRICS_FILE).read_bytes() == first_metrics
    assert (out / "report.html").exists() and resumed.out == out
    assert "Resumed (--resume): this last invocation took" in (out / "report.html").read_text()
    assert "Total wall time" in (tmp_path / "straight" / "report.html").read_text()
    for a, b in zip(resumed.steps, straight.steps, strict=True):
        assert measured_numbers(a.metrics) == measured_numbers(b.metrics), a.step.key
        assert torch.equal(a.facts["nll_per_image"], b.facts["nll_per_image"])
        wa, wb = load_run(a.run_dir).model.state_dict(), load_run(b.run_dir).model.state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wb), a.step.key

    # A finished recipe resumed again keeps everything; changed weights are measured again.
    measured.clear()
    capsys.readouterr()
    run(out, resume=True)
    assert measured == []
    # progress=False (`--quiet`) still prints the plan: here, nothing left to do
    assert "recipe tiny (quick): 2 model(s); resumed, what is left takes about 0 min" in capsys.readouterr().err
    model = load_run(out / "second").model
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_model(out / "second", model)
    run(out, resume=True)
    assert measured == ["second"]
    # So are measurements made before vaelab had one of its sample metrics (here: coverage); this
    # tiny recipe draws no samples, so the stored results are given sample figures by hand.
    path = out / "first" / recipes.METRICS_FILE
    stored = json.loads(path.read_text())
    complete = {k: 0.5 for k in recipes.QUALITY_KEYS}
    for figures, remeasured in ((complete, []), ({k: v for k, v in complete.items() if k != "coverage"}, ["first"])):
        path.write_text(json.dumps({**stored, "sample_quality": {"samples": figures, "real_train": complete}}))
        measured.clear()
        run(out, resume=True)
        assert measured == remeasured


def test_resume_refuses_what_it_cannot_continue_before_touching_anything(tmp_path, tiny_data, monkeypatch):
    from vaelab.errors import ConfigError

    monkeypatch.setitem(recipes.RECIPES, "tiny", tiny_recipe())
    run = lambda out, **kw: recipes.run_recipe("tiny", out, quick=True, progress=False,  # noqa: E731
                                               data_override=tiny_data, device="cpu", **kw)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'none'}: nothing to resume"):
        run(tmp_path / "none", resume=True)
    with pytest.raises(ConfigError, match="choose one"):
        run(tmp_path / "none", resume=True, overwrite=True)
    out = tmp_path / "out"
    run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds recipe tiny \\(--quick\\), not tiny \\(full\\)"):
        recipes.run_recipe("tiny", out, progress=False, data_override=tiny_data, resume=True)
    monkeypatch.setitem(recipes.RECIPES, "tiny", tiny_recipe(hidden=24))
    with pytest.raises(ConfigError, match=f"{out / 'first'}: trained with model_config.hidden_dims=\\[16\\], "
                                          f"but this recipe's step first has \\[24\\]"):
        run(out, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("device, said", [("cuda", " on cuda"), ("cuda:1", " on cuda:1"), ("cpu", ""), ("auto", "")])
def test_the_training_time_says_when_the_model_trained_on_a_gpu(tmp_path, device, said):
    """A model trained on a GPU and measured on the CPU by --resume keeps its GPU training time:
    the report's table says where it was spent."""
    model = build_model("vae", make_config("vae", ["hidden_dims=[8]", "latent_dim=2"]))
    write_run_config(tmp_path, model, TrainConfig(device=device))
    assert recipes.trained_on(tmp_path) == said


def test_a_step_is_drawn_and_measured_on_the_device_it_trained_on(tmp_path, tiny_data, monkeypatch):
    """A recipe that trains on a GPU measures there too: loaded on the CPU, the IWAE estimate of
    an LSTM VAE trained on an H100 ran for more than five minutes, against seconds on the card."""
    asked, real_load = [], recipes.load_run

    def load_run(run_dir, device="cpu"):
        asked.append(device)
        return real_load(run_dir)  # this machine has only its CPU to load onto

    monkeypatch.setattr(recipes, "load_run", load_run)
    monkeypatch.setattr(recipes, "resolve_device", lambda name: torch.device(name))  # no CUDA check
    # the training itself runs on the CPU: only the recipe's own device lookup is told "cuda:3"
    real_train = recipes.train
    monkeypatch.setattr(recipes, "train", lambda model, model_config, config, *a, **k: real_train(
        model, model_config, dataclasses.replace(config, device="cpu"), *a, **k))
    cheap = recipes.EvalSettings(iw_samples=4, iw_images=20, n_samples=0, batch_size=50)
    r = recipes.run_step("vae-2d-mnist", "vae-2d", tmp_path, tiny_data, epochs=1, settings=cheap,
                         figures=["loss_curves"], device="cuda:3", progress=False)
    assert asked == [torch.device("cuda:3")] and "iwae" in r.metrics
