"""``dataset-subsets`` (D2NWG) and ``partial`` (p-diff): classifier zoos on k-class subsets.

``dataset-subsets``: each task is a k-class subset of a base data set (offline: digits, C(10, 5) =
252 five-class tasks), optionally with ``max_examples_per_class`` examples per class and on frozen
CLIP features.  A member trains the whole architecture from its own seed and hyper-parameters and
keeps its last ``keep_last`` epochs, each with train/val accuracy and loss.

``partial``: per task a base model is trained once (seeded by the task, ``base_epochs``) and cached
in the zoo (``<zoo>/base/<task_id>.safetensors``); each member starts from it, trains only the
selected parameters (e.g. the last two BN layers, ``select: norm-last:2``) with BN statistics
frozen, and keeps the checkpoints of the last ``keep_last`` optimisation steps of its last epoch
(p-diff keeps 200), so a member is exactly base + its table rows.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ...storage import exists, join, read_bytes, resolve, safetensors_metadata, write_bytes_atomic
from .. import architectures
from . import data as D
from .base import (Family, Recipe, Task, centre, evaluate, make_optimizer, register_family, snapshot, train_epoch)

__all__ = ["DatasetSubsets", "Partial", "ClassifierRecipe", "enumerate_tasks", "task_from_condition",
           "base_model_state", "task_data"]


def enumerate_tasks(dataset: str, k: int, num_classes: int | None = None) -> list[Task]:
    if num_classes is None:
        num_classes = D.num_classes(dataset)
    pre = D.dataset_prefix(dataset)
    sep = "" if num_classes <= 10 else "_"
    return [Task(f"{pre}-" + sep.join(map(str, c)), f"{pre}:" + ",".join(map(str, c)), tuple(c))
            for c in itertools.combinations(range(num_classes), k)]


def task_from_condition(condition: str) -> Task:
    """``"<dataset>:<class>,<class>,..."`` -> Task (the inverse of the condition strings above)."""
    if ":" not in condition:
        raise ValueError(f"tasks: {condition!r} is not '<dataset>:<class>,<class>,...'")
    pre, cls = condition.split(":", 1)
    try:
        classes = tuple(int(c) for c in cls.split(","))
    except ValueError:
        raise ValueError(f"tasks: {condition!r} is not '<dataset>:<class>,<class>,...'") from None
    if len(set(classes)) != len(classes):
        raise ValueError(f"tasks: {condition!r} repeats a class")
    sep = "" if max(classes) < 10 else "_"
    return Task(f"{pre}-" + sep.join(map(str, classes)), condition, classes)


def _data(spec):
    """(X, y) the members train on: images, or the zoo's cached frozen features."""
    if spec.features:
        return D.load_features(spec.output, spec.dataset, spec.features, spec.image_size)
    return D.load_dataset(spec.dataset, spec.image_size)


def task_data(spec, task: Task):
    """((X_train, y_train), (X_val, y_val)) of a task exactly as the zoo's members saw them."""
    return D.task_split(spec.dataset, task, spec.val_fraction, seed=0, max_per_class=spec.max_examples_per_class,
                        data=_data(spec), image_size=spec.image_size)


def _in_shape(spec) -> tuple[int, ...]:
    if spec.features:
        return (D.feature_dim(spec.features),)
    X, _ = _data(spec)
    return tuple(X.shape[1:])


