import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from vaelab.losses import (
    IMQ_SCALES,
    mmd_imq,
    bce_from_logits, discriminator_loss, generator_loss, iwae_bound, kl_normal, log_normal,
    log_standard_normal, mse,
)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 5), torch.randn(16, 5)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = kl_divergence(q, p).sum(1)
    torch.testing.assert_close(kl_normal(mu, logvar), expected, rtol=1e-5, atol=1e-5)


def test_kl_is_zero_at_the_prior():
    assert torch.allclose(kl_normal(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_bce_from_logits_matches_probability_bce_summed_per_image():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(bce_from_logits(logits, target), expected, rtol=1e-4, atol=1e-3)


def test_bce_from_logits_is_finite_for_confident_wrong_pixels():
    logits = torch.full((1, 784), 200.0)
    assert torch.isfinite(bce_from_logits(logits, torch.zeros(1, 784))).all()


def test_log_densities_match_torch_distributions():
    torch.manual_seed(0)
    z, mu, logvar = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z, mu, logvar), expected)
    torch.testing.assert_close(log_standard_normal(z), Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_iwae_of_equal_weights_is_the_weight():
    lw = torch.full((7, 3), -2.5)
    torch.testing.assert_close(iwae_bound(lw), torch.full((3,), -2.5))
    lw = torch.log(torch.tensor([[1.0], [3.0]]))
    assert math.isclose(iwae_bound(lw).item(), math.log(2.0), rel_tol=1e-6)


def test_mse_per_image():
    a, b = torch.zeros(2, 1, 28, 28), torch.ones(2, 1, 28, 28)
    torch.testing.assert_close(mse(a, b), torch.ones(2))


def test_gan_losses_at_chance():
    zero = torch.zeros(8, 1)
    assert math.isclose(discriminator_loss(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(generator_loss(zero).item(), math.log(2), rel_tol=1e-6)


def test_mmd_imq_matches_the_definition_term_by_term():
    """The unbiased MMD^2 estimate, written out as the three double sums of its definition."""
    torch.manual_seed(0)
    a, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) + 0.5

    def k(x, y):
        return sum(2 * 3 * s / (2 * 3 * s + float(((x - y) ** 2).sum())) for s in IMQ_SCALES)

    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    ab = sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert math.isclose(float(mmd_imq(a, b)), aa + bb - 2 * ab, rel_tol=1e-9)


def test_mmd_imq_separates_distributions_and_has_finite_gradients():
    torch.manual_seed(0)
    prior = torch.randn(256, 16)
    same, shrunk = torch.randn(256, 16), 0.5 * torch.randn(256, 16)
    assert abs(float(mmd_imq(same, prior))) < 0.01 < float(mmd_imq(shrunk, prior))
    codes = torch.cat([shrunk[:4], shrunk[:4]]).requires_grad_()  # duplicates: zero distances
    mmd_imq(codes, prior).backward()
    assert torch.isfinite(codes.grad).all() and codes.grad.abs().sum() > 0
    one = torch.randn(1, 16, requires_grad=True)  # a last batch of one image: no estimate, no NaN
    assert float(mmd_imq(one, prior[:1]).detach()) == 0
    mmd_imq(one, prior[:1]).backward()
    assert torch.isfinite(one.grad).all()
