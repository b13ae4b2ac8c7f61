"""The Gaussian VAEs' objective options: the KL warm-up (its weight at each step, in the loss, in
the figure, and across a resume), free bits (no KL gradient under the threshold, by autograd), and
IWAE training (k = 1 is the ELBO, the bound rises with k, and its gradient is eq. 14 of Burda et
al. written out)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaelab import checkpoint as ckpt
from vaelab.batch import Batch, StepState
from vaelab.errors import ConfigError
from vaelab.figures import kl_weight_over_steps
from vaelab.history_files import read_steps
from vaelab.losses import kl_free_bits, kl_normal_per_dim
from vaelab.models import build_model, make_config
from vaelab.models.vae import VAE
from vaelab.errors import TrainingInterrupted
from vaelab.train import resume, train

from conftest import quick_config
from test_contract import record_steps
from test_models import CASES

GAUSSIAN = {"vae": {"hidden_dims": [24], "latent_dim": 3}, "lstm-vae": CASES["lstm-vae"][1],
            "cvae": {"hidden_dims": [24], "latent_dim": 3}, "vae-gan": CASES["vae-gan-mlp"][1]}


def batch_for(model, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10 if model.conditional else None)


# --- the KL warm-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GAUSSIAN))
def test_the_warmup_weight_at_step_s_is_beta_times_s_over_the_warmup(name):
    model = build_model(name, make_config(name, **GAUSSIAN[name], beta=2.0, kl_warmup_steps=8))
    for step, weight in [(0, 0.0), (1, 0.25), (4, 1.0), (7, 1.75), (8, 2.0), (9, 2.0), (10**6, 2.0), (None, 2.0)]:
        state = None if step is None else StepState(step=step, epochs=3, steps_per_epoch=5)
        assert model.kl_weight(state) == weight, step
    plain = build_model(name, make_config(name, **GAUSSIAN[name], beta=2.0))
    assert {plain.kl_weight(StepState(step=s)) for s in (0, 3, 100)} == {2.0}


@pytest.mark.parametrize("name", ["vae", "lstm-vae", "cvae"])
def test_each_step_weighs_the_kl_term_by_its_warmup_weight(name):
    torch.manual_seed(0)
    model = build_model(name, make_config(name, **GAUSSIAN[name], kl_warmup_steps=4)).eval()
    batch = batch_for(model)
    for step in (0, 1, 3, 4, 9):
        torch.manual_seed(1)
        out = model(batch, StepState(step=step))
        assert out.terms["kl"] > 1e-3  # so a wrong weight would show
        expected = out.terms["recon"] + min(1.0, step / 4) * out.terms["kl"]
        torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)


def test_warmup_config_errors():
    for name in ("vae", "cvae", "lstm-vae", "vae-gan"):
        with pytest.raises(ConfigError, match="kl_warmup_steps must be non-negative"):
            make_config(name, kl_warmup_steps=-1)


@pytest.mark.parametrize("name", ["vae", "cvae"])
def test_a_run_with_warmup_resumes_bit_identically(tmp_path, tiny_data, monkeypatch, name):
    """Interrupted after its 3rd of 8 steps, inside a 6-step warm-up, the resumed run ends with the
    weights and step losses of the uninterrupted one, bit for bit; and the warm-up matters (a run
    without it ends elsewhere), so a resume that restarted the schedule would show. The plain VAE
    takes the hand-derived step, the cVAE autograd's."""
    cfg, train_cfg = make_config(name, hidden_dims=[16], kl_warmup_steps=6), quick_config(epochs=2)
    cls = type(build_model(name, cfg))
    record_steps(monkeypatch, cls, interrupt_at=3)
    with pytest.raises(TrainingInterrupted):
        train(name, cfg, train_cfg, tmp_path / "resumed", progress=False, data=tiny_data)
    assert ckpt.load_checkpoint(tmp_path / "resumed")["partial"]["batches_done"] == 3
    resumed = resume(tmp_path / "resumed", progress=False, data=tiny_data)
    straight = train(name, cfg, train_cfg, tmp_path / "straight", progress=False, data=tiny_data)
    without = train(name, make_config(name, hidden_dims=[16]), train_cfg, tmp_path / "without", progress=False,
                    data=tiny_data)
    for (key, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(resumed.steps, straight.steps)
    assert (resumed.steps[:, 2] - resumed.steps[:, 3] - resumed.steps[:, 4] * ((resumed.steps[:, 0] - 1) / 6).clamp(max=1)
            ).abs().max() < 1e-3  # each logged loss carries its step's weight
    assert any(not torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                      without.model.state_dict().values()))


