"""Loading a trained generator from its export folder (local path or ``s3://``)."""

from __future__ import annotations

import os

from .errors import GeneratorError
from .io import local_copy, model_class
from .methods import METHODS, GeneratorMethod
from .presets import get_preset
from .state import GeneratorState

__all__ = ["load_generator"]


def load_generator(uri: str) -> GeneratorMethod:
    """A trained generator from its export folder: :class:`GeneratorState` + one model folder per model."""
    state, model_classes = GeneratorState.read(uri)
    if state.method not in METHODS:
        raise GeneratorError(f"{uri}: unknown method {state.method!r}")
    models = {}
    with local_copy(uri) as d:
        for key, cls_name in model_classes.items():
            cls = model_class(cls_name, f"{uri}: model {key}")
            models[key] = cls.from_pretrained(os.path.join(d, key)).eval()
    # the exact configs the models were built with; models the export lacks get preset + overrides
    configs = {k: {n: v for n, v in m.config.items() if not n.startswith("_")} for k, m in models.items()}
    base = get_preset(state.method, state.preset)
    for k in base:
        configs.setdefault(k, {**base[k], **state.model_overrides.get(k, {})})
    state.model_configs = configs
    return GeneratorMethod.from_state(state, models=models)
