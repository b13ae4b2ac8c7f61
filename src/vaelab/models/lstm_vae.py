"""The LSTM-encoder VAE: an LSTM reads the image row by row, transposed convolutions draw it.

Encoder: one LSTM layer over the 28 rows (each a 28-dim vector); its last hidden state feeds the
mu and log sigma^2 heads. Decoder: z -> linear -> (64, 7, 7) -> ConvTranspose 4x4/2 -> (32, 14, 14)
-> ConvTranspose 4x4/2 -> (1, 28, 28) logits by default. Loss: BCE + KL as in the MLP VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from torch import nn

from ..config import require
from .blocks import ConvDecoder, GaussianHeads, LSTMEncoderTrunk, SplitHeads, check_transposed_layers
from .registry import register
from .vae import GaussianVAE, VAEObjective


DECODER_ACTIVATIONS = ("relu", "leaky_relu")


@dataclass
class LSTMVAEConfig(VAEObjective):
    """LSTM encoder, transposed-convolution decoder, Bernoulli likelihood."""

    latent_dim: int = 2
    lstm_hidden: int = 128
    # Decoder: feature-map channels after the projection and after each upsampling but the last;
    # one transposed convolution per entry, the last one producing the image.
    channels: list[int] = field(default_factory=lambda: [64, 32])
    kernels: list[int] = field(default_factory=lambda: [4, 4])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    start_size: int = 7  # side of the projected map; start_size * prod(strides) must be 28
    batch_norm: bool = False  # BatchNorm2d after each hidden transposed convolution
    dropout: float = 0.0  # dropout after each hidden transposed convolution
    # The decoder's nonlinearity: relu, or leaky_relu with slope `negative_slope` for x < 0.
    activation: str = "relu"
    negative_slope: float = 0.01
    # true: linear mu and log sigma^2 heads on the LSTM's last hidden state; false: its two halves
    # are mu and log sigma^2 themselves (needs lstm_hidden = 2 * latent_dim).
    fc_heads: bool = True

    def validate(self) -> None:
        require(self.latent_dim >= 1, "latent_dim must be at least 1")
        require(self.lstm_hidden >= 1, "lstm_hidden must be at least 1")
        require(self.activation in DECODER_ACTIVATIONS,
                f"activation must be one of {', '.join(DECODER_ACTIVATIONS)}")
        require(self.negative_slope >= 0, "negative_slope must be non-negative")
        require(self.fc_heads or self.lstm_hidden == 2 * self.latent_dim,
                f"fc_heads=false takes mu and log sigma^2 as the halves of the LSTM's state: lstm_hidden must be "
                f"2 * latent_dim = {2 * self.latent_dim}")
        problem = check_transposed_layers(self.channels, self.kernels, self.strides, self.start_size)
        require(problem is None, f"decoder: {problem}")
        require(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        self.validate_objective()


@register("lstm-vae")
class LSTMVAE(GaussianVAE):
    config_class = LSTMVAEConfig
    description = "LSTM encoder over the 28 rows, transposed-convolution decoder: BCE + KL"

    def __init__(self, config: LSTMVAEConfig):
        super().__init__(config)
        self.trunk = LSTMEncoderTrunk(config.lstm_hidden)
        self.heads = GaussianHeads(self.trunk.out_features, config.latent_dim) if config.fc_heads else SplitHeads()
        activation = (partial(nn.LeakyReLU, config.negative_slope) if config.activation == "leaky_relu"
                      else nn.ReLU)
        self.decoder = ConvDecoder(config.latent_dim, config.channels, config.kernels, config.strides,
                                   config.start_size, config.batch_norm, config.dropout, activation=activation)
