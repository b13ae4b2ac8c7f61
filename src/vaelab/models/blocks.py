"""Building blocks shared by the models: MLP encoders and decoders (more arrive with each model)."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28


def mlp(dims: list[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers through `dims` with ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GaussianHeads(nn.Module):
    """Two linear heads on a feature vector: mu and log sigma^2 of q(z|x)."""

    def __init__(self, in_features: int, latent_dim: int):
        super().__init__()
        self.mu = nn.Linear(in_features, latent_dim)
        self.logvar = nn.Linear(in_features, latent_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(h), self.logvar(h)


class MLPEncoderTrunk(nn.Module):
    """(B, 1, 28, 28) -> (B, hidden_dims[-1]) features; the identity if no hidden layers."""

    def __init__(self, hidden_dims: list[int]):
        super().__init__()
        self.net = mlp([IMAGE_PIXELS, *hidden_dims], final_activation=True)
        self.out_features = hidden_dims[-1] if hidden_dims else IMAGE_PIXELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, 1, 28, 28) -> (B, 784) -> (B, H)


class MLPDecoder(nn.Module):
    """(B, D) -> (B, 1, 28, 28) logits through the reversed hidden sizes."""

    def __init__(self, latent_dim: int, hidden_dims: list[int]):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden_dims), IMAGE_PIXELS])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)
