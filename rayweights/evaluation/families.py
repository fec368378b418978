"""Built-in task adapters for the zoo families of :mod:`rayweights.zoo`.

* ``dataset-subsets`` — classify a k-class subset of the zoo's dataset (digits offline): the zoo's
  architecture with a k-way head, fine-tuned with the zoo's optimiser on the task's training split,
  accuracy on its validation split (the split the zoo members were scored on).  Default ("random")
  initialisation: the architecture's own init for the seed.
* ``partial`` — p-diff: the task's shared base model (``rayweights.zoo.families.base_model_state``)
  with only the layout's parameters (e.g. the last two BN layers) trainable.  "random" re-initialises
  those parameters with the architecture's own init; (c) "pretrained" is the base model itself.

Both read the zoo's ``zoo_spec.json`` (written by ``build-zoo``) to rebuild exactly the members'
architecture, data split and optimiser.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..blocks import WeightLayout
from ..storage import read_bytes
from .adapters import AdapterError, register_adapter
from .protocols import BaseTaskAdapter

__all__ = ["SubsetTaskAdapter", "read_zoo_spec", "position_similarity"]


def read_zoo_spec(zoo) -> tuple[Any, list[str]]:
    """(ZooSpec, held-out conditions) from ``<zoo>/zoo_spec.json``."""
    from ..config import ConfigError, from_dict
    from ..zoo.spec import ZooSpec

    loc = zoo.root.join("zoo_spec.json")
    try:
        d = json.loads(read_bytes(loc))
    except FileNotFoundError:
        raise AdapterError(f"zoo: {loc.describe()} is missing (zoos written by build-zoo carry their spec)") from None
    try:
        return from_dict(ZooSpec, d["spec"]), list(d.get("held_out", []))
    except (ConfigError, KeyError) as exc:
        raise AdapterError(f"zoo: {loc.describe()}: {exc}") from exc


def position_similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Task similarity for k-way heads: half the fraction of head positions holding the same class
    (those output units can be reused as they are), half the Jaccard overlap of the class sets."""
    if not a or not b:
        return 0.0
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))
    jac = len(set(a) & set(b)) / len(set(a) | set(b))
    return 0.5 * same + 0.5 * jac


class SubsetTaskAdapter(BaseTaskAdapter):
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, spec, layout: WeightLayout, condition: str, lr: float | None = None,
                 weight_decay: float | None = None, optimizer: str | None = None, batch_size: int | None = None,
                 partial: bool = False):
        from ..zoo import architectures, families

        try:
            self.task = families.task_from_condition(condition)
        except (ValueError, IndexError) as exc:
            raise AdapterError(f"task {condition!r}: not a '<dataset>:<class>,<class>,...' condition ({exc})") from exc
        if len(self.task.classes) != spec.classes_per_task:
            raise AdapterError(f"task {condition!r}: {len(self.task.classes)} classes, the zoo's tasks have "
                               f"{spec.classes_per_task}")
        self.spec, self.layout, self.condition, self.task_id = spec, layout, condition, self.task.task_id
        self.partial = partial
        lo, hi = spec.hparams.lr
        self.lr = float(lr) if lr is not None else math.sqrt(lo * hi)
        self.weight_decay = float(weight_decay) if weight_decay is not None else math.sqrt(
            max(spec.hparams.weight_decay[0], 1e-12) * max(spec.hparams.weight_decay[1], 1e-12))
        self.optimizer = optimizer or spec.optimizer
        if self.optimizer not in ("sgd", "adamw"):
            raise AdapterError(f"family_options.optimizer: {self.optimizer!r} is not sgd or adamw")
        self.batch_size = int(batch_size or spec.batch_size)
        (Xtr, ytr), (Xva, yva) = families.task_split(spec.dataset, self.task, spec.val_fraction, seed=0)
        self.split = {"train": (Xtr, ytr), "test": (Xva, yva)}
        self._arch = lambda: architectures.build(spec.architecture, tuple(Xtr.shape[1:]), len(self.task.classes),
                                                 **spec.arch_options)
        self._families = families
        missing = set(layout.param_names) - set(self._arch().state_dict())
        if missing:
            raise AdapterError(f"zoo layout parameter {sorted(missing)[0]} is not in architecture {spec.architecture}")

    # -- model -----------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self._arch()
        if self.partial:
            fresh = {n: v.clone() for n, v in model.state_dict().items() if n in set(self.layout.param_names)}
            model.load_state_dict(self._families.base_model_state(self.spec, self.task))
            model.load_state_dict(fresh, strict=False)        # the generated part starts from the arch's own init
        return model

    def pretrained_state_dict(self) -> dict | None:
        if not self.partial:
            return None
        base = self._families.base_model_state(self.spec, self.task)
        return {n: base[n].clone() for n in self.layout.param_names}

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        names = set(self.layout.param_names)
        for n, p in model.named_parameters():
            p.requires_grad_(not self.partial or n in names)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def train_epoch(self, model, optimizer, epoch, seed):
        X, y = self.split["train"]
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        steps = self._families.train_epoch(model, optimizer, X, y, self.batch_size, g)   # the zoo's own loop
        return {"steps": steps}

    def evaluate(self, model, split="test"):
        X, y = self.split[split]
        m = self._families.evaluate(model, X, y)
        return {"accuracy": m["acc"], "loss": m["loss"]}

    @torch.no_grad()
    def predictions(self, model, split="test") -> np.ndarray:
        model.eval()
        return model(self.split[split][0]).argmax(1).numpy()

    def targets(self, split="test") -> np.ndarray:
        return self.split[split][1].numpy()

    def similarity(self, condition: str) -> float:
        try:
            other = self._families.task_from_condition(condition)
        except (ValueError, IndexError):
            return 0.0
        if condition.split(":", 1)[0] != self.condition.split(":", 1)[0]:
            return 0.0
        return position_similarity(self.task.classes, other.classes)


def _subset_factory(partial: bool):
    def factory(condition: str, zoo, lr: float | None = None, weight_decay: float | None = None,
                optimizer: str | None = None, batch_size: int | None = None) -> SubsetTaskAdapter:
        spec, _ = read_zoo_spec(zoo)
        if (spec.family == "partial") != partial:
            raise AdapterError(f"family: the zoo was built with family {spec.family!r}")
        return SubsetTaskAdapter(spec, zoo.layout, condition, lr, weight_decay, optimizer, batch_size, partial)

    return factory


register_adapter("dataset-subsets")(_subset_factory(False))
register_adapter("partial")(_subset_factory(True))
