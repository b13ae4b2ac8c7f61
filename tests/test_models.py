import dataclasses
from pathlib import Path
"""Every registered model on synthetic data: shapes, finite terms, one step moves every weight,
the run-folder round trip, generation ranges; then each model's own promises (the AE's
generation priors, the LSTM-VAE's decoder geometry, the VAE-GAN's gradient routing)."""

import copy

import pytest
import torch

from vaelab.batch import Batch, StepState
from vaelab.checkpoint import load_run
from vaelab.data import ImageData, load, to_float
from vaelab.errors import ConfigError
from vaelab.losses import generator_loss, mmd_imq
from vaelab.models import MODELS, build_model, make_config
from vaelab.models.blocks import ConvDecoder
from vaelab.train import train

from conftest import quick_config

# Small configurations of every model (and of each model's variants), so the suite stays fast.
CASES = {
    "vae": ("vae", {"hidden_dims": [32], "latent_dim": 3}),
    "ae": ("ae", {"hidden_dims": [32]}),
    "ae-normalized": ("ae", {"hidden_dims": [32], "normalize_latent": True}),
    "lstm-vae": ("lstm-vae", {"lstm_hidden": 16, "channels": [8, 4], "latent_dim": 4,
                              "batch_norm": True, "dropout": 0.1}),
    "vae-gan-conv": ("vae-gan", {"channels": [4, 8], "fc_dim": 16, "dec_hidden": 16, "latent_dim": 4,
                                 "margin": None}),
    "vae-gan-mlp": ("vae-gan", {"arch": "mlp", "hidden_dims": [32], "dis_hidden_dims": [32, 16],
                                "latent_dim": 4, "margin": None, "feature_loss": True, "fakes": "both"}),
    "cvae": ("cvae", {"hidden_dims": [32], "latent_dim": 3}),
    "cvae-lstm-conv": ("cvae", {"encoder": "lstm", "decoder": "conv", "lstm_hidden": 16, "channels": [8, 4],
                                "latent_dim": 4}),
}


def labels_for(model, n: int) -> torch.Tensor | None:
    """The condition a model's calls take: labels for a conditional model, none otherwise."""
    return torch.arange(n) % 10 if model.conditional else None


def test_every_registered_model_has_a_case():
    assert {name for name, _ in CASES.values()} == set(MODELS)


def images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_shapes_and_finite_terms(case):
    name, cfg = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, cfg)
    x, y = images(), labels_for(model, 8)
    out = model(Batch(x, y))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert list(out.terms) == list(model.term_names)
    assert all(v.shape == () and torch.isfinite(v) for v in out.terms.values())
    model.eval()
    post = model.encode(x, y)
    assert post.mu.shape == (8, model.latent_dim)
    assert model.decode_logits(torch.randn(5, model.latent_dim), labels_for(model, 5)).shape == (5, 1, 28, 28)
    one = None if y is None else y[:1]
    assert model.interpolate(x[:1], x[1:2], steps=4, condition=one).shape == (4, 1, 28, 28)


@pytest.mark.parametrize("case", list(CASES))
def test_one_training_step_changes_every_weight(case):
    name, cfg = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, cfg)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = model.training_step(Batch(images(16), labels_for(model, 16)), model.configure_optimizers(1e-3),
                              StepState(clip_grad=5.0))
    assert torch.isfinite(out.loss)
    for k, p in model.named_parameters():
        assert not torch.equal(before[k], p), k


@pytest.mark.parametrize("case", list(CASES))
def test_run_folder_round_trip_gives_identical_outputs(case, tmp_path, tiny_data):
    name, cfg = CASES[case]
    trainer = train(name, make_config(name, **cfg), quick_config(), tmp_path / "run", progress=False, data=tiny_data)
    live = trainer.model.eval()
    loaded = load_run(tmp_path / "run").model
    x, y = to_float(tiny_data.test_x[:10]), labels_for(live, 10)
    z, zy = torch.randn(6, live.latent_dim), labels_for(live, 6)
    torch.testing.assert_close(loaded.decode(z, zy), live.decode(z, zy), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x, y).mu, live.encode(x, y).mu, rtol=0, atol=0)
    torch.testing.assert_close(loaded.reconstruct(x, y), live.reconstruct(x, y), rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sy = labels_for(live, 7)
    torch.testing.assert_close(loaded.sample(7, generator=g1, condition=sy), live.sample(7, generator=g2, condition=sy),
                               rtol=0, atol=0)
    test_rows = [r for r in trainer.history if r["split"] == "test"]
    assert set(live.term_names) <= set(test_rows[0])


@pytest.mark.parametrize("case", list(CASES))
def test_generate_and_reconstruct_shapes_and_ranges(case):
    name, cfg = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, cfg).eval()
    s = model.sample(9, generator=torch.Generator().manual_seed(0), condition=labels_for(model, 9))
    r = model.reconstruct(images(5), labels_for(model, 5))
    for t, shape in ((s, (9, 1, 28, 28)), (r, (5, 1, 28, 28))):
        assert t.shape == shape and t.min() >= 0 and t.max() <= 1 and torch.isfinite(t).all()


