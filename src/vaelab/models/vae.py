"""The MLP VAE: 784 -> 512 ReLU -> (mu, log sigma^2) -> z -> 512 ReLU -> 784 sigmoid by default;
the widths, depth and hidden nonlinearity (ReLU or tanh) are its config's.

Also what every Gaussian VAE here shares (`GaussianVAE`, the MLP, LSTM and conditional ones): the
objective and its options (`VAEObjective`): the KL weight beta, a linear KL warm-up, free bits,
and IWAE training with k importance samples (k = 1: the ELBO).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import Batch, StepState
from ..config import option, require
from ..losses import (bce_from_logits, bce_from_logits_shared_target, iwae_bound, kl_free_bits, kl_normal,
                      kl_normal_per_dim, log_normal, log_standard_normal, reparameterize)
from . import vae_step
from .base import GenerativeModel, ModelOutput, Posterior
from .blocks import ACTIVATIONS, GaussianHeads, MLPDecoder, MLPEncoderTrunk
from .registry import register


@dataclass
class VAEObjective:
    """The training objective's options, shared by every Gaussian VAE's config (a base class, so
    its fields come first). The defaults are the plain ELBO, BCE + KL."""

    beta: float = option(1.0, "weight of the KL term (1 = the true ELBO)")
    kl_warmup_steps: int = option(0, "KL warm-up: the KL weight rises linearly from 0 at the first step to "
                                     "beta after this many steps (0 = beta throughout)")
    free_bits: float = option(0.0, "nats per latent dimension under which the KL term gives no gradient: "
                                   "each dimension's batch-mean KL is clamped from below at it (Kingma et "
                                   "al. 2016); 0 = off; the logged kl stays the unclamped KL")
    iwae_k: int = option(1, "importance samples in the training objective: the loss is the IWAE bound's "
                            "negative (Burda et al. 2016); 1 = the ELBO exactly; recon and kl stay the "
                            "ELBO's terms (averaged over the k samples), so recon + kl compares across k")

    def validate_objective(self) -> None:
        require(self.beta >= 0, "beta must be non-negative")
        require(self.kl_warmup_steps >= 0, "kl_warmup_steps must be non-negative")
        require(self.free_bits >= 0, "free_bits must be non-negative")
        require(self.iwae_k >= 1, "iwae_k must be at least 1")
        # Free bits clamp the analytic KL of the ELBO; in the IWAE bound the prior and posterior
        # densities sit inside a log-mean-exp, where there is no per-dimension KL to clamp.
        require(self.free_bits == 0 or self.iwae_k == 1, "free_bits applies to the ELBO: use it with iwae_k=1")


@dataclass
class VAEConfig(VAEObjective):
    """Fully connected VAE (Kingma & Welling 2014) with a Bernoulli decoder."""

    hidden_dims: list[int] = field(default_factory=lambda: [512])  # encoder widths; decoder mirrors
    latent_dim: int = 2
    activation: str = option("relu", "hidden-layer nonlinearity of encoder and decoder: relu (default) or "
                                     "tanh (Burda et al. 2016's networks)")

    def validate(self) -> None:
        require(self.latent_dim >= 1, "latent_dim must be at least 1")
        require(all(h >= 1 for h in self.hidden_dims), "hidden_dims must be positive")
        require(self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}")
        self.validate_objective()


class GaussianVAE(GenerativeModel):
    """Shared by every VAE here: BCE + kl_weight * KL, or with `iwae_k` > 1 the IWAE bound.
    Subclasses build `trunk` (image -> features), `heads` (features -> mu, log sigma^2) and
    `decoder` (z -> logits); their config is a `VAEObjective`."""

    term_names = ("recon", "kl")
    regularizer_term = "kl"

    def kl_weight(self, state: StepState | None) -> float:
        """The KL term's weight in the loss of the training step `state` (None: outside
        training, where the loss is the objective trained towards). `config.beta`, reached
        linearly from 0 over the first `config.kl_warmup_steps` steps; another schedule is a
        subclass overriding this. A Python number, so the schedule costs no device sync and the
        hand-derived step (vae_step.py) uses the same one."""
        beta = self.config.beta
        return beta if state is None else beta * state.warmup_fraction(self.config.kl_warmup_steps)

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
        if self.config.iwae_k > 1:
            return self.iwae_loss(x, condition, post, self.config.iwae_k, self.kl_weight(state))
        z = reparameterize(post.mu, post.logvar)
        recon = bce_from_logits(self.decode_logits(z, condition), x).mean()
        kl = kl_normal(post.mu, post.logvar).mean()
        penalty = kl_free_bits(kl_normal_per_dim(post.mu, post.logvar), self.config.free_bits) \
            if self.config.free_bits > 0 else kl
        loss = recon + self.kl_weight(state) * penalty
        return ModelOutput(loss=loss, terms={"recon": recon.detach(), "kl": kl.detach()})

    def iwae_loss(self, x: torch.Tensor, condition: torch.Tensor | None, post: Posterior, k: int,
                  weight: float = 1.0) -> ModelOutput:
        """The negative IWAE bound -L_k = -log (1/k) sum_i w_i, w_i = p(x|z_i) p(z_i) / q(z_i|x),
        z_i ~ q(z|x) (Burda et al. 2016, eq. 8); its gradient is eq. 14's, the normalised weights
        times each sample's gradient of log w_i. `weight` scales log p(z) - log q(z|x) inside each
        log w_i, as the KL weight scales the KL in the ELBO (1: the paper's bound).

        The terms are the ELBO's, estimated on the same k samples: `recon` the BCE averaged over
        them, `kl` the analytic KL; recon + kl is then the negative ELBO whatever k (compare
        runs by it), and loss <= recon + kl by the bound's gap.
        """
        mu, logvar = post.mu, post.logvar
        z = mu + torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device) * torch.exp(0.5 * logvar)  # (k, B, D)
        # Sample-major rows, so the labels repeat whole: row i * B + b is z[i, b] with label b's.
        cond = None if condition is None else condition.repeat(k)
        logits = self.decode_logits(z.flatten(0, 1), cond)  # (k*B, 1, 28, 28)
        nll = bce_from_logits_shared_target(logits.view(k, *x.shape), x)  # (k, B): -log p(x|z_i)
        log_ratio = log_standard_normal(z) - log_normal(z, mu, logvar)  # (k, B): log p(z_i) - log q(z_i|x)
        loss = -iwae_bound(-nll + weight * log_ratio).mean()
        kl = kl_normal(mu, logvar).mean()
        return ModelOutput(loss=loss, terms={"recon": nll.mean().detach(), "kl": kl.detach()})


@register("vae")
class VAE(GaussianVAE):
    config_class = VAEConfig
    description = "MLP VAE, 784-512-2 by default: BCE + KL, the 2-D latent-space assignment"
    _derivation: vae_step.Derivation | None = None  # set by configure_optimizers

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.trunk = MLPEncoderTrunk(config.hidden_dims, activation=config.activation)
        self.heads = GaussianHeads(self.trunk.out_features, config.latent_dim)
        self.decoder = MLPDecoder(config.latent_dim, config.hidden_dims, activation=config.activation)

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        # Whether the hand-derived step (vae_step.py) computes this model's update is decided here,
        # once, by exact classes: a subclass, or a part of another class, trains by autograd.
        self._derivation = vae_step.derived_for(self, VAE)
        return super().configure_optimizers(lr)

    def training_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer],
                      state: StepState) -> ModelOutput:
        # On the CPU the hand-derived step does the same update faster (README: 1.0-1.6x); gradient
        # clipping, hooks, autocast, compile and CUDA take the autograd step. Both weigh the KL
        # term by the same `kl_weight(state)`.
        opt = optimizers["model"]
        if (state.clip_grad is None and not self.is_compiled
                and vae_step.applies(self, batch.x, opt, self._derivation)):
            return vae_step.training_step(self, batch.x, opt, self._derivation, self.kl_weight(state))
        return super().training_step(batch, optimizers, state)
