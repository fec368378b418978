"""Test helpers shared by tests/test_sampling.py and tests/test_evaluation.py: a tiny digits zoo
trained in the test (MLPs on label subsets of sklearn digits) and a TaskAdapter for it.

Members of one task start from a shared base initialisation (seed 0) and differ in data order and
learning rate, so a Gaussian fitted to a task's members is a sensible (if simple) generator.
"""

from __future__ import annotations

import torch
from torch import nn

from rayweights.blocks import WeightLayout
from rayweights.evaluation.protocols import BaseTaskAdapter
from rayweights.table import CheckpointRecord, ZooWriter

_DATA = {}


def digits():
    if "d" not in _DATA:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        _DATA["d"] = (X[perm], y[perm])
    return _DATA["d"]


def make_mlp(seed: int, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class DigitsTask(BaseTaskAdapter):
    """Classify the digits of ``condition`` = "digits:a,b,c" (10-way head, accuracy on the subset)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, condition: str, layout: WeightLayout, lr: float = 0.05, hidden: int = 16, train_frac=0.7):
        self.condition, self.task_id, self.layout, self.lr, self.hidden = condition, condition.replace(":", "-").replace(",", ""), layout, lr, hidden
        labels = [int(x) for x in condition.split(":", 1)[1].split(",")]
        X, y = digits()
        keep = torch.isin(y, torch.tensor(labels))
        X, y = X[keep], y[keep]
        n = int(len(y) * train_frac)
        self.split = {"train": (X[:n], y[:n]), "test": (X[n:], y[n:])}

    def build_model(self, seed: int) -> nn.Module:
        return make_mlp(1000 + seed, self.hidden)

    def make_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.lr)

    def train_epoch(self, model, optimizer, epoch, seed):
        X, y = self.split["train"]
        g = torch.Generator().manual_seed(seed * 100 + epoch)
        perm = torch.randperm(len(y), generator=g)
        model.train()
        total = 0.0
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        return {"loss": total / len(y)}

    @torch.no_grad()
    def evaluate(self, model, split="test"):
        X, y = self.split[split]
        model.eval()
        logits = model(X)
        return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                "loss": float(nn.functional.cross_entropy(logits, y))}

    @torch.no_grad()
    def predictions(self, model, split="test"):
        model.eval()
        return model(self.split[split][0]).argmax(1).numpy()

    def targets(self, split="test"):
        return self.split[split][1].numpy()


TASKS = ["digits:0,1,2,3,4", "digits:5,6,7,8,9", "digits:0,2,4,6,8", "digits:1,3,5,7,9"]


def train_member(condition: str, seed: int, lr: float, epochs: int, hidden: int = 16):
    """Start from the shared base init (seed 0), train on the task; returns checkpoints [(epoch, sd, acc)]."""
    model = make_mlp(0, hidden)
    task = DigitsTask(condition, None, lr=lr, hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for e in range(1, epochs + 1):
        task.train_epoch(model, opt, e, seed)
        if e > epochs - 2:
            out.append((e, {k: v.clone() for k, v in model.state_dict().items()}, task.evaluate(model)["accuracy"]))
    return out


def build_tiny_zoo(uri: str, tasks=TASKS, members_per_task: int = 3, epochs: int = 12, block_size: int = 64,
                   hidden: int = 16) -> WeightLayout:
    layout = WeightLayout.from_state_dict(make_mlp(0, hidden).state_dict(), rule=1, block_size=block_size)
    w = ZooWriter.create(uri, layout)
    for ti, cond in enumerate(tasks):
        for s in range(members_per_task):
            lr = [0.3, 0.2, 0.4][s % 3]
            ck = train_member(cond, seed=s + 10 * ti, lr=lr, epochs=epochs, hidden=hidden)
            w.write_member(f"t{ti}-s{s}", f"t{ti}", cond, s,
                           [CheckpointRecord(step=e, state_dict=sd, metrics={"accuracy": a}) for e, sd, a in ck],
                           {"lr": lr})
    w.consolidate()
    return layout


def make_adapter(condition: str, zoo, lr: float = 0.05, hidden: int = 16) -> DigitsTask:
    """Adapter factory for ``family: "tests.evalkit:make_adapter"``."""
    if not condition.startswith("digits:"):
        raise ValueError(f"condition {condition!r}: expected 'digits:a,b,...'")
    return DigitsTask(condition, zoo.layout, lr=lr, hidden=hidden)


_ZOO_CACHE: dict = {}


def tiny_zoo(tmp_path_factory) -> str:
    """The tiny digits zoo, built once per test session (shared by the test modules)."""
    if "uri" not in _ZOO_CACHE:
        uri = str(tmp_path_factory.mktemp("tinyzoo") / "zoo")
        build_tiny_zoo(uri, tasks=TASKS[:3], members_per_task=3, epochs=10)
        _ZOO_CACHE["uri"] = uri
    return _ZOO_CACHE["uri"]
