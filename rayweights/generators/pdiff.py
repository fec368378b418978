"""p-diff parameter autoencoder (Wang et al. 2024, Sec. 2.3 and App. C.1/C.3).

A 4-layer 1-D CNN encoder and decoder over the flattened parameter vector; each layer is two 1-D
convolutions, each followed by a normalisation (instance or group norm — p-diff's ablation favours
both over batch norm) and a LeakyReLU.  The encoder folds the length by ``fold`` per layer, the
decoder unfolds it with transposed convolutions; no output activation (weights are not squashed).

Noise augmentation (training only): Gaussian noise of amplitude ``input_noise`` (1e-3) on the
input parameters and ``latent_noise`` (1e-1) on the latent representation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .layers import norm_groups

__all__ = ["PDiffAutoencoder"]


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm1d(ch, affine=True)
    if kind == "group":
        return nn.GroupNorm(norm_groups(ch, 8), ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: {kind!r} is not instance, group or none")


class PDiffAutoencoder(ModelMixin, ConfigMixin):
    """x [B, in_dim] -> latent [B, latent_channels, latent_length] -> x_hat [B, in_dim]."""

    @register_to_config
    def __init__(self, in_dim: int = 1024, channels: tuple = (64, 128, 256, 256), latent_channels: int = 4,
                 fold: int = 2, kernel_size: int = 5, norm: str = "instance", input_noise: float = 1e-3,
                 latent_noise: float = 1e-1, negative_slope: float = 0.2):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels: p-diff uses a 4-layer encoder/decoder, got {len(channels)} entries")
        if in_dim < 1:
            raise ValueError(f"in_dim: must be >= 1, got {in_dim}")
        f4 = fold ** 4
        self.latent_length = max(2, -(-in_dim // f4))          # >= 2 so instance norm is defined
        self.padded_dim = self.latent_length * f4
        pad, act = kernel_size // 2, lambda: nn.LeakyReLU(negative_slope)
        enc, c_in = [], 1
        for c in channels:
            enc += [nn.Conv1d(c_in, c, kernel_size, stride=fold, padding=pad) if fold > 1 else
                    nn.Conv1d(c_in, c, kernel_size, padding=pad), _norm(norm, c), act(),
                    nn.Conv1d(c, c, kernel_size, padding=pad), _norm(norm, c), act()]
            c_in = c
        self.encoder = nn.Sequential(*enc)
        self.to_latent = nn.Conv1d(c_in, latent_channels, 1)
        self.from_latent = nn.Conv1d(latent_channels, c_in, 1)
        dec = []
        for c in reversed(channels):
            dec += [nn.ConvTranspose1d(c_in, c, fold, stride=fold), _norm(norm, c), act(),
                    nn.Conv1d(c, c, kernel_size, padding=pad), _norm(norm, c), act()]
            c_in = c
        self.decoder = nn.Sequential(*dec)
        self.conv_out = nn.Conv1d(c_in, 1, kernel_size, padding=pad)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.latent_channels, self.latent_length)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.config.in_dim:
            raise ValueError(f"x: shape {tuple(x.shape)} is not [B, in_dim={self.config.in_dim}]")
        return x

    def encode(self, x: torch.Tensor, noise: bool = False) -> torch.Tensor:
        x = self._check(x).to(self.to_latent.weight.dtype)
        if noise and self.config.input_noise > 0:
            x = x + torch.randn_like(x) * self.config.input_noise
        h = F.pad(x, (0, self.padded_dim - x.shape[1])).unsqueeze(1)
        z = self.to_latent(self.encoder(h))
        if noise and self.config.latent_noise > 0:
            z = z + torch.randn_like(z) * self.config.latent_noise
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder(self.from_latent(z.to(self.from_latent.weight.dtype)))
        return self.conv_out(h)[:, 0, : self.config.in_dim]

    def forward(self, x: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        """Reconstruction; noise augmentation when training (``noise=None``) or if asked."""
        return self.decode(self.encode(x, noise=self.training if noise is None else noise))
