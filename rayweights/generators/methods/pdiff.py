"""p-diff: a 1-D CNN autoencoder with noise augmentation, then an unconditional DDPM on its latents."""

from __future__ import annotations

import torch

from ..latent_denoiser import LatentDenoiser1D
from ..pdiff import PDiffAutoencoder
from .base import register_method
from .latent import LatentMethod
from .losses import EpsilonLoss, ReconstructionLoss

__all__ = ["PDiff"]


@register_method
class PDiff(LatentMethod):
    """p-diff: 1-D CNN autoencoder with noise augmentation, then a DDPM on its latents."""

    name = "pdiff"
    stages = ("autoencoder", "diffusion")
    stage_model = {"autoencoder": "autoencoder", "diffusion": "denoiser"}
    stage_unit = {"autoencoder": "checkpoint", "diffusion": "checkpoint"}
    model_class = {"autoencoder": PDiffAutoencoder, "denoiser": LatentDenoiser1D}
    conditioning = None
    first_stage = "autoencoder"

    def latent_shape(self):
        a = self.model_configs["autoencoder"]
        fold = a.get("fold", 2)
        return (a.get("latent_channels", 4), max(2, -(-self.flat_dim // fold ** 4)))

    def check_layout(self):
        self._fill("autoencoder", "in_dim", self.flat_dim, "the table's flattened length (num_blocks x block_size)")
        zc, zl = self.latent_shape()
        self._fill("denoiser", "latent_channels", zc, "the autoencoder's latent channels")
        self._fill("denoiser", "latent_length", zl, "the autoencoder's latent length")
        self.model_configs["denoiser"].setdefault("cond_dim", 0)

    # p-diff's zoo is a few members' densely saved checkpoints: in per-group normalised space they
    # sit within ~1e-2 of one common vector.  Two standardisations make that spread visible to the
    # models (both fitted by the trainer, stored in data_stats, absent = identity for old exports):
    # * inputs: per-coordinate mean/std over the zoo, so the autoencoder (and its 1e-3 input /
    #   1e-1 latent noise augmentation) works on the checkpoints' differences at unit scale;
    # * latents: per-coordinate mean removed and one scale factor (1 / std of the centred latents,
    #   the latent-diffusion "scaling factor"), so the DDPM sees zero-mean, unit-variance data.
    @torch.no_grad()
    def fit_input_stats(self, weights: torch.Tensor, eps: float = 1e-6) -> dict[str, torch.Tensor]:
        """Per-coordinate mean/std of the layout-normalised ``weights`` [N, num_blocks*block_size] (raw)."""
        L = self.layout
        x0 = L.normalize(weights.float().reshape(-1, L.num_blocks, L.block_size)).reshape(weights.shape[0], -1)
        mask = L.valid_mask.reshape(-1).float()
        std = x0.double().std(0, unbiased=False).float().clamp_min(eps) if x0.shape[0] > 1 else torch.ones_like(mask)
        self.data_stats.update(input_mean=x0.double().mean(0).float() * mask, input_std=torch.where(mask > 0, std, 1.0))
        self.data_stats.pop("latent_mean", None)           # latents of another input space
        return self.data_stats

    def _standardize(self, x0: torch.Tensor) -> torch.Tensor:
        if "input_mean" not in self.data_stats:
            return x0
        m, s = (self.data_stats[k].to(x0.device, x0.dtype) for k in ("input_mean", "input_std"))
        return (x0 - m) / s * (s > 0)

    def _unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        if "input_mean" not in self.data_stats:
            return x
        m, s = (self.data_stats[k].to(x.device, x.dtype) for k in ("input_mean", "input_std"))
        return x * s + m

    def _latents(self, x0, device, sample_posterior):
        z = self.frozen("autoencoder", device).encode(self._standardize(x0), noise=False)
        if "latent_mean" in self.data_stats:
            z = z - self.data_stats["latent_mean"].to(z.device, z.dtype)
        return z

    def _decode(self, z, device):
        if "latent_mean" in self.data_stats:
            z = z + self.data_stats["latent_mean"].to(z.device, z.dtype)
        return self._unstandardize(self.frozen("autoencoder", device).decode(z))

    @torch.no_grad()
    def fit_latent_scale(self, weights: torch.Tensor, device="cpu") -> float:
        """Latent mean per coordinate and 1 / std of the centred latents of ``weights`` (raw)."""
        L = self.layout
        self.data_stats.pop("latent_mean", None)
        x0 = L.normalize(weights.float().view(-1, L.num_blocks, L.block_size)).view(weights.shape[0], -1)
        z = self._latents(x0.to(device), device, sample_posterior=False).float().cpu()
        self.data_stats["latent_mean"] = z.mean(0)
        std = float((z - z.mean(0)).std()) if z.shape[0] > 1 else 1.0
        self.latent_scale = 1.0 / max(std, 1e-6)
        return self.latent_scale

    def prepare(self, stage, batch, device="cpu"):
        out = self._normalized(stage, batch, device)
        if stage == "diffusion":
            return {"x0": self._scaled_latents(out["x0"], device)}
        out["x0"] = self._standardize(out["x0"])
        return out

    def build_trainer(self, stage):
        if stage == "autoencoder":
            return ReconstructionLoss(self.model("autoencoder"))
        return EpsilonLoss(self.model("denoiser"), self.scheduler, blockwise=False)