class DatasetSubsets(Family):
    name = "dataset-subsets"
    arch_kind = "classifier"
    score_metric = "val_acc"

    def check(self, spec) -> None:
        D.check_dataset(spec.dataset, spec.image_size)
        D.check_features(spec.features)

    def enumerate_tasks(self, spec) -> list[Task]:
        return enumerate_tasks(spec.dataset, spec.classes_per_task)

    def task_from_condition(self, spec, condition: str) -> Task:
        return task_from_condition(condition)

    def validate_tasks(self, spec, tasks: list[Task]) -> None:
        for t in tasks:
            if len(t.classes) != spec.classes_per_task:
                raise ValueError(f"tasks: {t.condition} has {len(t.classes)} classes, spec says {spec.classes_per_task}")

    def template_state_dict(self, spec) -> dict:
        return architectures.build(spec.architecture, _in_shape(spec), spec.classes_per_task,
                                   **spec.arch_options).state_dict()

    def needs_prepare(self, spec) -> bool:
        return bool(spec.features)

    def prepare(self, spec, device: str = "cpu") -> dict:
        if spec.features:
            Fx, _ = D.load_features(spec.output, spec.dataset, spec.features, spec.image_size, device, store=True)
            return {"features": list(Fx.shape)}
        return {}

    def train_member(self, spec, task, seed, hparams, select_names=None, device="cpu"):
        return train_classifier(spec, task, seed, hparams, select_names, device, partial=False)

    def recipe(self, spec, task, *, lr=None, weight_decay=None, optimizer=None, batch_size=None,
               device="cpu") -> "ClassifierRecipe":
        return ClassifierRecipe(spec, task, partial=self.name == "partial", lr=lr, weight_decay=weight_decay,
                                optimizer=optimizer, batch_size=batch_size, device=device)

    def condition_features(self, spec, condition, samples_per_class, seed=0):
        task = task_from_condition(condition)
        (X, y), _ = task_data(spec, task)
        X = X.reshape(X.shape[0], -1).float()
        g = torch.Generator().manual_seed(int(seed))
        out = []
        for i, c in enumerate(task.classes):
            idx = (y == i).nonzero().view(-1)
            if len(idx) == 0:
                raise ValueError(f"tasks: class {c} of {condition} has no training examples")
            # fewer examples than asked (small max_examples_per_class): draw with replacement
            pick = (idx[torch.randperm(len(idx), generator=g)[:samples_per_class]] if len(idx) >= samples_per_class
                    else idx[torch.randint(len(idx), (samples_per_class,), generator=g)])
            out.append(X[pick])
        return torch.stack(out)


class Partial(DatasetSubsets):
    name = "partial"

    def check(self, spec) -> None:
        super().check(spec)
        if spec.features:
            return          # features are computed by prepare(); the step count is checked by the members
        (Xtr, _), _ = task_data(spec, self.enumerate_tasks(spec)[0] if not spec.tasks
                                else task_from_condition(spec.tasks[0]))
        steps = len(Xtr) // spec.batch_size + (1 if len(Xtr) % spec.batch_size >= 2 else 0)
        if spec.keep_last > steps:
            raise ValueError(f"keep_last: {spec.keep_last} checkpoints, but an epoch has only {steps} steps "
                             f"({len(Xtr)} examples / batch_size {spec.batch_size})")

    def train_member(self, spec, task, seed, hparams, select_names=None, device="cpu"):
        return train_classifier(spec, task, seed, hparams, select_names, device, partial=True)


# --------------------------------------------------------------------------- partial: base models
_BASES: dict = {}


def _base_config(spec, task: Task) -> dict:
    return {"dataset": spec.dataset, "features": spec.features, "image_size": spec.image_size,
            "architecture": spec.architecture, "arch_options": spec.arch_options, "task": task.task_id,
            "base_epochs": spec.base_epochs, "batch_size": spec.batch_size, "val_fraction": spec.val_fraction,
            "max_examples_per_class": spec.max_examples_per_class}


def _base_location(spec, task: Task):
    return resolve(join(spec.output, "base", f"{task.task_id}.safetensors")) if spec.output else None


