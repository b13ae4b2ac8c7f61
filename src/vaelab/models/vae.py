"""The MLP VAE: 784 -> 512 ReLU -> (mu, log sigma^2) -> z -> 512 ReLU -> 784 sigmoid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import Batch, StepState
from ..config import require
from ..losses import bce_from_logits, kl_normal, reparameterize
from ..optim import PackedAdam
from . import vae_step
from .base import GenerativeModel, ModelOutput, Posterior
from .blocks import GaussianHeads, MLPDecoder, MLPEncoderTrunk
from .registry import register


@dataclass
class VAEConfig:
    """Fully connected VAE (Kingma & Welling 2014) with a Bernoulli decoder."""

    hidden_dims: list[int] = field(default_factory=lambda: [512])  # encoder widths; decoder mirrors
    latent_dim: int = 2
    beta: float = 1.0  # weight of the KL term (1 = the true ELBO)

    def validate(self) -> None:
        require(self.latent_dim >= 1, "latent_dim must be at least 1")
        require(all(h >= 1 for h in self.hidden_dims), "hidden_dims must be positive")
        require(self.beta >= 0, "beta must be non-negative")


class GaussianVAE(GenerativeModel):
    """Shared by every VAE here: BCE + kl_weight * KL. Subclasses build `trunk` (image ->
    features), `heads` (features -> mu, log sigma^2) and `decoder` (z -> logits)."""

    term_names = ("recon", "kl")
    regularizer_term = "kl"

    def kl_weight(self, state: StepState | None) -> float:
        """The KL term's weight in the loss of the training step `state` (None: outside
        training, where the loss is the objective trained towards). `config.beta` at every step;
        a schedule (a KL warm-up, say) is a subclass overriding this. A Python number, so the
        schedule costs no device sync and the hand-derived step (vae_step.py) uses the same one."""
        return self.config.beta

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Posterior:
        self.refuse_condition(condition)
        mu, logvar = self.heads(self.trunk(x))
        return Posterior(mu, logvar)

    def decode_logits(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.refuse_condition(condition)
        return self.decoder(z)

    def forward(self, batch: Batch, state: StepState | None = None) -> ModelOutput:
        # A conditional subclass (`conditional = True`) is conditioned on the batch's labels.
        x, condition = batch.x, (batch.y if self.conditional else None)
        post = self.encode(x, condition)
        z = reparameterize(post.mu, post.logvar)
        recon = bce_from_logits(self.decode_logits(z, condition), x).mean()
        kl = kl_normal(post.mu, post.logvar).mean()
        loss = recon + self.kl_weight(state) * kl
        return ModelOutput(loss=loss, terms={"recon": recon.detach(), "kl": kl.detach()})


@register("vae")
class VAE(GaussianVAE):
    config_class = VAEConfig
    description = "MLP VAE, 784-512-2 by default: BCE + KL, the 2-D latent-space assignment"
    _derivation: vae_step.Derivation | None = None  # set by configure_optimizers

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.trunk = MLPEncoderTrunk(config.hidden_dims)
        self.heads = GaussianHeads(self.trunk.out_features, config.latent_dim)
        self.decoder = MLPDecoder(config.latent_dim, config.hidden_dims)

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        # Whether the hand-derived step (vae_step.py) computes this model's update is decided here,
        # once, by exact classes: a subclass, or a part of another class, trains by autograd.
        self._derivation = vae_step.derived_for(self, VAE)
        return {"model": PackedAdam(self.parameters(), lr=lr)}

    def training_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer],
                      state: StepState) -> ModelOutput:
        # On the CPU the hand-derived step does the same update about 1.6x faster; gradient
        # clipping, hooks, autocast, compile and CUDA take the autograd step. Both weigh the KL
        # term by the same `kl_weight(state)`.
        opt = optimizers["model"]
        if (state.clip_grad is None and not self.is_compiled
                and vae_step.applies(self, batch.x, opt, self._derivation)):
            return vae_step.training_step(self, batch.x, opt, self._derivation, self.kl_weight(state))
        return super().training_step(batch, optimizers, state)
