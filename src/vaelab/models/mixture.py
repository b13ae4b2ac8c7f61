"""A Gaussian mixture over latent codes, fitted by EM to the codes of the training images.

As a generative prior it puts draws where the decoder has learned to draw: ex-post density
estimation (Ghosh et al. 2020, "From variational to deterministic autoencoders"; the two-stage VAE
of Dai & Wipf 2019 fits a second VAE to the codes instead). N(0, I) leaves holes between the
regions the codes of each kind of image fill, and a decoder turns draws from those holes into
malformed images (docs/vae-gan.md measures how many).

Its parameters are buffers, so they travel in the model's safetensors and checkpoints. Until it
is fitted it is one component, N(0, I).
"""

from __future__ import annotations

import math

import torch
from torch import nn

EM_ITERATIONS = 60
# Added to every component's covariance, relative to the codes' mean variance: keeps a component
# that collapses onto a few codes factorable.
RIDGE = 1e-4


class GaussianMixture(nn.Module):
    """`components` full-covariance Gaussians in `dim` dimensions."""

    def __init__(self, dim: int, components: int):
        super().__init__()
        weights = torch.zeros(components)
        weights[0] = 1.0
        self.register_buffer("weights", weights)
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("scale_tril", torch.eye(dim).repeat(components, 1, 1))

    @property
    def components(self) -> int:
        return len(self.weights)

    @torch.no_grad()
    def fit(self, codes: torch.Tensor, generator: torch.Generator | None = None,
            iterations: int = EM_ITERATIONS) -> float:
        """EM from distinct codes drawn by `generator` as the means, the codes' covariance for
        every component and equal weights; float64 throughout. Returns the mean log-likelihood per
        code of the fitted mixture. With fewer codes than components (a run on a few images) only
        as many components as codes are fitted; the others keep weight 0."""
        z = codes.detach().to(torch.float64)
        n, d = z.shape
        if n < 2:
            raise ValueError(f"a mixture needs at least 2 codes to fit, got {n}")
        k = min(self.components, n)
        start = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")[:k]
        means = z[start.to(z.device)].clone()
        ridge = RIDGE * z.var(0).mean() * torch.eye(d, dtype=z.dtype, device=z.device)
        covs = (torch.atleast_2d(torch.cov(z.T)) + ridge).repeat(k, 1, 1)
        log_w = torch.full((k,), -math.log(k), dtype=z.dtype, device=z.device)
        for it in range(iterations + 1):
            tril = torch.linalg.cholesky(covs)
            log_p = log_w + _log_normal(z, means, tril)  # (n, k)
            log_total = torch.logsumexp(log_p, 1, keepdim=True)
            if it == iterations:
                break
            r = torch.exp(log_p - log_total)  # responsibilities (n, k)
            nk = r.sum(0) + 1e-10
            log_w = torch.log(nk / n)
            means = (r.T @ z) / nk[:, None]
            for j in range(k):
                diff = z - means[j]
                covs[j] = (r[:, j, None] * diff).T @ diff / nk[j] + ridge
        self.weights.zero_()
        self.means.zero_()
        self.scale_tril.copy_(torch.eye(d, dtype=self.scale_tril.dtype, device=self.scale_tril.device))
        self.weights[:k] = log_w.exp()
        self.means[:k] = means
        self.scale_tril[:k] = tril
        return float(log_total.mean())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, dim) draws: a component by its weight, then its Gaussian."""
        dev = self.means.device
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, device=dev)
        return self.means[which] + (self.scale_tril[which] @ eps.unsqueeze(-1)).squeeze(-1)

    def marginal_quantiles(self, q: torch.Tensor) -> torch.Tensor:
        """(n,) probabilities -> (n, dim): each axis's quantiles under its marginal (a 1-D mixture),
        by bisection on its CDF; on q's device and in its dtype."""
        w = self.weights.to(torch.float64)
        mu = self.means.to(torch.float64)  # (k, d)
        sd = self.scale_tril.to(torch.float64).pow(2).sum(-1).sqrt()  # (k, d): sqrt of diag(L L^T)
        p = q.to(device=mu.device, dtype=torch.float64)[:, None]  # (n, 1)
        lo = (mu - 12 * sd).min(0).values.expand(len(p), -1).clone()
        hi = (mu + 12 * sd).max(0).values.expand(len(p), -1).clone()
        for _ in range(60):
            mid = (lo + hi) / 2
            cdf = (w[:, None] * torch.special.ndtr((mid[:, None, :] - mu) / sd)).sum(1)  # (n, d)
            below = cdf < p
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2).to(device=q.device, dtype=q.dtype)


def _log_normal(z: torch.Tensor, means: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    """log N(z_i | means_j, L_j L_j^T) for every code i and component j: (n, k)."""
    d = z.shape[1]
    out = torch.empty(len(z), len(means), dtype=z.dtype, device=z.device)
    for j in range(len(means)):
        white = torch.linalg.solve_triangular(tril[j], (z - means[j]).T, upper=False)  # (d, n)
        log_det = tril[j].diagonal().log().sum()
        out[:, j] = -0.5 * white.pow(2).sum(0) - log_det - 0.5 * d * math.log(2 * math.pi)
    return out