def base_model_state(spec, task: Task, store: bool = False) -> dict:
    """partial: the task's shared base model.  Read from the zoo's cache when the zoo has it (so
    evaluation uses bit-identical weights to the members'), else trained (deterministic per task)
    and, with ``store``, written to the cache."""
    cfg = json.dumps(_base_config(spec, task), sort_keys=True)
    key = (spec.output, cfg)
    if key in _BASES:
        return _BASES[key]
    loc = _base_location(spec, task)
    if loc is not None and exists(loc):
        raw = read_bytes(loc)
        meta = safetensors_metadata(raw)
        if meta.get("config") == cfg:
            _BASES[key] = st_load(raw)
            return _BASES[key]
    seed = zlib.crc32(task.task_id.encode())
    torch.manual_seed(seed)
    (Xtr, ytr), _ = task_data(spec, task)
    model = architectures.build(spec.architecture, tuple(Xtr.shape[1:]), len(task.classes), **spec.arch_options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(spec.base_epochs):
        train_epoch(model, opt, Xtr, ytr, spec.batch_size, g)
    sd = snapshot(model)
    if store and loc is not None:
        write_bytes_atomic(loc, st_save({k: v.contiguous() for k, v in sd.items()}, metadata={"config": cfg}))
    _BASES[key] = sd
    return sd


# --------------------------------------------------------------------------- the recipe
class ClassifierRecipe(Recipe):
    """``dataset-subsets`` / ``partial``: minibatch cross-entropy on the task's training split, the
    spec's optimiser; ``partial`` starts from the task's base model with BatchNorm statistics frozen."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, spec, task: Task, partial: bool = False, lr: float | None = None,
                 weight_decay: float | None = None, optimizer: str | None = None, batch_size: int | None = None,
                 device: str = "cpu"):
        self.spec, self.task, self.partial, self.device = spec, task, partial, device
        self.lr = float(lr) if lr is not None else centre(*spec.hparams.lr)
        self.weight_decay = float(weight_decay) if weight_decay is not None else centre(*spec.hparams.weight_decay)
        self.optimizer = optimizer or spec.optimizer
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer: {self.optimizer!r} is not sgd, adam or adamw")
        self.batch_size = int(batch_size or spec.batch_size)
        (Xtr, ytr), (Xva, yva) = task_data(spec, task)
        self.split = {"train": (Xtr.to(device), ytr.to(device)), "test": (Xva.to(device), yva.to(device))}

    def build_model(self, seed: int):
        shared = self.spec.init == "shared"   # one initialisation for the whole zoo (ZooSpec.init)
        torch.manual_seed(self.spec.seed if shared else seed)
        Xtr = self.split["train"][0]
        model = architectures.build(self.spec.architecture, tuple(Xtr.shape[1:]), len(self.task.classes),
                                    **self.spec.arch_options)
        if shared:
            torch.manual_seed(seed)           # the member's own randomness from here on
        return model

    def base_state_dict(self, store: bool = False) -> dict | None:
        return base_model_state(self.spec, self.task, store=store) if self.partial else None

    def make_optimizer(self, model, trainable=None):
        names = None if trainable is None else set(trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(names is None or n in names)
        params = [p for p in model.parameters() if p.requires_grad]
        return make_optimizer(self.optimizer, params, self.lr, self.weight_decay)

    def train_epoch(self, model, optimizer, g, on_step=None) -> dict:
        X, y = self.split["train"]
        return {"steps": train_epoch(model, optimizer, X, y, self.batch_size, g, on_step=on_step,
                                     freeze_norm_stats=self.partial)}

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        X, y = self.split[split]
        m = evaluate(model, X, y)
        return {"accuracy": m["acc"], "loss": m["loss"]}


# --------------------------------------------------------------------------- training
def train_classifier(spec, task: Task, seed: int, hparams: dict, select_names=None, device: str = "cpu",
                     partial: bool = False):
    """Train one member with the family's recipe; returns its kept checkpoints [(epoch or step, state_dict, metrics)]."""
    recipe = ClassifierRecipe(spec, task, partial, hparams["lr"], hparams["weight_decay"], device=device)
    base = recipe.base_state_dict(store=True)
    model = recipe.build_model(seed)
    if base is not None:
        model.load_state_dict(base)
    model.to(device)
    only_selected = spec.train_only_selected or partial
    opt = recipe.make_optimizer(model, select_names if only_selected else None)
    g = torch.Generator().manual_seed(seed)
    kept: list = []
    epochs = hparams["epochs"]
    step = 0

    def score(sd=None):
        if sd is not None:
            model.load_state_dict(sd)
        tr, va = recipe.evaluate(model, "train"), recipe.evaluate(model, "test")
        return {"train_acc": tr["accuracy"], "train_loss": tr["loss"], "val_acc": va["accuracy"],
                "val_loss": va["loss"]}

    for epoch in range(1, epochs + 1):
        last = partial and epoch == epochs
        n_before = len(kept)

        def on_step():   # p-diff: a checkpoint after each step of the last epoch
            kept.append((step + len(kept) - n_before + 1, snapshot(model), None))

        step += recipe.train_epoch(model, opt, g, on_step=on_step if last else None)["steps"]
        if not partial and epoch > epochs - spec.keep_last:
            kept.append((epoch, snapshot(model), score()))
    if partial:
        kept = [(st, sd, score({k: v.to(device) for k, v in sd.items()})) for st, sd, _ in kept[-spec.keep_last:]]
    for _, _, m in kept:
        if not all(math.isfinite(v) for v in m.values()):
            raise FloatingPointError(f"non-finite metrics {m} (lr {hparams['lr']:.3g} too high?)")
    return kept


register_family(DatasetSubsets())
register_family(Partial())
