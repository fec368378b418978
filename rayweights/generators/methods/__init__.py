"""The generator methods: one file each, registered by name in :data:`METHODS`.

| method | stages (model) | unit | condition |
|---|---|---|---|
| ``denoised_weights`` | diffusion (BlockUNet1D) | block | text prompt (frozen text encoder, cached) + block index |
| ``pdiff`` | autoencoder (PDiffAutoencoder), diffusion (LatentDenoiser1D) | checkpoint | none |
| ``d2nwg`` | vae (WeightVAE), dataset_encoder (SetTransformer), diffusion (LatentDenoiser1D) | checkpoint | dataset (Set Transformer) |

``base.py``: the interface and the registry; ``losses.py``: the stage losses; ``latent.py``: what
p-diff and D2NWG share.
"""

from .base import METHODS, GeneratorMethod, build_method, count_parameters, register_method
from .d2nwg import D2NWG
from .denoised_weights import DenoisedWeights
from .latent import LatentMethod
from .pdiff import PDiff

__all__ = ["GeneratorMethod", "LatentMethod", "DenoisedWeights", "PDiff", "D2NWG", "METHODS", "build_method",
           "register_method", "count_parameters"]
