"""The shared half of the latent methods (p-diff, D2NWG): a first-stage autoencoder/VAE, a latent
scale, and a latent denoiser sampled with one forward per step for all samples of a condition."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import GeneratorError
from .base import GeneratorMethod

__all__ = ["LatentMethod"]


class LatentMethod(GeneratorMethod):
    """A method whose diffusion runs on the latents of a first-stage model (``first_stage``)."""

    first_stage: ClassVar[str] = ""

    def _latents(self, x0: torch.Tensor, device, sample_posterior: bool) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor, device) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @torch.no_grad()
    def fit_latent_scale(self, weights: torch.Tensor, device="cpu") -> float:
        L = self.layout
        x0 = L.normalize(weights.float().view(-1, L.num_blocks, L.block_size)).view(weights.shape[0], -1)
        z = self._latents(x0.to(device), device, sample_posterior=False)
        std = float(z.float().std())
        self.latent_scale = 1.0 / max(std, 1e-6)
        return self.latent_scale

    @torch.no_grad()
    def reconstruct(self, weights: torch.Tensor, device="cpu") -> torch.Tensor:
        """Raw weights [N, num_blocks*block_size] -> the first stage's reconstruction dec(enc(x)) (raw,
        posterior mean, no noise augmentation): the autoencoder/VAE check of the diagnostics."""
        L = self.layout
        w = weights.float().reshape(-1, L.num_blocks, L.block_size)
        z = self._latents(L.normalize(w).reshape(w.shape[0], -1).to(device), device, sample_posterior=False)
        x = self._decode(z, device).float().cpu().reshape(-1, L.num_blocks, L.block_size)
        return L.denormalize(x).reshape(w.shape[0], -1)

    def _scaled_latents(self, x0, device, sample_posterior=True):
        if self.latent_scale is None:
            raise GeneratorError(f"method {self.name}: latent_scale is not fitted (train the first stage first)")
        with torch.no_grad():
            return self._latents(x0, device, sample_posterior) * self.latent_scale

    def _sample_one(self, cond, n, mode, t, steps, eta, gen, device, chunk_blocks, guidance_scale):
        if self.latent_scale is None:
            raise GeneratorError(f"method {self.name}: latent_scale is missing from the generator")
        den = self.frozen("denoiser", device)
        zc, zl = self.latent_shape()
        z = torch.randn(n, zc, zl, generator=gen).to(device)
        c = None if cond is None else cond.view(1, -1).expand(n, -1)
        z0 = self._denoise(self._guided(den, c, guidance_scale), z, mode, t, steps, eta, gen)
        return self._decode(z0.float() / self.latent_scale, device).view(n, self.layout.num_blocks, self.layout.block_size)


