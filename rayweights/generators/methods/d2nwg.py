"""D2NWG: a VAE over whole weight vectors, a Set Transformer dataset encoder aligned with the VAE latents
(contrastive), and a dataset-conditioned latent DDPM."""

from __future__ import annotations

from typing import Sequence

import torch

from ...conditioning import ConditionCache, ConditioningError, SetTransformer, dataset_features
from ..errors import GeneratorError
from ..latent_denoiser import LatentDenoiser1D
from ..vae import WeightVAE
from .base import register_method
from .latent import LatentMethod
from .losses import ContrastiveLoss, EpsilonLoss, VAELoss

__all__ = ["D2NWG"]


@register_method
class D2NWG(LatentMethod):
    """D2NWG: VAE, Set Transformer dataset encoder (contrastive), dataset-conditioned latent DDPM.

    Classifier-free guidance: with ``cond_dropout`` p the diffusion stage (only) trains a fraction p
    of its rows on the null condition, an all-zeros dataset embedding; ``sample(...,
    guidance_scale=s)`` combines the passes with the dataset embedding and that same zeros vector."""

    name = "d2nwg"
    stages = ("vae", "dataset_encoder", "diffusion")
    stage_model = {"vae": "vae", "dataset_encoder": "dataset_encoder", "diffusion": "denoiser"}
    stage_unit = {"vae": "checkpoint", "dataset_encoder": "checkpoint", "diffusion": "checkpoint"}
    model_class = {"vae": WeightVAE, "dataset_encoder": SetTransformer, "denoiser": LatentDenoiser1D}
    conditioning = "dataset"
    first_stage = "vae"

    def latent_shape(self):
        v = self.model_configs["vae"]
        levels = len(v.get("hidden_channels", (32, 64, 128)))
        return (v.get("latent_channels", 4), v.get("adapter_length", 64) // 2 ** (levels - 1))

    def check_layout(self):
        self._fill("vae", "in_dim", self.flat_dim, "the table's flattened length (num_blocks x block_size)")
        zc, zl = self.latent_shape()
        self._fill("dataset_encoder", "weight_dim", zc * zl, "the VAE latent size")
        self._fill("denoiser", "latent_channels", zc, "the VAE's latent channels")
        self._fill("denoiser", "latent_length", zl, "the VAE's latent length")
        self._fill("denoiser", "cond_dim", self.model_configs["dataset_encoder"].get("out_dim", 128),
                   "the dataset embedding width")
        if "feature_dim" in self.dataset_options:
            self._fill("dataset_encoder", "in_dim", int(self.dataset_options["feature_dim"]),
                       "the dataset feature width")

    def _encoder_name(self):
        return "SetTransformer"

    def features(self, conditions: Sequence[str], seed: int | None = None) -> torch.Tensor:
        """Per-class feature sets [n, C, K, d] of the datasets the conditions name."""
        k = int(self.dataset_options["samples_per_class"])
        s = int(self.dataset_options["seed"] if seed is None else seed)
        spec = self.dataset_options.get("zoo_spec")
        feats = [dataset_features(c, k, s, spec) for c in conditions]
        shapes = {tuple(f.shape) for f in feats}
        if len(shapes) > 1:
            raise ConditioningError(f"dataset features differ in shape across conditions: {sorted(shapes)[:3]} "
                                    "(every dataset needs the same number of classes and samples per class)")
        return torch.stack(feats)

    def build_features_bank(self) -> torch.Tensor:
        if not self.condition_names:
            raise GeneratorError("d2nwg: the table has no conditions (dataset names) to encode")
        self.features_bank = self.features(self.condition_names)
        self.dataset_options["feature_dim"] = int(self.features_bank.shape[-1])
        self.check_layout()
        return self.features_bank

    @torch.no_grad()
    def _encode_new(self, conditions):
        enc = self.frozen("dataset_encoder", "cpu")
        return enc(self.features(conditions)).float()

    def build_condition_cache(self) -> ConditionCache:
        """After the dataset-encoder stage: embed every zoo condition once with the frozen encoder."""
        if self.features_bank is None:
            self.build_features_bank()
        with torch.no_grad():
            emb = self.frozen("dataset_encoder", "cpu")(self.features_bank).float()
        self.conditions = ConditionCache(self.condition_names, emb, "dataset", "SetTransformer")
        return self.conditions

    def _latents(self, x0, device, sample_posterior):
        mean, logvar = self.frozen("vae", device).encode(x0)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample_posterior else mean

    def _decode(self, z, device):
        return self.frozen("vae", device).decode(z)

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        if stage == "vae":
            return out
        if stage == "dataset_encoder":
            if self.features_bank is None:
                raise GeneratorError("d2nwg: no dataset features bank (build_features_bank first)")
            ids = batch["cond_id"].to(device).long()
            if bool((ids < 0).any()):
                raise GeneratorError("batch: a row's condition is not among the table's conditions")
            uniq, inv = torch.unique(ids, return_inverse=True)
            with torch.no_grad():
                lat = self._latents(out["x0"], device, sample_posterior=False)
            return {"latents": lat, "features": self.features_bank[uniq.cpu()].to(device), "cond_ids": inv}
        return {"x0": self._scaled_latents(out["x0"], device), "cond": self._train_cond(batch, device)}

    def build_trainer(self, stage):
        if stage == "vae":
            return VAELoss(self.model("vae"))
        if stage == "dataset_encoder":
            return ContrastiveLoss(self.model("dataset_encoder"))
        return EpsilonLoss(self.model("denoiser"), self.scheduler, blockwise=False)


