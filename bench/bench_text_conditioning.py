"""Denoised Weights text conditioning: pooled vs token-level, and the tiny UNet's GroupNorm groups.

    python bench/bench_text_conditioning.py [--steps 300]

Two prompts (encoded by the packaged MiniLM) map to two different MLP weight vectors (a tiny table,
2 members x 2 checkpoints each).  Per setting, the tiny BlockUNet1D trains ``--steps`` steps in one
process (v-prediction, cond_dropout 0.2, same data and seed), then samples 4 weight sets per prompt with
one-step recovery at t = 800 and prints: the loss over the first 20 / last 30 steps, how many samples are
nearest their own prompt's mean weights (of 8), the mean distance to it, and the distance between the two
prompts' sample means (the targets are ``sep`` apart).  ``max_groups`` 32 is the tiny preset before it
set 8: with 16/32 channels every GroupNorm group holds one channel and the norm after each ResBlock's
embedding shift removes the shift (timestep, block index and pooled prompt vector reach nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rayweights.generators import build_method  # noqa: E402
from rayweights.table import open_zoo  # noqa: E402
from tests.genkit import tiny_table  # noqa: E402

PROMPTS = ["a watercolor painting of a quiet harbour", "a neon cyberpunk city at night in the rain"]


def run(mode: str, max_groups: int, zoo, layout, steps: int) -> str:
    method = build_method("denoised_weights", layout, "tiny", text_encoder="default", cond_dropout=0.2,
                          scheduler={"prediction_type": "v_prediction"},
                          model_overrides={"denoiser": {"condition_mode": mode, "max_groups": max_groups}})
    method.build_condition_cache(PROMPTS, "default")
    ws, conds = [], []
    for m in zoo.members.to_pylist():
        b = zoo.blocks([m["member_id"]])
        ws.append(b)
        conds += [PROMPTS.index(m["condition"])] * b.shape[0]
    w, cond = torch.cat(ws), torch.tensor(conds)
    nb = layout.num_blocks
    batch = {"block": w.reshape(-1, layout.block_size), "block_index": torch.arange(nb).repeat(w.shape[0]),
             "cond_id": cond.repeat_interleave(nb)}
    module = method.trainer_module("diffusion")
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    torch.manual_seed(0)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        loss = module(**method.prepare("diffusion", batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    secs = time.perf_counter() - t0
    target = torch.stack([w[cond == i].mean(0) for i in range(2)]).reshape(2, -1)
    x = method.layout.denormalize(method.sample(PROMPTS, 4, mode="one_step", t=800, seed=0)).reshape(8, -1)
    d = torch.cdist(x, target)
    own = torch.arange(2).repeat_interleave(4)
    gap = float((x[:4].mean(0) - x[4:].mean(0)).norm())
    return (f"| {mode} | {max_groups} | {sum(losses[:20]) / 20:.3f} / {sum(losses[-30:]) / 30:.3f} | "
            f"{int((d.argmin(1) == own).sum())}/8 | {float(d.gather(1, own[:, None]).mean()):.2f} | {gap:.2f} | "
            f"{secs:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = open_zoo(tiny_table(tempfile.mkdtemp() + "/zoo", conditions=PROMPTS, members=2, checkpoints=2))
    layout = zoo.layout.fit_stats(zoo.blocks())
    w = zoo.blocks()
    sep = float((w[:4].mean(0) - w[4:].mean(0)).norm())
    print(f"targets apart: sep = {sep:.2f}\n")
    print("| condition_mode | max_groups | loss first 20 / last 30 | nearest own | dist to own | gap of means | s |")
    print("|---|---|---|---|---|---|---|")
    for mode, groups in [("pooled", 32), ("tokens", 32), ("pooled", 8), ("tokens", 8)]:
        print(run(mode, groups, zoo, layout, args.steps), flush=True)


if __name__ == "__main__":
    main()
