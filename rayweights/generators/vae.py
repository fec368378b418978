"""D2NWG weight VAE (Soro et al., Sec. 3.2 and App. E): the latent-diffusion VAE with linear adapters.

A linear layer before the encoder maps the vectorised weights ``[B, in_dim]`` to a
``[B, adapter_channels, adapter_length]`` map (lifted to ``hidden_channels[0]`` by a convolution) for
the convolutional encoder (ResBlocks +
downsampling -> mean and log-variance of ``[B, latent_channels, latent_length]``); the decoder
mirrors it and a last linear layer maps back to ``in_dim``.  Loss (eq. 1): reconstruction + KL to
N(0, I) with weight ``kl_weight`` (1e-6).  No discriminator (removed, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .layers import Downsample1D, ResBlock1D, Upsample1D, group_norm

__all__ = ["WeightVAE"]


class WeightVAE(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_dim: int = 1024, adapter_length: int = 64, hidden_channels: tuple = (32, 64, 128),
                 latent_channels: int = 4, layers_per_block: int = 1, kl_weight: float = 1e-6,
                 adapter_channels: int = 4, max_groups: int = 32):
        super().__init__()
        levels = len(hidden_channels)
        if adapter_length % (2 ** (levels - 1)):
            raise ValueError(f"adapter_length {adapter_length} must be divisible by 2^{levels - 1}")
        c0 = hidden_channels[0]
        self.latent_length = adapter_length // 2 ** (levels - 1)
        self.adapter_in = nn.Linear(in_dim, adapter_channels * adapter_length)
        self.lift = nn.Conv1d(adapter_channels, c0, 3, padding=1)
        enc, ch = [], c0
        for i, c in enumerate(hidden_channels):
            for _ in range(layers_per_block):
                enc.append(ResBlock1D(ch, c, None, max_groups=max_groups))
                ch = c
            if i < levels - 1:
                enc.append(Downsample1D(ch))
        self.encoder = nn.ModuleList(enc)
        self.enc_out = nn.Sequential(group_norm(ch, max_groups), nn.SiLU(), nn.Conv1d(ch, 2 * latent_channels, 3, padding=1))
        self.dec_in = nn.Conv1d(latent_channels, ch, 3, padding=1)
        dec = []
        for i, c in reversed(list(enumerate(hidden_channels))):
            for _ in range(layers_per_block):
                dec.append(ResBlock1D(ch, c, None, max_groups=max_groups))
                ch = c
            if i > 0:
                dec.append(Upsample1D(ch))
        self.decoder = nn.ModuleList(dec)
        self.dec_out = nn.Sequential(group_norm(ch, max_groups), nn.SiLU(), nn.Conv1d(ch, adapter_channels, 3, padding=1))
        self.adapter_out = nn.Linear(adapter_channels * adapter_length, in_dim)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.latent_channels, self.latent_length)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean, logvar), each [B, latent_channels, latent_length]."""
        if x.dim() != 2 or x.shape[1] != self.config.in_dim:
            raise ValueError(f"x: shape {tuple(x.shape)} is not [B, in_dim={self.config.in_dim}]")
        h = self.lift(self.adapter_in(x.to(self.adapter_in.weight.dtype)).view(x.shape[0], self.config.adapter_channels, -1))
        for layer in self.encoder:
            h = layer(h)
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z.to(self.dec_in.weight.dtype))
        for layer in self.decoder:
            h = layer(h)
        return self.adapter_out(self.dec_out(h).flatten(1))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample_posterior else mean
        return self.decode(z), mean, logvar

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Eq. 1: mean squared reconstruction error (over real weights) + kl_weight * KL / in_dim
        (the KL summed over latent dimensions, as in the LDM VAE, on the per-weight scale)."""
        recon, mean, logvar = self(x)
        err = (recon.float() - x.float()) ** 2
        rec = (err * mask).sum() / mask.sum().clamp_min(1) if mask is not None else err.mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1).mean()
        return rec + self.config.kl_weight * kl / self.config.in_dim, {"recon": rec.detach(), "kl": kl.detach()}
