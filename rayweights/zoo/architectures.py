"""Zoo member architectures: a small registry of constructors (DiT style).

``build(name, in_shape, num_classes, **kw)`` returns a fresh ``nn.Module``; ``ARCH_KINDS[name]``
says what it is (``classifier``, ``image2image``, ``discriminator``), so a spec can check that its
family and architecture fit together before anything trains.

Classifiers (p-diff Tab. 3b, scaled to the input):

* ``mlp3`` — three linear layers; BN on the hidden ones by default (p-diff's partial zoos need BN).
  p-diff's exact MLP-3 is ``hidden: [50, 25], norm: false``.
* ``convnet3`` — three 3x3 conv + BN + ReLU layers (p-diff: 32 channels), pooling, a linear head.
* ``resnet_small`` — a BN stem and ``blocks`` basic residual blocks.

Image-to-image (Denoised Neural Weights / E2GAN, scaled down):

* ``e2gan_lora`` — :class:`ConceptGenerator`: stem, two stride-2 downsampling convs, ResNet blocks,
  one transformer block over the bottleneck tokens, two transposed-conv upsampling layers, output
  conv.  Every conv/linear carries a LoRA adapter (ranks per layer kind, paper A.2: 1/4/8 for
  the sampling layers, 8 for ResNet convs, 1 in the transformer) and every conv a BN.
* ``patchgan`` — :class:`PatchDiscriminator`, the conditional PatchGAN of pix2pix (input: source
  and target image concatenated on channels; output: a map of real/fake logits).
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from .lora import LoRAConv2d, LoRAConvTranspose2d, LoRALinear

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
ARCH_KINDS: dict[str, str] = {}

#: the parameters a concepts zoo keeps and trains: LoRA down/up weights and the BN affine parameters
CONCEPT_SELECT = [r"(^|\.)lora_(down|up)\.weight$", r"(^|\.)norm\d*\.(weight|bias)$"]


def register(name: str, kind: str = "classifier"):
    def deco(fn):
        ARCHITECTURES[name] = fn
        ARCH_KINDS[name] = kind
        return fn
    return deco


def build(name: str, in_shape: tuple[int, ...], num_classes: int, **kw) -> nn.Module:
    if name not in ARCHITECTURES:
        raise KeyError(f"architecture: unknown {name!r} (registered: {', '.join(sorted(ARCHITECTURES))})")
    try:
        return ARCHITECTURES[name](in_shape=tuple(in_shape), num_classes=num_classes, **kw)
    except TypeError as exc:
        raise ValueError(f"arch_options: {exc} (architecture {name})") from exc


def _flat_dim(in_shape) -> int:
    d = 1
    for s in in_shape:
        d *= s
    return d


@register("mlp3")
def mlp3(in_shape, num_classes, hidden: int | list[int] = 32, norm: bool = True):
    """p-diff MLP-3: three linear layers (BN on the hidden ones unless ``norm: false``)."""
    h1, h2 = (hidden, hidden) if isinstance(hidden, int) else tuple(hidden)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(_flat_dim(in_shape), h1)]
    layers += [nn.BatchNorm1d(h1)] if norm else []
    layers += [nn.ReLU(), nn.Linear(h1, h2)]
    layers += [nn.BatchNorm1d(h2)] if norm else []
    layers += [nn.ReLU(), nn.Linear(h2, num_classes)]
    return nn.Sequential(*layers)


def _image_channels(in_shape) -> int:
    if len(in_shape) != 3:
        raise ValueError(f"needs image inputs [C, H, W], got input shape {tuple(in_shape)} "
                         "(feature vectors: use mlp3)")
    return in_shape[0]


@register("convnet3")
def convnet3(in_shape, num_classes, width: int = 16):
    """p-diff ConvNet-3: three conv+BN+ReLU layers, pooling, linear head."""
    c = _image_channels(in_shape)
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@register("resnet_small")
def resnet_small(in_shape, num_classes, width: int = 16, blocks: int = 2):
    c = _image_channels(in_shape)
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         *[_Block(width) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


# --------------------------------------------------------------------------- image-to-image GAN
DEFAULT_RANKS = {"stem": 1, "down1": 4, "down2": 8, "res": 8, "attn": 1, "mlp": 1, "up1": 8, "up2": 4, "out": 1}


class _ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, ch: int, act: bool = True):
        super().__init__()
        self.conv = conv
        self.norm = nn.BatchNorm2d(ch)
        self.act = act

    def forward(self, x):
        x = self.norm(self.conv(x))
        return torch.relu(x) if self.act else x


class _ResBlock(nn.Module):
    def __init__(self, c: int, rank: int):
        super().__init__()
        self.conv1 = LoRAConv2d(c, c, 3, padding=1, rank=rank, bias=False)
        self.norm1 = nn.BatchNorm2d(c)
        self.conv2 = LoRAConv2d(c, c, 3, padding=1, rank=rank, bias=False)
        self.norm2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


class _TransformerBlock(nn.Module):
    """Pre-LN self-attention + MLP over the bottleneck's H*W tokens; q/k/v/o and the MLP carry LoRA."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, rank_attn: int, rank_mlp: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: {heads} does not divide the bottleneck width {dim}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = LoRALinear(dim, dim, rank_attn)
        self.k = LoRALinear(dim, dim, rank_attn)
        self.v = LoRALinear(dim, dim, rank_attn)
        self.o = LoRALinear(dim, dim, rank_attn)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = LoRALinear(dim, dim * mlp_ratio, rank_mlp)
        self.fc2 = LoRALinear(dim * mlp_ratio, dim, rank_mlp)

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)                      # [B, HW, C]
        h = self.ln1(t)
        split = lambda z: z.view(B, H * W, self.heads, C // self.heads).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        t = t + self.o(a.transpose(1, 2).reshape(B, H * W, C))
        t = t + self.fc2(nn.functional.gelu(self.fc1(self.ln2(t))))
        return t.transpose(1, 2).reshape(B, C, H, W)


class ConceptGenerator(nn.Module):
    """E2GAN-style image-to-image generator with LoRA on every conv/linear layer (values in [-1, 1]).

    ``forward(x, noise=None)``: ``x`` [B, C, H, W] (H, W divisible by 4); ``noise`` [B, noise_channels,
    H, W] (the z of eq. 4), drawn from N(0, 1) when omitted.  ``config`` is JSON-able and rebuilds the
    same module (:meth:`from_config`); the weights of a trained base live in safetensors.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, noise_channels: int = 1, width: int = 16,
                 res_blocks: int = 2, heads: int = 2, mlp_ratio: int = 2, ranks: dict | None = None):
        super().__init__()
        r = {**DEFAULT_RANKS, **(ranks or {})}
        unknown = set(r) - set(DEFAULT_RANKS)
        if unknown:
            raise ValueError(f"ranks: unknown layer kind(s) {sorted(unknown)} (known: {sorted(DEFAULT_RANKS)})")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, noise_channels=noise_channels,
                           width=width, res_blocks=res_blocks, heads=heads, mlp_ratio=mlp_ratio, ranks=r)
        w = width
        self.noise_channels = noise_channels
        self.stem = _ConvBN(LoRAConv2d(in_channels + noise_channels, w, 7, padding=3, rank=r["stem"], bias=False), w)
        self.down1 = _ConvBN(LoRAConv2d(w, 2 * w, 3, 2, 1, rank=r["down1"], bias=False), 2 * w)
        self.down2 = _ConvBN(LoRAConv2d(2 * w, 4 * w, 3, 2, 1, rank=r["down2"], bias=False), 4 * w)
        self.res = nn.Sequential(*[_ResBlock(4 * w, r["res"]) for _ in range(res_blocks)])
        self.attn = _TransformerBlock(4 * w, heads, mlp_ratio, r["attn"], r["mlp"])
        self.up1 = _ConvBN(LoRAConvTranspose2d(4 * w, 2 * w, 3, 2, 1, 1, rank=r["up1"], bias=False), 2 * w)
        self.up2 = _ConvBN(LoRAConvTranspose2d(2 * w, w, 3, 2, 1, 1, rank=r["up2"], bias=False), w)
        self.out = LoRAConv2d(w, out_channels, 7, padding=3, rank=r["out"])

    @classmethod
    def from_config(cls, config: dict) -> "ConceptGenerator":
        return cls(**config)

    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.noise_channels:
            if noise is None:
                noise = torch.randn(x.shape[0], self.noise_channels, *x.shape[2:], device=x.device, dtype=x.dtype)
            x = torch.cat([x, noise], 1)
        h = self.down2(self.down1(self.stem(x)))
        h = self.attn(self.res(h))
        return torch.tanh(self.out(self.up2(self.up1(h))))


@register("e2gan_lora", kind="image2image")
def e2gan_lora(in_shape, num_classes=None, **kw):
    c = _image_channels(in_shape)
    if in_shape[1] % 4 or in_shape[2] % 4:
        raise ValueError(f"image size {tuple(in_shape[1:])} must be divisible by 4")
    return ConceptGenerator(in_channels=c, out_channels=num_classes or c, **kw)


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN (pix2pix): logits per overlapping patch of (source, target)."""

    def __init__(self, in_channels: int = 6, width: int = 16, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(1, layers):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([source, target], 1))


@register("patchgan", kind="discriminator")
def patchgan(in_shape, num_classes=None, width: int = 16, layers: int = 2):
    return PatchDiscriminator(in_channels=_image_channels(in_shape), width=width, layers=layers)
