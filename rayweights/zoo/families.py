"""Task families. ``dataset-subsets`` (D2NWG's subset zoo): each task is a k-class subset of a base
dataset; offline default scikit-learn's bundled digits (C(10,5) = 252 five-class tasks); on a
cluster any torchvision ``ImageFolder`` by path (``dataset: imagefolder:/path``).
``partial`` (p-diff): per task a base model is trained once (seeded by the task); each member
starts from it, trains only the selected parameters (e.g. the last two BN layers) and keeps the
checkpoints of the last K optimisation steps of its last epoch.

A family turns a spec into tasks and trains one member of one task, returning its kept checkpoints.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from . import architectures


@dataclass(frozen=True)
class Task:
    task_id: str
    condition: str          # e.g. "digits:0,1,2,3,4"
    classes: tuple[int, ...]


@lru_cache(maxsize=4)
def load_dataset(name: str):
    """-> (X float32 [N, C, H, W], y int64 [N]). Offline: ``digits``; cluster: ``imagefolder:<path>``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]
        return torch.from_numpy(X), torch.from_numpy(d.target.astype(np.int64))
    if name.startswith("imagefolder:"):
        from torchvision import datasets, transforms

        ds = datasets.ImageFolder(name.split(":", 1)[1], transform=transforms.Compose(
            [transforms.Resize((32, 32)), transforms.ToTensor()]))
        X = torch.stack([ds[i][0] for i in range(len(ds))])
        return X - 0.5, torch.tensor(ds.targets, dtype=torch.int64)
    raise ValueError(f"dataset: unknown {name!r} (digits | imagefolder:<path>)")


def dataset_prefix(name: str) -> str:
    return "digits" if name == "digits" else name.rsplit("/", 1)[-1]


def enumerate_tasks(dataset: str, k: int, num_classes: int | None = None) -> list[Task]:
    if num_classes is None:
        num_classes = int(load_dataset(dataset)[1].max()) + 1
    pre = dataset_prefix(dataset)
    return [Task(f"{pre}-" + "".join(map(str, c)) if num_classes <= 10 else f"{pre}-" + "_".join(map(str, c)),
                 f"{pre}:" + ",".join(map(str, c)), tuple(c))
            for c in itertools.combinations(range(num_classes), k)]


def task_from_condition(condition: str) -> Task:
    pre, cls = condition.split(":", 1)
    classes = tuple(int(c) for c in cls.split(","))
    return Task(f"{pre}-" + "".join(map(str, classes)), condition, classes)


def task_split(dataset: str, task: Task, val_fraction: float = 0.3, seed: int = 0):
    """Fixed train/val split of the task's examples; labels remapped to 0..k-1."""
    X, y = load_dataset(dataset)
    mask = torch.zeros_like(y, dtype=torch.bool)
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.int64)
    for i, c in enumerate(task.classes):
        mask |= y == c
        remap[c] = i
    Xs, ys = X[mask], remap[y[mask]]
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(ys), generator=g)
    n_val = int(len(ys) * val_fraction)
    return (Xs[perm[n_val:]], ys[perm[n_val:]]), (Xs[perm[:n_val]], ys[perm[:n_val]])


def evaluate(model: nn.Module, X, y) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(X)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    return {"acc": acc, "loss": loss}


def draw_hparams(ranges, seed: int) -> dict:
    """Per-member hyper-parameters drawn deterministically from the spec's ranges (diverse zoo)."""
    rng = random.Random(seed)
    lo, hi = ranges.lr
    lr = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    wlo, whi = ranges.weight_decay
    wd = math.exp(rng.uniform(math.log(wlo), math.log(whi))) if whi > wlo > 0 else wlo
    elo, ehi = ranges.epochs
    return {"lr": lr, "weight_decay": wd, "epochs": rng.randint(elo, ehi)}


_BASES: dict = {}


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, X, y, batch_size: int, g: torch.Generator,
                on_step=None, freeze_norm_stats: bool = False) -> int:
    """One epoch of minibatch cross-entropy training; ``on_step()`` after each step. Returns steps.

    ``freeze_norm_stats`` keeps every BatchNorm on its stored running statistics (partial zoos:
    only the selected parameters may change, so a member is exactly base + its table rows)."""
    model.train()
    if freeze_norm_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    perm = torch.randperm(len(y), generator=g)
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


def base_model_state(spec, task: Task) -> dict:
    """partial: the task's shared base model, trained once per process (deterministic per task)."""
    key = (spec.dataset, spec.architecture, str(spec.arch_options), task.task_id, spec.base_epochs)
    if key not in _BASES:
        import zlib
        seed = zlib.crc32(task.task_id.encode())
        torch.manual_seed(seed)
        (Xtr, ytr), _ = task_split(spec.dataset, task, spec.val_fraction, seed=0)
        model = architectures.build(spec.architecture, tuple(Xtr.shape[1:]), len(task.classes), **spec.arch_options)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        for _ in range(spec.base_epochs):
            train_epoch(model, opt, Xtr, ytr, spec.batch_size, g)
        _BASES[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _BASES[key]


def train_member(spec, task: Task, seed: int, hparams: dict, select_names: list[str] | None = None):
    """Train one member; returns (kept checkpoints [(epoch or step, state_dict, metrics)], seconds)."""
    t0 = time.perf_counter()
    partial = spec.family == "partial"
    base = base_model_state(spec, task) if partial else None
    torch.manual_seed(seed)
    (Xtr, ytr), (Xva, yva) = task_split(spec.dataset, task, spec.val_fraction, seed=0)
    model = architectures.build(spec.architecture, tuple(Xtr.shape[1:]), len(task.classes), **spec.arch_options)
    if base is not None:
        model.load_state_dict(base)
    only_selected = spec.train_only_selected or partial
    for n, p in model.named_parameters():
        p.requires_grad_(not only_selected or select_names is None or n in select_names)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=hparams["lr"], momentum=0.9, weight_decay=hparams["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    g = torch.Generator().manual_seed(seed)
    kept = []
    epochs = hparams["epochs"]
    step = 0

    def snapshot():   # p-diff: a checkpoint after every step of the last epoch
        kept.append((step + len(kept) + 1, {k: v.detach().clone() for k, v in model.state_dict().items()}, None))

    for epoch in range(1, epochs + 1):
        last_partial = partial and epoch == epochs
        if last_partial:
            kept.clear()
        step += train_epoch(model, opt, Xtr, ytr, spec.batch_size, g, on_step=snapshot if last_partial else None,
                            freeze_norm_stats=partial)
        if partial:
            continue
        if epoch > epochs - spec.keep_last:
            tr, va = evaluate(model, Xtr, ytr), evaluate(model, Xva, yva)
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            kept.append((epoch, sd, {"train_acc": tr["acc"], "train_loss": tr["loss"],
                                     "val_acc": va["acc"], "val_loss": va["loss"]}))
    if partial:
        kept = kept[-spec.keep_last:]
        scored = []
        for st, sd, _ in kept:
            model.load_state_dict(sd)
            tr, va = evaluate(model, Xtr, ytr), evaluate(model, Xva, yva)
            scored.append((st, sd, {"train_acc": tr["acc"], "train_loss": tr["loss"],
                                    "val_acc": va["acc"], "val_loss": va["loss"]}))
        kept = scored
    return kept, time.perf_counter() - t0


def template_state_dict(spec, k: int) -> dict:
    X, _ = load_dataset(spec.dataset)
    return architectures.build(spec.architecture, tuple(X.shape[1:]), k, **spec.arch_options).state_dict()
