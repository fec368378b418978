"""The zoo spec: a strict, typed YAML document (unknown keys are errors naming the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import architectures

FAMILIES = ("dataset-subsets", "partial")


@dataclass
class HParamRanges:
    """Per-member variation: each member draws its own values from these ranges (seeded)."""

    lr: list[float] = field(default_factory=lambda: [3e-3, 3e-2])
    weight_decay: list[float] = field(default_factory=lambda: [1e-5, 1e-3])
    epochs: list[int] = field(default_factory=lambda: [8, 12])

    def __post_init__(self):
        for name in ("lr", "weight_decay", "epochs"):
            v = getattr(self, name)
            if len(v) != 2 or v[0] > v[1] or v[0] < 0:
                raise ValueError(f"hparams.{name}: expected [low, high] with 0 <= low <= high, got {v}")
        if self.lr[0] <= 0:
            raise ValueError("hparams.lr: must be > 0")
        if self.epochs[0] < 1:
            raise ValueError("hparams.epochs: must be >= 1")


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0          # fractional: 0.25 packs four members per GPU
    workers: int = 2               # actor pool size (max concurrent members)


@dataclass
class ZooSpec:
    name: str
    output: str = ""                         # URI of the zoo (folder / file:// / s3://); --output overrides
    family: str = "dataset-subsets"
    dataset: str = "digits"                  # digits | imagefolder:<path>
    classes_per_task: int = 5
    tasks: list[str] = field(default_factory=list)       # explicit conditions "digits:0,1,2,3,4" ...
    max_tasks: int = 0                        # else: enumerate all subsets, keep the first N (0 = all)
    held_out: list[str] = field(default_factory=list)    # conditions reserved for evaluation
    held_out_every: int = 0                   # also reserve every k-th enumerated task
    architecture: str = "mlp3"
    arch_options: dict = field(default_factory=dict)
    select: str | list[str] | None = None     # which parameters are kept (see WeightLayout)
    train_only_selected: bool = False
    members_per_task: int = 2
    seed: int = 0
    hparams: HParamRanges = field(default_factory=HParamRanges)
    keep_last: int = 2                        # checkpoints kept: last K epochs (partial: last K steps)
    base_epochs: int = 10                     # partial: epochs of the shared base model per task
    optimizer: str = "adamw"
    batch_size: int = 64
    val_fraction: float = 0.3
    block_size: int = 256
    rule: int = 1
    resources: Resources = field(default_factory=Resources)
    max_retries: int = 2
    fail_members: list[str] = field(default_factory=list)   # fault injection (tests, drills)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: unknown {self.family!r} (available: {', '.join(FAMILIES)})")
        if self.architecture not in architectures.ARCHITECTURES:
            raise ValueError(f"architecture: unknown {self.architecture!r} "
                             f"(registered: {', '.join(sorted(architectures.ARCHITECTURES))})")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: {self.optimizer!r} is not adamw or sgd")
        if self.members_per_task < 1:
            raise ValueError("members_per_task: must be >= 1")
        if self.keep_last < 1:
            raise ValueError("keep_last: must be >= 1")
        if self.family == "partial" and not self.select:
            raise ValueError("select: the partial family needs the parameters it trains (e.g. norm-last:2)")
        if self.family != "partial" and self.keep_last > self.hparams.epochs[0]:
            raise ValueError(f"keep_last: {self.keep_last} exceeds the fewest epochs {self.hparams.epochs[0]}")
        if self.block_size < 1:
            raise ValueError("block_size: must be >= 1")
        if self.classes_per_task < 2:
            raise ValueError("classes_per_task: must be >= 2")
        if "tasks" in self.__dict__ and self.tasks is not None and not isinstance(self.tasks, list):
            raise ValueError("tasks: expected a list")
