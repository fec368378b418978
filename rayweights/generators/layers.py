"""1-D building blocks shared by the generators: ResBlocks with an embedding, transformer blocks
with self- and cross-attention (PyTorch SDPA, flash/memory-efficient kernels on GPU), resampling."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffusers.models.embeddings import TimestepEmbedding, Timesteps


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels, max_groups), channels, eps=1e-6)


class ResBlock1D(nn.Module):
    """GN -> SiLU -> Conv -> (+ Linear(emb)) -> GN -> SiLU -> Dropout -> Conv, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, dropout: float = 0.0,
                 kernel_size: int = 3, max_groups: int = 32):
        super().__init__()
        pad = kernel_size // 2
        self.norm1 = group_norm(in_ch, max_groups)
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel_size, padding=pad)
        self.emb = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch, max_groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(out_ch, out_ch, kernel_size, padding=pad)
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        kv = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv, dim, bias=False)
        self.to_v = nn.Linear(kv, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` [B, T] bool: True where a key/value token may be attended to (padding False;
        every row needs at least one True)."""
        B, N, C = x.shape
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        sh = lambda t: t.reshape(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]      # [B, 1, 1, T]: all heads, queries
        out = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class Transformer1D(nn.Module):
    """Over the length of a [B, C, L] map: self-attention, cross-attention to ``context``
    [B, T, context_dim] (skipped when the generator is unconditioned; ``context_mask`` [B, T] bool
    masks padding tokens out of it), GEGLU feed-forward."""

    def __init__(self, channels: int, heads: int, context_dim: int | None, max_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, max_groups)
        self.proj_in = nn.Linear(channels, channels)
        self.ln1, self.attn1 = nn.LayerNorm(channels), Attention(channels, heads)
        self.ln2 = nn.LayerNorm(channels) if context_dim else None
        self.attn2 = Attention(channels, heads, context_dim) if context_dim else None
        self.ln3, self.ff = nn.LayerNorm(channels), GEGLU(channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj_in(self.norm(x).transpose(1, 2))
        h = h + self.attn1(self.ln1(h))
        if self.attn2 is not None and context is not None:
            h = h + self.attn2(self.ln2(h), context, context_mask)
        h = h + self.ff(self.ln3(h))
        return x + self.proj_out(h).transpose(1, 2)


class Downsample1D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def timestep_embedding_modules(base_channels: int, emb_dim: int):
    """diffusers' sinusoidal ``Timesteps`` + ``TimestepEmbedding`` MLP -> ``emb_t``."""
    return Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0), \
        TimestepEmbedding(base_channels, emb_dim)
