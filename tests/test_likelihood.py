"""The likelihood-mnist recipe (Burda et al. 2016's table): its architecture and schedule, the
active-unit count against a direct computation, the whole recipe in quick mode on synthetic data,
and its report's words following the numbers (swap them and the words swap)."""

import html
import math
import re

import pytest
import torch
from torch import nn

from vaelab import prose, recipes
from vaelab.checkpoint import save_model, write_run_config
from vaelab.errors import ConfigError
from vaelab.evaluate import ACTIVE_UNIT_THRESHOLD, latent_terms
from vaelab.models import build_model, make_config
from vaelab.models.vae import VAE
from vaelab.recipes import BURDA_TABLE, RECIPES, RecipeResult, StepResult, table_metrics, write_report
from vaelab.train import TrainConfig

from test_recipes import answer_paragraphs, text_of

RECIPE = RECIPES["likelihood-mnist"]


# --- the architecture and the schedule ----------------------------------------------------------


def test_the_recipe_trains_burdas_one_stochastic_layer_network_at_k_1_5_50():
    assert [s.key for s in RECIPE.steps] == ["vae", "iwae-5", "iwae-50"]
    assert [s.config["iwae_k"] for s in RECIPE.steps] == [1, 5, 50]
    for step in RECIPE.steps:
        model = build_model(step.model, make_config(step.model, **step.config))
        assert type(model) is VAE
        layers = [(type(m), getattr(m, "in_features", None), getattr(m, "out_features", None))
                  for m in [*model.trunk.net, model.heads.mu, model.heads.logvar, *model.decoder.net]]
        assert layers == [(nn.Linear, 784, 200), (nn.Tanh, None, None), (nn.Linear, 200, 200), (nn.Tanh, None, None),
                          (nn.Linear, 200, 50), (nn.Linear, 200, 50),
                          (nn.Linear, 50, 200), (nn.Tanh, None, None), (nn.Linear, 200, 200), (nn.Tanh, None, None),
                          (nn.Linear, 200, 784)]
        train = TrainConfig(dataset=step.dataset, epochs=step.epochs[1], **step.train)
        train.validate()
        assert (train.dataset, train.binarize, train.batch_size, train.lr) == ("mnist", "dynamic", 20, 1e-3)
        # the rate falls tenfold over the full run, as the paper's over its 3280 passes
        assert math.isclose(train.lr * train.lr_decay ** (train.epochs - 1), 1e-4, rel_tol=1e-4)
    assert recipes.LIKELIHOOD_FULL_EVAL.iw_samples == 5000 and recipes.LIKELIHOOD_FULL_EVAL.iw_images >= 10000
    assert recipes.estimate_seconds(RECIPE, quick=False) <= 3 * 3600  # the budget on this CPU
    assert recipes.estimate_seconds(RECIPE, quick=True) <= 5 * 60


def test_an_unknown_activation_is_refused():
    with pytest.raises(ConfigError, match="activation must be one of relu, tanh"):
        make_config("vae", activation="sigmoid")


def test_the_table_keeps_an_iwaes_own_bound():
    m = {"elbo": {"neg_elbo": 90.0}, "test_terms": {"loss": 88.0, "recon": 70.0, "kl": 20.0}}
    assert table_metrics(m, {"iwae_k": 5})["test_terms"] == {"loss": 88.0}  # -L_5, not the ELBO again
    assert table_metrics(m, {"iwae_k": 1})["test_terms"] == {}


# --- active units --------------------------------------------------------------------------------


def test_active_units_are_burdas_count_against_a_direct_computation():
    """Unit u is active when the variance over the test images of its posterior mean exceeds 0.01
    (Burda et al. 2016, section 5.2). The mean head is rescaled so that the six units' variances
    straddle the threshold; the count and the variances must match a direct computation, one
    image at a time in float64, on the images the likelihood is measured on (the binarised ones,
    not the grey levels)."""
    torch.manual_seed(0)
    model = build_model("vae", make_config("vae", hidden_dims=[8], latent_dim=6, activation="tanh")).eval()
    g = torch.Generator().manual_seed(1)
    grey = torch.rand(300, 1, 28, 28, generator=g)
    binary = (torch.rand(grey.shape, generator=g) < grey).float()

    def direct_variances():
        w1, b1 = model.trunk.net[0].weight.double(), model.trunk.net[0].bias.double()
        wm, bm = model.heads.mu.weight.double(), model.heads.mu.bias.double()
        mu = torch.stack([wm @ torch.tanh(w1 @ x.double().flatten() + b1) + bm for x in binary])  # (N, 6)
        return ((mu - mu.mean(0)) ** 2).sum(0) / (len(mu) - 1)

    targets = torch.tensor([0.0, 0.004, 0.0095, 0.0106, 0.3, 1.7], dtype=torch.float64)
    with torch.no_grad():
        scale = (targets / direct_variances()).sqrt().float()
        model.heads.mu.weight.mul_(scale[:, None])
        model.heads.mu.bias.mul_(scale)
    reference = direct_variances()
    torch.testing.assert_close(reference, targets, rtol=1e-4, atol=1e-12)
    out = latent_terms(model, grey, binary, batch=128)
    torch.testing.assert_close(torch.tensor(out["latent"]["mu_variance"], dtype=torch.float64), reference,
                               rtol=1e-4, atol=1e-9)
    assert ACTIVE_UNIT_THRESHOLD == 0.01
    assert out["latent"]["active_units"] == int((reference > 0.01).sum()) == 3
    on_grey = latent_terms(model, grey, grey, batch=128)["latent"]["mu_variance"]
    assert not torch.allclose(torch.tensor(on_grey, dtype=torch.float64), reference, rtol=1e-2)


