"""LatentDenoiser1D — the latent-space DDPM noise predictor of p-diff and D2NWG.

A 1-D CNN UNet over latents ``[B, latent_channels, latent_length]``: a 4-level encoder and
decoder of ResBlocks (each takes the timestep embedding) with skip connections, halving the length
at a level when it is even and >= 4.  Optional dataset conditioning as in D2NWG: the condition
vector is projected to ``cond_channels`` extra input channels and *concatenated* to ``z_t``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .layers import Downsample1D, ResBlock1D, Transformer1D, Upsample1D, group_norm, timestep_embedding_modules

__all__ = ["LatentDenoiser1D"]


class LatentDenoiser1D(ModelMixin, ConfigMixin):
    """eps_psi(z_t, t[, z_D]) -> predicted noise, same shape as ``z_t``."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, latent_length: int = 64, channels: tuple = (64, 128, 256, 256),
                 layers_per_block: int = 1, cond_dim: int = 0, cond_channels: int = 1, emb_dim: int | None = None,
                 mid_attention_heads: int = 0, dropout: float = 0.0, max_groups: int = 32):
        super().__init__()
        ch0 = channels[0]
        emb_dim = emb_dim or 4 * ch0
        self.time_proj, self.time_embedding = timestep_embedding_modules(ch0, emb_dim)
        self.cond_proj = nn.Linear(cond_dim, cond_channels * latent_length) if cond_dim > 0 else None
        in_ch = latent_channels + (cond_channels if cond_dim > 0 else 0)
        self.conv_in = nn.Conv1d(in_ch, ch0, 3, padding=1)
        length, self.resample = latent_length, []
        for i in range(len(channels) - 1):
            do = length % 2 == 0 and length >= 4
            self.resample.append(do)
            length = length // 2 if do else length
        self.down, skips, ch = nn.ModuleList(), [ch0], ch0
        for i, out_ch in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(layers_per_block):
                level.append(ResBlock1D(ch, out_ch, emb_dim, dropout, max_groups=max_groups))
                ch = out_ch
                skips.append(ch)
            if i < len(channels) - 1:
                level.append(Downsample1D(ch) if self.resample[i] else nn.Identity())
                skips.append(ch)
            self.down.append(level)
        self.mid1 = ResBlock1D(ch, ch, emb_dim, dropout, max_groups=max_groups)
        self.mid_attn = Transformer1D(ch, mid_attention_heads, None, max_groups) if mid_attention_heads else None
        self.mid2 = ResBlock1D(ch, ch, emb_dim, dropout, max_groups=max_groups)
        self.up = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(channels))):
            level = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                level.append(ResBlock1D(ch + skips.pop(), out_ch, emb_dim, dropout, max_groups=max_groups))
                ch = out_ch
            if i > 0:
                level.append(Upsample1D(ch) if self.resample[i - 1] else nn.Identity())
            self.up.append(level)
        self.norm_out = group_norm(ch, max_groups)
        self.conv_out = nn.Conv1d(ch, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        B, C, L = sample.shape
        if (C, L) != (self.config.latent_channels, self.config.latent_length):
            raise ValueError(f"sample: latent shape {(C, L)} != ({self.config.latent_channels}, "
                             f"{self.config.latent_length})")
        dtype = self.conv_in.weight.dtype
        t = timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep.reshape(B)
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        x = sample.to(dtype)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("cond: this denoiser is dataset-conditioned (cond_dim > 0); pass the embedding")
            c = cond.to(dtype).reshape(-1, self.config.cond_dim)
            c = c.expand(B, -1) if c.shape[0] == 1 else c
            x = torch.cat([x, self.cond_proj(c).view(B, self.config.cond_channels, L)], dim=1)   # concatenation
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for layer in level:
                h = layer(h, emb) if isinstance(layer, ResBlock1D) else layer(h)
                hs.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for level in self.up:
            for layer in level:
                if isinstance(layer, ResBlock1D):
                    h = layer(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
