"""FINE learngene initialisation of variable-sized models.

W_l = U Σ_l Vᵀ per layer type: U, V shared by all blocks (the learngenes), Σ_l per layer.

Public API::

    from rayweights.learngene import (LayerType, match_layer_types, extract, Learngene, Gene,
        init_from_learngene, build_model, sigma_phase_parameters, materialize, collect_learngene,
        map_depth, ModelFamily, register_model_family, get_model_family, MODEL_FAMILIES, LearngeneError)
    from rayweights.learngene.spec import LearngeneConfig
    from rayweights.learngene.experiment import plan_learngene, run_learngene
    from rayweights.learngene.cli import main

Typical use on any ``nn.Module``::

    types = [LayerType("q", r"blocks\\.(\\d+)\\.attn\\.q\\.weight"), LayerType("mlp_in", r"blocks\\.(\\d+)\\.fc1\\.weight")]
    lg = extract(trained_model, types, mode="diag")          # or mode="full", rank=/energy=
    lg.save("s3://bucket/learngenes/vit")                     # learngene.safetensors + learngene.json
    model, report = build_model(lambda: MyViT(depth=6, width=384), Learngene.load(uri), factorized=True)
    names = sigma_phase_parameters(model)                     # only Σ (+ norms) train
    ...train on a small subset...
    materialize(model)                                        # plain weights; full training follows
"""

from .build import (DEPTH_MODES, EXTEND_MODES, FactorizedWeight, InitReport, build_model, collect_learngene,
                    init_from_learngene, map_depth, materialize, norm_parameters, sigma_phase_parameters)
from .factor import MODES, Gene, Learngene, decompose, extract
from .layers import LayerMatch, LayerType, LearngeneError, match_layer_types
from . import generator  # noqa: F401  (registers the block_unet1d model family)
from .models import MODEL_FAMILIES, ModelFamily, get_model_family, register_model_family

__all__ = ["LayerType", "LayerMatch", "match_layer_types", "LearngeneError", "extract", "decompose", "Learngene",
           "Gene", "MODES", "init_from_learngene", "build_model", "sigma_phase_parameters", "materialize",
           "collect_learngene", "map_depth", "norm_parameters", "FactorizedWeight", "InitReport", "DEPTH_MODES",
           "EXTEND_MODES", "ModelFamily", "register_model_family", "get_model_family", "MODEL_FAMILIES"]