# --- the whole recipe, quick, on synthetic data --------------------------------------------------


def test_the_quick_recipe_runs_end_to_end_on_synthetic_data(tmp_path, tiny_data):
    result = recipes.run_recipe("likelihood-mnist", tmp_path / "out", quick=True, progress=False, device="cpu",
                                data_override=tiny_data)
    assert [r.step.key for r in result.steps] == ["vae", "iwae-5", "iwae-50"]
    for r in result.steps:
        iw = r.metrics["iwae"]
        assert (iw["k"], iw["images"]) == (100, len(tiny_data.test_x))
        assert "sample_quality" not in r.metrics  # cheap metrics: no classifier
        assert r.metrics["likelihood_data"].startswith("test set, binarized once")
        values = r.facts["nll_per_image"]
        assert values.shape == (len(tiny_data.test_x),) and math.isclose(values.mean().item(), iw["nll"])
        assert 0 <= r.metrics["latent"]["active_units"] <= 50
    page = (tmp_path / "out" / "report.html").read_text()
    text = text_of(page)
    assert "The likelihood table (Burda et al. 2016" in text and "86.76" in text and "84.78" in text
    assert "IWAE with K = 100 on all 64 test images" in text and "classifier" not in text
    assert "per-image differences" in text  # the paired errors were used
    assert (tmp_path / "out" / "figures" / "likelihood_curves.png").is_file()
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)


# --- the report's words follow the numbers -------------------------------------------------------


def likelihood_metrics(nll: float, se: float, units: int, bound: float) -> dict:
    return {"model": "vae", "dataset": "mnist", "latent_dim": 50, "recon_mse": 0.05,
            "likelihood_data": "test set, binarized once (fixed seed)",
            "test_terms": {"loss": bound, "recon": bound - 20.0, "kl": 25.0},
            "elbo": {"neg_elbo": bound + 5.0, "recon": bound - 20.0, "kl": 25.0},
            "iwae": {"nll": nll, "se": se, "k": 5000, "images": 400},
            "latent": {"active_units": units, "latent_dim": 50, "kl_per_dim": [0.5] * 50,
                       "mu_variance": [0.1] * 50}}


def fake_likelihood_result(tmp_path, nlls, units, paired=True, spread=6.0, noise=0.05) -> RecipeResult:
    """The recipe's three steps with tiny untrained models in real run folders, these NLLs and
    active units; per-image NLLs sharing one image effect (std `spread`: a standard error of the
    mean near 0.3, as on 10,000 real test images) plus `noise` per model, so that the paired
    differences are far tighter than the errors of the means."""
    g = torch.Generator().manual_seed(0)
    hard = torch.randn(400, generator=g, dtype=torch.float64) * spread
    steps = []
    for step, nll, u in zip(RECIPE.steps, nlls, units):
        model = build_model("vae", make_config("vae", hidden_dims=[16], latent_dim=50, activation="tanh",
                                               iwae_k=step.config["iwae_k"]))
        run_dir = tmp_path / "out" / step.key
        run_dir.mkdir(parents=True)
        write_run_config(run_dir, model, TrainConfig(epochs=1, device="cpu", binarize="dynamic"))
        save_model(run_dir, model)
        (run_dir / "history.csv").write_text(
            "epoch,split,loss,recon,kl,seconds\n1,train,120,100,22,1\n1,test,110,92,20,1\n"
            "2,train,100,80,22,1\n2,test,99,79,21,1\n")
        values = hard + torch.randn(400, generator=g, dtype=torch.float64) * noise
        values = values - values.mean() + nll
        se = values.std().item() / math.sqrt(len(values))
        r = StepResult(step, run_dir, likelihood_metrics(nll, se, u, bound=nll + 2.0), {}, 1.0)
        if paired:
            r.facts["nll_per_image"] = values
        steps.append(r)
    return RecipeResult(RECIPE, tmp_path / "out", False, steps, {})


