"""What every task family shares: tasks, the family protocol and registry, per-member
hyper-parameters, the classifier training epoch and evaluation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import check_id

__all__ = ["Task", "Family", "Recipe", "FAMILIES", "register_family", "get_family", "draw_hparams", "train_epoch",
           "evaluate", "resolve_device", "centre", "Checkpoint", "freeze_batchnorm", "make_optimizer", "snapshot", "plan_tasks"]

#: (step or epoch, state_dict, metrics) — what a family's train_member returns, oldest first
Checkpoint = tuple[int, dict, dict]


@dataclass(frozen=True)
class Task:
    task_id: str            # storage-safe id, e.g. "digits-01234" or "grayscale__blur_1-p0"
    condition: str          # what the generator is conditioned on: "digits:0,1,2,3,4" or a prompt
    classes: tuple[int, ...] = ()
    group: str = ""         # tasks of one group are held out together (a concept and its paraphrases)

    @property
    def holdout_key(self) -> str:
        return self.group or self.condition


class Family:
    """A task family: enumerates tasks and trains one member of one task.

    Subclasses set ``name`` and ``arch_kind`` (the architecture kind it trains, see
    ``architectures.ARCH_KINDS``) and implement the methods below.  ``spec`` is a ZooSpec.
    """

    name: str = ""
    arch_kind: str = "classifier"

    def check(self, spec) -> None:
        """Validate what needs the data or files (paths, sizes); raise ValueError('field: why')."""

    def enumerate_tasks(self, spec) -> list[Task]:
        raise NotImplementedError

    def task_from_condition(self, spec, condition: str) -> Task:
        raise NotImplementedError

    def template_state_dict(self, spec) -> dict:
        """A state_dict with the member architecture's names/shapes (builds the zoo layout)."""
        raise NotImplementedError

    def default_select(self, spec):
        return None

    def needs_prepare(self, spec) -> bool:
        return False

    def prepare(self, spec, device: str = "cpu") -> dict:
        """Shared work done once per build before any member (base models, features); returns a
        small JSON-able summary.  Idempotent: reuses what an earlier build cached in the zoo."""
        return {}

    def train_member(self, spec, task: Task, seed: int, hparams: dict, select_names: list[str] | None,
                     device: str = "cpu") -> list[Checkpoint]:
        raise NotImplementedError

    def recipe(self, spec, task: Task, *, lr: float | None = None, weight_decay: float | None = None,
               optimizer: str | None = None, batch_size: int | None = None, device: str = "cpu") -> "Recipe":
        """How this family trains a model of ``task`` (the members' recipe): hyper-parameters left
        ``None`` take the centre of the zoo's ranges (geometric mean of ``hparams.lr``), the
        spec's optimiser and batch size.  Families without a fine-tuning recipe raise."""
        raise ValueError(f"family: {self.name} has no training recipe")

    def condition_features(self, spec, condition: str, samples_per_class: int, seed: int = 0):
        """Per-class example sets of the data a condition names, as the members saw it: float32
        ``[C, K, d]`` (K = ``samples_per_class`` training examples of each class, flattened), for
        dataset-conditioned generators (D2NWG).  Families without class-structured data raise."""
        raise ValueError(f"family: {self.name} has no per-class data to describe condition {condition!r}")

    #: the metric summarised per member in the build results (higher or lower is better)
    score_metric: str = "val_acc"


