"""Generator training: Ray Train V2 ``TorchTrainer`` workers running DeepSpeed (``train-generator``).

    from rayweights.train import GeneratorTrainConfig, train_generator
    result = train_generator(GeneratorTrainConfig(method="pdiff", zoo="runs/tiny/zoo"))
    result.export_uri    # -> rayweights.generators.load_generator(...)
    method = train_local(cfg, export=...)   # the same stages in one process (small zoos, tests)

The names below load on first use (PEP 562): Ray Data's processes unpickle the batch functions of
``rayweights.train.data``, and an eager package would make each of them import the generators
(diffusers, scikit-learn), ~10 s per process on 2 cores, several processes per training stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:                      # for type checkers only; at run time __getattr__ loads them
    from .config import FaultInjection, GeneratorTrainConfig, StageConfig, resolved_stage  # noqa: F401
    from .local import train_local  # noqa: F401
    from .trainer import Plan, TrainError, TrainResult, preflight, train_generator  # noqa: F401

_EXPORTS = {"GeneratorTrainConfig": "config", "StageConfig": "config", "FaultInjection": "config",
            "resolved_stage": "config", "train_local": "local", "train_generator": "trainer",
            "preflight": "trainer", "TrainError": "trainer", "TrainResult": "trainer", "Plan": "trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
