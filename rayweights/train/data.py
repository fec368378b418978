"""Zoo tables -> training data: normalisation stats, streaming Ray Datasets, row counts."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..blocks import WeightLayout
from ..table import Zoo

__all__ = ["fit_stats", "stage_dataset", "num_rows", "sample_weights_for_stats", "shard_megabytes", "InMemoryShard"]

log = logging.getLogger(__name__)


def _stat_members(zoo: Zoo, max_members: int, seed: int) -> list[str]:
    ids = sorted(zoo.members.column("member_id").to_pylist())
    if len(ids) <= max_members:
        return ids
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=max_members, replace=False).tolist())


def sample_weights_for_stats(zoo: Zoo, max_members: int = 256, seed: int = 0) -> torch.Tensor:
    """Raw blocks [N, num_blocks, block_size] of (at most) ``max_members`` members, all their
    checkpoints: the bounded sample that per-group stats and latent scales are fitted on."""
    return zoo.blocks(_stat_members(zoo, max_members, seed))


def fit_stats(zoo: Zoo, max_members: int = 256, seed: int = 0, by: str = "group") -> WeightLayout:
    """The zoo layout with normalisation stats (``by``: per ``"group"`` or per ``"tensor"``, see
    ``WeightLayout.fit_stats``): the stored ones if the zoo has them at that granularity, else fitted
    on a deterministic sample of ``max_members`` members (never the whole table)."""
    if zoo.layout.stats_by == by:
        return zoo.layout
    return zoo.layout.fit_stats(sample_weights_for_stats(zoo, max_members, seed), by=by)


def num_rows(zoo: Zoo, unit: str) -> int:
    """Rows ``zoo.dataset(unit)`` yields, from the manifest (no data read)."""
    m = zoo.members
    if unit == "block":
        return int(sum(m.column("num_rows").to_pylist())) if "num_rows" in m.column_names else \
            sum(len(c) for c in m.column("checkpoints").to_pylist()) * zoo.layout.num_blocks
    return sum(len(c) for c in m.column("checkpoints").to_pylist())


def _add_condition_ids(batch: dict, unit: str, index: dict) -> dict:
    """Ray Data UDF: keep the training columns, map the condition string to its integer id."""
    cond = batch["condition"]
    ids = np.fromiter((index.get(str(c), -1) for c in cond), dtype=np.int64, count=len(cond))
    if unit == "block":
        return {"block": batch["block"].astype(np.float32, copy=False),
                "block_index": batch["block_index"].astype(np.int64), "cond_id": ids}
    return {"weights": batch["weights"].astype(np.float32, copy=False), "cond_id": ids}


def stage_dataset(zoo: Zoo, unit: str, condition_names: Sequence[str]):
    """A streaming ``ray.data.Dataset`` of training rows: ``block``/``block_index``/``cond_id`` or
    ``weights``/``cond_id``, with the file order randomised per epoch."""
    cols = ["condition", "block_index", "block"] if unit == "block" else None
    ds = zoo.dataset(unit=unit, columns=cols)
    index = {c: i for i, c in enumerate(condition_names)}
    return ds.map_batches(_add_condition_ids, fn_kwargs={"unit": unit, "index": index},
                          batch_format="numpy", zero_copy_batch=True).randomize_block_order()


def shard_megabytes(zoo: Zoo, unit: str, num_workers: int) -> float:
    """Size of one worker's shard of the training rows in memory (float32 weights + int64 ids)."""
    L = zoo.layout
    row = (L.block_size * 4 + 16) if unit == "block" else (L.num_blocks * L.block_size * 4 + 8)
    return num_rows(zoo, unit) * row / max(1, num_workers) / 2**20


class InMemoryShard:
    """A worker's shard read once from its Ray Data iterator, then served as shuffled micro-batches from
    memory every epoch: what a plain torch loop does, for shards that fit (``data_in_memory``)."""

    def __init__(self, shard, read_batch: int = 8192):
        parts: dict[str, list[torch.Tensor]] = {}
        for b in shard.iter_torch_batches(batch_size=read_batch, prefetch_batches=2):
            for k, v in b.items():
                parts.setdefault(k, []).append(v)
        self.data = {k: torch.cat(v) for k, v in parts.items()}
        self.rows = len(next(iter(self.data.values()))) if self.data else 0

    def epoch(self, batch_size: int, seed: int):
        """Full micro-batches of one epoch in a seeded random order (the incomplete tail is dropped)."""
        perm = torch.randperm(self.rows, generator=torch.Generator().manual_seed(seed))
        for i in range(0, self.rows - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield {k: v[idx] for k, v in self.data.items()}
