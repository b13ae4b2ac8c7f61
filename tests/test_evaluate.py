"""Metrics against trusted references: IWAE against numerical integration on a tiny model,
the Fréchet distance against its defining properties (the classifier and the other sample
metrics: test_metrics.py)."""

import json
import math

import pytest
import torch
from torch import nn

from vaelab import evaluate as ev
from vaelab.checkpoint import load_run
from vaelab.cli import main
from vaelab.losses import bce_from_logits, bce_from_logits_shared_target
from vaelab.models import Posterior


class TinyVAE(nn.Module):
    """1-D latent, 4 Bernoulli pixels: log p(x) is a 1-D integral we can do on a grid."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, generator=g) * 2
        self.b = torch.randn(4, generator=g)
        self.a = torch.randn(4, generator=g) * 0.5

    def encode(self, x):
        mu = (x @ self.a)[:, None]
        return Posterior(mu, torch.full_like(mu, 0.8))  # a wide proposal, not the true posterior

    def decode_logits(self, z):
        return z * self.w + self.b  # (N, 1) -> (N, 4)

    def exact_log_px(self, x):
        z = torch.linspace(-12, 12, 200001, dtype=torch.float64)[:, None]
        log_prior = -0.5 * (math.log(2 * math.pi) + z[:, 0] ** 2)
        logits = z * self.w.double() + self.b.double()
        out = []
        for xi in x.double():
            log_lik = -nn.functional.binary_cross_entropy_with_logits(
                logits, xi.expand_as(logits), reduction="none").sum(1)
            dz = (z[1, 0] - z[0, 0]).item()
            out.append(torch.logsumexp(log_lik + log_prior, 0).item() + math.log(dz))
        return torch.tensor(out)


X4 = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])


def test_iwae_matches_numerical_integration():
    model = TinyVAE()
    exact = model.exact_log_px(X4)
    g = torch.Generator().manual_seed(1)
    est = ev.iwae_log_likelihood(model, X4, k=40000, chunk_rows=8000, generator=g)
    torch.testing.assert_close(est.float(), exact.float(), atol=0.02, rtol=0)


def test_iwae_bound_tightens_as_k_grows():
    model = TinyVAE()
    exact = model.exact_log_px(X4)
    x = X4.repeat(300, 1)  # 300 independent estimates of each image's bound
    g = torch.Generator().manual_seed(2)
    means = [ev.iwae_log_likelihood(model, x, k=k, generator=g).view(300, 4).mean(0) for k in (1, 5, 50, 500)]
    gaps = [(exact - m.float()).mean().item() for m in means]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 0.05 and abs(gaps[-1]) < 0.02, gaps


def test_shared_target_bce_equals_repeated_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1, 28, 28, generator=g) * 3
    x = torch.rand(5, 1, 28, 28, generator=g)
    expected = bce_from_logits(logits.reshape(15, 1, 28, 28), x.repeat(3, 1, 1, 1)).view(3, 5)
    torch.testing.assert_close(bce_from_logits_shared_target(logits, x), expected, rtol=1e-5, atol=1e-3)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(ev.frechet_distance(a, a)) < 1e-6
    noise = torch.randn(a.shape, generator=g)
    d = [ev.frechet_distance(a, a + s * noise) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(d, d[1:])), d
    # Two Gaussians N(0, I) and N(m, I): the distance is |m|^2.
    b, c = torch.randn(20000, 4, generator=g), torch.randn(20000, 4, generator=g) + 1.5
    assert ev.frechet_distance(b, c) == pytest.approx(4 * 1.5 ** 2, rel=0.05)


def test_evaluate_cli_writes_metrics_json(tmp_path, synthetic_mnist, capsys):
    run = tmp_path / "run"
    assert main(["train", "vae", "--epochs", "1", "--batch-size", "64", "--out", str(run), "--device", "cpu",
                 "--set", "hidden_dims=[32]", "--latent-dim", "3", "--quiet"]) == 0
    code = main(["evaluate", str(run), "--iw-samples", "20", "--iw-images", "50", "--samples", "200",
                 "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "IWAE NLL" in out and "Fréchet distance" in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["iwae"]["images"] == 50 and m["iwae"]["se"] > 0
    assert m["iwae"]["nll"] <= m["elbo"]["neg_elbo"] + 5  # the bound is tighter than the ELBO (noise aside)
    assert len(m["latent"]["kl_per_dim"]) == 3 and 0 <= m["latent"]["active_units"] <= 3
    q = m["sample_quality"]
    assert len(q["samples"]["class_histogram"]) == 10 and q["real_train"]["n"] == 200
    assert q["real_train"]["fd"] < q["samples"]["fd"]
    assert main(["plot", str(run), "--device", "cpu", "--grid", "4"]) == 0
    assert (run / "figures" / "latent_scatter.png").is_file()
    # a grid asked for where no manifold is drawn is said, not ignored
    assert "(--grid 4 not used: the manifold is drawn for 2-D latents only, and this run's latent is 3-D)" \
        in capsys.readouterr().out
    # loss curves it cannot draw are said, with the way back
    (run / "history.csv").unlink()
    assert main(["plot", str(run), "--device", "cpu"]) == 0
    assert f"(no loss curves: {run / 'history.csv'}: missing (deleted?; `vaelab train --resume {run}`" \
        in capsys.readouterr().out


def test_metrics_of_a_loaded_run_are_reproducible(tmp_path, synthetic_mnist):
    from vaelab.data import load
    from vaelab.models import make_config
    from vaelab.train import train

    from conftest import quick_config

    data = load("mnist", quiet=True)
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(), tmp_path / "run", progress=False, data=data)
    s = ev.EvalSettings(iw_samples=10, iw_images=20, n_samples=0)
    a = ev.evaluate_run(load_run(tmp_path / "run"), data, s)
    b = ev.evaluate_run(load_run(tmp_path / "run"), data, s)
    assert a["iwae"] == {**b["iwae"], "seconds": a["iwae"]["seconds"]} and a["elbo"] == b["elbo"]
