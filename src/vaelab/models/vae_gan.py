"""The VAE-GAN of Larsen et al. 2016, "Autoencoding beyond pixels using a learned similarity metric".

Three networks: an encoder q(z|x), a decoder (the generator) and a discriminator that sees real
images, reconstructions x~ = Dec(z ~ q(z|x)) and samples x_p = Dec(z_p ~ N(0, I)).

Losses (batch means, per image sums as in the VAE):
    L_prior = KL(q(z|x) || N(0, I))
    L_llike = pixel_weight * BCE(x~, x)                       (pixel reconstruction)
            + [feature_loss] 1/2 ||Dis_l(x~) - Dis_l(x)||^2   (Dis_l: hidden layer `feature_layer`)
    L_GAN   = log D(x) + 1/2 [log(1 - D(x~)) + log(1 - D(x_p))]

The paper's L_GAN sums all three terms. Here the B reconstructions and B prior samples form one
set of 2B fakes, averaged together (`losses.discriminator_loss(real, fake)` is the mean
cross-entropy over each set), so real and fake images weigh equally in the discriminator's
objective; with the plain sum the fakes would count twice, biasing the discriminator towards
"fake" (its optimum becomes p(x) / (p(x) + p_x~(x) + p_p(x))). The decoder's non-saturating term, -log D(fake), is likewise the mean
over the 2B fakes. This balanced form is what the defaults (`equilibrium`, `margin`, `gamma`) were
measured with. `fakes=prior` leaves the reconstructions out of L_GAN: the B prior samples are the
only fakes, for the discriminator and for the decoder's adversarial term.

The paper's update rule (its Algorithm 1, section 2.3):
    encoder       minimises beta * L_prior + L_llike    (beta = 1, the default, is the paper)
    decoder       minimises gamma * L_llike - L_GAN   (non-saturating: -log D(fake) instead)
    discriminator maximises L_GAN                     (minimises its cross-entropy)

Objectives. `objective=basic` is the literal L = L_prior + L_GAN of the assignment (paper eq. 5
without L_llike): the encoder then minimises L_prior alone, so its codes carry no information
about the input, and the decoder minimises -L_GAN alone; its "reconstructions" are samples that
ignore the image they were asked to reconstruct (the recipe fashion-generative shows this).
`objective=full` (the default) adds L_llike: a pixel term weighted by `pixel_weight` (default 1:
the encoder then minimises exactly the VAE's negative ELBO) and, with `feature_loss=true`, the
paper's learned similarity on a hidden layer of the discriminator. `gamma` (default 0.03) scales
L_llike for the decoder, so that the adversarial gradient is not drowned by ~100 nats of pixel
loss and can sharpen the samples. `pixel_weight=0` with `feature_loss=true` is the paper's exact
objective (which, in a short MNIST check, collapsed the posterior: the small discriminator's
features weigh little against the KL term).

Architecture (arch=conv): DCGAN-shaped (Radford et al. 2016) — 4x4 stride-2 convolutions in the
encoder and the discriminator, transposed ones in the decoder, batch norm in the encoder and the
decoder (its projection too), by default none in the discriminator, so a real image's score never
depends on the fakes it is batched with (`dis_batch_norm` adds it, as InfoGAN has it; it measured
worse); `spectral_norm` optionally normalises the discriminator's layers. docs/vae-gan.md has the
ablation behind the defaults (each variant 10 epochs on MNIST and Fashion-MNIST, measured with
the domain classifier's metrics).

Generation: `gen_prior=mixture` (the default) decodes draws from a Gaussian mixture fitted to
the training codes after every epoch (models/mixture.py), which puts them where the decoder has
learned to draw; `gen_prior=normal` decodes N(0, I) draws, some of which fall between the codes'
clusters and decode to malformed images. On MNIST the mixture's samples are better on every
measure that stray samples cannot inflate; on Fashion-MNIST they are more often recognised but
blurrier and less varied (docs/vae-gan.md measures both). Training is the same either way, and
the mixture is fitted either way, so `vaelab config RUN gen_prior=...` switches a trained run.

Gradient routing: every gradient of a step is taken at the same parameters, before any
optimizer steps (as in Algorithm 1), and each with `torch.autograd.grad` with respect to its own
network's parameters only. So the discriminator's loss never reaches the decoder, L_GAN never
reaches the encoder, and no backward pass ever runs on a graph whose weights a step changed.

Stability: the authors' equilibrium rule, on the discriminator's mean cross-entropy over real and
fake images (compared with `equilibrium`, about ln 2, a coin flip). Below equilibrium - margin the
discriminator is winning and skips its update; above equilibrium + margin it is losing and the
decoder skips its update. (The authors' code tests real and fake separately, "either below".
In a 200-step MNIST check that rested the discriminator on 93-98% of the steps: it soon
recognises real digits with confidence while many fakes still fool it. With the mean, in the
10-epoch MNIST runs, it rested for most of epoch 1 and trained on every step from epoch 3 on.)
`margin=none` switches the rule off. The fraction of steps each network trained is logged
(`dec_updated`, `dis_updated`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..batch import Batch, StepState
from ..config import require
from ..distributed import global_mean
from ..errors import ConfigError
from ..losses import bce_from_logits, discriminator_loss, generator_loss, kl_normal, mmd_imq, reparameterize
from ..optim import PackedAdam
from .registry import register
from .base import GenerativeModel, ModelOutput, Posterior
from .mixture import GaussianMixture
from .blocks import (ConvDecoder, ConvEncoderTrunk, Discriminator, GaussianHeads, MLPDecoder,
                     MLPEncoderTrunk)

ARCHS = ("conv", "mlp")


OBJECTIVES = ("full", "basic")
FAKES = ("both", "prior")
GEN_PRIORS = ("normal", "mixture")
# The mixture is fitted to one draw z ~ q(z|x) for every FIT_STRIDE-th training image (20,000 of
# MNIST's 60,000: as many confident samples as all of them, in a third of the time). Draws, not
# posterior means: an encoder whose posteriors collapse onto N(0, I) (objective=basic) has means
# near 0 but draws spread like N(0, I), and the decoder is trained on draws.
FIT_STRIDE = 3
FIT_ITERATIONS = 30


@dataclass
class VAEGANConfig:
    """VAE-GAN: encoder, decoder/generator and discriminator, each with its own optimizer."""

    arch: str = "conv"  # conv | mlp
    latent_dim: int = 16
    # full: L_prior + L_llike + L_GAN (L_llike = pixel BCE and/or the feature loss);
    # basic: the literal L_prior + L_GAN, nothing that rewards reconstructing the input
    objective: str = "full"
    # The fakes the discriminator sees: "prior" samples only, so the adversarial game is played on
    # the images generation draws and reconstructions are shaped by L_llike alone, or "both"
    # reconstructions and prior samples (the paper's L_GAN; the feature loss needs it).
    # docs/vae-gan.md has the measurements behind the default (with dec_hidden=1024, on conv).
    fakes: str = "prior"
    # arch=mlp: encoder widths (the decoder mirrors them) and the discriminator's widths
    hidden_dims: list[int] = field(default_factory=lambda: [512])
    dis_hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    # arch=conv: 4x4 stride-2 convolution widths of encoder and discriminator (28 -> 14 -> 7; the
    # decoder mirrors them with transposed convolutions), and their fully connected width
    channels: list[int] = field(default_factory=lambda: [32, 64])
    fc_dim: int = 256
    # arch=conv: a fully connected layer of this width at the decoder's input (0: none, z is
    # projected straight onto the first map), as InfoGAN's MNIST generator (1024)
    dec_hidden: int = 1024
    # arch=conv: the decoder's map widths, first to last before the image (e.g. [128, 64], InfoGAN's
    # MNIST generator); empty: the encoder's `channels` mirrored
    dec_channels: list[int] = field(default_factory=list)
    # arch=conv: the discriminator's convolution widths and fully connected width; empty / 0: the
    # encoder's `channels` / `fc_dim` (a stronger critic for a larger generator, e.g. [64, 128])
    dis_channels: list[int] = field(default_factory=list)
    dis_fc_dim: int = 0
    # Batch norm in the conv encoder and decoder (never in the discriminator); project_norm adds
    # it after the decoder's first (linear) layer too, as DCGAN's generator has it.
    batch_norm: bool = True
    project_norm: bool = True
    spectral_norm: bool = False  # spectral normalisation of every discriminator layer
    # Batch norm in the discriminator after every layer but the first (InfoGAN's MNIST
    # discriminator); the step's real and fake images are normalised as one batch.
    dis_batch_norm: bool = False
    feature_loss: bool = False  # add L_llike^{Dis_l}, the reconstruction error on a hidden layer of D
    # Which hidden layer of D (0-based, convolutions first; negative counts from the end). The
    # default 1 is the last convolution with arch=conv (as in the paper) and the last hidden layer
    # with arch=mlp.
    feature_layer: int = 1
    gamma: float = 0.03  # weight of L_llike against L_GAN in the decoder's loss
    beta: float = 1.0  # weight of L_prior in the encoder's loss (1 = the paper)
    kl_warmup_steps: int = 0  # beta reached linearly from 0 over this many steps (0 = beta throughout)
    # Weight of MMD(q(z), p(z)) in the encoder's loss (InfoVAE, Zhao et al. 2019): the batch's codes
    # against the prior draws, pulling the codes of all images together onto N(0, I), so prior draws
    # land where the decoder has learned to draw (the KL term matches each image's q(z|x) alone).
    mmd_weight: float = 0.0
    pixel_weight: float = 1.0  # weight of the pixel BCE in L_llike (see the module docstring)
    equilibrium: float = 0.68  # the discriminator's cross-entropy at balance (ln 2 = chance)
    margin: float | None = 0.35  # equilibrium rule margin; none = always update all three
    # What generation draws codes from: "mixture", a Gaussian mixture of `prior_components`
    # fitted after every epoch to the codes of a third of the training images (models/mixture.py),
    # or "normal", N(0, I), the KL term's prior, whose draws between the codes' clusters decode to
    # malformed images. Training is the same either way: the GAN's prior samples are N(0, I) draws
    # (drawing them from the mixture measured worse). docs/vae-gan.md measures both.
    gen_prior: str = "mixture"
    prior_components: int = 30
    # Each network's learning rate as a multiple of the trainer's --lr.
    enc_lr_scale: float = 1.0
    dec_lr_scale: float = 1.0
    dis_lr_scale: float = 1.0

    # Fields added after runs were first saved, with the values that rebuild those older runs
    # (a stored config lacking them predates them).
    legacy_defaults: ClassVar[dict] = {"objective": "full", "fakes": "both", "dec_hidden": 0, "dec_channels": [],
                                       "dis_channels": [], "dis_fc_dim": 0, "dis_batch_norm": False,
                                       "gen_prior": "normal",
                                       "project_norm": False, "spectral_norm": False,
                                       "enc_lr_scale": 1.0, "dec_lr_scale": 1.0, "dis_lr_scale": 1.0}

    def validate(self) -> None:
        require(self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}")
        require(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        require(self.fakes in FAKES, f"fakes must be one of {', '.join(FAKES)}")
        require(self.gen_prior in GEN_PRIORS, f"gen_prior must be one of {', '.join(GEN_PRIORS)}")
        require(self.prior_components >= 1, "prior_components must be at least 1")
        require(self.dec_hidden >= 0, "dec_hidden must be 0 (none) or a layer width")
        require(self.fakes == "both" or not self.feature_loss,
                "feature_loss compares reconstructions in the discriminator's features: it needs fakes=both "
                "(--set fakes=both)")
        require(self.latent_dim >= 1, "latent_dim must be at least 1")
        require(all(h >= 1 for h in [*self.hidden_dims, *self.dis_hidden_dims]), "hidden sizes must be positive")
        require(self.arch != "mlp" or len(self.dis_hidden_dims) >= 1, "dis_hidden_dims needs a layer")
        require(1 <= len(self.channels) <= 2 and min(self.channels) >= 1,
                "channels must hold one or two positive widths (28 halves twice at most)")
        require(not self.dec_channels or (len(self.dec_channels) == len(self.channels) and min(self.dec_channels) >= 1),
                "dec_channels must be empty (mirror channels) or hold as many positive widths as channels")
        require(not self.dis_channels or (1 <= len(self.dis_channels) <= 2 and min(self.dis_channels) >= 1),
                "dis_channels must be empty (the encoder's channels) or hold one or two positive widths")
        require(self.fc_dim >= 1, "fc_dim must be positive")
        require(self.dis_fc_dim >= 0, "dis_fc_dim must be 0 (the encoder's fc_dim) or a layer width")
        require(not self.project_norm or self.batch_norm, "project_norm needs batch_norm=true")
        require(min(self.gamma, self.pixel_weight, self.beta, self.mmd_weight) >= 0,
                "gamma, pixel_weight, beta and mmd_weight must be non-negative")
        require(self.kl_warmup_steps >= 0, "kl_warmup_steps must be non-negative")
        require(self.objective == "basic" or self.pixel_weight > 0 or self.feature_loss,
                "with pixel_weight=0 and feature_loss=false nothing trains the encoder to reconstruct "
                "(objective=basic is that choice made explicitly)")
        require(self.objective != "basic" or not self.feature_loss,
                "objective=basic has no reconstruction term: feature_loss needs objective=full")
        require(self.margin is None or self.margin > 0, "margin must be positive (or none)")
        require(min(self.enc_lr_scale, self.dec_lr_scale, self.dis_lr_scale) > 0, "learning-rate scales must be positive")


class GaussianEncoder(nn.Module):
    """A feature trunk and the mu / log sigma^2 heads."""

    def __init__(self, trunk: nn.Module, latent_dim: int):
        super().__init__()
        self.trunk = trunk
        self.heads = GaussianHeads(trunk.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.trunk(x))


@register("vae-gan")
class VAEGAN(GenerativeModel):
    config_class = VAEGANConfig
    term_names = ("enc_loss", "dec_loss", "dis_loss", "dis_acc_real", "dis_acc_fake",
                  "kl", "recon", "feature", "dec_updated", "dis_updated")
    regularizer_term = "kl"
    description = "VAE-GAN (Larsen et al. 2016): encoder, decoder and discriminator with their own updates"
    generation_fields = ("gen_prior",)
    optional_state = ("code_prior.",)

    def __init__(self, config: VAEGANConfig):
        super().__init__(config)
        c = config
        if c.arch == "conv":
            n = len(c.channels)
            self.encoder = GaussianEncoder(ConvEncoderTrunk(c.channels, c.fc_dim, c.batch_norm), c.latent_dim)
            self.decoder = ConvDecoder(c.latent_dim, c.dec_channels or list(reversed(c.channels)), [4] * n, [2] * n,
                                       start_size=28 >> n, batch_norm=c.batch_norm, project_norm=c.project_norm,
                                       hidden=c.dec_hidden)
            self.discriminator = Discriminator([c.dis_fc_dim or c.fc_dim], c.dis_channels or c.channels,
                                               spectral_norm=c.spectral_norm, batch_norm=c.dis_batch_norm)
        else:
            self.encoder = GaussianEncoder(MLPEncoderTrunk(c.hidden_dims), c.latent_dim)
            self.decoder = MLPDecoder(c.latent_dim, c.hidden_dims)
            self.discriminator = Discriminator(c.dis_hidden_dims, spectral_norm=c.spectral_norm,
                                               batch_norm=c.dis_batch_norm)
        # Fitted whatever gen_prior says, so that `vaelab config RUN gen_prior=...` can switch a
        # trained run either way; runs saved before it existed load without it (optional_state).
        self.code_prior = GaussianMixture(c.latent_dim, c.prior_components)
        n_layers = len(self.discriminator.layers)
        if c.feature_loss and not -n_layers <= c.feature_layer < n_layers:
            raise ConfigError(f"feature_layer {c.feature_layer}: the discriminator has {n_layers} hidden layers")

    def networks(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder, "discriminator": self.discriminator}

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Posterior:
        self.refuse_condition(condition)
        mu, logvar = self.encoder(x)
        return Posterior(mu, logvar)

    def decode_logits(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.refuse_condition(condition)
        return self.decoder(z)

    # --- generation ---------------------------------------------------------------------------

    def check_generation(self) -> None:
        """Refuse to draw from a mixture that was never fitted (a run saved before vaelab fitted
        one), rather than silently drawing N(0, I) under the mixture's name."""
        if self.config.gen_prior == "mixture" and any(k.startswith("code_prior.") for k in self.absent_state):
            raise ConfigError("gen_prior=mixture: this run has no fitted mixture (it was saved by a vaelab that "
                              "did not fit one); use gen_prior=normal, or train it again")

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.gen_prior == "normal":
            return super().prior_sample(n, generator)
        self.check_generation()
        return self.code_prior.sample(n, generator)

    @property
    def prior_name(self) -> str:
        if self.config.gen_prior == "normal":
            return super().prior_name
        return f"a {self.config.prior_components}-component Gaussian mixture fitted to the training codes"

    def prior_quantiles(self, q: torch.Tensor) -> torch.Tensor:
        if self.config.gen_prior == "normal":
            return super().prior_quantiles(q)
        self.check_generation()
        return self.code_prior.marginal_quantiles(q)

    def end_of_epoch(self, train_images: torch.Tensor) -> None:
        # Fixed seeds, so a resumed run fits the same mixture.
        g = torch.Generator(device=train_images.device).manual_seed(0)
        codes = self.codes(train_images[::FIT_STRIDE], g)
        self.code_prior.fit(codes, torch.Generator(device=codes.device).manual_seed(0), FIT_ITERATIONS)

    # --- losses -------------------------------------------------------------------------------

    def kl_weight(self, state: StepState | None) -> float:
        """The weight of L_prior in the encoder's loss at the training step `state` (None:
        outside training), as `GaussianVAE.kl_weight`: `config.beta` (1, the default, is the
        paper), reached linearly from 0 over the first `config.kl_warmup_steps` steps."""
        beta = self.config.beta
        return beta if state is None else beta * state.warmup_fraction(self.config.kl_warmup_steps)

    def losses(self, batch: Batch, state: StepState | None = None) -> dict[str, torch.Tensor]:
        """Every network's loss on the batch, from one forward pass of each network; `state` is
        the training step's (None outside training)."""
        x = batch.x
        c, b = self.config, len(x)
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar)
        z_p = torch.randn_like(z)
        # One decoder pass for reconstructions and samples, so batch norm sees both.
        logits = self.decoder(torch.cat([z, z_p]))  # (2B, 1, 28, 28)
        fakes = logits if c.fakes == "both" else logits[b:]  # (2B or B, 1, 28, 28)
        features, d_logits = self.discriminator(torch.cat([x, torch.sigmoid(fakes)]))  # (3B or 2B,)
        real_logits, fake_logits = d_logits[:b], d_logits[b:]

        kl = kl_normal(mu, logvar).mean()
        recon = bce_from_logits(logits[:b], x).mean()
        llike = c.pixel_weight * recon if c.objective == "full" else torch.zeros((), device=x.device)
        if c.feature_loss:
            f = features[c.feature_layer]
            # Gaussian log-likelihood of Dis_l(x) around Dis_l(x~), up to a constant (paper eq. 8).
            feature = 0.5 * (f[b:2 * b] - f[:b].detach()).pow(2).flatten(1).sum(1).mean()
            llike = llike + feature
        else:
            feature = torch.zeros((), device=x.device)
        return {
            "enc_loss": self.kl_weight(state) * kl + llike + (c.mmd_weight * mmd_imq(z, z_p) if c.mmd_weight else 0),
            "dec_loss": c.gamma * llike + generator_loss(fake_logits),
            "dis_loss": discriminator_loss(real_logits, fake_logits),
            "dis_acc_real": (real_logits > 0).float().mean(),
            "dis_acc_fake": (fake_logits < 0).float().mean(),
            "kl": kl, "recon": recon, "feature": feature,
            # the discriminator's cross-entropy on each set, for the equilibrium rule
            "dis_real_ce": nn.functional.softplus(-real_logits).mean(),
            "dis_fake_ce": nn.functional.softplus(fake_logits).mean(),
        }

    def equilibrium(self, real_ce: float, fake_ce: float) -> tuple[bool, bool]:
        """(train the decoder?, train the discriminator?) by the equilibrium rule, applied to the
        discriminator's mean cross-entropy over real and fake images."""
        c = self.config
        if c.margin is None:
            return True, True
        ce = 0.5 * (real_ce + fake_ce)
        return ce <= c.equilibrium + c.margin, ce >= c.equilibrium - c.margin

    def _output(self, t: dict[str, torch.Tensor], train_dec: bool, train_dis: bool) -> ModelOutput:
        terms = {n: t[n].detach() for n in self.term_names if n in t}
        terms["dec_updated"] = torch.tensor(float(train_dec), device=t["kl"].device)
        terms["dis_updated"] = torch.tensor(float(train_dis), device=t["kl"].device)
        # loss = the encoder's loss (weighted L_prior + L_llike [+ MMD]) + the discriminator's
        # cross-entropy (-L_GAN): one number to log
        loss = (t["enc_loss"] + t["dis_loss"]).detach()
        return ModelOutput(loss=loss, terms={n: terms[n] for n in self.term_names})

    def forward(self, batch: Batch, state: StepState | None = None) -> ModelOutput:
        t = self.losses(batch, state)
        train_dec, train_dis = self.equilibrium(t["dis_real_ce"].item(), t["dis_fake_ce"].item())
        return self._output(t, train_dec, train_dis)

    # --- training -----------------------------------------------------------------------------

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        # beta1 = 0.5, the usual choice for adversarial training (Radford et al. 2016)
        c = self.config
        scale = {"encoder": c.enc_lr_scale, "decoder": c.dec_lr_scale, "discriminator": c.dis_lr_scale}
        return {name: PackedAdam(net.parameters(), lr=lr * scale[name], betas=(0.5, 0.999))
                for name, net in self.networks().items()}

    def training_step(self, batch: Batch, optimizers: dict[str, torch.optim.Optimizer],
                      state: StepState) -> ModelOutput:
        t = self.losses(batch, state)
        # In data-parallel training every process decides from the cross-entropies averaged over
        # the processes, so all step the same optimizers (whose steps wait for each other).
        real_ce, fake_ce = global_mean(torch.stack([t["dis_real_ce"], t["dis_fake_ce"]]).detach()).tolist()
        train_dec, train_dis = self.equilibrium(real_ce, fake_ce)
        todo = [("encoder", t["enc_loss"])]
        if train_dec:
            todo.append(("decoder", t["dec_loss"]))
        if train_dis:
            todo.append(("discriminator", t["dis_loss"]))
        nets = self.networks()
        # All gradients first, each loss w.r.t. its own network only; then the steps.
        grads = {}
        for i, (name, loss) in enumerate(todo):
            params = list(nets[name].parameters())
            grads[name] = torch.autograd.grad(loss, params, retain_graph=i < len(todo) - 1)
        for name, g in grads.items():
            params = list(nets[name].parameters())
            for p, gp in zip(params, g):
                p.grad = gp
            if state.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, state.clip_grad, foreach=True)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return self._output(t, train_dec, train_dis)
