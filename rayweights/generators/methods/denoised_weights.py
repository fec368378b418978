"""Denoised Neural Weights: a BlockUNet1D denoises (block, block index, text prompt) rows; every block
of a weight set is sampled in one batched forward per step."""

from __future__ import annotations

import torch

from ..block_unet import BlockUNet1D
from .base import GeneratorMethod, register_method
from .losses import EpsilonLoss

__all__ = ["DenoisedWeights"]


@register_method
class DenoisedWeights(GeneratorMethod):
    """Denoised Neural Weights: BlockUNet1D over (block, block index, text prompt) rows.

    Classifier-free guidance: with ``cond_dropout`` p the diffusion stage trains a fraction p of its
    rows on the null condition, an all-zeros pooled text embedding (the BlockUNet1D context
    projection then sees only its bias); ``sample(..., guidance_scale=s)`` combines the passes with
    the prompt and with that same zeros vector (:func:`rayweights.generators.diffusion.guided`)."""

    name = "denoised_weights"
    stages = ("diffusion",)
    stage_model = {"diffusion": "denoiser"}
    stage_unit = {"diffusion": "block"}
    model_class = {"denoiser": BlockUNet1D}
    conditioning = "text"

    def check_layout(self):
        self._fill("denoiser", "block_size", self.layout.block_size, "the table's block_size")
        if self.conditions is not None:
            self._fill("denoiser", "cross_attention_dim", self.conditions.dim, "the text embedding width")

    def model_config(self, key):
        cfg = dict(self.model_configs[key])
        if cfg.get("cross_attention_dim") is None:
            cfg["cross_attention_dim"] = self.conditions.dim if self.conditions is not None else self.text_encoder.dim
            self.model_configs[key]["cross_attention_dim"] = cfg["cross_attention_dim"]
        return cfg

    def _encoder_name(self):
        return self.text_encoder.name_or_path

    def _encode_new(self, conditions):
        return self.text_encoder.encode(conditions)

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        # the noise is predicted on every position, padding included: padded positions are x0 = 0,
        # and an untrained prediction there would feed garbage back through the UNet while sampling
        out.pop("mask")
        out["cond"] = self._train_cond(batch, device)
        return out

    def build_trainer(self, stage):
        return EpsilonLoss(self.model("denoiser"), self.scheduler, blockwise=True)

    def _sample_one(self, cond, n, mode, t, steps, eta, gen, device, chunk_blocks, guidance_scale):
        L = self.layout
        model = self.frozen("denoiser", device)
        nb, bs = L.num_blocks, L.block_size
        noise = torch.randn(n * nb, bs, generator=gen).to(device)
        bidx = torch.arange(nb, device=device).repeat(n)
        rows = n * nb if chunk_blocks <= 0 else chunk_blocks
        out = []
        for s in range(0, n * nb, rows):
            b = bidx[s:s + rows]
            c = None if cond is None else cond.view(1, -1).expand(b.shape[0], -1)
            # guidance doubles the rows of a forward: the block indices repeat with them
            fn = self._guided(lambda x, tt, cc, b=b: model(x, tt, b.repeat(x.shape[0] // b.shape[0]), cc), c,
                              guidance_scale)
            out.append(self._denoise(fn, noise[s:s + rows], mode, t, steps, eta, gen))
        return torch.cat(out).view(n, nb, bs)


