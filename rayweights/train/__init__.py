"""Generator training: Ray Train V2 ``TorchTrainer`` workers running DeepSpeed (``train-generator``).

    from rayweights.train import GeneratorTrainConfig, train_generator
    result = train_generator(GeneratorTrainConfig(method="pdiff", zoo="runs/tiny/zoo"))
    result.export_uri    # -> rayweights.generators.load_generator(...)
"""

from .config import FaultInjection, GeneratorTrainConfig, StageConfig, resolved_stage
from .trainer import Plan, TrainError, TrainResult, preflight, train_generator

__all__ = ["GeneratorTrainConfig", "StageConfig", "FaultInjection", "resolved_stage", "train_generator", "preflight",
           "TrainError", "TrainResult", "Plan"]
