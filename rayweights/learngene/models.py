"""Model families: a constructor of variable size, its layer types, and the task it is trained on.

A :class:`ModelFamily` is the "small adapter table" that makes learngenes work on a network: which
parameters are which layer type (regexes with a block-index group) and how to build a model of a
given size (``build(**size)``).  Built in:

* ``digits_transformer``: a pre-norm ViT-style classifier on 8x8 digits (rows as tokens), with
  attention q/k/v/o and MLP in/out per block; size ``width``, ``depth``, ``heads``.
* ``denoiser1d``: a DiT/UNet-flavoured 1-D noise predictor (conv residual blocks with a time
  projection, then attention) for ``(x [B, C, T], t [B]) -> eps``; size ``channels``, ``depth``.
* ``zoo_resnet_small``: the zoo's ``resnet_small`` (rayweights.zoo architectures) on digits; size
  ``width``, ``blocks``.
* ``block_unet1d``: the generator BlockUNet1D, registered by :mod:`.generator` (imported with the
  ``rayweights.learngene`` package).

Users add their own with :func:`register_model_family` (Python) or give ``layer_types`` plus
``constructor: "package.module:function"`` in a job config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from ..zoo import architectures
from .layers import LayerType, LearngeneError

__all__ = ["ModelFamily", "MODEL_FAMILIES", "register_model_family", "get_model_family", "DigitsTransformer", "Denoiser1D",
           "import_constructor"]


@dataclass
class ModelFamily:
    """``layer_types`` is a list (the same regexes for every size) or a function of the built model
    (for architectures whose repeated layers change shape with position, e.g. a UNet's up path:
    the type *names* are what must agree between sizes, the patterns may differ)."""

    name: str
    task: str                                   # "digits" | "denoise1d"
    layer_types: list[LayerType] | Callable[[nn.Module], list[LayerType]]
    build: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)   # options every size shares
    description: str = ""
    unwrap: Callable[[nn.Module], nn.Module] | None = None   # the model to export (e.g. the inner generator)

    def types_for(self, model: nn.Module) -> list[LayerType]:
        return list(self.layer_types(model) if callable(self.layer_types) else self.layer_types)

    def construct(self, size: dict[str, Any]) -> nn.Module:
        kw = {**self.defaults, **size}
        try:
            return self.build(**kw)
        except TypeError as exc:
            raise LearngeneError(f"family {self.name!r}: cannot build size {size}: {exc}") from None


MODEL_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> ModelFamily:
    MODEL_FAMILIES[family.name] = family
    return family


def get_model_family(name: str) -> ModelFamily:
    if name not in MODEL_FAMILIES:
        raise LearngeneError(f"family: unknown {name!r} (registered: {', '.join(sorted(MODEL_FAMILIES))})")
    return MODEL_FAMILIES[name]


def import_constructor(spec: str) -> Callable[..., nn.Module]:
    """``"package.module:function"`` -> the callable (a user's own model constructor)."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise LearngeneError(f"constructor: {spec!r} is not 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise LearngeneError(f"constructor: cannot import {spec!r} ({exc})") from None
    if not callable(obj):
        raise LearngeneError(f"constructor: {spec!r} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------
# Attention and ResBlock1D stay this module's own rather than rayweights.generators.layers': those
# differ in ways that change results and the parameter names learngene layer types match —
# layers.Attention has bias-free to_q/to_k/to_v and to_out (here q/k/v/o with biases), layers.ResBlock1D
# applies SiLU to the embedding, has dropout and GroupNorm eps 1e-6 and names its projection ``emb``
# (here ``temb``, no SiLU, eps 1e-5).  Saved learngenes and their curves were made with these.
class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (one layer type each)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise TypeError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):  # x [B, T, D]
        B, T, D = x.shape
        h = self.heads

        def split(t):
            return t.view(B, T, h, D // h).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width * ratio)
        self.fc2 = nn.Linear(width * ratio, width)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    """Rows of an [1, H, W] image are tokens; mean-pooled pre-norm transformer; linear head."""

    def __init__(self, width: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
                 image_size: int = 8, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(image_size, width)
        self.pos = nn.Parameter(torch.randn(image_size, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):  # [B, 1, H, W]
        h = self.embed(x.flatten(1, 2)) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h).mean(1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal timestep features [cos | sin]: diffusers' ``get_timestep_embedding``, the function
    the generators' ``Timesteps`` (``rayweights.generators.layers.timestep_embedding_modules``) wraps;
    that helper also builds a ``TimestepEmbedding`` MLP, whose parameters this model does not have."""
    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)


class ResBlock1D(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.temb = nn.Linear(channels, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.temb(emb)[:, :, None]
        return x + self.conv2(nn.functional.silu(self.norm2(h)))


class DenoiserBlock(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.res = ResBlock1D(channels, groups)
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, heads)

    def forward(self, x, emb):
        x = self.res(x, emb)
        h = x.transpose(1, 2)
        return (h + self.attn(self.norm(h))).transpose(1, 2)


class Denoiser1D(nn.Module):
    """eps-prediction network for 1-D signals: conv in, ``depth`` (ResBlock + attention) blocks, conv
    out.  ``forward(x [B, C, T], t [B], index=None)`` (the block index is ignored)."""

    def __init__(self, channels: int = 32, depth: int = 2, heads: int = 4, in_channels: int = 1, groups: int = 4):
        super().__init__()
        if channels % groups:
            raise TypeError(f"channels {channels} is not divisible by groups {groups}")
        self.channels = channels
        self.time1 = nn.Linear(channels, channels)
        self.time2 = nn.Linear(channels, channels)
        self.conv_in = nn.Conv1d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(DenoiserBlock(channels, heads, groups) for _ in range(depth))
        self.norm_out = nn.GroupNorm(groups, channels)
        self.conv_out = nn.Conv1d(channels, in_channels, 3, padding=1)

    def forward(self, x, t, index=None):
        emb = self.time2(nn.functional.silu(self.time1(timestep_embedding(t, self.channels))))
        h = self.conv_in(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


def _blocks(prefix: str, names: dict[str, str]) -> list[LayerType]:
    return [LayerType(k, rf"{prefix}\.(\d+)\.{v}") for k, v in names.items()]


TRANSFORMER_TYPES = [LayerType("embed", r"embed\.weight"), LayerType("pos", r"pos"),
                     *_blocks("blocks", {"q": r"attn\.q\.weight", "k": r"attn\.k\.weight", "v": r"attn\.v\.weight",
                                         "o": r"attn\.o\.weight", "mlp_in": r"mlp\.fc1\.weight",
                                         "mlp_out": r"mlp\.fc2\.weight"}),
                     LayerType("head", r"head\.weight")]

DENOISER_TYPES = [LayerType("time1", r"time1\.weight"), LayerType("time2", r"time2\.weight"),
                  LayerType("conv_in", r"conv_in\.weight"),
                  *_blocks("blocks", {"conv1": r"res\.conv1\.weight", "conv2": r"res\.conv2\.weight",
                                      "temb": r"res\.temb\.weight", "q": r"attn\.q\.weight", "k": r"attn\.k\.weight",
                                      "v": r"attn\.v\.weight", "o": r"attn\.o\.weight"}),
                  LayerType("conv_out", r"conv_out\.weight")]

# the zoo's resnet_small is an nn.Sequential: 0 stem conv, 1 BN, 2 ReLU, 3.. blocks, then pool, flatten, Linear
RESNET_TYPES = [LayerType("stem", r"0\.weight", ndim=4), LayerType("conv1", r"(\d+)\.conv1\.weight"),
                LayerType("conv2", r"(\d+)\.conv2\.weight"), LayerType("head", r"(\d+)\.weight", ndim=2)]


def _zoo_resnet_small(width: int = 16, blocks: int = 2, in_shape=(1, 8, 8), num_classes: int = 10) -> nn.Module:
    return architectures.build("resnet_small", tuple(in_shape), num_classes, width=width, blocks=blocks)


register_model_family(ModelFamily("digits_transformer", "digits", TRANSFORMER_TYPES, DigitsTransformer,
                       description="ViT-style digits classifier (rows as tokens); size: width, depth, heads"))
register_model_family(ModelFamily("denoiser1d", "denoise1d", DENOISER_TYPES, Denoiser1D,
                       description="1-D eps-prediction net (ResBlock + attention blocks); size: channels, depth"))
register_model_family(ModelFamily("zoo_resnet_small", "digits", RESNET_TYPES, _zoo_resnet_small,
                       description="the zoo's resnet_small on digits; size: width, blocks"))
