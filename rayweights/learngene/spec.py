"""The ``learngene`` job config: strict dataclasses (unknown keys are errors naming the field)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..config import check_import_allowed
from .build import DEPTH_MODES, EXTEND_MODES
from .factor import MODES
from .layers import LayerType
from .tasks import TASK_KINDS

__all__ = ["LearngeneConfig", "SizeSpec", "SourceSpec", "ExtractSpec", "InitSpec", "SigmaPhaseSpec", "TrainSpec",
           "TargetSpec", "TaskSpec", "ResourceSpec", "METHODS"]

METHODS = ("scratch", "fine", "fine_nosigma")
_SIZE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class SizeSpec:
    name: str
    size: dict[str, Any] = field(default_factory=dict)     # constructor keyword arguments of this size

    def __post_init__(self):
        if not _SIZE_NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} must be a plain name ([A-Za-z0-9_.-], used as a folder)")


@dataclass
class SourceSpec:
    """The trained model the learngene comes from: pretrained here for ``steps`` (full data), or
    read from ``weights`` (a safetensors state_dict, local or s3://)."""

    size: dict[str, Any] = field(default_factory=dict)
    steps: int = 400
    lr: float = 3e-3
    weights: str = ""

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps: must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")
        if not self.weights and self.steps == 0:
            raise ValueError("steps: 0 needs source.weights (a trained model to extract from)")


@dataclass
class ExtractSpec:
    mode: str = "diag"                  # diag (paper: Σ_l diagonal, CP-ALS) | full (Tucker-2, Σ_l dense)
    rank: int | None = None             # cap on the rank of every layer type
    energy: float | None = None         # keep this fraction of the squared Frobenius norm
    ranks: dict[str, int] = field(default_factory=dict)   # per layer type caps
    als_iters: int = 25
    learn_steps: int = 0                # FINE learngene learning: train U, V, Σ jointly on the source task
    learn_lr: float = 1e-3

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {list(MODES)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank: must be >= 1")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise ValueError("energy: must be in (0, 1]")
        if any(v < 1 for v in self.ranks.values()):
            raise ValueError("ranks: every rank must be >= 1")
        if self.als_iters < 0 or self.learn_steps < 0:
            raise ValueError("als_iters / learn_steps: must be >= 0")
        if self.learn_lr <= 0:
            raise ValueError("learn_lr: must be > 0")


@dataclass
class InitSpec:
    depth: str = "interpolate"
    extend: str = "orthogonal"
    rescale_fan_in: bool = True

    def __post_init__(self):
        if self.depth not in DEPTH_MODES:
            raise ValueError(f"depth: {self.depth!r} is not one of {list(DEPTH_MODES)}")
        if self.extend not in EXTEND_MODES:
            raise ValueError(f"extend: {self.extend!r} is not one of {list(EXTEND_MODES)}")


@dataclass
class SigmaPhaseSpec:
    """FINE's initialisation: only Σ (and norms) train, on a small subset, before full training."""

    steps: int = 50
    lr: float = 1e-2
    subset: float = 0.1                 # fraction of the training set
    train_norms: bool = True
    extra_trainable: list[str] = field(default_factory=list)   # regexes of other parameters to train

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps: must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")
        if not (0 < self.subset <= 1):
            raise ValueError("subset: must be in (0, 1]")
        for rx in self.extra_trainable:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"extra_trainable: invalid regex {rx!r}: {exc}") from None


@dataclass
class TrainSpec:
    """Every run lasts ``steps`` (= the direct-pretraining budget of each size); ``budget`` is the
    fixed step budget at which the initialisations are compared (Σ-phase steps count)."""

    steps: int = 400
    budget: int = 100
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    eval_every: int = 25

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps: must be >= 1")
        if not (1 <= self.budget <= self.steps):
            raise ValueError(f"budget: must be in [1, steps={self.steps}], got {self.budget}")
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")
        if self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("batch_size / eval_every: must be >= 1")


@dataclass
class TargetSpec:
    """The metric value "reached" means: ``direct`` (what direct pretraining of that size reaches at
    the end of its run), ``random_at_budget`` (what random init reaches at the budget), or ``value``."""

    kind: str = "direct"
    value: float | None = None
    tolerance: float = 0.0              # absolute slack in metric units

    def __post_init__(self):
        if self.kind not in ("direct", "random_at_budget", "value"):
            raise ValueError(f"kind: {self.kind!r} is not direct, random_at_budget or value")
        if self.kind == "value" and self.value is None:
            raise ValueError("value: kind 'value' needs a number")
        if self.tolerance < 0:
            raise ValueError("tolerance: must be >= 0")


@dataclass
class TaskSpec:
    kind: str = ""                      # default: the family's task
    options: dict[str, Any] = field(default_factory=dict)   # digits: metric, val_fraction; denoise1d: data, length, ...

    def __post_init__(self):
        if self.kind and self.kind not in TASK_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {list(TASK_KINDS)}")


@dataclass
class ResourceSpec:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class LearngeneConfig:
    """The ``learngene`` config.  A config is trusted input only when it says so: ``constructor:
    package.module:function`` imports and runs code, and is refused unless ``allow_import: true``."""

    name: str
    source: SourceSpec
    targets: list[SizeSpec]
    family: str = ""                    # a registered family (models.MODEL_FAMILIES / generator.py)
    constructor: str = ""               # or "package.module:function" building a model from size kwargs
    family_options: dict[str, Any] = field(default_factory=dict)   # keyword arguments shared by every size
    layer_types: list[LayerType] = field(default_factory=list)     # override / define the layer types
    output: str = ""
    task: TaskSpec = field(default_factory=TaskSpec)
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    init: InitSpec = field(default_factory=InitSpec)
    sigma_phase: SigmaPhaseSpec = field(default_factory=SigmaPhaseSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    methods: list[str] = field(default_factory=lambda: ["scratch", "fine"])
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    parallel: bool = True               # one Ray task per (size, method, seed); false: in this process
    device: str = "auto"                # auto | cpu | cuda
    export_inits: bool = True           # write each size's FINE initialisation (after the Σ phase)
    allow_import: bool = False          # a config is trusted input only when it says so: `constructor` imports code

    def __post_init__(self):
        if self.constructor:
            check_import_allowed(self.constructor, "constructor", self.allow_import)
        if not self.family and not self.constructor:
            raise ValueError("family: give a registered family or a constructor ('package.module:function')")
        if self.constructor and not self.layer_types and not self.family:
            raise ValueError("layer_types: a custom constructor needs layer_types (name + pattern per type)")
        if self.constructor and not self.task.kind and not self.family:
            raise ValueError("task.kind: a custom constructor needs the task it trains on")
        if not self.targets:
            raise ValueError("targets: give at least one size")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: duplicate size names {sorted({n for n in names if names.count(n) > 1})}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad} (available: {list(METHODS)})")
        if "scratch" not in self.methods:
            raise ValueError("methods: 'scratch' (random init / direct pretraining) is the reference; keep it")
        if not any(m.startswith("fine") for m in self.methods):
            raise ValueError("methods: include 'fine' (and/or 'fine_nosigma')")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not auto, cpu or cuda")
        if self.sigma_phase.steps >= self.train.steps:
            raise ValueError(f"sigma_phase.steps: {self.sigma_phase.steps} leaves no full training within "
                             f"train.steps={self.train.steps}")
