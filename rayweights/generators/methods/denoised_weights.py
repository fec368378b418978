"""Denoised Neural Weights: a BlockUNet1D denoises (block, block index, text prompt) rows; every block
of a weight set is sampled in one batched forward per step."""

from __future__ import annotations

import torch

from ...conditioning import ConditionCache, TokenCondition
from ..block_unet import CONDITION_MODES, BlockUNet1D
from ..errors import GeneratorError
from .base import GeneratorMethod, register_method
from .losses import EpsilonLoss

__all__ = ["DenoisedWeights"]


@register_method
class DenoisedWeights(GeneratorMethod):
    """Denoised Neural Weights: BlockUNet1D over (block, block index, text prompt) rows.

    Text conditioning follows the denoiser's ``condition_mode`` (``model.denoiser.condition_mode``):
    ``pooled`` (the default) gives it the cached mean-pooled prompt embedding; ``tokens`` the cached
    token states with their padding mask for cross-attention and the pooled vector
    (:meth:`TextEncoder.encode_tokens`: CLIP's projected EOS embedding, MiniLM's mean) for the
    embedding.  Training rows carry only ``cond_id``; the states are gathered from the condition
    cache inside :meth:`prepare`.

    Classifier-free guidance: with ``cond_dropout`` p the diffusion stage trains a fraction p of its
    rows on the null condition (pooled: an all-zeros embedding, the context projection then sees
    only its bias; tokens: zero token states with only position 0 unmasked and a zero pooled
    vector); ``sample(..., guidance_scale=s)`` combines the passes with the prompt and with that same
    null condition (:func:`rayweights.generators.diffusion.guided`)."""

    name = "denoised_weights"
    stages = ("diffusion",)
    stage_model = {"diffusion": "denoiser"}
    stage_unit = {"diffusion": "block"}
    model_class = {"denoiser": BlockUNet1D}
    conditioning = "text"

    @property
    def uses_tokens(self) -> bool:
        return self.model_configs["denoiser"].get("condition_mode", "pooled") == "tokens"

    def check_layout(self):
        self._fill("denoiser", "block_size", self.layout.block_size, "the table's block_size")
        mode = self.model_configs["denoiser"].get("condition_mode", "pooled")
        if mode not in CONDITION_MODES:
            raise GeneratorError(f"model.denoiser.condition_mode: {mode!r} is not one of {list(CONDITION_MODES)}")
        if self.conditions is None:
            return
        if mode == "tokens":
            if not self.conditions.has_tokens:
                raise GeneratorError("model.denoiser.condition_mode: 'tokens' needs a condition cache with token "
                                     "states, this one holds pooled vectors only (rebuild it with encode_tokens)")
            self._fill("denoiser", "cross_attention_dim", self.conditions.token_dim, "the text token width")
            self._fill("denoiser", "pooled_dim", self.conditions.dim, "the pooled text embedding width")
        else:
            self._fill("denoiser", "cross_attention_dim", self.conditions.dim, "the text embedding width")

    def model_config(self, key):
        cfg = self.model_configs[key]
        if cfg.get("cross_attention_dim") is None:
            if self.conditions is not None:
                cfg["cross_attention_dim"] = self.conditions.token_dim if self.uses_tokens else self.conditions.dim
            else:
                cfg["cross_attention_dim"] = self.text_encoder.dim
        if self.uses_tokens and cfg.get("pooled_dim") is None:
            cfg["pooled_dim"] = self.conditions.dim if self.conditions is not None else self.text_encoder.pooled_dim
        return dict(cfg)

    def build_condition_cache(self, conditions, text_encoder_label: str | None = None) -> ConditionCache:
        """Encode ``conditions`` once into the condition cache (token states too in tokens mode);
        ``text_encoder_label``: what the cache records as its encoder (default: the encoder's path)."""
        label = text_encoder_label or self._encoder_name()
        conditions = list(dict.fromkeys(conditions))
        if self.uses_tokens:
            cache = ConditionCache.from_tokens(conditions, self.text_encoder.encode_tokens(conditions), "text", label)
        else:
            cache = ConditionCache(conditions, self.text_encoder.encode(conditions), "text", label)
        self.conditions = cache
        self.condition_names = list(conditions)
        self.check_layout()
        return cache

    def _encoder_name(self):
        return self.text_encoder.name_or_path

    def _encode_new(self, conditions):
        if self.uses_tokens:
            return self.text_encoder.encode_tokens(conditions)
        return self.text_encoder.encode(conditions)

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        # the noise is predicted on every position, padding included: padded positions are x0 = 0,
        # and an untrained prediction there would feed garbage back through the UNet while sampling
        out.pop("mask")
        cond = self._train_cond(batch, device)
        if isinstance(cond, TokenCondition):
            out.update(cond=cond.pooled, cond_tokens=cond.tokens, cond_mask=cond.mask)
        else:
            out["cond"] = cond
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

        def run(x, tt, cc, b):
            b = b.repeat(x.shape[0] // b.shape[0])      # guidance doubles the rows of a forward: indices repeat too
            if isinstance(cc, TokenCondition):
                return model(x, tt, b, **cc.model_kwargs())
            return model(x, tt, b, cc)

        out = []
        for s in range(0, n * nb, rows):
            b = bidx[s:s + rows]
            if cond is None:
                c = None
            elif isinstance(cond, TokenCondition):
                c = cond.expand(b.shape[0])
            else:
                c = cond.view(1, -1).expand(b.shape[0], -1)
            fn = self._guided(lambda x, tt, cc, b=b: run(x, tt, cc, b), c, guidance_scale)
            out.append(self._denoise(fn, noise[s:s + rows], mode, t, steps, eta, gen))
        return torch.cat(out).view(n, nb, bs)
