"""The concepts family's base generator: identity vs the edit-task mixture, on held-out concepts.

    python bench/bench_concepts_base.py [--spec jobs/specs/concepts.yaml] [--seeds 2] [--set key=value ...]

For each base objective (``concepts.base_objective``: identity, mixture) trains the zoo's base
generator (nothing cached: no output), then, on every held-out concept of the spec (first
paraphrase), prints the validation L1 ([0, 1] pixel units, lower is better) of the base as it is and
after a member's LoRA + BN fine-tuning with eq. 4 (the zoo's recipe: k = the zoo's most epochs, the
centre of its lr range, no weight decay; mean over ``--seeds``).  ``|x-y|`` is leaving the image
unedited.  The mixture base never sees a held-out concept (only the spec's training concepts).
Also printed per base: its L1 on the training concepts' validation pairs and on reproducing x.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rayweights.config import load_config  # noqa: E402
from rayweights.zoo import ZooSpec, plan_tasks  # noqa: E402
from rayweights.zoo.families import concepts as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="jobs/specs/concepts.yaml")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = load_config(ZooSpec, args.spec, ["output=", *args.overrides])
    train, held = plan_tasks(spec)
    held = [t for t in held if t.task_id.endswith("-p0")]
    k = spec.hparams.epochs[1]
    hp = {"lr": math.sqrt(spec.hparams.lr[0] * spec.hparams.lr[1]), "weight_decay": 0.0, "epochs": k}
    train_groups = list(dict.fromkeys(t.group for t in train))
    print(f"spec {args.spec} {' '.join(args.overrides)}: {len(train_groups)} training concepts, "
          f"{len(held)} held-out; base {spec.base_epochs} epochs on {spec.concepts.base_images} images; "
          f"members: {k} epochs, lr {hp['lr']:.3g}, {args.seeds} seeds")
    res: dict = {}
    for objective in ("identity", "mixture"):
        s = dataclasses.replace(spec, concepts=dataclasses.replace(spec.concepts, base_objective=objective))
        t0 = time.perf_counter()
        C.base_generator_state(s)
        t_base = time.perf_counter() - t0
        G = C.load_base_generator(s)
        seen = [C._l1(G, *[v * 2 - 1 for v in C.task_pairs(s, t)[1]]) for t in train if t.task_id.endswith("-p0")]
        res[objective, "train_base"] = sum(seen) / len(seen)
        x = C.task_pairs(s, held[0])[1][0] * 2 - 1
        res[objective, "recon"] = C._l1(G, x, x)
        t0 = time.perf_counter()
        for t in held:
            xva, yva = C.task_pairs(s, t)[1]
            res[objective, t.group, "base"] = C._l1(G, xva * 2 - 1, yva * 2 - 1)
            res["id", t.group] = float((xva - yva).abs().mean())
            tuned = [C.train_concept_member(s, t, seed, hp)[-1][2]["val_l1"] for seed in range(args.seeds)]
            res[objective, t.group, "tuned"] = sum(tuned) / len(tuned)
        print(f"  {objective}: base trained in {t_base:.1f} s, members in {time.perf_counter() - t0:.1f} s; "
              f"base L1 on the training concepts' validation pairs {res[objective, 'train_base']:.4f}, "
              f"on reproducing x {res[objective, 'recon']:.4f}")
    print(f"\n| held-out concept | \\|x-y\\| | identity base | mixture base | tuned from identity ({k} ep) "
          f"| tuned from mixture ({k} ep) |")
    print("|---|---:|---:|---:|---:|---:|")
    cols = [("identity", "base"), ("mixture", "base"), ("identity", "tuned"), ("mixture", "tuned")]
    for t in held:
        vals = " | ".join(f"{res[o, t.group, w]:.4f}" for o, w in cols)
        print(f"| {t.group} | {res['id', t.group]:.4f} | {vals} |")
    means = " | ".join(f"**{sum(res[o, t.group, w] for t in held) / len(held):.4f}**" for o, w in cols)
    print(f"| mean | {sum(res['id', t.group] for t in held) / len(held):.4f} | {means} |")
    better = sum(res["mixture", t.group, "tuned"] < res["identity", t.group, "tuned"] for t in held)
    print(f"\ntuned from the mixture base lower on {better}/{len(held)} held-out concepts")


if __name__ == "__main__":
    main()
