"""Zoo tables -> training data: normalisation stats, streaming Ray Datasets, row counts."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..blocks import WeightLayout
from ..table import Zoo

__all__ = ["fit_stats", "stage_dataset", "num_rows", "sample_weights_for_stats"]

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
