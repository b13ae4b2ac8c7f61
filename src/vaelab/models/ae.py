"""The plain autoencoder (784 -> 512 -> 2 -> 512 -> 784, MSE), optionally with a normalized bottleneck.

A plain autoencoder has no prior, so "generation" means feeding the decoder codes from some
distribution chosen after training. After each epoch the model records where its training
codes lie (their box, mean and covariance, saved with the weights) and samples from:

- `box`: uniform over the box the training codes occupy (the default without normalization),
- `normal`: N(0, I), right only when the codes are normalized,
- `fitted`: a Gaussian with the codes' mean and covariance.

With `normalize_latent=true` each code neuron goes through batch normalization without affine
parameters before the decoder (batch statistics while training, running statistics afterwards),
which pins it to mean 0 and variance 1 over the data; N(0, I) is then the natural generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..batch import Batch, StepState
from ..config import require
from ..losses import mse
from .base import GenerativeModel, ModelOutput, Posterior
from .blocks import MLPDecoder, MLPEncoderTrunk
from .registry import register

GEN_PRIORS = ("auto", "box", "normal", "fitted")


@dataclass
class AEConfig:
    """Fully connected autoencoder with a mean-squared-error objective."""

    hidden_dims: list[int] = field(default_factory=lambda: [512])  # encoder widths; decoder mirrors
    latent_dim: int = 2
    normalize_latent: bool = False  # batch-norm the code (no affine): mean 0, variance 1 per neuron
    # Decoder inputs for generation: auto = normal with normalize_latent, box without.
    gen_prior: str = "auto"

    def validate(self) -> None:
        require(self.latent_dim >= 1, "latent_dim must be at least 1")
        require(all(h >= 1 for h in self.hidden_dims), "hidden_dims must be positive")
        require(self.gen_prior in GEN_PRIORS, f"gen_prior must be one of {', '.join(GEN_PRIORS)}")


@register("ae")
class AE(GenerativeModel):
    config_class = AEConfig
    term_names = ("recon",)
    generation_fields = ("gen_prior",)
    regularizer_term = None
    description = "fully connected autoencoder, 784-512-2, MSE; normalize_latent=true batch-norms the code"

    def __init__(self, config: AEConfig):
        super().__init__(config)
        d = config.latent_dim
        self.trunk = MLPEncoderTrunk(config.hidden_dims)
        self.to_code = nn.Linear(self.trunk.out_features, d)
        self.norm = nn.BatchNorm1d(d, affine=False) if config.normalize_latent else nn.Identity()
        self.decoder = MLPDecoder(d, config.hidden_dims)
        # Where the training codes lie, filled by `end_of_epoch`; until then they describe
        # N(0, I) and the box [-2, 2]^D. Buffers, so they travel in model.safetensors.
        self.register_buffer("code_min", torch.full((d,), -2.0))
        self.register_buffer("code_max", torch.full((d,), 2.0))
        self.register_buffer("code_mean", torch.zeros(d))
        self.register_buffer("code_cov", torch.eye(d))

    @property
    def gen_prior(self) -> str:
        if self.config.gen_prior == "auto":
            return "normal" if self.config.normalize_latent else "box"
        return self.config.gen_prior

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Posterior:
        self.refuse_condition(condition)
        return Posterior(mu=self.norm(self.to_code(self.trunk(x))), logvar=None)

    def decode_logits(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.refuse_condition(condition)
        return self.decoder(z)

    def forward(self, batch: Batch, state: StepState | None = None) -> ModelOutput:
        x = batch.x
        recon = mse(self.decode(self.encode(x).mu), x).mean()
        return ModelOutput(loss=recon, terms={"recon": recon.detach()})

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        d, dev = self.latent_dim, self.device
        if self.gen_prior == "box":
            u = torch.rand(n, d, generator=generator, device=dev)
            return self.code_min + u * (self.code_max - self.code_min)
        eps = torch.randn(n, d, generator=generator, device=dev)
        if self.gen_prior == "normal":
            return eps
        # fitted: mean + L eps with L L^T = covariance (jitter keeps a flat direction factorable)
        chol = torch.linalg.cholesky(self.code_cov + 1e-6 * torch.eye(d, device=dev))
        return self.code_mean + eps @ chol.T

    @property
    def prior_name(self) -> str:
        return {"box": "uniform over the training codes' box", "normal": "N(0, I)",
                "fitted": "Gaussian fitted to the training codes"}[self.gen_prior]

    def prior_quantiles(self, q: torch.Tensor) -> torch.Tensor:
        buf = lambda b: b.to(device=q.device, dtype=q.dtype)  # noqa: E731
        q = q.unsqueeze(1)  # (n,) -> (n, 1), against (D,) per-axis parameters
        if self.gen_prior == "box":
            return buf(self.code_min) + q * buf(self.code_max - self.code_min)
        if self.gen_prior == "normal":
            return torch.special.ndtri(q).expand(-1, self.latent_dim)
        # fitted: each axis's marginal is N(mean_i, cov_ii)
        return buf(self.code_mean) + buf(self.code_cov.diagonal()).sqrt() * torch.special.ndtri(q)

    def end_of_epoch(self, train_images: torch.Tensor) -> None:
        codes = self.codes(train_images)
        self.code_min.copy_(codes.min(0).values)
        self.code_max.copy_(codes.max(0).values)
        self.code_mean.copy_(codes.mean(0))
        self.code_cov.copy_(torch.atleast_2d(torch.cov(codes.T)))
