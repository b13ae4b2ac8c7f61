"""Building blocks shared by the models: MLP, convolutional and LSTM encoder trunks, Gaussian
heads, MLP and transposed-convolution decoders, and the discriminator."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28
# The hidden-layer nonlinearities an MLP may use, by the name a config gives.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(dims: list[int], final_activation: bool = False, activation: str = "relu") -> nn.Sequential:
    """Linear layers through `dims` with `activation` (a key of ACTIVATIONS) between them (and
    after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2 or final_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianHeads(nn.Module):
    """Two linear heads on a feature vector: mu and log sigma^2 of q(z|x)."""

    def __init__(self, in_features: int, latent_dim: int):
        super().__init__()
        self.mu = nn.Linear(in_features, latent_dim)
        self.logvar = nn.Linear(in_features, latent_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(h), self.logvar(h)


class SplitHeads(nn.Module):
    """mu and log sigma^2 as the two halves of the feature vector itself, no layer between: the
    "sampling straight from the LSTM's output" of a student's LSTM-VAE report."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar


class MLPEncoderTrunk(nn.Module):
    """(B, 1, 28, 28) -> (B, hidden_dims[-1]) features; the identity if no hidden layers.
    `extra_features`: a vector (B, E) joins the pixels at the input (a conditional VAE's one-hot
    label)."""

    def __init__(self, hidden_dims: list[int], extra_features: int = 0, activation: str = "relu"):
        super().__init__()
        self.net = mlp([IMAGE_PIXELS + extra_features, *hidden_dims], final_activation=True, activation=activation)
        self.out_features = hidden_dims[-1] if hidden_dims else IMAGE_PIXELS + extra_features

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        if extra is not None:
            h = torch.cat([h, extra.to(h.dtype)], 1)  # -> (B, 784 + E)
        return self.net(h)  # -> (B, H)


class MLPDecoder(nn.Module):
    """(B, D) -> (B, 1, 28, 28) logits through the reversed hidden sizes."""

    def __init__(self, latent_dim: int, hidden_dims: list[int], activation: str = "relu"):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden_dims), IMAGE_PIXELS], activation=activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)


def transposed_padding(kernel: int, stride: int) -> tuple[int, int]:
    """(padding, output_padding) that make ConvTranspose2d multiply the size by `stride` exactly.

    The output size is (n - 1) * s - 2p + k + op; it equals n * s when 2p - op = k - s.
    """
    p = (kernel - stride + 1) // 2
    return p, 2 * p - (kernel - stride)


def check_transposed_layers(channels: list[int], kernels: list[int], strides: list[int],
                            start_size: int) -> str | None:
    """Why a ConvDecoder with these settings cannot produce 28x28 images, or None if it can."""
    if not channels or not (len(channels) == len(kernels) == len(strides)):
        return "channels, kernels and strides must be non-empty lists of the same length"
    if min(channels) < 1 or min(strides) < 1 or start_size < 1:
        return "channels, strides and start size must be positive"
    for k, s in zip(kernels, strides):
        if k < s or (s == 1 and (k - s) % 2):
            return f"kernel {k} with stride {s} cannot scale a map exactly (need kernel >= stride, odd with stride 1)"
    size = start_size
    for s in strides:
        size *= s
    if size != 28:
        return f"start size {start_size} times the strides {strides} gives {size}, not 28"
    return None


class ConvDecoder(nn.Module):
    """(B, D) -> (B, 1, 28, 28) logits: a linear projection to a (channels[0], S, S) map, then one
    transposed convolution per entry of `channels`, each scaling the map by its stride; the last
    one outputs the single image channel."""

    def __init__(self, latent_dim: int, channels: list[int], kernels: list[int], strides: list[int],
                 start_size: int = 7, batch_norm: bool = False, dropout: float = 0.0,
                 project_norm: bool = False, hidden: int = 0, activation: Callable[[], nn.Module] = nn.ReLU):
        super().__init__()
        problem = check_transposed_layers(channels, kernels, strides, start_size)
        if problem:
            raise ValueError(problem)
        self.start_shape = (channels[0], start_size, start_size)
        width = channels[0] * start_size * start_size
        # project_norm: batch norm on the projected map too, as in DCGAN's generator (Radford et
        # al. 2016), so every layer of the decoder sees normalised inputs. hidden > 0: a fully
        # connected layer of that width before the projection, as InfoGAN's MNIST generator has
        # (Chen et al. 2016: 1024 units); for a 16-D code it nearly triples the decoder's
        # multiply-adds (1.8 to 4.9 million per image).
        norm = (lambda n: [nn.BatchNorm1d(n)]) if project_norm else (lambda n: [])
        first = [nn.Linear(latent_dim, hidden), *norm(hidden), activation()] if hidden else []
        self.project = nn.Sequential(*first, nn.Linear(hidden or latent_dim, width), *norm(width), activation())
        layers: list[nn.Module] = []
        outs = [*channels[1:], 1]
        for i, (c_in, c_out, k, s) in enumerate(zip(channels, outs, kernels, strides)):
            p, op = transposed_padding(k, s)
            layers.append(nn.ConvTranspose2d(c_in, c_out, k, s, p, output_padding=op))
            if i < len(channels) - 1:
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(activation())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, *self.start_shape)  # (B, D) -> (B, C, S, S)
        return self.net(h)  # -> (B, 1, 28, 28)


class LSTMEncoderTrunk(nn.Module):
    """Reads the 28 rows of an image as a sequence of 28-dim vectors: (B, 1, 28, 28) -> (B, H),
    the last hidden state. `extra_features`: a vector (B, E) is appended to every row, so each
    step of the sequence sees it (a conditional VAE's one-hot label)."""

    def __init__(self, hidden: int, extra_features: int = 0):
        super().__init__()
        self.lstm = nn.LSTM(input_size=28 + extra_features, hidden_size=hidden, batch_first=True)
        self.out_features = hidden

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        rows = x[:, 0]  # (B, 1, 28, 28) -> rows (B, 28, 28)
        if extra is not None:
            rows = torch.cat([rows, extra.to(rows.dtype)[:, None, :].expand(-1, 28, -1)], 2)  # -> (B, 28, 28 + E)
        _, (h, _) = self.lstm(rows)  # h: (1, B, H)
        return h[-1]


class ConvEncoderTrunk(nn.Module):
    """(B, 1, 28, 28) -> (B, fc) features: 4x4 stride-2 convolutions (28 -> 14 -> 7 ...), then a
    fully connected layer."""

    def __init__(self, channels: list[int], fc: int, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        size = 28
        for c_in, c_out in zip([1, *channels[:-1]], channels):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            size //= 2
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(channels[-1] * size * size, fc), nn.ReLU())
        self.out_features = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).flatten(1))  # (B, C, s, s) -> (B, C*s*s) -> (B, fc)


class Discriminator(nn.Module):
    """Image -> (hidden activations, real/fake logit). `conv` selects 4x4 stride-2 convolutions
    (the widths in `conv_channels`) before the fully connected layers `fc_dims`; without them it
    is an MLP on the 784 pixels. LeakyReLU throughout; no batch norm by default, so a real image's
    score does not depend on the fakes it is batched with. `batch_norm` adds it after every layer
    but the first, as InfoGAN's MNIST discriminator has it (Chen et al. 2016): then the real and
    fake images of a step are normalised together, as one batch.

    The hidden activations are what the feature-wise reconstruction loss compares (Larsen et al.
    2016, Dis_l): one entry per hidden layer, convolutions first."""

    def __init__(self, fc_dims: list[int], conv_channels: list[int] | None = None, spectral_norm: bool = False,
                 batch_norm: bool = False):
        super().__init__()
        # Spectral normalisation (Miyato et al. 2018) bounds each layer's Lipschitz constant, so the
        # discriminator's gradients stay informative instead of saturating as it wins.
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.layers = nn.ModuleList()
        size, c_prev = 28, 1

        def norm(kind: type[nn.Module], width: int) -> list[nn.Module]:
            return [kind(width)] if batch_norm and self.layers else []

        for c in conv_channels or []:
            self.layers.append(nn.Sequential(sn(nn.Conv2d(c_prev, c, 4, 2, 1)), *norm(nn.BatchNorm2d, c),
                                             nn.LeakyReLU(0.2)))
            size, c_prev = size // 2, c
        self.n_conv = len(conv_channels or [])
        d_prev = c_prev * size * size
        for d in fc_dims:
            self.layers.append(nn.Sequential(sn(nn.Linear(d_prev, d)), *norm(nn.BatchNorm1d, d), nn.LeakyReLU(0.2)))
            d_prev = d
        self.out = sn(nn.Linear(d_prev, 1))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = []
        h = x if self.n_conv else x.flatten(1)
        for i, layer in enumerate(self.layers):
            if i == self.n_conv and self.n_conv:
                h = h.flatten(1)  # (B, C, s, s) -> (B, C*s*s)
            h = layer(h)
            features.append(h)
        return features, self.out(h).squeeze(1)  # logits (B,)