# --- the autoencoder --------------------------------------------------------------------------


def trained_ae(tiny_data, tmp_path, **cfg):
    return train("ae", make_config("ae", hidden_dims=[32], **cfg), quick_config(epochs=2), tmp_path / "run",
                 progress=False, data=tiny_data).model.eval()


def test_ae_records_where_its_codes_lie(tiny_data, tmp_path):
    model = trained_ae(tiny_data, tmp_path)
    codes = model.encode(to_float(tiny_data.train_x)).mu.detach()
    torch.testing.assert_close(model.code_min, codes.min(0).values)
    torch.testing.assert_close(model.code_max, codes.max(0).values)
    torch.testing.assert_close(model.code_mean, codes.mean(0))
    torch.testing.assert_close(model.code_cov, torch.cov(codes.T))
    assert model.gen_prior == "box"
    z = model.prior_sample(2000, generator=torch.Generator().manual_seed(0))
    assert (z >= model.code_min).all() and (z <= model.code_max).all()
    # spread over the whole box, not a corner of it
    assert ((z.max(0).values - z.min(0).values) > 0.9 * (model.code_max - model.code_min)).all()


def test_a_stopped_ae_run_samples_from_its_last_epochs_codes(tiny_data, tmp_path, monkeypatch):
    """The box is recorded with every epoch's checkpoint, not only the last one's."""
    from vaelab.train import Trainer

    finish = Trainer._finish_epoch

    def finish_then_stop(self, epoch, *args):
        finish(self, epoch, *args)
        raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint of a 3-epoch run

    monkeypatch.setattr(Trainer, "_finish_epoch", finish_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train("ae", make_config("ae", hidden_dims=[32]), quick_config(epochs=3), tmp_path / "run",
              progress=False, data=tiny_data)
    model = load_run(tmp_path / "run").model
    codes = model.encode(to_float(tiny_data.train_x)).mu.detach()
    torch.testing.assert_close(model.code_min, codes.min(0).values)
    torch.testing.assert_close(model.code_max, codes.max(0).values)


def test_ae_fitted_and_normal_priors(tiny_data, tmp_path):
    model = trained_ae(tiny_data, tmp_path)
    model.config.gen_prior = "fitted"
    z = model.prior_sample(20000, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.MultivariateNormal(model.code_mean, model.code_cov)
    scale = model.code_cov.diag().sqrt()
    torch.testing.assert_close(z.mean(0), ref.mean, atol=0.05 * scale.max().item(), rtol=0)
    torch.testing.assert_close(torch.cov(z.T), ref.covariance_matrix, rtol=0.05, atol=0.05 * scale.max().item() ** 2)
    model.config.gen_prior = "normal"
    z = model.prior_sample(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.std(0), torch.ones(2), atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match="gen_prior"):
        make_config("ae", ["gen_prior=uniform"])


def test_prior_quantiles_follow_the_generative_prior(tiny_data, tmp_path):
    from vaelab.figures import latent_axis_values

    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    normal = torch.special.ndtri(q).unsqueeze(1).expand(3, 2)
    vae = build_model("vae", make_config("vae", hidden_dims=[8]))
    torch.testing.assert_close(vae.prior_quantiles(q), normal)
    model = trained_ae(tiny_data, tmp_path, normalize_latent=True)
    torch.testing.assert_close(model.prior_quantiles(q), normal)  # the normalized AE's prior is N(0, I)
    values, how = latent_axis_values(model, 4)
    q4 = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), torch.special.ndtri(q4).expand(2, 4))
    assert "N(0, I)" in how
    model.config.gen_prior = "box"
    lo, hi = model.code_min.double(), model.code_max.double()
    torch.testing.assert_close(model.prior_quantiles(q), lo + q.unsqueeze(1) * (hi - lo))
    assert "box" in latent_axis_values(model, 4)[1]
    model.config.gen_prior = "fitted"
    z = model.prior_sample(200000, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(model.prior_quantiles(q), torch.quantile(z, q, dim=0), atol=0.02, rtol=0)
    assert "fitted" in latent_axis_values(model, 4)[1]


def test_normalized_ae_codes_have_zero_mean_unit_variance(tiny_data, tmp_path):
    model = trained_ae(tiny_data, tmp_path, normalize_latent=True)
    assert model.gen_prior == "normal"
    assert not any(p.requires_grad for p in model.norm.parameters())  # no affine parameters
    model.train()
    codes = model.encode(to_float(tiny_data.train_x[:200])).mu.detach()  # batch statistics
    torch.testing.assert_close(codes.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.var(0, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    # evaluation uses the running statistics, so a code does not depend on its batch
    model.eval()
    x = to_float(tiny_data.train_x[:200])
    raw = model.to_code(model.trunk(x))
    norm = model.norm
    torch.testing.assert_close(model.encode(x).mu, (raw - norm.running_mean) / (norm.running_var + norm.eps).sqrt())
    torch.testing.assert_close(model.encode(x[:1]).mu, model.encode(x).mu[:1])


# --- the LSTM-VAE ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels,kernels,strides,start", [
    ([64, 32], [4, 4], [2, 2], 7), ([16, 8], [3, 5], [2, 2], 7), ([8, 8, 4], [4, 3, 4], [2, 1, 2], 7),
    ([8], [4], [4], 7), ([8, 4], [3, 4], [1, 2], 14),
])
def test_conv_decoder_reaches_28x28(channels, kernels, strides, start):
    dec = ConvDecoder(3, channels, kernels, strides, start, batch_norm=True, dropout=0.2)
    assert dec(torch.randn(2, 3)).shape == (2, 1, 28, 28)


def test_lstm_vae_reads_rows_and_rejects_bad_decoders():
    model = build_model("lstm-vae", {"lstm_hidden": 8})
    assert model.trunk.lstm.input_size == 28 and model.trunk.lstm.hidden_size == 8
    with pytest.raises(ConfigError, match="not 28"):
        make_config("lstm-vae", ["start_size=6"])
    with pytest.raises(ConfigError, match="same length"):
        make_config("lstm-vae", ["kernels=[4]"])


def test_lstm_vae_decoder_activation_and_heads_as_a_report_varied_them():
    """The options behind a student's decoder variants: LeakyReLU with its slope in every hidden
    layer of the decoder, and mu / log sigma^2 as the halves of the LSTM's state (no heads)."""
    torch.manual_seed(0)
    relu = build_model("lstm-vae", {"lstm_hidden": 8, "latent_dim": 4})
    torch.manual_seed(0)
    leaky = build_model("lstm-vae", {"lstm_hidden": 8, "latent_dim": 4, "activation": "leaky_relu",
                                     "negative_slope": 0.2})
    slopes = [m.negative_slope for m in leaky.decoder.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2] * 2 and not any(isinstance(m, torch.nn.ReLU) for m in leaky.decoder.modules())
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu.decoder.modules()) == 2
    leaky.load_state_dict(relu.state_dict())  # the same weights: only the nonlinearity differs
    z = torch.randn(5, 4)
    assert not torch.allclose(leaky.decode_logits(z), relu.decode_logits(z))

    split = build_model("lstm-vae", {"lstm_hidden": 8, "latent_dim": 4, "fc_heads": False})
    assert not list(split.heads.parameters())
    x = torch.rand(3, 1, 28, 28)
    h = split.trunk(x)
    posterior = split.encode(x)
    assert torch.equal(posterior.mu, h[:, :4]) and torch.equal(posterior.logvar, h[:, 4:])
    with pytest.raises(ConfigError, match="lstm_hidden must be 2 \\* latent_dim = 8"):
        make_config("lstm-vae", ["fc_heads=false", "latent_dim=4", "lstm_hidden=10"])
    with pytest.raises(ConfigError, match="activation must be one of relu, leaky_relu"):
        make_config("lstm-vae", ["activation=elu"])


