"""BlockUNet1D — the Denoised Neural Weights generator (Gong et al., ECCV 2024, Fig. 2).

A 1-D UNet over one weight block ``w_n`` (``block_size`` values): ResBlocks that take
``emb = emb_t + emb_n`` (timestep embedding + the block-index embedding of eq. 2) and transformer
blocks with self-attention and cross-attention to the text condition ``tau(T)``.  It predicts the
noise (eq. 1); one-step direct recovery (eq. 3) and DDIM/DDPM sampling live in the method object.

The text condition ``tau(T)`` comes in one of two ``condition_mode``s:

* ``"pooled"`` (the default; every config saved before the option loads as this): a pooled prompt
  embedding ``[B, D]``, which a learned projection turns into ``context_tokens`` key/value tokens
  for the cross-attention (token states ``[B, T, D]`` given instead are used as they are);
* ``"tokens"``: the cross-attention attends to the prompt's own token states ``[B, T, D]`` (the text
  encoder's last hidden states) under their key padding mask ``[B, T]`` (padding never changes the
  output), and a projection of the pooled prompt vector ``[B, pooled_dim]`` joins the embedding the
  ResBlocks take: ``emb = emb_t + emb_n + emb_c``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..conditioning import BlockIndexEmbedding
from diffusers.models.embeddings import TimestepEmbedding

from .layers import Downsample1D, ResBlock1D, Transformer1D, Upsample1D, group_norm, timestep_embedding_modules

__all__ = ["BlockUNet1D", "CONDITION_MODES"]

CONDITION_MODES = ("pooled", "tokens")


class BlockUNet1D(ModelMixin, ConfigMixin):
    """eps_theta(w_n^t, t, n, tau(T)) over blocks of ``block_size``.

    forward(sample [B, block_size], timestep [B], block_index [B], encoder_hidden_states
    [B, D] | [B, T, D] | None, encoder_attention_mask [B, T] | None, pooled_projections
    [B, pooled_dim] | None) -> predicted noise [B, block_size].

    ``condition_mode``: ``"pooled"`` or ``"tokens"`` (module docstring); ``pooled_dim``: width of
    the pooled vector in tokens mode (None: ``cross_attention_dim``); ``context_tokens`` only
    matters in pooled mode."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, block_size: int = 256, block_channels: tuple = (64, 128, 256), layers_per_block: int = 2,
                 attention_levels: tuple = (False, True, True), num_heads: int = 4,
                 cross_attention_dim: int | None = 384, context_tokens: int = 4, emb_dim: int | None = None,
                 index_encoding_dim: int = 128, dropout: float = 0.0, max_groups: int = 32,
                 mid_attention: bool = True, condition_mode: str = "pooled", pooled_dim: int | None = None):
        super().__init__()
        if condition_mode not in CONDITION_MODES:
            raise ValueError(f"condition_mode: {condition_mode!r} is not one of {list(CONDITION_MODES)}")
        if condition_mode == "tokens" and not cross_attention_dim:
            raise ValueError("condition_mode: 'tokens' needs a cross_attention_dim (the token width)")
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
        pooled = ctx if condition_mode == "pooled" else None
        self.context_proj = nn.Linear(ctx, ctx * context_tokens) if pooled else None
        self.context_pos = nn.Parameter(torch.zeros(1, context_tokens, ctx)) if pooled else None
        # tokens mode: emb_c, the pooled prompt vector's share of the ResBlocks' embedding
        self.pooled_embedding = (TimestepEmbedding(pooled_dim or ctx, emb_dim) if condition_mode == "tokens"
                                 else None)
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
    @staticmethod
    def _batched(x: torch.Tensor, dims: int, batch: int) -> torch.Tensor:
        """``x`` with a batch dimension (added if missing), broadcast from 1 row to ``batch``."""
        if x.dim() == dims - 1:
            x = x.unsqueeze(0)
        if x.shape[0] == 1 and batch > 1:
            x = x.expand(batch, *x.shape[1:])
        return x

    def _context(self, cond, mask, pooled, batch: int):
        """(cross-attention context [B, T, D] | None, its key mask [B, T] | None, emb_c | None)."""
        D = self.config.cross_attention_dim
        tokens_mode = self.config.condition_mode == "tokens"
        if not D or cond is None:
            return None, None, None
        if tokens_mode and cond.dim() != 3:
            raise ValueError(f"encoder_hidden_states: condition_mode 'tokens' takes token states [B, T, {D}], "
                             f"got {tuple(cond.shape)}")
        if tokens_mode and pooled is None:
            raise ValueError("pooled_projections: required with condition_mode 'tokens' (the pooled prompt vector)")
        if not tokens_mode and pooled is not None:
            raise ValueError("pooled_projections: only taken with condition_mode 'tokens'")
        dtype = self.conv_in.weight.dtype
        cond = self._batched(cond.to(dtype), 2 if cond.dim() <= 2 else 3, batch)
        if cond.shape[-1] != D:
            raise ValueError(f"encoder_hidden_states: last dim {cond.shape[-1]} != cross_attention_dim {D}")
        if cond.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states: {cond.shape[0]} rows for a batch of {batch}")
        if cond.dim() == 2:                        # pooled mode: learned tokens from the pooled vector
            return self.context_proj(cond).view(batch, self.config.context_tokens, D) + self.context_pos, None, None
        if mask is not None:
            mask = self._batched(mask.to(device=cond.device, dtype=torch.bool), 2, batch)
            if tuple(mask.shape) != tuple(cond.shape[:2]):
                raise ValueError(f"encoder_attention_mask: shape {tuple(mask.shape)} does not match the tokens "
                                 f"{tuple(cond.shape[:2])}")
            # a row with no token at all (never a real prompt) attends to position 0 instead of giving NaN
            mask = torch.cat([mask[:, :1] | ~mask.any(1, keepdim=True), mask[:, 1:]], dim=1)
        emb_c = None
        if tokens_mode:
            pooled = self._batched(pooled.to(dtype), 2, batch)
            want = self.pooled_embedding.linear_1.in_features
            if tuple(pooled.shape) != (batch, want):
                raise ValueError(f"pooled_projections: shape {tuple(pooled.shape)} is not [{batch}, {want}]")
            emb_c = self.pooled_embedding(pooled)
        return cond, mask, emb_c

    def _run(self, layer, h, emb, ctx, mask):
        if isinstance(layer, ResBlock1D):
            fn = lambda a, b: layer(a, b)
            args = (h, emb)
        elif isinstance(layer, Transformer1D):
            fn = lambda a, b, c: layer(a, b, c)
            args = (h, ctx, mask)
        else:
            return layer(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, block_index: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None) -> torch.Tensor:
        """``encoder_attention_mask``: True on real tokens (padding False); ``pooled_projections``:
        the pooled prompt vector, required (and only taken) in ``condition_mode`` ``"tokens"``."""
        squeeze = sample.dim() == 2
        x = sample.unsqueeze(1) if squeeze else sample
        B, _, L = x.shape
        if L != self.config.block_size:
            raise ValueError(f"sample: block size {L} != the generator's block_size {self.config.block_size}")
        dtype = self.conv_in.weight.dtype
        t = timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep.reshape(B)
        n = block_index.reshape(-1).expand(B) if block_index.numel() == 1 else block_index.reshape(B)
        emb = self.time_embedding(self.time_proj(t).to(dtype)) + self.block_embedding(n)   # emb = emb_t + emb_n
        ctx, mask, emb_c = self._context(encoder_hidden_states, encoder_attention_mask, pooled_projections, B)
        if emb_c is not None:
            emb = emb + emb_c                                                               # ... + emb_c

        h = self.conv_in(x.to(dtype))
        hs = [h]
        for level in self.down:
            for layer in level:
                h = self._run(layer, h, emb, ctx, mask)
                if not isinstance(layer, Transformer1D):
                    hs.append(h)
                else:
                    hs[-1] = h
        for layer in self.mid:
            h = self._run(layer, h, emb, ctx, mask)
        for level in self.up:
            for layer in level:
                if isinstance(layer, ResBlock1D):
                    h = torch.cat([h, hs.pop()], dim=1)
                h = self._run(layer, h, emb, ctx, mask)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, 0] if squeeze else out
