"""``GeneratorTrainConfig``: the strict, typed config of ``train-generator``.

Top-level ``steps``/``batch_size``/``lr``/... are the defaults of every stage; ``stages.<name>``
overrides them per stage (``autoencoder``/``diffusion`` for p-diff; ``vae``/``dataset_encoder``/
``diffusion`` for D2NWG; ``diffusion`` for Denoised Weights).  Defaults follow the papers where
they say: AdamW, lr 1e-5 and weight decay 0.01 for Denoised Weights at scale (the tiny configs
raise the lr), p-diff lr 1e-3 / wd 2e-6, D2NWG lr 1e-4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..config import check_keywords
from ..generators import METHODS, SchedulerConfig, UnknownPresetError, get_preset

__all__ = ["GeneratorTrainConfig", "StageConfig", "FaultInjection", "resolved_stage", "LRSchedule"]

LRSchedule = Literal["constant", "linear_decay", "cosine"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class StageConfig:
    """Per-stage overrides; ``None`` = inherit the top-level value."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    lr_schedule: LRSchedule | None = None
    grad_clip: float | None = None

    def __post_init__(self):
        for f in ("steps", "batch_size"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"{f}: must be >= 1, got {v}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


@dataclass
class FaultInjection:
    """Testing knob: kill one worker once at a given optimiser step (the run must survive it), once Ray
    Train has registered the latest checkpoint before that step (the restart resumes from it)."""

    step: int = -1             # -1: disabled
    rank: int = 0
    stage: str = ""            # "" = the first stage that trains
    mode: str = "exit"         # exit (the worker process dies) | raise (an exception in the loop)

    def __post_init__(self):
        if self.mode not in ("exit", "raise"):
            raise ValueError(f"fault_injection.mode: {self.mode!r} is not exit or raise")
        if self.rank < 0:
            raise ValueError("fault_injection.rank: must be >= 0")


@dataclass
class GeneratorTrainConfig:
    method: str                                  # denoised_weights | pdiff | d2nwg
    zoo: str = ""                                # zoo URI (local folder, file:// or s3://)
    preset: str = "tiny"                         # size preset (rayweights.generators.presets)
    model: dict[str, dict] = field(default_factory=dict)     # per-model constructor overrides
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)   # the noise schedule (DDPMScheduler)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    only_stages: list[str] = field(default_factory=list)     # train only these ([] = all)
    # optimisation defaults of every stage
    steps: int = 1000
    batch_size: int = 64                         # global batch (all workers, all accumulation steps)
    gradient_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: LRSchedule = "constant"
    grad_clip: float = 1.0
    # distributed
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2                          # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"                      # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool = False
    # checkpoints, logs, storage
    run_name: str = "generator"
    storage: str = "runs"                        # runs are <storage>/<run_name>/...
    checkpoint_every: int = 100
    log_every: int = 10
    max_failures: int = 0
    seed: int = 0
    # data and conditions
    stats_members: int = 256                     # members used to fit per-group normalisation stats
    normalization: str = "group"                 # group | tensor: one mean/std per layout group or per tensor
    #                                              element: a mean per weight position (the zoo's average), a std per tensor
    shuffle_buffer: int = 0                      # rows in each worker's local shuffle buffer (0: 8 batches)
    # auto: a worker whose shard of the table is <= in_memory_max_mb reads it once and reshuffles it in memory
    # every epoch (no Ray Data pipeline per epoch); larger shards stream from the table. always | never force it.
    data_in_memory: str = "auto"
    in_memory_max_mb: float = 2048.0
    text_encoder: str = "default"                # HF name or path; default = packaged MiniLM
    dataset_samples_per_class: int = 10          # D2NWG: samples per class in a dataset's feature sets
    # classifier-free guidance: probability that a diffusion-stage row trains on the null condition
    # (conditioned methods; 0 = never, and such a generator refuses guidance_scale != 1 at sampling)
    cond_dropout: float = 0.0
    skip_bad_members: bool = False               # train without zoo members whose files fail the pre-flight check
    fault_injection: FaultInjection = field(default_factory=FaultInjection)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r} (known: {sorted(METHODS)})")
        try:
            models = get_preset(self.method, self.preset)
        except UnknownPresetError as exc:
            raise ValueError(str(exc)) from None
        bad = sorted(set(self.model) - set(models))
        if bad:
            raise ValueError(f"model: unknown model(s) {bad} for {self.method} (has {sorted(models)})")
        for key, kwargs in self.model.items():      # keywords checked against the constructors, at load
            check_keywords(METHODS[self.method].model_class[key], kwargs or {}, f"model.{key}")
        stages = METHODS[self.method].stages
        bad = sorted(set(self.stages) - set(stages))
        if bad:
            raise ValueError(f"stages: unknown stage(s) {bad} for {self.method} (stages: {list(stages)})")
        bad = sorted(set(self.only_stages) - set(stages))
        if bad:
            raise ValueError(f"only_stages: unknown stage(s) {bad} for {self.method} (stages: {list(stages)})")
        if self.fault_injection.stage and self.fault_injection.stage not in stages:
            raise ValueError(f"fault_injection.stage: {self.fault_injection.stage!r} is not a stage of {self.method}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout: must be in [0, 1), got {self.cond_dropout}")
        if self.cond_dropout and METHODS[self.method].conditioning is None:
            raise ValueError(f"cond_dropout: method {self.method} is unconditional (cond_dropout must be 0)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: {self.zero_stage} is not 0, 1, 2 or 3")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: {self.precision!r} is not auto, bf16 or fp32")
        if self.data_in_memory not in ("auto", "always", "never"):
            raise ValueError(f"data_in_memory: {self.data_in_memory!r} is not auto, always or never")
        if self.in_memory_max_mb < 0:
            raise ValueError(f"in_memory_max_mb: must be >= 0, got {self.in_memory_max_mb}")
        if self.normalization not in ("group", "tensor", "element"):
            raise ValueError(f"normalization: {self.normalization!r} is not group, tensor or element")
        for f in ("num_workers", "steps", "batch_size", "gradient_accumulation", "checkpoint_every", "log_every",
                  "stats_members", "dataset_samples_per_class"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}: must be >= 1, got {getattr(self, f)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.max_failures < -1:
            raise ValueError("max_failures: must be >= -1 (-1 = retry forever)")
        if not _NAME.match(self.run_name):
            raise ValueError(f"run_name: {self.run_name!r} must be letters, digits, '_', '.', '-' (no '/')")
        if self.fault_injection.rank >= self.num_workers and self.fault_injection.step >= 0:
            raise ValueError(f"fault_injection.rank: {self.fault_injection.rank} >= num_workers {self.num_workers}")
        for name in stages:
            s = resolved_stage(self, name)
            per_worker = self.num_workers * self.gradient_accumulation
            if s["batch_size"] % per_worker:
                raise ValueError(f"batch_size: {s['batch_size']} (stage {name}) is not divisible by num_workers x "
                                 f"gradient_accumulation = {per_worker}")

    @property
    def train_stages(self) -> list[str]:
        return [s for s in METHODS[self.method].stages if not self.only_stages or s in self.only_stages]

    def bf16(self, gpu: bool | None = None) -> bool:
        if self.precision == "auto":
            return bool(self.use_gpu if gpu is None else gpu)
        return self.precision == "bf16"


def resolved_stage(cfg: GeneratorTrainConfig, stage: str) -> dict:
    """The effective optimisation settings of one stage (stage overrides over top-level defaults)."""
    s = cfg.stages.get(stage) or StageConfig()
    out = {}
    for f in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip"):
        v = getattr(s, f)
        out[f] = getattr(cfg, f) if v is None else v
    return out
