"""The stage losses: the ``nn.Module`` whose ``forward(**prepared)`` is a stage's loss (what DeepSpeed wraps)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from ...conditioning import SetTransformer, clip_contrastive_loss
from ..diffusion import SchedulerConfig, training_target
from ..pdiff import PDiffAutoencoder
from ..vae import WeightVAE

__all__ = ["EpsilonLoss", "ReconstructionLoss", "VAELoss", "ContrastiveLoss"]


def _masked_mean(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


class EpsilonLoss(nn.Module):
    """Eq. 1 (and p-diff/D2NWG's latent DDPM objective): ||eps_theta(x_t, t, ...) - eps||^2 with
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps from diffusers' DDPMScheduler.add_noise, t ~ U[0, T)
    (the target is v or x0 instead for those ``prediction_type``s)."""

    def __init__(self, denoiser: nn.Module, scheduler: SchedulerConfig, blockwise: bool):
        super().__init__()
        self.denoiser, self.blockwise = denoiser, blockwise
        self.scheduler = DDPMScheduler(**scheduler.to_dict())     # not a module: no buffers cast to bf16

    def forward(self, x0: torch.Tensor, cond: torch.Tensor | None = None, block_index: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cond_tokens: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``cond``: the condition vector; with ``cond_tokens`` [B, T, D] / ``cond_mask`` [B, T] (a
        token-conditioned BlockUNet1D) the token states cross-attended to, and ``cond`` their pooled vector."""
        x0 = x0.float()
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if cond_tokens is not None:
            pred = self.denoiser(x_t, t, block_index, cond_tokens, encoder_attention_mask=cond_mask,
                                 pooled_projections=cond)
        else:
            pred = self.denoiser(x_t, t, block_index, cond) if self.blockwise else self.denoiser(x_t, t, cond)
        return _masked_mean((pred.float() - training_target(self.scheduler, x0, noise, t)) ** 2, mask)


class ReconstructionLoss(nn.Module):
    """p-diff autoencoder: MSE over real weights of dec(enc(x + xi_in) + xi_lat) vs x."""

    def __init__(self, autoencoder: PDiffAutoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean((self.autoencoder(x0, noise=True).float() - x0.float()) ** 2, mask)


class VAELoss(nn.Module):
    def __init__(self, vae: WeightVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.loss(x0, None if mask is None else mask.expand_as(x0))[0]


class ContrastiveLoss(nn.Module):
    """D2NWG eq. 2: align Set Transformer dataset embeddings with (projected) VAE weight latents."""

    def __init__(self, encoder: SetTransformer):
        super().__init__()
        self.encoder = encoder

    def forward(self, latents: torch.Tensor, features: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        zw = self.encoder.embed_weights(latents)
        zd = self.encoder(features)
        return clip_contrastive_loss(zw, zd, cond_ids, self.encoder.logit_scale)
