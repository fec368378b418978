"""Denoised Weights one-step recovery: epsilon- vs v-prediction on the same tiny conditioned table.

    python bench/bench_prediction_type.py [--steps 400]

Trains the tiny BlockUNet1D in one process per prediction type (same data, seed, steps), then
samples 4 weight sets per condition with one-step recovery at several t and with 20-step DDIM, and
prints: how many samples are nearest to their own condition's mean weights (chance = 1/3) and the
mean distance to it (lower is better; the distance between two conditions' means is printed too).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rayweights.conditioning import ConditionCache  # noqa: E402
from rayweights.generators import build_method  # noqa: E402
from rayweights.table import open_zoo  # noqa: E402
from tests.genkit import CONDITIONS, tiny_table  # noqa: E402


def run(kind: str, zoo, layout, steps: int):
    names = list(CONDITIONS)
    cache = ConditionCache(names, torch.eye(3, 12) * 3.0, "text", "bench")
    m = build_method("denoised_weights", layout, "tiny", conditions=cache, scheduler={"prediction_type": kind})
    ws, conds = [], []
    for row in zoo.members.to_pylist():
        b = zoo.blocks([row["member_id"]])
        ws.append(b)
        conds += [names.index(row["condition"])] * b.shape[0]
    w, cond = torch.cat(ws), torch.tensor(conds)
    nb, bs = layout.num_blocks, layout.block_size
    batch = {"block": w.reshape(-1, bs), "block_index": torch.arange(nb).repeat(w.shape[0]),
             "cond_id": cond.repeat_interleave(nb)}
    module = m.trainer_module("diffusion")
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = module(**m.prepare("diffusion", batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    secs = time.perf_counter() - t0
    target = torch.stack([w[cond == i].mean(0) for i in range(3)])
    rows = []
    for mode, t in [("one_step", 200), ("one_step", 500), ("one_step", 800), ("one_step", 950), ("ddim", 0)]:
        x = layout.denormalize(m.sample(names, 4, mode=mode, t=t, steps=20, seed=0)).reshape(12, -1)
        d = torch.cdist(x, target.reshape(3, -1))
        own = torch.arange(3).repeat_interleave(4)
        rows.append((f"{mode} t={t}" if mode == "one_step" else "ddim 20 steps", int((d.argmin(1) == own).sum()),
                     float(d[torch.arange(12), own].mean())))
    between = float(torch.cdist(target.reshape(3, -1), target.reshape(3, -1)).sum() / 6)
    return sum(losses[:20]) / 20, sum(losses[-40:]) / 40, secs, rows, between


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(2)
    zoo = open_zoo(tiny_table(os.path.join(tempfile.mkdtemp(), "zoo"), members=3, checkpoints=2))
    layout = zoo.layout.fit_stats(zoo.blocks())
    res = {k: run(k, zoo, layout, a.steps) for k in ("epsilon", "v_prediction")}
    print(f"tiny BlockUNet1D, {layout.num_blocks} blocks of {layout.block_size}, 3 conditions x 3 members x 2 "
          f"checkpoints, {a.steps} full-batch AdamW steps (lr 3e-3)\n")
    print("| sampling | eps: own-nearest /12 | eps: dist to own mean | v: own-nearest /12 | v: dist to own mean |")
    print("|---|---|---|---|---|")
    for (name, ok_e, d_e), (_, ok_v, d_v) in zip(res["epsilon"][3], res["v_prediction"][3]):
        print(f"| {name} | {ok_e} | {d_e:.2f} | {ok_v} | {d_v:.2f} |")
    print(f"\nmean distance between two conditions' means: {res['epsilon'][4]:.2f}")
    for k, (l0, l1, secs, _, _) in res.items():
        print(f"{k}: loss {l0:.3f} (first 20 steps) -> {l1:.3f} (last 40), {secs:.0f} s")


if __name__ == "__main__":
    main()
