"""The Gaussian mixture fitted to latent codes (models/mixture.py), against torch.distributions."""

import dataclasses

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal, Normal

from vaelab.models import build_model
from vaelab.models.mixture import GaussianMixture

from test_models import CASES


def reference(g: GaussianMixture) -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(g.weights.double()),
                             MultivariateNormal(g.means.double(), scale_tril=g.scale_tril.double()))


def two_clusters(n: int = 6000, seed: int = 0) -> tuple[torch.Tensor, MixtureSameFamily]:
    truth = MixtureSameFamily(
        Categorical(torch.tensor([0.3, 0.7], dtype=torch.float64)),
        MultivariateNormal(torch.tensor([[-4.0, 1.0], [3.0, -2.0]], dtype=torch.float64),
                           covariance_matrix=torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 2.0]]],
                                                          dtype=torch.float64)))
    torch.manual_seed(seed)
    return truth.sample((n,)).float(), truth


def test_an_unfitted_mixture_is_the_standard_normal():
    g = GaussianMixture(3, 5)
    z = g.sample(20000, torch.Generator().manual_seed(0))
    assert z.shape == (20000, 3)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(3), atol=0.04, rtol=0)


def test_em_recovers_a_known_mixture_and_reports_its_likelihood():
    codes, truth = two_clusters()
    g = GaussianMixture(2, 2)
    mean_ll = g.fit(codes, torch.Generator().manual_seed(0))
    order = g.means[:, 0].argsort()  # components in the truth's order (left cluster first)
    torch.testing.assert_close(g.weights[order], torch.tensor([0.3, 0.7]), atol=0.02, rtol=0)
    torch.testing.assert_close(g.means[order], truth.component_distribution.loc.float(), atol=0.1, rtol=0)
    cov = g.scale_tril @ g.scale_tril.transpose(1, 2)
    torch.testing.assert_close(cov[order], truth.component_distribution.covariance_matrix.float(), atol=0.12, rtol=0)
    # the returned likelihood is the fitted mixture's, as torch.distributions computes it
    assert mean_ll == pytest.approx(float(reference(g).log_prob(codes.double()).mean()), abs=1e-6)
    # and no worse than the truth's on the codes it was fitted to (EM maximises it)
    assert mean_ll >= float(truth.log_prob(codes.double()).mean()) - 1e-6


def test_fit_is_deterministic_for_a_seed_and_samples_follow_the_weights():
    codes, _ = two_clusters()
    a, b = GaussianMixture(2, 2), GaussianMixture(2, 2)
    a.fit(codes, torch.Generator().manual_seed(3))
    b.fit(codes, torch.Generator().manual_seed(3))
    for x, y in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    z = a.sample(20000, torch.Generator().manual_seed(1))
    left = float((z[:, 0] < -0.5).float().mean())  # the clusters are far apart along the first axis
    assert left == pytest.approx(0.3, abs=0.015)


def test_marginal_quantiles_invert_each_axis_cdf():
    codes, _ = two_clusters()
    g = GaussianMixture(2, 2)
    g.fit(codes, torch.Generator().manual_seed(0))
    q = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999])
    x = g.marginal_quantiles(q)  # (5, 2)
    sd = (g.scale_tril.double().pow(2).sum(-1)).sqrt()  # each component's per-axis standard deviation
    for axis in range(2):
        marginal = MixtureSameFamily(Categorical(g.weights.double()), Normal(g.means[:, axis].double(), sd[:, axis]))
        torch.testing.assert_close(marginal.cdf(x[:, axis].double()).float(), q, atol=1e-5, rtol=0)


def test_fewer_codes_than_components_fit_as_many_components_as_codes():
    """A run on a handful of images: 3 codes for 30 components fit 3, the rest weigh nothing and
    are never drawn; a single code cannot be fitted."""
    codes = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]) + 0.01 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    g = GaussianMixture(2, 30)
    assert math.isfinite(g.fit(codes, torch.Generator().manual_seed(0), iterations=5))
    assert int((g.weights > 0).sum()) == 3 and g.weights.sum().item() == pytest.approx(1.0)
    z = g.sample(3000, torch.Generator().manual_seed(1))
    assert torch.isfinite(z).all() and (torch.cdist(z, codes).min(1).values < 1.0).float().mean() > 0.95
    with pytest.raises(ValueError, match="at least 2 codes"):
        GaussianMixture(2, 4).fit(torch.zeros(1, 2))


