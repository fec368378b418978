"""The ``block_unet1d`` family: learngenes for the Denoised-Weights generator ``BlockUNet1D``.

Sizes are a preset of ``rayweights.generators`` (``denoised_weights``) plus overrides, e.g.
``{preset: tiny, block_channels: [32, 64], layers_per_block: 2}``: width = ``block_channels``,
depth = ``layers_per_block``.  Sizes compared in one run must have the same number of levels.

Layer types are derived from the built UNet (their *names* agree between sizes, their patterns
list that model's parameters).  Per level and path (``d<i>`` down, ``mid``, ``u<k>`` up):

* ResBlock ``conv2`` and ``emb`` over all ResBlocks of the level (same shape);
* ResBlock ``conv1`` / ``skip`` by role, because their input width depends on position: down
  levels ``first`` (the channel change) and the rest; up levels ``first``, ``mid`` and ``last``
  (their inputs concatenate different skips);
* every Transformer1D projection (proj_in/out, self- and cross-attention q/k/v/out, GEGLU in/out);
* depth-1 types: down/up-sampling convs, conv_in/conv_out, the time and block-index MLPs and the
  context projection.

Norms, biases and ``context_pos`` keep their default initialisation.  The model the task trains
is a thin wrapper ``(x [B, 1, T], t, block_index) -> eps`` (unconditioned); ``unwrap`` gives the
BlockUNet1D for ``save_pretrained``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..generators import BlockUNet1D, get_preset
from ..generators.layers import Downsample1D, ResBlock1D, Transformer1D, Upsample1D

from .layers import LayerType
from .models import ModelFamily, register_model_family

__all__ = ["BlockUNetDenoiser", "block_unet_layer_types", "build_block_unet"]


class BlockUNetDenoiser(nn.Module):
    """``(x [B, 1, T], t [B], block_index [B]) -> eps`` around an unconditioned BlockUNet1D."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, index=None):
        if index is None:
            index = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return self.unet(x, t, index, None)


def build_block_unet(preset: str = "tiny", block_size: int = 64, **overrides) -> BlockUNetDenoiser:
    cfg = get_preset("denoised_weights", preset)["denoiser"]
    cfg.update(overrides)
    cfg.update(block_size=block_size, cross_attention_dim=None)
    return BlockUNetDenoiser(BlockUNet1D(**cfg))


_RES_KINDS = ("conv1", "conv2", "emb", "skip")
_TF_KINDS = {"proj_in": "proj_in", "q1": "attn1.to_q", "k1": "attn1.to_k", "v1": "attn1.to_v",
             "o1": "attn1.to_out", "q2": "attn2.to_q", "k2": "attn2.to_k", "v2": "attn2.to_v",
             "o2": "attn2.to_out", "ff_in": "ff.proj", "ff_out": "ff.out", "proj_out": "proj_out"}
# segments resized separately: attention heads (q/k/v rows, out-projection columns), GEGLU [value, gate]
_TF_CHUNKS = {"q1": "out", "k1": "out", "v1": "out", "o1": "in", "q2": "out", "k2": "out", "v2": "out", "o2": "in"}


def _type(name: str, prefix: str, blocks: list[int], suffix: str, **chunks) -> LayerType:
    alt = "|".join(str(b) for b in blocks)
    return LayerType(name, rf"{re.escape(prefix)}\.(?P<block>{alt})\.{re.escape(suffix)}", **chunks)


def block_unet_layer_types(model: nn.Module) -> list[LayerType]:
    """Layer types of a (wrapped) BlockUNet1D, named by level / role (see the module docstring)."""
    unet = model.unet if isinstance(model, BlockUNetDenoiser) else model
    root = "unet." if isinstance(model, BlockUNetDenoiser) else ""
    params = dict(unet.named_parameters())
    heads = int(unet.config.num_heads)
    types: list[LayerType] = []
    sinusoidal = {"time_embedding.linear_1.weight", "block_embedding.linear_1.weight"}   # [cos | sin] inputs
    for name in ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight",
                 "time_embedding.linear_2.weight", "block_embedding.linear_1.weight",
                 "block_embedding.linear_2.weight", "context_proj.weight"):
        if name in params:
            types.append(LayerType(name.replace(".weight", "").replace(".", "_"), re.escape(root + name),
                                   in_chunks=2 if name in sinusoidal else None))
    h_channels: dict[int, int] = {}   # id(ResBlock) -> channels of its non-skip input (up path: [h | skip])
    ch = unet.mid[-1].conv1.out_channels
    for lv in unet.up:
        for m in lv:
            if isinstance(m, ResBlock1D):
                h_channels[id(m)] = ch
                ch = m.conv1.out_channels

    def level(tag: str, prefix: str, layers, up: bool):
        res = [j for j, m in enumerate(layers) if isinstance(m, ResBlock1D)]
        tfs = [j for j, m in enumerate(layers) if isinstance(m, Transformer1D)]
        p = root + prefix
        for kind in ("conv2", "emb"):
            if res and f"{prefix}.{res[0]}.{kind}.weight" in params:
                types.append(_type(f"{tag}_{kind}", p, res, f"{kind}.weight"))
        roles = ({"first": res[:1], "mid": res[1:-1], "last": res[-1:]} if up and len(res) > 1
                 else {"first": res[:1], "rest": res[1:]})
        for kind in ("conv1", "skip"):
            for role, js in roles.items():
                js = [j for j in js if f"{prefix}.{j}.{kind}.weight" in params]
                if not js:
                    continue
                chunks = None
                if up:
                    splits = {(h_channels[id(layers[j])], layers[j].conv1.in_channels - h_channels[id(layers[j])])
                              for j in js}
                    if len(splits) != 1:   # cannot happen for BlockUNet1D; keep such blocks apart if it does
                        raise ValueError(f"{prefix} {kind} {role}: blocks with different [h, skip] splits {splits}")
                    chunks = list(splits.pop())
                types.append(_type(f"{tag}_{kind}_{role}", p, js, f"{kind}.weight", in_chunks=chunks))
        for short, path in _TF_KINDS.items():
            if tfs and f"{prefix}.{tfs[0]}.{path}.weight" in params:
                side = _TF_CHUNKS.get(short)
                chunks = {f"{side}_chunks": heads} if side else {"out_chunks": 2} if short == "ff_in" else {}
                types.append(_type(f"{tag}_tf_{short}", p, tfs, f"{path}.weight", **chunks))
        for j, m in enumerate(layers):
            if isinstance(m, (Downsample1D, Upsample1D)):
                kind = "downsample" if isinstance(m, Downsample1D) else "upsample"
                types.append(_type(f"{tag}_{kind}", p, [j], "conv.weight"))

    for i, lv in enumerate(unet.down):
        level(f"d{i}", f"down.{i}", lv, up=False)
    level("mid", "mid", unet.mid, up=False)
    for k, lv in enumerate(unet.up):
        level(f"u{k}", f"up.{k}", lv, up=True)
    return types


def _unwrap(model: nn.Module) -> nn.Module:
    return model.unet if isinstance(model, BlockUNetDenoiser) else model


register_model_family(ModelFamily("block_unet1d", "denoise1d", block_unet_layer_types, build_block_unet, unwrap=_unwrap,
                       description="the Denoised-Weights generator BlockUNet1D; size: preset + block_channels, "
                                   "layers_per_block (same number of levels)"))
