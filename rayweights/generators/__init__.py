"""Weight generators (diffusers-style models) and the method objects that train and sample them.

Models, one file each: :class:`BlockUNet1D` (Denoised Neural Weights), :class:`PDiffAutoencoder`
and :class:`LatentDenoiser1D` (p-diff), :class:`WeightVAE` + ``rayweights.conditioning.SetTransformer``
+ :class:`LatentDenoiser1D` (D2NWG).  Sizes: :mod:`rayweights.generators.presets`.
Methods (training stages, losses, sampling, export): :mod:`rayweights.generators.methods`.
"""

from .block_unet import BlockUNet1D
from .latent_denoiser import LatentDenoiser1D
from .methods import (D2NWG, METHODS, DenoisedWeights, GeneratorError, GeneratorMethod, GeneratorSampler, PDiff,
                      block_unet_denoiser, build_method, count_parameters, load_generator, load_model,
                      one_step_recover, sampler_loader)
from .pdiff import PDiffAutoencoder
from .presets import PRESETS, UnknownPresetError, get_preset, list_presets, register_preset
from .vae import WeightVAE

__all__ = ["BlockUNet1D", "LatentDenoiser1D", "PDiffAutoencoder", "WeightVAE", "GeneratorMethod", "DenoisedWeights",
           "PDiff", "D2NWG", "METHODS", "build_method", "load_generator", "load_model", "GeneratorError",
           "GeneratorSampler", "sampler_loader", "block_unet_denoiser", "count_parameters", "one_step_recover",
           "PRESETS", "get_preset", "list_presets", "register_preset", "UnknownPresetError"]
