"""Pure loss functions. Each returns one value per example (shape (B,)) unless it says otherwise;
callers average over the batch, so the reduction is stated once, here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bce_from_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood -log p(x|z), summed over pixels: (B, ...) -> (B,).

    From logits rather than probabilities: log(sigmoid) is evaluated stably, so a confident
    wrong pixel costs a large finite amount instead of log(0).
    """
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return per_pixel.flatten(1).sum(1)


def bce_from_logits_shared_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`bce_from_logits` of K decodes per image against their one image: logits (K, B, ...) and
    target (B, ...) -> (K, B), without materializing K copies of the target.

    Uses BCE(l, x) = softplus(l) - x * l, whose second term is one contraction over pixels.
    """
    k, b = logits.shape[:2]
    flat = logits.reshape(k, b, -1)
    return F.softplus(flat).sum(-1) - torch.einsum("kbp,bp->kb", flat, target.reshape(b, -1))


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, summed over latents: (B, D) -> (B,).

    Kingma & Welling 2014, Appendix B: -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2).
    """
    return kl_normal_per_dim(mu, logvar).sum(1)


def kl_normal_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The per-dimension terms of `kl_normal`: (B, D) -> (B, D)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_free_bits(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL term with free bits (Kingma et al. 2016, "Improved variational inference with
    inverse autoregressive flow", its "free bits" objective with one latent dimension per group): each dimension's
    KL averaged over the batch, clamped from below at `free_bits` nats, summed: (B, D) -> scalar.

    A dimension whose batch-mean KL is under the threshold adds the constant `free_bits`, so the
    KL term gives it no gradient: the encoder keeps that much information per dimension for free,
    which stops the KL pressure from collapsing the dimension onto the prior early in training.
    """
    return kl_per_dim.mean(0).clamp(min=free_bits).sum()


def mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, averaged over pixels: (B, ...) -> (B,)."""
    return (recon - target).pow(2).flatten(1).mean(1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + eps * sigma with eps ~ N(0, I): a sample that stays differentiable in mu, sigma."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + z.pow(2)).sum(-1)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """Importance-weighted bound log (1/K) sum_k w_k from log w of shape (K, B) -> (B,).

    Burda et al. 2016, eq. 8, evaluated with logsumexp for stability.
    """
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)


# GAN losses (Goodfellow et al. 2014), written on discriminator logits. The non-saturating
# generator loss is used, as in Larsen et al. 2016 and nearly every practical GAN.


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-[log D(x) + log(1 - D(x_fake))] per example, averaged over each set; returns a scalar."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log D(x_fake), averaged; returns a scalar."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# Kernel widths of mmd_imq, as multiples of 2 * latent_dim (the expected squared distance between
# two standard normal draws): a sum over scales needs no tuning to the codes' spread.
IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def mmd_imq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of the squared maximum mean discrepancy between the samples a (n, d) and
    b (m, d), with the inverse multiquadratic kernel k(x, y) = C / (C + |x - y|^2) summed over
    C = 2 d s for s in IMQ_SCALES (Tolstikhin et al. 2018, "Wasserstein auto-encoders"); its
    heavy tails keep a gradient on codes far from the prior's bulk. Zero in expectation when a and
    b come from one distribution."""
    n, m, d = len(a), len(b), a.shape[1]
    if min(n, m) < 2:  # the unbiased estimate needs two samples a side; one image says nothing
        return a.sum() * 0
    ab = torch.cat([a, b])
    norms = ab.pow(2).sum(1)
    # |x|^2 + |y|^2 - 2 x.y rather than cdist: its gradient is finite at zero distance (the diagonal)
    sq = (norms[:, None] + norms[None, :] - 2 * ab @ ab.T).clamp_min(0)
    k = sum((2 * d * s) / (2 * d * s + sq) for s in IMQ_SCALES)
    k_aa, k_bb, k_ab = k[:n, :n], k[n:, n:], k[:n, n:]

    def off_diagonal_mean(block: torch.Tensor) -> torch.Tensor:
        size = len(block)
        return (block.sum() - block.diagonal().sum()) / (size * (size - 1))

    return off_diagonal_mean(k_aa) + off_diagonal_mean(k_bb) - 2 * k_ab.mean()
