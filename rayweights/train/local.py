"""Single-process generator training: the same stages, losses, optimiser and LR schedule as the
Ray Train + DeepSpeed workers (:mod:`rayweights.train.worker`), without Ray or DeepSpeed.

For small zoos on one machine (tests, quality gates, CPU benchmarks) where starting a Ray Train run
per stage costs more than the training::

    from rayweights.train import GeneratorTrainConfig, train_local
    method = train_local(cfg, export="runs/x/export")     # cfg.zoo etc. as for train-generator

Differences from the distributed path: one process (``num_workers``, ``zero_stage`` and
``precision`` are ignored: fp32), the zoo's rows are read into memory once, batches are drawn by
reshuffling every epoch, and no intermediate checkpoints are written (only the export at the end).
Everything a stage needs between stages (input stats, latent scale, condition caches) is done by the
same driver code as :func:`rayweights.train.train_generator`.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from .config import GeneratorTrainConfig, resolved_stage
from .trainer import Plan, _finish_stage, preflight

__all__ = ["train_local", "lr_multiplier"]

log = logging.getLogger(__name__)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate factor at optimiser step ``step`` (0-based) of DeepSpeed's WarmupLR /
    WarmupDecayLR / WarmupCosineLR as configured by :func:`rayweights.train.worker.deepspeed_config`."""
    warmup = max(1, warmup)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear_decay":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lr_schedule: {schedule!r} is not constant, linear_decay or cosine")


def _rows(plan: Plan):
    """(flat raw weights [R, D], condition id per row) of the whole zoo."""
    zoo, method = plan.zoo, plan.method
    members = zoo.members.to_pylist()
    index = {c: i for i, c in enumerate(method.condition_names)}
    blocks = zoo.blocks([m["member_id"] for m in members])
    cond = []
    for m in members:
        cond += [index.get(m["condition"], -1)] * len(m["checkpoints"] or [])
    if len(cond) != blocks.shape[0]:
        raise RuntimeError(f"zoo {zoo.uri}: manifest checkpoints and blocks files disagree")
    return blocks.reshape(blocks.shape[0], -1).float(), torch.tensor(cond, dtype=torch.long)


def train_local(cfg: GeneratorTrainConfig, plan: Plan | None = None, export: str | None = None,
                show_progress: bool = False):
    """Train every stage of ``cfg`` in this process; returns the trained method (and writes its
    export to ``export`` when given)."""
    plan = plan or preflight(cfg)
    method = plan.method
    weights, cond = _rows(plan)
    L = method.layout
    g = torch.Generator().manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    for stage in cfg.train_stages:
        sc = resolved_stage(cfg, stage)
        module = method.trainer_module(stage)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=sc["lr"], weight_decay=sc["weight_decay"], betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, sc=sc: lr_multiplier(s, sc["steps"], sc["warmup_steps"], sc["lr_schedule"]))
        unit = method.stage_unit[stage]
        n_rows = weights.shape[0] * (L.num_blocks if unit == "block" else 1)
        bs = min(sc["batch_size"], n_rows)
        perm, pos = torch.randperm(n_rows, generator=g), 0
        bar = tqdm(total=sc["steps"], desc=f"{method.name}:{stage}", disable=not show_progress)
        loss_ema = None
        for step in range(sc["steps"]):
            if pos + bs > n_rows:
                perm, pos = torch.randperm(n_rows, generator=g), 0
            idx = perm[pos:pos + bs]
            pos += bs
            if unit == "block":
                r, b = idx // L.num_blocks, idx % L.num_blocks
                batch = {"block": weights.view(-1, L.num_blocks, L.block_size)[r, b], "block_index": b,
                         "cond_id": cond[r]}
            else:
                batch = {"weights": weights[idx], "cond_id": cond[idx]}
            loss = module(**method.prepare(stage, batch, "cpu"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sc["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, sc["grad_clip"])
            opt.step()
            sched.step()
            v = float(loss.detach())
            loss_ema = v if loss_ema is None else 0.98 * loss_ema + 0.02 * v
            bar.update(1)
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss_ema:.4g}")
                log.info("stage %s step %d loss %.5g lr %.3g", stage, step + 1, loss_ema, sched.get_last_lr()[0])
        bar.close()
        module.eval()
        method._trainers.pop(stage, None)
        _finish_stage(method, stage, plan)
    if export:
        method.save_pretrained(export)
    return method
