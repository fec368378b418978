"""BlockUNet1D — the Denoised Neural Weights generator (Gong et al., ECCV 2024, Fig. 2).

A 1-D UNet over one weight block ``w_n`` (``block_size`` values): ResBlocks that take
``emb = emb_t + emb_n`` (timestep embedding + the block-index embedding of eq. 2) and transformer
blocks with self-attention and cross-attention to the text condition ``tau(T)``.  It predicts the
noise (eq. 1); one-step direct recovery (eq. 3) and DDIM/DDPM sampling live in the method object.

The text condition is either a pooled embedding ``[B, D]`` (the cached mean-pooled prompt
embedding), which a learned projection turns into ``context_tokens`` key/value tokens, or token
states ``[B, T, D]`` used as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..conditioning import BlockIndexEmbedding
from .layers import Downsample1D, ResBlock1D, Transformer1D, Upsample1D, group_norm, timestep_embedding_modules

__all__ = ["BlockUNet1D"]


class BlockUNet1D(ModelMixin, ConfigMixin):
    """eps_theta(w_n^t, t, n, tau(T)) over blocks of ``block_size``.

    forward(sample [B, block_size], timestep [B], block_index [B], encoder_hidden_states
    [B, D] | [B, T, D] | None) -> predicted noise [B, block_size]."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, block_size: int = 256, block_channels: tuple = (64, 128, 256), layers_per_block: int = 2,
                 attention_levels: tuple = (False, True, True), num_heads: int = 4,
                 cross_attention_dim: int | None = 384, context_tokens: int = 4, emb_dim: int | None = None,
                 index_encoding_dim: int = 128, dropout: float = 0.0, max_groups: int = 32,
                 mid_attention: bool = True):
        super().__init__()
        levels = len(block_channels)
        if len(attention_levels) != levels:
            raise ValueError(f"attention_levels: {len(attention_levels)} entries for {levels} block_channels")
        if block_size % (2 ** (levels - 1)):
            raise ValueError(f"block_size {block_size} must be divisible by 2^{levels - 1} "
                             f"(the UNet has {levels} levels)")
        ch0 = block_channels[0]
        emb_dim = emb_dim or 4 * ch0
        self.time_proj, self.time_embedding = timestep_embedding_modules(ch0, emb_dim)
        self.block_embedding = BlockIndexEmbedding(index_encoding_dim, emb_dim)
        ctx = cross_attention_dim or None
        self.context_proj = nn.Linear(ctx, ctx * context_tokens) if ctx else None
        self.context_pos = nn.Parameter(torch.zeros(1, context_tokens, ctx)) if ctx else None
        self.conv_in = nn.Conv1d(1, ch0, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch0]
        ch = ch0
        for i, out_ch in enumerate(block_channels):
            level = nn.ModuleList()
            for _ in range(layers_per_block):
                level.append(ResBlock1D(ch, out_ch, emb_dim, dropout, max_groups=max_groups))
                ch = out_ch
                if attention_levels[i]:
                    level.append(Transformer1D(ch, num_heads, ctx, max_groups))
                skips.append(ch)
            if i < levels - 1:
                level.append(Downsample1D(ch))
                skips.append(ch)
            self.down.append(level)

        self.mid = nn.ModuleList([ResBlock1D(ch, ch, emb_dim, dropout, max_groups=max_groups)])
        if mid_attention:
            self.mid.append(Transformer1D(ch, num_heads, ctx, max_groups))
        self.mid.append(ResBlock1D(ch, ch, emb_dim, dropout, max_groups=max_groups))

        self.up = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(block_channels))):
            level = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                level.append(ResBlock1D(ch + skips.pop(), out_ch, emb_dim, dropout, max_groups=max_groups))
                ch = out_ch
                if attention_levels[i]:
                    level.append(Transformer1D(ch, num_heads, ctx, max_groups))
            if i > 0:
                level.append(Upsample1D(ch))
            self.up.append(level)
        self.norm_out = group_norm(ch, max_groups)
        self.conv_out = nn.Conv1d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ helpers
    def _context(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if self.context_proj is None or cond is None:
            return None
        cond = cond.to(self.context_proj.weight.dtype)
        if cond.dim() == 1:
            cond = cond.unsqueeze(0)
        if cond.shape[0] == 1 and batch > 1:
            cond = cond.expand(batch, *cond.shape[1:])
        D = self.config.cross_attention_dim
        if cond.shape[-1] != D:
            raise ValueError(f"encoder_hidden_states: last dim {cond.shape[-1]} != cross_attention_dim {D}")
        if cond.dim() == 2:
            return self.context_proj(cond).view(cond.shape[0], self.config.context_tokens, D) + self.context_pos
        return cond

    def _run(self, layer, h, emb, ctx):
        if isinstance(layer, ResBlock1D):
            fn = lambda a, b: layer(a, b)
            args = (h, emb)
        elif isinstance(layer, Transformer1D):
            fn = lambda a, b: layer(a, b)
            args = (h, ctx)
        else:
            return layer(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, block_index: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        squeeze = sample.dim() == 2
        x = sample.unsqueeze(1) if squeeze else sample
        B, _, L = x.shape
        if L != self.config.block_size:
            raise ValueError(f"sample: block size {L} != the generator's block_size {self.config.block_size}")
        dtype = self.conv_in.weight.dtype
        t = timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep.reshape(B)
        n = block_index.reshape(-1).expand(B) if block_index.numel() == 1 else block_index.reshape(B)
        emb = self.time_embedding(self.time_proj(t).to(dtype)) + self.block_embedding(n)   # emb = emb_t + emb_n
        ctx = self._context(encoder_hidden_states, B)

        h = self.conv_in(x.to(dtype))
        hs = [h]
        for level in self.down:
            for layer in level:
                h = self._run(layer, h, emb, ctx)
                if not isinstance(layer, Transformer1D):
                    hs.append(h)
                else:
                    hs[-1] = h
        for layer in self.mid:
            h = self._run(layer, h, emb, ctx)
        for level in self.up:
            for layer in level:
                if isinstance(layer, ResBlock1D):
                    h = torch.cat([h, hs.pop()], dim=1)
                h = self._run(layer, h, emb, ctx)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, 0] if squeeze else out