def test_the_loss_curves_show_the_warmup_weight(tmp_path, tiny_data):
    trainer = train("vae", make_config("vae", hidden_dims=[16], beta=0.5, kl_warmup_steps=5), quick_config(epochs=2),
                    tmp_path / "run", progress=False, data=tiny_data)
    steps, columns = read_steps(tmp_path / "run")
    iterations, weights = kl_weight_over_steps(trainer.model, steps, columns)
    assert iterations.tolist() == list(range(1, 9))
    np.testing.assert_allclose(weights, 0.5 * np.minimum(1, np.arange(8) / 5))
    plain = build_model("vae", make_config("vae", hidden_dims=[16]))
    assert kl_weight_over_steps(plain, steps, columns) is None
    assert (tmp_path / "run" / "figures").is_dir()
    from vaelab.figures import loss_curves_figure

    assert loss_curves_figure(tmp_path / "run", trainer.model, tmp_path / "curves.png").stat().st_size > 0


# --- free bits ---------------------------------------------------------------------------------------


def test_free_bits_give_no_gradient_under_the_threshold():
    """Autograd through `kl_free_bits`: dimension 0's batch-mean KL is under the threshold and gets
    no gradient; dimensions 1 and 2 are over it and get exactly the plain KL's gradient."""
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(16, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.5, 2.0])).requires_grad_()
    logvar = (torch.randn(16, 3, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    per_dim = kl_normal_per_dim(mu, logvar).mean(0)
    assert per_dim[0] < 0.5 < per_dim[1:].min()
    clamped = torch.autograd.grad(kl_free_bits(kl_normal_per_dim(mu, logvar), 0.5), [mu, logvar])
    plain = torch.autograd.grad(kl_normal_per_dim(mu, logvar).mean(0).sum(), [mu, logvar])
    for c, p in zip(clamped, plain):
        assert torch.count_nonzero(c[:, 0]) == 0 and torch.count_nonzero(p[:, 0]) > 0
        torch.testing.assert_close(c[:, 1:], p[:, 1:], rtol=0, atol=0)
    value = kl_free_bits(kl_normal_per_dim(mu, logvar), 0.5)
    torch.testing.assert_close(value, 0.5 + per_dim[1:].sum())


@pytest.mark.parametrize("name", ["vae", "cvae"])
def test_a_models_free_bits_leave_the_dimension_under_them_to_the_reconstruction(name):
    """In the model's loss: the gradient on the posterior of a dimension under the threshold is the
    reconstruction's alone (that of a threshold over every dimension, where the KL term is a
    constant); a dimension over it gets the KL's too. The logged kl is unclamped."""
    torch.manual_seed(0)
    model = build_model(name, make_config(name, hidden_dims=[24], latent_dim=3))
    batch = batch_for(model)
    captured = {}
    original = model.heads.forward

    def keep(h):
        mu, logvar = original(h)
        captured.update(mu=mu, logvar=logvar)
        return mu, logvar

    model.heads.forward = keep
    with torch.no_grad():
        model(batch)
        per_dim = kl_normal_per_dim(captured["mu"], captured["logvar"]).mean(0)
    low, high = per_dim.argmin(), per_dim.argmax()
    grads = {}
    for what, threshold in (("between", float(per_dim.min() + per_dim.max()) / 2), ("over all", 1e6)):
        model.config.free_bits = threshold
        torch.manual_seed(1)
        out = model(batch, StepState(step=5))
        grads[what] = torch.autograd.grad(out.loss, [captured["mu"], captured["logvar"]])
        assert out.terms["kl"] == pytest.approx(float(per_dim.sum()), rel=1e-5)  # unclamped
    for between, recon_only in zip(grads["between"], grads["over all"]):
        torch.testing.assert_close(between[:, low], recon_only[:, low], rtol=0, atol=0)
        assert (between[:, high] - recon_only[:, high]).abs().max() > 1e-4


def test_free_bits_and_iwae_options_are_checked():
    with pytest.raises(ConfigError, match="free_bits must be non-negative"):
        make_config("vae", free_bits=-0.1)
    with pytest.raises(ConfigError, match="iwae_k must be at least 1"):
        make_config("cvae", iwae_k=0)
    with pytest.raises(ConfigError, match="free_bits applies to the ELBO"):
        make_config("lstm-vae", free_bits=0.5, iwae_k=5)


@pytest.mark.parametrize("fields", [{"free_bits": 0.1}, {"iwae_k": 3}])
def test_the_hand_derived_step_is_not_taken_for_another_objective(fields):
    """vae_step derives BCE + weight * KL: with free bits or importance samples the plain VAE
    trains by autograd (its gradients are left on the parameters), and the default still takes
    the hand step."""
    for extra, hand in ((fields, False), ({}, True)):
        torch.manual_seed(0)
        model = build_model("vae", make_config("vae", hidden_dims=[16], latent_dim=2, **extra))
        opts = model.configure_optimizers(1e-3)
        model.training_step(batch_for(model, 32), opts, StepState())
        assert all(p.grad is None for p in model.parameters()) == hand, extra


# --- IWAE training ---------------------------------------------------------------------------------


def log_weights_by_hand(model, x, y, eps):
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i = mu + sigma * eps_i, each density
    written out (Bernoulli pixels, standard normal prior, diagonal Gaussian posterior): (k, B)."""
    post = model.encode(x, y)
    mu, sigma = post.mu, torch.exp(0.5 * post.logvar)
    rows = []
    for e in eps:  # one importance sample at a time
        z = mu + sigma * e
        logits = model.decode_logits(z, y).flatten(1)
        t = x.flatten(1)
        log_px = (t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).sum(1)
        log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
        log_qz = (-0.5 * e**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(1)
        rows.append(log_px + log_pz - log_qz)
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["vae", "cvae"])
def test_iwae_with_k_1_is_the_elbo(name):
    """iwae_k = 1 is today's analytic ELBO, exactly; and the importance-weighted loss at k = 1, on
    the same noise, is the single-sample ELBO with the KL estimated by that sample."""
    torch.manual_seed(0)
    model = build_model(name, make_config(name, hidden_dims=[24], latent_dim=3, iwae_k=1)).double()
    batch = batch_for(model)
    x, y = batch.x.double(), batch.y
    torch.manual_seed(1)
    out = model(Batch(x, y))
    post = model.encode(x, y)
    torch.manual_seed(1)
    eps = torch.randn_like(post.mu)
    q = torch.distributions.Normal(post.mu, torch.exp(0.5 * post.logvar))
    p = torch.distributions.Normal(torch.zeros_like(post.mu), torch.ones_like(post.mu))
    recon = F.binary_cross_entropy_with_logits(model.decode_logits(post.mu + eps * q.scale, y), x,
                                               reduction="none").flatten(1).sum(1).mean()
    kl = torch.distributions.kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(out.loss, recon + kl, rtol=1e-12, atol=1e-9)
    torch.manual_seed(1)
    one = model.iwae_loss(x, y, post, k=1)
    torch.testing.assert_close(one.loss, -log_weights_by_hand(model, x, y, eps[None]).mean(), rtol=1e-12, atol=1e-9)


def test_the_iwae_bound_rises_with_k_on_a_fixed_model(tiny_data, tmp_path):
    """L_1 <= L_5 <= L_50 (Burda et al., theorem 1), on a trained model, each averaged over 256
    images and 4 draws; the steps are far larger than the estimates' noise."""
    from vaelab.data import to_float

    model = train("vae", make_config("vae", hidden_dims=[32], latent_dim=3), quick_config(epochs=2), tmp_path / "run",
                  progress=False, data=tiny_data).model.eval()
    x = to_float(tiny_data.train_x)
    bounds = []
    for k in (1, 5, 50):
        model.config.iwae_k = k
        torch.manual_seed(0)
        with torch.no_grad():
            bounds.append(-float(np.mean([model(Batch(x)).loss.item() for _ in range(4)])))
    assert bounds[0] + 0.5 < bounds[1] and bounds[1] + 0.5 < bounds[2], bounds


@pytest.mark.parametrize("name", ["vae", "cvae"])
def test_the_iwae_gradient_is_the_papers_eq_14(name):
    """grad L_k = sum_i w~_i grad log w_i, w~_i = w_i / sum_j w_j (Burda et al. 2016, eq. 14), with
    log w_i written out by hand and the normalised weights held constant, on a tiny model in
    float64; against the gradient of the model's own loss on the same noise."""
    k = 4
    torch.manual_seed(0)
    model = build_model(name, make_config(name, hidden_dims=[6], latent_dim=2, iwae_k=k)).double()
    batch = batch_for(model, 3)
    x, y = batch.x.double(), batch.y
    params = list(model.parameters())
    torch.manual_seed(1)
    loss = model(Batch(x, y), StepState()).loss
    ours = torch.autograd.grad(-loss, params)

    torch.manual_seed(1)
    eps = torch.randn(k, 3, 2, dtype=torch.float64)  # the draw the loss made (encoding draws nothing)
    log_w = log_weights_by_hand(model, x, y, eps)  # (k, B)
    normalised = (log_w - torch.logsumexp(log_w, 0)).exp().detach()  # w~_i per image
    surrogate = (normalised * log_w).sum(0).mean()  # its gradient is eq. 14's, averaged over the batch
    paper = torch.autograd.grad(surrogate, params)
    for (pname, _), a, b in zip(model.named_parameters(), ours, paper):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=pname)
    # and the bound itself: log (1/k) sum_i w_i
    torch.testing.assert_close(-loss, (torch.logsumexp(log_w, 0) - math.log(k)).mean(), rtol=1e-12, atol=1e-9)
    assert max(float(g.abs().max()) for g in ours) > 1e-3


def test_iwae_terms_are_the_elbos_on_the_k_samples():
    """The logged recon is the BCE averaged over the k samples and kl the analytic KL: recon + kl
    is the negative ELBO whatever k, while the loss is the (tighter) negative IWAE bound."""
    torch.manual_seed(0)
    model = build_model("vae", make_config("vae", hidden_dims=[24], latent_dim=3, iwae_k=6)).double()
    x = batch_for(model, 8).x.double()
    torch.manual_seed(1)
    out = model(Batch(x))
    torch.manual_seed(1)
    eps = torch.randn(6, 8, 3, dtype=torch.float64)
    post = model.encode(x)
    bce = torch.stack([F.binary_cross_entropy_with_logits(model.decode_logits(post.mu + e * torch.exp(0.5 * post.logvar)),
                                                          x, reduction="none").flatten(1).sum(1) for e in eps])
    torch.testing.assert_close(out.terms["recon"], bce.mean(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(out.terms["kl"], kl_normal_per_dim(post.mu, post.logvar).sum(1).mean())