def paragraphs(tmp_path, **kw) -> list[str]:
    return answer_paragraphs(write_report(fake_likelihood_result(tmp_path, **kw)).read_text())


def starting(answers: list[str], *heads: str) -> str:
    return next(a for a in answers if a.startswith(heads))


ORDERING = ("As in the paper", "Unlike the paper", "Part of the paper's ordering", "No gap between")


def test_the_report_follows_the_papers_ordering_when_the_numbers_do(tmp_path):
    answers = paragraphs(tmp_path, nlls=(87.60, 86.30, 85.50), units=(18, 21, 24))
    summary = starting(answers, "3 of 3")
    assert summary.startswith("3 of 3 models within the 1.5-nat target.")
    assert "VAE (k = 1): 87.60 ± " in summary and "0.84 nats above (worse than) the paper's 86.76" in summary
    ordering = starting(answers, *ORDERING)
    assert ordering.startswith("As in the paper, the NLL falls as k grows")
    assert "IWAE (k = 5) clearly better than VAE (k = 1) by 1.30 nats" in ordering
    assert "per-image differences" in ordering
    units = starting(answers, "Active units")
    assert "VAE (k = 1) 18, IWAE (k = 5) 21 and IWAE (k = 50) 24" in units
    assert "They rise with k, as in the paper" in units and "fewer units than the paper's" in units
    length = starting(answers, "Trained for")
    assert "140, 90 and 45 passes" in length and "3,280" in length and "works against them" in length
    text = text_of(write_report(fake_likelihood_result(tmp_path / "again", nlls=(87.6, 86.3, 85.5),
                                                       units=(18, 21, 24))).read_text())
    assert "batches of 20 on dynamically binarised images" in text
    assert "IWAE (k = 50) 45 epochs from 0.001 to 0.0001 (lr_decay 0.949014)" in text


def test_swapped_numbers_swap_the_words(tmp_path):
    answers = paragraphs(tmp_path, nlls=(86.00, 86.50, 89.00), units=(24, 21, 18))
    summary = starting(answers, "1 of 3")
    assert summary.startswith("1 of 3 models within the 1.5-nat target.")
    assert "0.76 nats below (better than) the paper's 86.76: within" in summary
    assert "IWAE (k = 5): 86.50" in summary and "at the border" in summary
    assert "IWAE (k = 50): 89.00" in summary and "4.22 nats above (worse than) the paper's 84.78: outside" in summary
    ordering = starting(answers, *ORDERING)
    assert ordering.startswith("Unlike the paper, at least one pair is clearly ordered the other way")
    assert "VAE (k = 1) clearly better than IWAE (k = 5) by 0.50 nats" in ordering and "the reverse of" in ordering
    units = starting(answers, "Active units")
    assert "They do not rise with k as in the paper" in units and "They rise with k" not in units


def test_without_per_image_values_the_errors_combine_and_a_small_gap_is_noise(tmp_path):
    """0.5 nats between models whose means each carry a 0.3-nat error: clear image by image (the
    models agree on which images are hard), within the noise when only the means are known."""
    nlls, units = (86.00, 85.50, 85.00), (20, 20, 20)
    paired = starting(paragraphs(tmp_path / "p", nlls=nlls, units=units), *ORDERING)
    assert paired.startswith("As in the paper") and "per-image differences" in paired
    alone = starting(paragraphs(tmp_path / "c", nlls=nlls, units=units, paired=False), *ORDERING)
    assert alone.startswith("No gap between the models shows clearly") and "(combined)" in alone
    units_text = starting(paragraphs(tmp_path / "u", nlls=nlls, units=units), "Active units")
    assert "do not rise at every step" in units_text


@pytest.mark.parametrize("nll,se,status", [(87.0, 0.1, "within"), (88.5, 0.1, "outside"), (88.2, 0.1, "edge"),
                                           (84.0, 0.1, "outside"), (86.76, 0.2, "within")])
def test_nll_against_the_paper(nll, se, status):
    got, sentence = prose.nll_against_paper("M", nll, se, 86.76, 1.5)
    assert got == status, sentence
    if nll < 86.76 - 1.5:
        assert "unexpected; check the evaluation" in sentence
    assert f"{nll:.2f} ± {se:.2f}" in sentence