class Recipe:
    """How a family trains a model of one task, as public API: the zoo builder trains its members
    with it and the evaluation fine-tunes generated and baseline initialisations with the same one.

    ``task``; ``lr``, ``weight_decay``, ``optimizer``, ``batch_size``; ``split``: ``{"train": (x, y),
    "test": (x, y)}`` (``test`` is the split the members were scored on, their validation split);
    ``metric`` (the primary key of :meth:`evaluate`) and ``higher_is_better``."""

    task: Task
    lr: float
    weight_decay: float
    optimizer: str
    batch_size: int
    split: dict
    metric: str = ""
    higher_is_better: bool = True

    def build_model(self, seed: int) -> nn.Module:
        """The architecture with its own initialisation for ``seed`` (a member's starting point
        before any shared base weights are loaded)."""
        raise NotImplementedError

    def base_state_dict(self, store: bool = False) -> dict | None:
        """The shared base weights every member of the task starts from (None: none); ``store``
        caches weights trained now in the zoo."""
        return None

    def make_optimizer(self, model: nn.Module, trainable=None):
        """The family's optimiser over the parameters named in ``trainable`` (None: all); the others
        are frozen (``requires_grad`` False)."""
        raise NotImplementedError

    def train_epoch(self, model: nn.Module, optimizer, g: torch.Generator, on_step=None) -> dict:
        """One epoch of the members' objective on ``split["train"]`` (shuffled and noised from
        ``g``); ``on_step()`` after each step.  Returns ``{"steps": n, ...}`` (running losses)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        raise NotImplementedError


def centre(lo: float, hi: float) -> float:
    """The geometric centre of a log-uniform range (a positive floor keeps a 0 lower end finite)."""
    return math.sqrt(max(lo, 1e-12) * max(hi, 1e-12))


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family: unknown {name!r} (available: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def resolve_device(spec) -> str:
    """``device: auto`` -> ``cuda`` when the member was given GPU share and one is visible."""
    if spec.device != "auto":
        return spec.device
    return "cuda" if spec.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def draw_hparams(ranges, seed: int) -> dict:
    """Per-member hyper-parameters drawn deterministically from the spec's ranges (diverse zoo):
    learning rate and weight decay log-uniform, epochs uniform."""
    rng = random.Random(seed)
    lo, hi = ranges.lr
    lr = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    wlo, whi = ranges.weight_decay
    wd = math.exp(rng.uniform(math.log(wlo), math.log(whi))) if whi > wlo > 0 else wlo
    elo, ehi = ranges.epochs
    return {"lr": lr, "weight_decay": wd, "epochs": rng.randint(elo, ehi)}


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm on its stored running statistics (they are not part of a partial layout)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, X, y, batch_size: int, g: torch.Generator,
                on_step=None, freeze_norm_stats: bool = False) -> int:
    """One epoch of minibatch cross-entropy training; ``on_step()`` after each step. Returns steps.

    ``freeze_norm_stats`` keeps every BatchNorm on its stored running statistics (partial zoos:
    only the selected parameters may change, so a member is exactly base + its table rows)."""
    model.train()
    if freeze_norm_stats:
        freeze_batchnorm(model)
    perm = torch.randperm(len(y), generator=g).to(y.device)
    steps = 0
    for i in range(0, len(y), batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) < 2:        # BatchNorm needs two examples
            continue
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if on_step is not None:
            on_step()
    return steps


def evaluate(model: nn.Module, X, y, batch_size: int = 4096) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(X[i:i + batch_size]) for i in range(0, len(y), batch_size)])
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    return {"acc": acc, "loss": loss}


def make_optimizer(name: str, params, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def plan_tasks(spec) -> tuple[list[Task], list[Task]]:
    """-> (training tasks, held-out tasks).  Held-out entries match a task's condition or its group
    (a concept key holds out all its paraphrases); ``held_out_every`` reserves every k-th group."""
    fam = get_family(spec.family)
    if spec.tasks:
        tasks = [fam.task_from_condition(spec, c) for c in spec.tasks]
    else:
        tasks = fam.enumerate_tasks(spec)
    held = set(spec.held_out)
    hit = lambda t: t.condition in held or t.holdout_key in held or t.task_id in held
    direct = [t for t in tasks if hit(t)]
    matched = {k for t in direct for k in (t.condition, t.holdout_key, t.task_id)}
    extra = [fam.task_from_condition(spec, c) for c in sorted(held - matched)]
    held_keys = {t.holdout_key for t in direct + extra}
    held_out = [t for t in tasks if t.holdout_key in held_keys] + extra
    train = [t for t in tasks if t.holdout_key not in held_keys]
    if spec.held_out_every:
        groups = list(dict.fromkeys(t.holdout_key for t in train))
        k = spec.held_out_every
        reserve = {gk for i, gk in enumerate(groups) if i % k == k - 1}
        kept: list[Task] = []
        for t in train:                  # with max_tasks: the first N training tasks and the every-k-th
            if t.holdout_key in reserve:  # groups among them (not every k-th group of the whole vocabulary)
                held_out.append(t)
            elif spec.max_tasks and len(kept) == spec.max_tasks:
                break
            else:
                kept.append(t)
        train = kept
    if spec.max_tasks:
        train = train[:spec.max_tasks]
    if not train:
        raise ValueError("tasks: the task list is empty (after removing held-out tasks)")
    for t in train + held_out:          # every id that becomes part of a path is checked here, in one place
        check_id(t.task_id, f"tasks: {t.condition!r} gives task id")
    ids = [t.task_id for t in train]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise ValueError(f"tasks: {dup} appears twice")
    if hasattr(fam, "validate_tasks"):
        fam.validate_tasks(spec, train + held_out)
    return train, held_out
