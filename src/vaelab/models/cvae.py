"""The conditional VAE (Sohn et al. 2015, "Learning structured output representation using deep
conditional generative models"): q(z|x, y) and p(x|z, y), with the label y as a one-hot vector
into the encoder and the decoder, and the prior p(z) = N(0, I) independent of y.

Because the decoder is told the class, the code z need not carry it: z holds the style (slant,
thickness, ...) and one z decoded with each of the ten labels draws the ten classes in one style.
Asking for a class is then a matter of passing the label, not of finding the class's region of
the latent space.

Encoder: the MLP (the one-hot joins the 784 pixels) or the LSTM over the rows (the one-hot joins
every row); decoder: the MLP or the transposed convolutions, each fed [z, one-hot]. The objective
and its options (warm-up, free bits, IWAE) are every Gaussian VAE's (`VAEObjective`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option, require
from ..errors import ConfigError
from .base import Posterior
from .blocks import (ConvDecoder, GaussianHeads, LSTMEncoderTrunk, MLPDecoder, MLPEncoderTrunk,
                     check_transposed_layers)
from .registry import register
from .vae import GaussianVAE, VAEObjective

ENCODERS = ("mlp", "lstm")
DECODERS = ("mlp", "conv")


@dataclass
class CVAEConfig(VAEObjective):
    """Conditional VAE: the label into both networks, a Bernoulli decoder."""

    # 2 by default, measured (README): a larger code keeps some of the class itself, so a prior
    # draw decoded with label k lands where another class's codes lie and draws that class
    # (MNIST, 10 epochs: 96 % of samples judged the asked digit at 2, 92 % at 4, 81 % at 8, 71 % at 16).
    latent_dim: int = option(2, "latent size: the style the label leaves out (a larger code also keeps "
                                "some of the class, and samples stray from the asked one)")
    n_classes: int = option(10, "number of labels (the one-hot's length)")
    encoder: str = option("mlp", "mlp (the one-hot joins the pixels) or lstm (it joins every row)")
    decoder: str = option("mlp", "mlp or conv (transposed convolutions); either reads [z, one-hot]")
    hidden_dims: list[int] = option([512], "encoder=mlp: hidden widths; decoder=mlp mirrors them")
    lstm_hidden: int = option(128, "encoder=lstm: the LSTM's hidden size")
    channels: list[int] = option([64, 32], "decoder=conv: channels after the projection and after each "
                                           "upsampling but the last (one transposed convolution each)")
    kernels: list[int] = option([4, 4], "decoder=conv: kernel size of each transposed convolution")
    strides: list[int] = option([2, 2], "decoder=conv: stride of each transposed convolution")
    start_size: int = option(7, "decoder=conv: side of the projected map; start_size * prod(strides) = 28")

    def validate(self) -> None:
        require(self.latent_dim >= 1, "latent_dim must be at least 1")
        require(self.n_classes >= 2, "n_classes must be at least 2")
        require(self.encoder in ENCODERS, f"encoder must be one of {', '.join(ENCODERS)}")
        require(self.decoder in DECODERS, f"decoder must be one of {', '.join(DECODERS)}")
        require(all(h >= 1 for h in self.hidden_dims), "hidden_dims must be positive")
        require(self.lstm_hidden >= 1, "lstm_hidden must be at least 1")
        if self.decoder == "conv":
            problem = check_transposed_layers(self.channels, self.kernels, self.strides, self.start_size)
            require(problem is None, f"decoder: {problem}")
        self.validate_objective()


@register("cvae")
class CVAE(GaussianVAE):
    config_class = CVAEConfig
    description = "conditional VAE (Sohn et al. 2015), 784+10-512-2: the label one-hot into encoder and decoder"
    conditional = True

    def __init__(self, config: CVAEConfig):
        super().__init__(config)
        c = config.n_classes
        if config.encoder == "mlp":
            self.trunk = MLPEncoderTrunk(config.hidden_dims, extra_features=c)
        else:
            self.trunk = LSTMEncoderTrunk(config.lstm_hidden, extra_features=c)
        self.heads = GaussianHeads(self.trunk.out_features, config.latent_dim)
        if config.decoder == "mlp":
            self.decoder = MLPDecoder(config.latent_dim + c, config.hidden_dims)
        else:
            self.decoder = ConvDecoder(config.latent_dim + c, config.channels, config.kernels, config.strides,
                                       config.start_size)
        # Rows of the identity are the one-hot codes; indexing it needs no device sync (F.one_hot
        # checks the labels' range on the host every call). Not persistent: nothing to store.
        self.register_buffer("one_hot_codes", torch.eye(c), persistent=False)

    def one_hot(self, condition: torch.Tensor | None) -> torch.Tensor:
        """(B,) int64 labels -> (B, n_classes) one-hot rows."""
        if condition is None:
            raise ConfigError(f"{self.name} is conditional: pass condition= (B,) class labels "
                              f"in 0..{self.config.n_classes - 1}")
        return self.one_hot_codes[condition]

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> Posterior:
        mu, logvar = self.heads(self.trunk(x, self.one_hot(condition)))
        return Posterior(mu, logvar)

    def decode_logits(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        y = self.one_hot(condition).to(z.dtype)
        if len(y) != len(z):
            raise ConfigError(f"{self.name}: {len(z)} codes but {len(y)} labels")
        return self.decoder(torch.cat([z, y], 1))  # (B, D + C) -> (B, 1, 28, 28)
