"""Tiny weight-block tables for generator/training tests, written with ZooWriter (no zoo builder)."""

from __future__ import annotations

import torch

from rayweights.blocks import WeightLayout
from rayweights.table import CheckpointRecord, ZooWriter

CONDITIONS = ["digits:0,1,2", "digits:3,4,5", "digits:6,7,8"]


def mlp_state_dict(cond: int, member: int, ckpt: int, hidden: int = 8) -> dict[str, torch.Tensor]:
    """A small MLP's weights: a per-condition base plus small per-member/per-checkpoint noise, so a
    conditioned generator has something to learn and members of one condition are close."""
    g = torch.Generator().manual_seed(1000 + cond)
    base = {"0.weight": torch.randn(hidden, 8, generator=g) * 0.3, "0.bias": torch.randn(hidden, generator=g) * 0.1,
            "2.weight": torch.randn(3, hidden, generator=g) * 0.3, "2.bias": torch.randn(3, generator=g) * 0.1}
    h = torch.Generator().manual_seed(10_000 * cond + 100 * member + ckpt)
    return {k: v + 0.02 * torch.randn(v.shape, generator=h) for k, v in base.items()}


def tiny_table(uri: str, conditions=CONDITIONS, members: int = 2, checkpoints: int = 2, block_size: int = 16,
               hidden: int = 8, with_conditions: bool = True) -> str:
    layout = WeightLayout.from_state_dict(mlp_state_dict(0, 0, 0, hidden), rule=1, block_size=block_size)
    w = ZooWriter.create(uri, layout)
    for ci, cond in enumerate(conditions):
        for m in range(members):
            w.write_member(member_id=f"c{ci}-m{m}", task_id=f"t{ci}", condition=cond if with_conditions else "",
                           seed=m, checkpoints=[CheckpointRecord(step=k, state_dict=mlp_state_dict(ci, m, k, hidden))
                                                for k in range(checkpoints)])
    w.consolidate()
    return uri


def empty_table(uri: str, block_size: int = 16) -> str:
    ZooWriter.create(uri, WeightLayout.from_state_dict(mlp_state_dict(0, 0, 0), rule=1, block_size=block_size))
    return uri
