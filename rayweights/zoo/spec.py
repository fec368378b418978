"""The zoo spec: a strict, typed YAML document (unknown keys are errors naming the field).

Everything that can be checked without data is checked here (``__post_init__``); what needs the
data or the output URI (dataset paths, the task list, the layout, a probe write) is checked by
``rayweights.zoo.builder.prepare`` — both before any member trains.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from ..config import from_dict
from ..errors import check_id
from ..storage import read_bytes, resolve
from . import architectures
from .families import FAMILIES
from .sources import parse_sources

OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class HParamRanges:
    """Per-member variation: each member draws its own values from these ranges (seeded), so a zoo
    is diverse by design rather than consecutive checkpoints of one run."""

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

    def __post_init__(self):
        if self.num_cpus <= 0:
            raise ValueError("resources.num_cpus: must be > 0")
        if not 0 <= self.num_gpus <= 8:
            raise ValueError(f"resources.num_gpus: {self.num_gpus} (0 for CPU, a fraction to pack members per GPU)")
        if self.workers < 1:
            raise ValueError("resources.workers: must be >= 1")


@dataclass
class ConceptOptions:
    """The ``concepts`` family (Denoised Neural Weights): paired data, editor, base generator, GAN."""

    image_size: int = 16                # source/target images are image_size x image_size RGB
    num_images: int = 64                # paired images per concept (paper: 400 per concept, 80/10/10 split)
    image_seed: int = 0                 # seed of the procedural images / of the pick from a folder or table
    # where the source images come from: procedural (offline default) | imagefolder:<uri> | parquet:<uri>
    # (or a bare folder URI / a URI ending in .parquet; local, file:// or s3://)
    sources: str = "procedural"
    sources_column: str = "image"       # a Parquet table's column of encoded image bytes (or {bytes, path})
    max_ops: int = 2                    # 1: single operations only; 2: plus two-step compositions
    paraphrases: int = 1                # prompts per concept (the paper's augmented concepts)
    editor: str = "procedural"          # procedural | diffusers:<pipeline folder>
    editor_options: dict = field(default_factory=dict)   # e.g. {num_inference_steps: 20}
    lambda_l1: float = 100.0            # lambda of eq. 4 (pix2pix's 100)
    base_images: int = 256              # procedural images the base generator is trained on (user sources:
                                        # the members' training split of the source images)
    base_lr: float = 2e-3
    # the base generator's objective (L1): mixture = pairs (x, edit(x)) of the zoo's training concepts,
    # a concept drawn uniformly per image (held-out concepts never); identity = reproduce x (zoos built
    # before this option existed: their zoo_spec.json reads as identity)
    base_objective: Literal["mixture", "identity"] = "mixture"
    discriminator: dict = field(default_factory=lambda: {"width": 16, "layers": 2})

    def __post_init__(self):
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"concepts.image_size: {self.image_size} must be >= 8 and divisible by 4")
        if self.num_images < 4:
            raise ValueError("concepts.num_images: must be >= 4")
        if self.max_ops not in (1, 2):
            raise ValueError("concepts.max_ops: 1 or 2")
        if self.paraphrases < 1:
            raise ValueError("concepts.paraphrases: must be >= 1")
        if self.editor != "procedural" and not self.editor.startswith("diffusers:"):
            raise ValueError(f"concepts.editor: {self.editor!r} is not 'procedural' or 'diffusers:<path>'")
        parse_sources(self.sources)
        if not self.sources_column:
            raise ValueError("concepts.sources_column: empty (the Parquet column of encoded images)")
        if self.lambda_l1 < 0 or self.base_lr <= 0 or self.base_images < 2:
            raise ValueError("concepts: lambda_l1 >= 0, base_lr > 0 and base_images >= 2 are required")
        unknown = set(self.discriminator) - {"width", "layers"}
        if unknown:
            raise ValueError(f"concepts.discriminator: unknown key(s) {sorted(unknown)} (width, layers)")


@dataclass
class ZooSpec:
    name: str
    output: str = ""                         # URI of the zoo (folder / file:// / s3://); --output overrides
    family: str = "dataset-subsets"          # dataset-subsets | partial | concepts
    # --- data (classifier families)
    dataset: str = "digits"                  # digits | imagefolder:<path> | torchvision:<Name>:<root> | parquet:<uri>
    image_size: int = 32                     # resize for image folders / tables (digits stay 8x8)
    features: str = ""                       # "" | clip:<path>: train on frozen CLIP image embeddings
    classes_per_task: int = 5
    max_examples_per_class: int = 0          # 0 = all (D2NWG: subsets of classes and examples)
    # --- tasks
    tasks: list[str] = field(default_factory=list)       # explicit conditions ("digits:0,1,2,3,4", prompts)
    max_tasks: int = 0                        # else: enumerate all tasks, keep the first N (0 = all)
    held_out: list[str] = field(default_factory=list)    # conditions / concept keys reserved for evaluation
    held_out_every: int = 0                   # also reserve every k-th enumerated task (concept); with max_tasks, among the first ones
    # --- members
    architecture: str = "mlp3"
    arch_options: dict = field(default_factory=dict)
    select: str | list[str] | None = None     # which parameters are kept (see WeightLayout); concepts: LoRA+BN
    train_only_selected: bool = False         # partial and concepts always train only the selected ones
    members_per_task: int = 2
    seed: int = 0
    # member: every member starts from its own random initialisation; shared: every member of every task
    # starts from one initialisation (seeded by ``seed``), so the zoo lies in one basin and its members'
    # units correspond across tasks (the setting of fine-tuned zoos, which conditional generators interpolate)
    init: Literal["member", "shared"] = "member"
    hparams: HParamRanges = field(default_factory=HParamRanges)
    keep_last: int = 2                        # checkpoints kept: last K epochs (partial: last K steps)
    base_epochs: int = 10                     # partial: per-task base model; concepts: the base generator
    optimizer: str = "adamw"                  # adamw | adam | sgd
    batch_size: int = 64
    val_fraction: float = 0.3
    concepts: ConceptOptions = field(default_factory=ConceptOptions)
    # --- layout
    block_size: int = 256
    rule: int = 1
    # --- execution
    resources: Resources = field(default_factory=Resources)
    device: str = "auto"                      # auto (cuda when num_gpus > 0 and visible) | cpu | cuda
    max_retries: int = 2
    fail_members: list[str] = field(default_factory=list)   # fault injection: "member_id" or "member_id:N"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: unknown {self.family!r} (available: {', '.join(sorted(FAMILIES))})")
        if self.architecture not in architectures.ARCHITECTURES:
            raise ValueError(f"architecture: unknown {self.architecture!r} "
                             f"(registered: {', '.join(sorted(architectures.ARCHITECTURES))})")
        need = FAMILIES[self.family].arch_kind
        if architectures.ARCH_KINDS[self.architecture] != need:
            fits = sorted(a for a, k in architectures.ARCH_KINDS.items() if k == need)
            raise ValueError(f"architecture: {self.architecture} is a {architectures.ARCH_KINDS[self.architecture]}; "
                             f"family {self.family} trains a {need} ({', '.join(fits)})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
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
        if self.max_tasks < 0 or self.held_out_every < 0 or self.max_examples_per_class < 0:
            raise ValueError("max_tasks / held_out_every / max_examples_per_class: must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: {self.val_fraction} must be in (0, 1)")
        if self.batch_size < 2:
            raise ValueError("batch_size: must be >= 2 (BatchNorm)")
        if self.base_epochs < 1 and self.family in ("partial", "concepts"):
            raise ValueError("base_epochs: must be >= 1")
        if self.max_retries < 0:
            raise ValueError("max_retries: must be >= 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device!r} is not auto, cpu or cuda[:N]")
        if self.tasks:                       # ids that become file names: checked at load, before any work
            fam = FAMILIES[self.family]
            for c in self.tasks:
                check_id(fam.task_from_condition(self, c).task_id, f"tasks: {c!r} gives task id")
        for f in self.fail_members:
            if f.count(":") > 1 or (":" in f and not f.rsplit(":", 1)[1].isdigit()):
                raise ValueError(f"fail_members: {f!r} is not 'member_id' or 'member_id:N'")


def read_zoo_spec(zoo_uri: str) -> tuple[ZooSpec | None, list[str]]:
    """(ZooSpec, held-out conditions) from ``<zoo>/zoo_spec.json`` (written by build-zoo), or
    (None, []) for a table written without the builder."""
    try:
        d = json.loads(read_bytes(resolve(zoo_uri).join("zoo_spec.json")))
    except FileNotFoundError:
        return None, []
    raw = d["spec"]
    if raw.get("family") == "concepts" and "base_objective" not in (raw.get("concepts") or {}):
        # written before concepts.base_objective existed: its base generator was trained on identity
        raw = {**raw, "concepts": {**(raw.get("concepts") or {}), "base_objective": "identity"}}
    spec = from_dict(ZooSpec, raw)
    if not spec.output:
        spec = dataclasses.replace(spec, output=zoo_uri)
    return spec, list(d.get("held_out", []))
