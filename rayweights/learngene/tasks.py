"""Tasks the learngene comparisons train on, and the step-based training loop.

* ``digits`` — scikit-learn's bundled 8x8 digits (offline), fixed train/val split; metric
  ``acc`` (higher is better) or ``loss``.
* ``denoise1d`` — DDPM noise prediction (diffusers' ``DDPMScheduler``) on 1-D rows: synthetic
  signals made in code (``data: signals``) or the weight blocks of a zoo (``data: zoo:<uri>``,
  per-group normalised with the zoo's stats when present), the weight generators' own task;
  metric ``eps_mse`` on a fixed validation set of (row, t, noise) triples (lower is better).
  Models are called ``model(x_t [B, 1, T], t [B], block_index [B])`` (index 0 for signals).

A task gives minibatches (``batches(subset, seed)``, an endless iterator over a seeded subset
of the training rows), a loss, and an evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from diffusers import DDPMScheduler

from ..datasets import load_dataset
from ..table import open_zoo
from .layers import LearngeneError

__all__ = ["LearngeneTask", "DigitsTask", "Denoise1DTask", "make_task", "train_steps", "TASK_KINDS"]

TASK_KINDS = ("digits", "denoise1d")


class LearngeneTask:
    metric: str = ""
    higher_is_better: bool = True
    batch_size: int = 64
    train_x: torch.Tensor
    train_y: torch.Tensor | None = None

    def batches(self, subset: float = 1.0, seed: int = 0, device: str | torch.device = "cpu") -> Iterator:
        n = len(self.train_x)
        g = torch.Generator().manual_seed(1_000 + seed)
        n_keep = n if subset >= 1 else max(1, int(round(n * subset)))
        keep = torch.randperm(n, generator=g)[:n_keep]
        x = self.train_x[keep].to(device)
        y = self.train_y[keep].to(device) if self.train_y is not None else None
        while True:
            perm = torch.randperm(len(keep), generator=g).to(device)
            for i in range(0, len(perm), self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield (x[idx], y[idx] if y is not None else None)

    def loss(self, model: nn.Module, batch, gen: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError


class DigitsTask(LearngeneTask):
    def __init__(self, metric: str = "acc", val_fraction: float = 0.3, batch_size: int = 64, split_seed: int = 0):
        if metric not in ("acc", "loss"):
            raise LearngeneError(f"task.metric: {metric!r} is not acc or loss for digits")
        X, y = load_dataset("digits")                  # the one datasets registry
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + split_seed))
        n_val = int(len(y) * val_fraction)
        self.val_x, self.val_y = X[perm[:n_val]], y[perm[:n_val]]
        self.train_x, self.train_y = X[perm[n_val:]], y[perm[n_val:]]
        self.metric, self.higher_is_better, self.batch_size = metric, metric == "acc", batch_size

    def loss(self, model, batch, gen=None):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model):
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        logits = model(self.val_x.to(dev))
        y = self.val_y.to(dev)
        out = {"acc": (logits.argmax(1) == y).float().mean().item(),
               "loss": nn.functional.cross_entropy(logits, y).item()}
        model.train(was)
        return out


def synthetic_signals(n: int, length: int, seed: int) -> torch.Tensor:
    """Rows of smooth structure: three sinusoids (1-8 cycles) plus a step, unit std per row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length)
    freq = torch.randint(1, 9, (n, 3), generator=g).float()
    phase = torch.rand(n, 3, generator=g) * 2 * torch.pi
    amp = torch.rand(n, 3, generator=g) + 0.2
    x = (amp[:, :, None] * torch.sin(2 * torch.pi * freq[:, :, None] * t + phase[:, :, None])).sum(1)
    where = torch.randint(length // 4, 3 * length // 4, (n, 1), generator=g)
    x = x + (torch.arange(length)[None] >= where).float() * (torch.rand(n, 1, generator=g) * 2 - 1) * 2
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True).clamp_min(1e-6)