# --- the VAE-GAN: gradient routing --------------------------------------------------------------


class Recorder:
    """Wraps an optimizer; at each step it records the .grad of every parameter of the model."""

    def __init__(self, name, opt, model, log):
        self.name, self.opt, self.model, self.log = name, opt, model, log

    def step(self):
        self.log.append((self.name, {k: None if p.grad is None else p.grad.clone()
                                     for k, p in self.model.named_parameters()}))
        self.opt.step()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


def network_of(param_name):
    return param_name.split(".")[0]


@pytest.mark.parametrize("case", ["vae-gan-conv", "vae-gan-mlp"])
def test_vae_gan_each_optimizer_steps_on_its_own_loss_only(case):
    _, cfg = CASES[case]
    torch.manual_seed(0)
    model = build_model("vae-gan", cfg)
    x = images(16)
    # The reference: the same losses (same noise) on a copy, each differentiated on its own.
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    t = ref.losses(Batch(x))
    expected = {}
    for net, loss in (("encoder", t["enc_loss"]), ("decoder", t["dec_loss"]), ("discriminator", t["dis_loss"])):
        params = dict(ref.networks()[net].named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        expected[net] = {f"{net}.{k}": g for k, g in zip(params, grads)}
    # The test can see a leak: L_GAN does depend on the encoder, and the discriminator's loss on
    # the decoder, so a misrouted gradient would show.
    gan_to_enc = torch.autograd.grad(generator_loss(ref.discriminator(torch.sigmoid(
        ref.decoder(ref.encoder(x)[0])))[1]), list(ref.encoder.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in gan_to_enc if g is not None) > 0
    dis_to_dec = torch.autograd.grad(t["dis_loss"], list(ref.decoder.parameters()), retain_graph=True)
    assert sum(g.abs().sum() for g in dis_to_dec) > 0

    log = []
    opts = {k: Recorder(k, o, model, log) for k, o in model.configure_optimizers(1e-3).items()}
    torch.manual_seed(1)
    model.training_step(Batch(x), opts, StepState())
    assert [name for name, _ in log] == ["encoder", "decoder", "discriminator"]
    for net, grads in log:
        for k, g in grads.items():
            if network_of(k) == net:
                torch.testing.assert_close(g, expected[net][k], rtol=1e-5, atol=1e-7, msg=k)
            else:
                assert g is None, f"{k} holds a gradient when the {net} steps"
    # Every step ran before any backward on changed weights would have raised; a second step
    # on the updated model works too.
    model.training_step(Batch(x), model.configure_optimizers(1e-3), StepState(step=1))


def test_vae_gan_equilibrium_rule_skips_the_winning_side():
    torch.manual_seed(0)
    cfg = dict(CASES["vae-gan-conv"][1], equilibrium=5.0, margin=0.5)  # D's ~0.7 nats: far "winning"
    model = build_model("vae-gan", cfg)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = model.training_step(Batch(images(16)), model.configure_optimizers(1e-3), StepState())
    assert out.terms["dis_updated"] == 0 and out.terms["dec_updated"] == 1
    for k, p in model.named_parameters():
        assert torch.equal(before[k], p) == (network_of(k) == "discriminator"), k
    model.config.equilibrium, model.config.margin = 0.68, 0.35
    assert model.equilibrium(0.1, 0.1) == (True, False)   # discriminator winning
    assert model.equilibrium(2.0, 2.0) == (False, True)   # discriminator losing
    assert model.equilibrium(0.7, 0.6) == (True, True)
    model.config.margin = None
    assert model.equilibrium(0.1, 0.1) == (True, True)


def test_vae_gan_basic_objective_is_prior_plus_gan_only():
    """objective=basic: the encoder minimises L_prior alone and the decoder -L_GAN alone, so the
    reconstruction error reaches no network (it is still reported)."""
    torch.manual_seed(0)
    model = build_model("vae-gan", dict(CASES["vae-gan-conv"][1], objective="basic", gamma=1.0, fakes="both"))
    x = images(16)
    torch.manual_seed(1)
    t = model.losses(Batch(x))
    assert torch.equal(t["enc_loss"], t["kl"]) and t["recon"] > 0
    b = len(x)
    torch.manual_seed(1)
    mu, logvar = model.encoder(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    z_p = torch.randn_like(z)
    _, d_logits = model.discriminator(torch.cat([x, model.decode(torch.cat([z, z_p]))]))
    torch.testing.assert_close(t["dec_loss"], generator_loss(d_logits[b:]))
    with pytest.raises(ConfigError, match="feature_loss needs objective=full"):
        make_config("vae-gan", ["objective='basic'", "feature_loss=true", "fakes='both'"])


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_vae_gan_beta_weighs_the_prior_term_in_the_encoder_loss_only(beta):
    """beta scales L_prior in the encoder's loss (beta=1 is the paper) and nothing else."""
    x, t = images(16), {}
    for b in (beta, 1.0):
        torch.manual_seed(0)
        model = build_model("vae-gan", dict(CASES["vae-gan-conv"][1], beta=b))
        torch.manual_seed(1)
        t[b] = model.losses(Batch(x))
    torch.testing.assert_close(t[beta]["enc_loss"], beta * t[beta]["kl"] + t[beta]["recon"])
    assert t[beta]["kl"] > 0
    for name in ("dec_loss", "dis_loss"):
        torch.testing.assert_close(t[beta][name], t[1.0][name])
    with pytest.raises(ConfigError, match="non-negative"):
        make_config("vae-gan", ["beta=-1"])


def test_vae_gan_mmd_weight_adds_the_codes_distance_to_the_prior_draws():
    """mmd_weight adds mmd_weight * MMD(z, z_p) to the encoder's loss: the batch's codes against
    the very prior draws the decoder turns into samples."""
    torch.manual_seed(0)
    model = build_model("vae-gan", dict(CASES["vae-gan-conv"][1], mmd_weight=50.0))
    x = images(16)
    torch.manual_seed(1)
    t = model.losses(Batch(x))
    torch.manual_seed(1)
    mu, logvar = model.encoder(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    z_p = torch.randn_like(z)
    torch.testing.assert_close(t["enc_loss"], t["kl"] + t["recon"] + 50.0 * mmd_imq(z, z_p))
    assert float(mmd_imq(z, z_p).detach()) != 0
    with pytest.raises(ConfigError, match="non-negative"):
        make_config("vae-gan", ["mmd_weight=-1"])


@pytest.mark.parametrize("fakes", ["both", "prior"])
def test_vae_gan_fakes_prior_leaves_reconstructions_out_of_the_game(fakes):
    """With fakes=prior the adversarial losses see only prior samples, so they have no path to the
    encoder (which moves only the reconstructions); with fakes=both they do. In eval mode: in
    training the decoder's batch norm normalises codes and prior draws together, a coupling through
    the batch statistics only (no network steps on another's loss either way)."""
    torch.manual_seed(0)
    model = build_model("vae-gan", dict(CASES["vae-gan-conv"][1], fakes=fakes)).eval()
    t = model.losses(Batch(images(16)))
    encoder = list(model.encoder.parameters())
    for name, loss in (("dis_loss", t["dis_loss"]),
                       ("the decoder's adversarial term", t["dec_loss"] - model.config.gamma * t["recon"])):
        grads = torch.autograd.grad(loss, encoder, retain_graph=True, allow_unused=True)
        reach = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert (reach == 0) == (fakes == "prior"), (name, reach)
    with pytest.raises(ConfigError, match="needs fakes=both"):
        make_config("vae-gan", ["fakes='prior'", "feature_loss=true"])
    with pytest.raises(ConfigError, match="fakes must be one of"):
        make_config("vae-gan", ["fakes='recon'"])


def test_stored_vae_gan_config_from_before_new_fields_rebuilds_the_old_networks():
    """A run saved before spectral norm, the projection's batch norm and the learning-rate scales
    existed stores none of those fields: it must rebuild with them off, not with today's defaults."""
    old = {"arch": "conv", "latent_dim": 4, "hidden_dims": [512], "dis_hidden_dims": [512, 256],
           "channels": [4, 8], "fc_dim": 16, "batch_norm": True, "feature_loss": False, "feature_layer": 1,
           "gamma": 0.1, "pixel_weight": 1.0, "equilibrium": 0.68, "margin": 0.35}
    model = build_model("vae-gan", old, stored=True)
    assert not model.config.spectral_norm and not model.config.project_norm
    assert not any("parametrizations" in k for k in model.state_dict())
    assert not isinstance(model.decoder.project[1], torch.nn.BatchNorm1d)
    assert model.config.fakes == "both" and model.config.dec_hidden == 0  # the game it was trained with
    assert model.decoder.project[0].in_features == 4  # z projected straight onto the first map


def test_vae_gan_defaults_are_the_ablations_default_row():
    """docs/vae-gan.md and the README quote the scores of the ablation variant that the defaults
    are; if either side changes, they no longer describe the model a user trains."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vaegan_ablation.py"
    spec = importlib.util.spec_from_file_location("vaegan_ablation", path)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    variant = make_config("vae-gan", **ablation.variant_config(ablation.DEFAULT_VARIANT))
    assert dataclasses.asdict(variant) == dataclasses.asdict(make_config("vae-gan"))
    old = make_config("vae-gan", **ablation.variant_config("old"))
    assert dataclasses.asdict(old) != dataclasses.asdict(make_config("vae-gan"))


def test_vae_gan_dec_hidden_puts_a_fully_connected_layer_before_the_projection():
    base = CASES["vae-gan-conv"][1]
    plain = build_model("vae-gan", dict(base, dec_hidden=0))
    wider = build_model("vae-gan", dict(base, dec_hidden=24))
    first = wider.decoder.project[0]
    assert (first.in_features, first.out_features) == (base["latent_dim"], 24)
    assert wider.decoder.project[3].in_features == 24  # Linear, BatchNorm1d, ReLU, then the projection
    # without it the decoder is the one before the option: a run stored then rebuilds with none
    assert plain.decoder.project[0].in_features == base["latent_dim"]
    stored = {k: v for k, v in dataclasses.asdict(plain.config).items() if k != "dec_hidden"}
    old = build_model("vae-gan", stored, stored=True)
    assert old.config.dec_hidden == 0 and old.state_dict().keys() == plain.state_dict().keys()
    assert wider.decode(torch.randn(5, base["latent_dim"])).shape == (5, 1, 28, 28)
    with pytest.raises(ConfigError, match="dec_hidden"):
        make_config("vae-gan", ["dec_hidden=-1"])


def test_vae_gan_dec_channels_widen_the_decoder_only():
    base = CASES["vae-gan-conv"][1]
    mirrored = build_model("vae-gan", base)
    wide = build_model("vae-gan", dict(base, dec_channels=[12, 6]))
    widths = lambda net: [m.in_channels for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert widths(mirrored.decoder) == list(reversed(base["channels"])) and widths(wide.decoder) == [12, 6]
    assert wide.decoder.project[-2].num_features == 12 * 7 * 7  # the projection feeds the first map
    assert wide.encoder.state_dict().keys() == mirrored.encoder.state_dict().keys()
    shapes = lambda net: [p.shape for p in net.parameters()]
    assert shapes(wide.discriminator) == shapes(mirrored.discriminator)
    assert wide.decode(torch.randn(3, base["latent_dim"])).shape == (3, 1, 28, 28)
    with pytest.raises(ConfigError, match="dec_channels"):
        make_config("vae-gan", ["dec_channels=[8]"])


def test_vae_gan_dis_channels_widen_the_discriminator_only():
    base = CASES["vae-gan-conv"][1]
    mirrored = build_model("vae-gan", base)
    strong = build_model("vae-gan", dict(base, dis_channels=[12, 10], dis_fc_dim=20))
    convs = lambda net: [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs(mirrored.discriminator) == base["channels"] and convs(strong.discriminator) == [12, 10]
    assert strong.discriminator.out.in_features == 20
    assert strong.discriminator.layers[-1][0].in_features == 10 * 7 * 7
    shapes = lambda net: [p.shape for p in net.parameters()]
    assert shapes(strong.encoder) == shapes(mirrored.encoder) and shapes(strong.decoder) == shapes(mirrored.decoder)
    features, logits = strong.discriminator(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3,) and features[1].shape == (3, 10, 7, 7)
    for bad in ("dis_channels=[8, 8, 8]", "dis_channels=[0]", "dis_fc_dim=-1"):
        with pytest.raises(ConfigError, match="dis_"):
            make_config("vae-gan", [bad])


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_vae_gan_dis_batch_norm_normalises_every_discriminator_layer_but_the_first(arch):
    base = dict(CASES["vae-gan-conv"][1], arch=arch)
    plain, normed = build_model("vae-gan", base), build_model("vae-gan", dict(base, dis_batch_norm=True))
    norms = lambda net: [any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in layer.modules())
                         for layer in net.discriminator.layers]
    assert not any(norms(plain))
    assert norms(normed) == [False] + [True] * (len(normed.discriminator.layers) - 1)
    # the encoder and decoder are untouched; a run stored before the option rebuilds without it
    shapes = lambda net: [p.shape for p in net.parameters()]
    assert shapes(normed.encoder) == shapes(plain.encoder) and shapes(normed.decoder) == shapes(plain.decoder)
    stored = {k: v for k, v in dataclasses.asdict(plain.config).items() if k != "dis_batch_norm"}
    assert build_model("vae-gan", stored, stored=True).config.dis_batch_norm is False
    # in training the batch's statistics are used, so a real image's score depends on its batch
    x = torch.rand(6, 1, 28, 28)
    normed.train()
    alone, batched = normed.discriminator(x[:3])[1], normed.discriminator(x)[1][:3]
    assert not torch.allclose(alone, batched)
    plain.train()
    torch.testing.assert_close(plain.discriminator(x[:3])[1], plain.discriminator(x)[1][:3])

def test_vae_gan_config_errors():
    with pytest.raises(ConfigError, match="arch"):
        make_config("vae-gan", ["arch='resnet'"])
    with pytest.raises(ConfigError, match="hidden layers"):
        build_model("vae-gan", {"feature_loss": True, "fakes": "both", "feature_layer": 7})
    with pytest.raises(ConfigError, match="nothing trains"):
        make_config("vae-gan", ["pixel_weight=0"])


# --- one short run per model on real MNIST -----------------------------------------------------


def real_subset(n_train=4000, n_test=1000):
    d = load("mnist", quiet=True)
    return ImageData(d.name, d.classes, d.train_x[:n_train], d.train_y[:n_train], d.test_x[:n_test], d.test_y[:n_test])


def mean_image_mse(data):
    x = to_float(data.test_x)
    return (x - to_float(data.train_x).mean(0)).pow(2).mean().item()


@pytest.mark.realdata
@pytest.mark.parametrize("name,cfg,epochs,check", [
    # a 2-D AE beats predicting the mean image (MSE ~0.067 per pixel on MNIST) within 128 steps
    ("ae", {}, 2, lambda r, d: r["recon"] < 0.9 * mean_image_mse(d)),
    ("ae", {"normalize_latent": True}, 2, lambda r, d: r["recon"] < 0.9 * mean_image_mse(d)),
    # an untrained VAE scores ~540 nats
    ("lstm-vae", {"latent_dim": 16}, 2, lambda r, d: r["loss"] < 250),
    # the default conv VAE-GAN costs 5x the MLP one a step: its 32 steps reach ~160 nats
    ("vae-gan", {}, 1, lambda r, d: r["recon"] < 220 and 0 < r["dis_acc_real"] <= 1),
    ("vae-gan", {"arch": "mlp"}, 2, lambda r, d: r["recon"] < 220 and 0 < r["dis_acc_real"] <= 1),
], ids=["ae", "ae-normalized", "lstm-vae", "vae-gan-conv", "vae-gan-mlp"])
def test_short_real_run(name, cfg, epochs, check, tmp_path):
    data = real_subset()
    trainer = train(name, make_config(name, **cfg), quick_config(epochs=epochs, eval_batch_size=1000),
                    tmp_path / "run", progress=False, data=data)
    test = [r for r in trainer.history if r["split"] == "test"][-1]
    assert check(test, data), test
    s = trainer.model.eval().sample(16)
    assert s.std(0).mean() > 0.02  # the samples differ from one another


def test_vae_gan_divergence_stops_training(tmp_path, tiny_data):
    from vaelab.errors import DivergenceError

    with pytest.raises(DivergenceError, match=r"diverged at epoch 1, step \d+: .*(enc|dec|dis)_loss is (nan|inf)"):
        train("vae-gan", make_config("vae-gan", **CASES["vae-gan-mlp"][1]), quick_config(lr=1e12),
              tmp_path / "run", progress=False, data=tiny_data)
