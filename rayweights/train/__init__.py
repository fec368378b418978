"""Generator training: Ray Train V2 ``TorchTrainer`` workers running DeepSpeed (``train-generator``).

    from rayweights.train import GeneratorTrainConfig, train_generator
    result = train_generator(GeneratorTrainConfig(method="pdiff", zoo="runs/tiny/zoo"))
    result.export_uri    # -> rayweights.generators.load_generator(...)
    method = train_local(cfg, export=...)   # the same stages in one process (small zoos, tests)
"""

from .config import FaultInjection, GeneratorTrainConfig, StageConfig, resolved_stage
from .local import train_local
from .trainer import Plan, TrainError, TrainResult, preflight, train_generator

__all__ = ["GeneratorTrainConfig", "StageConfig", "FaultInjection", "resolved_stage", "train_generator", "preflight",
           "TrainError", "TrainResult", "Plan", "train_local"]
