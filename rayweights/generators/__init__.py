"""Weight generators (diffusers-style models) and the method objects that train and sample them.

Models, one file each: :class:`BlockUNet1D` (Denoised Neural Weights), :class:`PDiffAutoencoder`
and :class:`LatentDenoiser1D` (p-diff), :class:`WeightVAE` + ``rayweights.conditioning.SetTransformer``
+ :class:`LatentDenoiser1D` (D2NWG).  Sizes: :mod:`rayweights.generators.presets`.
Methods (training stages, losses, sampling): :mod:`rayweights.generators.methods`; the diffusion
process (schedule, one-step recovery, DDIM/DDPM): :mod:`rayweights.generators.diffusion`; the state
and its export: :mod:`rayweights.generators.state`, :func:`load_generator`.
"""

from .block_unet import BlockUNet1D
from .diffusion import (SAMPLING_MODES, PredictionType, SamplingMode, SchedulerConfig, check_sampling, denoise,
                        make_scheduler, one_step_recover, training_target)
from .errors import GeneratorError
from .io import MODEL_CLASSES, load_model
from .latent_denoiser import LatentDenoiser1D
from .loader import load_generator
from .methods import (D2NWG, METHODS, DenoisedWeights, GeneratorMethod, LatentMethod, PDiff, build_method,
                      count_parameters, register_method)
from .pdiff import PDiffAutoencoder
from .presets import PRESETS, UnknownPresetError, get_preset, list_presets, register_preset
from .state import FORMAT_VERSION, GENERATOR_FILE, GeneratorState, is_generator_export
from .vae import WeightVAE

__all__ = ["BlockUNet1D", "LatentDenoiser1D", "PDiffAutoencoder", "WeightVAE", "MODEL_CLASSES", "GeneratorMethod",
           "LatentMethod", "DenoisedWeights", "PDiff", "D2NWG", "METHODS", "register_method", "build_method",
           "load_generator", "load_model", "GeneratorError", "GeneratorState", "FORMAT_VERSION", "GENERATOR_FILE",
           "is_generator_export", "count_parameters", "SchedulerConfig", "SamplingMode", "SAMPLING_MODES",
           "PredictionType", "make_scheduler", "training_target", "one_step_recover", "denoise", "check_sampling",
           "PRESETS", "get_preset", "list_presets", "register_preset", "UnknownPresetError"]