def test_vae_gan_samples_from_the_mixture_fitted_at_the_end_of_each_epoch():
    base = dict(CASES["vae-gan-conv"][1], gen_prior="mixture", prior_components=3)
    model = build_model("vae-gan", base)
    images = (torch.rand(90, 28, 28) * 255).to(torch.uint8)
    model.end_of_epoch(images)
    # fitted to one draw z ~ q(z|x) for every third image, in eval mode, its noise seeded apart
    model.eval()
    with torch.no_grad():
        post = model.encode(images[::3].unsqueeze(1).float() / 255)
    eps = torch.randn(post.mu.shape, generator=torch.Generator().manual_seed(0))
    codes = post.mu + (0.5 * post.logvar).exp() * eps
    expected = GaussianMixture(base["latent_dim"], 3)
    expected.fit(codes, torch.Generator().manual_seed(0), iterations=30)
    torch.testing.assert_close(model.code_prior.means, expected.means, atol=1e-5, rtol=1e-4)
    z = model.prior_sample(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, expected.sample(5, torch.Generator().manual_seed(0)), atol=1e-4, rtol=1e-4)
    assert "mixture" in model.prior_name
    # gen_prior=normal draws N(0, I), its mixture fitted all the same (`vaelab config` may switch
    # it); a run stored before the option rebuilds so
    normal = build_model("vae-gan", dict(base, gen_prior="normal"))
    torch.testing.assert_close(normal.prior_sample(4, torch.Generator().manual_seed(0)),
                               torch.randn(4, base["latent_dim"], generator=torch.Generator().manual_seed(0)))
    normal.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("code_prior.")},
                           strict=False)
    assert normal.code_prior.weights.count_nonzero() == 1  # not fitted yet: N(0, I)
    normal.end_of_epoch(images)
    torch.testing.assert_close(normal.code_prior.means, model.code_prior.means)
    stored = {k: v for k, v in dataclasses.asdict(normal.config).items() if k != "gen_prior"}
    old = build_model("vae-gan", stored, stored=True)
    assert old.config.gen_prior == "normal" and old.state_dict().keys() == normal.state_dict().keys()


def test_a_collapsed_encoders_mixture_is_the_prior_it_collapsed_onto():
    """objective=basic pulls every q(z|x) onto N(0, I): the posterior means sit at 0, but the
    draws the decoder is trained on spread like N(0, I), and so must the fitted mixture."""
    from vaelab.models.base import Posterior

    model = build_model("vae-gan", dict(CASES["vae-gan-conv"][1], prior_components=5))
    d = model.config.latent_dim
    model.encode = lambda x, condition=None: Posterior(torch.zeros(len(x), d), torch.zeros(len(x), d))
    model.end_of_epoch((torch.rand(3000, 28, 28) * 255).to(torch.uint8))
    z = model.prior_sample(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.zeros(d), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(d), atol=0.1, rtol=0)


def test_vae_gan_trains_the_same_with_either_generation_prior():
    """gen_prior only changes what generation draws: the losses of a step, the GAN's N(0, I)
    fakes included, and the weights after an epoch's fit are those of gen_prior=normal."""
    from vaelab.batch import Batch

    base = dict(CASES["vae-gan-conv"][1], prior_components=2)
    torch.manual_seed(0)
    mixture = build_model("vae-gan", dict(base, gen_prior="mixture"))
    torch.manual_seed(0)
    normal = build_model("vae-gan", dict(base, gen_prior="normal"))
    images = (torch.rand(12, 28, 28) * 255).to(torch.uint8)
    mixture.end_of_epoch(images)
    x = Batch(torch.rand(4, 1, 28, 28))
    torch.manual_seed(1)
    a = mixture.losses(x)
    torch.manual_seed(1)
    b = normal.losses(x)
    for name in ("enc_loss", "dec_loss", "dis_loss"):
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
