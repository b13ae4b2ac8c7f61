"""The contract every model keeps: encode / decode / sample / reconstruct / interpolate, a forward
that returns a `ModelOutput`, and its own training step.

Images are float tensors (B, 1, 28, 28) in [0, 1]; decoders produce logits of the same shape and
`decode` turns them into intensities.

One rule for arguments: what computes a loss (`forward`, `training_step`, a model's `losses`)
takes a `Batch`, which carries the labels; what maps tensors (`encode`, `decode_logits`,
`decode`, `latent`, `sample`, `reconstruct`) takes tensors and an optional `condition` (labels,
say, for a conditional model). A model that is not conditional refuses a condition rather than
ignoring it: samples that silently ignored the asked-for class would look like an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..batch import Batch, StepState
from ..data import to_float
from ..errors import ConfigError
from ..inference import batched
from ..losses import reparameterize
from ..optim import PackedAdam


@dataclass
class ModelOutput:
    """What a forward pass or training step returns.

    `loss` is the scalar being minimised (a batch mean); `terms` holds named scalar parts
    (batch means, detached where they are only reported). `terms` always has the same keys, in
    the order of the model's `term_names`, so histories line up.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Posterior:
    """The encoder's output: mean and log-variance of q(z|x); `logvar` is None for a plain AE."""

    mu: torch.Tensor
    logvar: torch.Tensor | None = None


class GenerativeModel(nn.Module):
    """Base class. Subclasses set `name`, `config_class`, `term_names` and implement
    `encode`, `decode_logits` and `forward`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    term_names: ClassVar[tuple[str, ...]] = ()
    # The name of the term shown as "regularisation" in loss-curve figures (KL for VAEs).
    regularizer_term: ClassVar[str | None] = None
    # Config fields that only change how the trained model generates, never its training: they
    # may change after training (`vaelab config RUN key=value`, or by hand in config.json).
    generation_fields: ClassVar[tuple[str, ...]] = ()
    # State-dict key prefixes that runs saved by an older vaelab may lack; loaded without them,
    # those tensors keep their initial values (the model says when that matters).
    optional_state: ClassVar[tuple[str, ...]] = ()
    # The optional_state keys the loaded weights lacked (set by checkpoint.load_state_into).
    absent_state: tuple[str, ...] = ()
    description: ClassVar[str] = ""
    # Whether `encode` and `decode_logits` use a condition; False: they refuse one.
    conditional: ClassVar[bool] = False

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def is_compiled(self) -> bool:
        """Whether `nn.Module.compile()` was called on the model."""
        return getattr(self, "_compiled_call_impl", None) is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- the contract --------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Posterior:
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: Batch, state: StepState | None = None) -> ModelOutput:
        """The loss on `batch`; `state` is the training step's (None outside training)."""
        raise NotImplementedError

    def refuse_condition(self, condition: torch.Tensor | None) -> None:
        """Called by an unconditional model's `encode` and `decode_logits`."""
        if condition is not None:
            raise ConfigError(f"model {self.name or type(self).__name__} is unconditional: "
                              "it takes no condition")

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) -> (B, 1, 28, 28) intensities in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z, condition))

    def latent(self, x: torch.Tensor, sample: bool = True, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of x: reparameterized samples z ~ q(z|x), or the means with sample=False."""
        post = self.encode(x, condition)
        if sample and post.logvar is not None:
            return reparameterize(post.mu, post.logvar)
        return post.mu

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latent vectors from the model's generative prior; N(0, I) unless overridden."""
        return torch.randn(n, self.latent_dim, generator=generator, device=self.device)

    @property
    def prior_name(self) -> str:
        """The generative prior in words, for figure labels."""
        return "N(0, I)"

    def prior_quantiles(self, q: torch.Tensor) -> torch.Tensor:
        """(n,) probabilities -> (n, D): the quantiles of each latent axis's marginal prior (the
        inverse CDF), on q's device and in its dtype; N(0, 1) unless overridden."""
        return torch.special.ndtri(q).unsqueeze(1).expand(-1, self.latent_dim)

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        """n images decoded from the prior: (n, 1, 28, 28) in [0, 1]; `condition` has n rows."""
        return self.decode(self.prior_sample(n, generator), condition)

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean of each image: the model's best reconstruction."""
        return self.decode(self.encode(x, condition).mu, condition)

    @torch.inference_mode()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10,
                    condition: torch.Tensor | None = None) -> torch.Tensor:
        """Decode `steps` points on the line between the codes of two images: (steps, 1, 28, 28).
        `condition` (1,): the one label both images are encoded and every point decoded with."""
        z_a = self.encode(x_a[:1], condition).mu
        z_b = self.encode(x_b[:1], condition).mu
        t = torch.linspace(0, 1, steps, device=z_a.device).unsqueeze(1)
        return self.decode((1 - t) * z_a + t * z_b, None if condition is None else condition.expand(steps))

    # --- training -------------------------------------------------------------------------------

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; the trainer saves and restores them by name."""
        # Fused Adam's step, bit for bit, without importing TorchDynamo (optim.py).
        return {"model": PackedAdam(self.parameters(), lr=lr)}

    def training_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer],
                      state: StepState) -> ModelOutput:
        """One update on `batch`, at the point of the run `state` describes (its `clip_grad`
        included). Models with several networks override this."""
        opt = optimizers["model"]
        opt.zero_grad(set_to_none=True)
        out = self(batch, state)
        out.loss.backward()
        if state.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), state.clip_grad, foreach=True)
        opt.step()
        return out

    def codes(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The codes of uint8 images (N, 28, 28): posterior means (an autoencoder's codes), or with
        `generator`, one draw z ~ q(z|x) for each image: together, draws from the aggregate
        posterior, the codes the decoder was trained on (still the means where the model has no
        variance). Eval mode (running batch-norm statistics), float32, where the images are; the
        noise comes from `generator` alone, so the global random stream, and with it training, is
        untouched."""

        def encode(x):
            post = self.encode(to_float(x))
            mu = post.mu.float()
            if generator is None or post.logvar is None:
                return mu
            eps = torch.randn(mu.shape, generator=generator, device=mu.device)
            return mu + (0.5 * post.logvar.float()).exp() * eps

        return batched(encode, images, batch_size=2000, to=None, model=self)

    def check_generation(self) -> None:
        """Raise ConfigError where this model, with its weights, cannot generate as its config
        says (`vaelab config` asks before it changes a generation setting)."""

    def end_of_epoch(self, train_images: torch.Tensor) -> None:
        """Hook run after each epoch, before its checkpoint, with the training images (uint8, on
        the device); the autoencoder records where its codes lie here, so that a run stopped
        early samples from where its last saved weights put the codes."""