def zoo_rows(uri: str, max_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks of a zoo's checkpoints as rows [N, block_size] plus each row's block index [N],
    normalised per group when the zoo stores stats (else globally standardised)."""
    zoo = open_zoo(uri)
    blocks = zoo.blocks()                      # [M, num_blocks, block_size]
    layout = zoo.layout
    try:
        blocks = torch.stack([layout.normalize(b) for b in blocks])
    except Exception:  # no fitted stats: one global standardisation
        blocks = (blocks - blocks.mean()) / blocks.std().clamp_min(1e-8)
    rows = blocks.reshape(-1, blocks.shape[-1])
    index = torch.arange(blocks.shape[1]).repeat(blocks.shape[0])
    if max_rows and len(rows) > max_rows:
        keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:max_rows]
        rows, index = rows[keep], index[keep]
    return rows, index


class Denoise1DTask(LearngeneTask):
    metric, higher_is_better = "eps_mse", False

    def __init__(self, data: str = "signals", length: int = 64, num_train: int = 2048, num_val: int = 256,
                 timesteps: int = 1000, batch_size: int = 64, split_seed: int = 0):
        if data == "signals":
            rows = synthetic_signals(num_train + num_val, length, seed=split_seed)
            index = torch.zeros(len(rows), dtype=torch.int64)
        elif data.startswith("zoo:"):
            rows, index = zoo_rows(data[4:], max_rows=num_train + num_val)
            if len(rows) < 2:
                raise LearngeneError(f"task.data: zoo {data[4:]!r} has fewer than 2 blocks")
        else:
            raise LearngeneError(f"task.data: {data!r} is not 'signals' or 'zoo:<uri>'")
        rows = rows[:, None, :].float()             # [N, 1, T]
        n_val = min(num_val, max(1, len(rows) // 5))
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(20_000 + split_seed))
        self.val_x, self.train_x = rows[perm[:n_val]], rows[perm[n_val:]]
        self.val_y, self.train_y = index[perm[:n_val]], index[perm[n_val:]]
        self.length = rows.shape[-1]
        self.batch_size = batch_size
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps)
        g = torch.Generator().manual_seed(30_000 + split_seed)
        self.val_t = torch.linspace(0, timesteps - 1, len(self.val_x)).round().long()
        self.val_noise = torch.randn(self.val_x.shape, generator=g)

    def _noisy(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def loss(self, model, batch, gen=None):
        x0, index = batch
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        return nn.functional.mse_loss(model(self._noisy(x0, noise, t), t, index), noise)

    @torch.no_grad()
    def evaluate(self, model):
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        x0, t, noise, index = (a.to(dev) for a in (self.val_x, self.val_t, self.val_noise, self.val_y))
        mse = nn.functional.mse_loss(model(self._noisy(x0, noise, t), t, index), noise).item()
        model.train(was)
        return {"eps_mse": mse}


def make_task(kind: str, **options: Any) -> LearngeneTask:
    if kind == "digits":
        return DigitsTask(**options)
    if kind == "denoise1d":
        return Denoise1DTask(**options)
    raise LearngeneError(f"task.kind: {kind!r} is not one of {TASK_KINDS}")


@dataclass
class CurvePoint:
    step: int
    metrics: dict[str, float]
    seconds: float


def train_steps(model: nn.Module, task: LearngeneTask, steps: int, *, lr: float, weight_decay: float = 0.0,
                eval_every: int = 50, subset: float = 1.0, seed: int = 0, start_step: int = 0,
                eval_at_start: bool = True, device: str | torch.device = "cpu",
                params: Sequence[nn.Parameter] | None = None, grad_clip: float = 1.0,
                extra_eval: Sequence[int] = (),
                on_eval: Callable[[int, dict], None] | None = None) -> list[CurvePoint]:
    """AdamW on ``params`` (default: all trainable) for ``steps`` minibatches; the task metric is
    evaluated every ``eval_every`` steps, at the absolute steps ``extra_eval`` and at the start/end.
    Steps are numbered from ``start_step`` so phases chain into one curve."""
    model.to(device).train()
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    curve: list[CurvePoint] = []
    t0 = time.perf_counter()

    def record(step):
        m = task.evaluate(model)
        curve.append(CurvePoint(step, m, time.perf_counter() - t0))
        if on_eval:
            on_eval(step, m)

    if eval_at_start:
        record(start_step)
    if steps <= 0:
        return curve
    if not params:
        raise LearngeneError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, min(20, steps // 10))))
    it = task.batches(subset, seed, device)
    for s in range(1, steps + 1):
        loss = task.loss(model, next(it))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {start_step + s}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        if (start_step + s) % eval_every == 0 or s == steps or (start_step + s) in extra_eval:
            record(start_step + s)
    return curve
