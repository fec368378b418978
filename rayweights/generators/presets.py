"""Size presets per method, from ``tiny`` (tests, seconds on a CPU) to ``xl`` (~1 B parameters).

A preset maps each model of a method to its constructor arguments; the data-dependent ones
(block size, flattened length, latent shape, condition widths) are filled in from the zoo layout
by the method object.  Parameter counts (``rayweights.generators.count_parameters``) are for the
paper-like layout: blocks of 256 for ``denoised_weights``; for the whole-vector methods they depend
on the vector length (the VAE's linear adapters scale with it), quoted here for 16 384 weights.

| method | tiny | small | base | large | xl |
|---|---|---|---|---|---|
| denoised_weights (BlockUNet1D, blocks of 256, text width 384) | 0.5 M | 18 M | 108 M | 418 M | 0.93 B |
| pdiff (AE + latent DDPM, 16 384 weights) | 0.2 M | 7 M | 104 M | 414 M | 0.98 B |
| d2nwg (VAE + Set Transformer + LDM, 16 384 weights, 512-d features) | 2.4 M | 17 M | 151 M | 512 M | 1.1 B |
"""

from __future__ import annotations

import copy

__all__ = ["PRESETS", "register_preset", "get_preset", "list_presets", "UnknownPresetError"]


class UnknownPresetError(KeyError):
    def __str__(self):
        return str(self.args[0])


PRESETS: dict[str, dict[str, dict[str, dict]]] = {"denoised_weights": {}, "pdiff": {}, "d2nwg": {}}


def register_preset(method: str, name: str, models: dict[str, dict]) -> None:
    PRESETS.setdefault(method, {})[name] = copy.deepcopy(models)


def list_presets(method: str) -> list[str]:
    return list(PRESETS.get(method, {}))


def get_preset(method: str, name: str) -> dict[str, dict]:
    if method not in PRESETS:
        raise UnknownPresetError(f"method: unknown method {method!r} (known: {sorted(PRESETS)})")
    if name not in PRESETS[method]:
        raise UnknownPresetError(f"preset: unknown preset {name!r} for method {method!r} "
                                 f"(known: {list_presets(method)})")
    return copy.deepcopy(PRESETS[method][name])


# ----------------------------------------------------------------------------- Denoised Weights
_UNET = dict(layers_per_block=2, context_tokens=4, index_encoding_dim=128)
# max_groups 8: at the default 32 every GroupNorm of 16/32 channels has one channel per group, and the
# norm after each ResBlock's embedding shift removes it (emb_t, emb_n and emb_c would reach nothing)
register_preset("denoised_weights", "tiny", {"denoiser": dict(
    _UNET, block_channels=[16, 32], attention_levels=[False, True], num_heads=2, layers_per_block=1,
    index_encoding_dim=32, context_tokens=2, mid_attention=False, max_groups=8)})
register_preset("denoised_weights", "small", {"denoiser": dict(
    _UNET, block_channels=[64, 128, 256], attention_levels=[False, True, True], num_heads=4)})
register_preset("denoised_weights", "base", {"denoiser": dict(     # ~108 M: the MFU benchmark model
    _UNET, block_channels=[128, 256, 512, 512], attention_levels=[False, True, True, True], num_heads=8)})
register_preset("denoised_weights", "large", {"denoiser": dict(
    _UNET, block_channels=[256, 512, 1024, 1024], attention_levels=[False, True, True, True], num_heads=16)})
register_preset("denoised_weights", "xl", {"denoiser": dict(        # ~0.93 B (ZeRO-3 on 64 A100s)
    _UNET, block_channels=[384, 768, 1536, 1536], attention_levels=[False, True, True, True], num_heads=16)})

# ----------------------------------------------------------------------------- p-diff
register_preset("pdiff", "tiny", {
    "autoencoder": dict(channels=[8, 16, 16, 16], latent_channels=4, fold=2, kernel_size=3, norm="instance"),
    "denoiser": dict(channels=[16, 32, 32, 32], layers_per_block=1)})
register_preset("pdiff", "small", {
    "autoencoder": dict(channels=[32, 64, 128, 128], latent_channels=4, fold=2, kernel_size=5, norm="instance"),
    "denoiser": dict(channels=[64, 128, 256, 256], layers_per_block=1)})
register_preset("pdiff", "base", {
    "autoencoder": dict(channels=[128, 256, 512, 512], latent_channels=8, fold=2, kernel_size=5, norm="instance"),
    "denoiser": dict(channels=[192, 384, 768, 768], layers_per_block=2, mid_attention_heads=8)})
register_preset("pdiff", "large", {
    "autoencoder": dict(channels=[256, 512, 1024, 1024], latent_channels=8, fold=2, kernel_size=5, norm="instance"),
    "denoiser": dict(channels=[384, 768, 1536, 1536], layers_per_block=2, mid_attention_heads=16)})
register_preset("pdiff", "xl", {
    "autoencoder": dict(channels=[512, 1024, 1536, 2048], latent_channels=16, fold=2, kernel_size=5, norm="group"),
    "denoiser": dict(channels=[512, 1024, 2048, 2048], layers_per_block=3, mid_attention_heads=16)})

# ----------------------------------------------------------------------------- D2NWG
register_preset("d2nwg", "tiny", {
    "vae": dict(adapter_length=16, hidden_channels=[16, 32], latent_channels=4, kl_weight=1e-6),
    "dataset_encoder": dict(hidden_dim=32, out_dim=32, num_heads=2, num_inds=8),
    "denoiser": dict(channels=[16, 32, 32, 32], layers_per_block=1, cond_channels=1)})
register_preset("d2nwg", "small", {
    "vae": dict(adapter_length=64, hidden_channels=[64, 128, 256], latent_channels=4, kl_weight=1e-6),
    "dataset_encoder": dict(hidden_dim=128, out_dim=128, num_heads=4, num_inds=16),
    "denoiser": dict(channels=[64, 128, 256, 256], layers_per_block=1, cond_channels=2)})
register_preset("d2nwg", "base", {
    "vae": dict(adapter_length=256, hidden_channels=[128, 256, 512], latent_channels=8, layers_per_block=2,
                kl_weight=1e-6),
    "dataset_encoder": dict(hidden_dim=512, out_dim=1024, num_heads=8, num_inds=32),
    "denoiser": dict(channels=[192, 384, 768, 768], layers_per_block=2, cond_channels=4, mid_attention_heads=8)})
register_preset("d2nwg", "large", {
    "vae": dict(adapter_length=512, hidden_channels=[256, 512, 1024], latent_channels=8, layers_per_block=2,
                kl_weight=1e-6),
    "dataset_encoder": dict(hidden_dim=768, out_dim=1024, num_heads=12, num_inds=32),
    "denoiser": dict(channels=[384, 768, 1536, 1536], layers_per_block=2, cond_channels=4, mid_attention_heads=16)})
register_preset("d2nwg", "xl", {
    "vae": dict(adapter_length=1024, hidden_channels=[256, 512, 1024, 1024], latent_channels=16,
                layers_per_block=2, kl_weight=1e-6),
    "dataset_encoder": dict(hidden_dim=1024, out_dim=1024, num_heads=16, num_inds=64),
    "denoiser": dict(channels=[512, 1024, 2048, 2048], layers_per_block=3, cond_channels=8, mid_attention_heads=16)})
