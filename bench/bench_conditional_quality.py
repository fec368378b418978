"""Conditional weight generators (Denoised Weights, D2NWG) on held-out digits tasks: are the samples usable?

    python bench/bench_conditional_quality.py [--methods denoised_weights d2nwg] [--samples 8] [--zoo DIR]

Builds a 4-class digits-subsets zoo of an MLP-3 with BatchNorm (10 tasks x 2 members, last 2
epochs kept; 3 held-out tasks) in this process, trains each method with its shipped tiny recipe
(``jobs/configs/<method>_tiny.yaml``: steps, batch, lr, schedule, scheduler; the same stage modules
the Ray Train worker wraps, one process), samples every held-out task with the recipe's sampling
default (``--mode``, ``--t``, ``--steps``) and prints one table per method: per held-out task the
epoch-0 accuracy of the generated weight sets vs random init, nearest zoo checkpoint + noise and
the checkpoint average; then per-tensor statistics in the zoo's range, invalid weight sets and
diversity within / between conditions (relative to the zoo's), and the fit on four seen tasks
(generated vs the members' own accuracy).

    python bench/bench_conditional_quality.py --methods d2nwg --heads --zoo DIR --sampling one_step:500 ddim:50

builds ``jobs/specs/digits_heads.yaml`` instead: every 4-class task but the held-out ones, members that
train only the classifier head on one shared frozen body (the default-tier quality gate's zoo).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rayweights.table import open_zoo  # noqa: E402
from rayweights.zoo.spec import read_zoo_spec  # noqa: E402
from tests.condkit import (HEADS_SPEC, build_spec_zoo, HELD_OUT, seen_fit, build_subsets_zoo, make_method, score, table, train_config,  # noqa: E402
                           train_in_process)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"denoised_weights": "jobs/configs/denoised_weights_tiny.yaml", "d2nwg": "jobs/configs/d2nwg_tiny.yaml"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(RECIPES))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--zoo", default="", help="reuse (or build into) this zoo folder")
    p.add_argument("--sampling", nargs="+", default=["default"],
                   help="one_step:<t> | ddim:<steps> | ddpm:<steps> | default (sample-weights' default)")
    p.add_argument("--set", action="append", default=[], help="training config override key=value")
    p.add_argument("--init", choices=["member", "shared"], default="member",
                   help="zoo members' initialisation when the zoo is built here (ZooSpec.init)")
    p.add_argument("--max-tasks", type=int, default=10, help="tasks of the zoo built here (0: all C(10, 4))")
    p.add_argument("--select", default=None,
                   help="train and keep only these parameters (e.g. last:1: heads on the shared frozen body)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--no-norm", action="store_true", help="MLP-3 without BatchNorm")
    p.add_argument("--epochs", type=int, nargs=2, default=(5, 6), help="members' epoch range")
    p.add_argument("--heads", action="store_true",
                   help="build the quality gate's heads zoo (jobs/specs/digits_heads.yaml: every 4-class task, heads "
                        "on one shared frozen body); overrides --init/--max-tasks/--select/--hidden/--epochs")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    zdir = a.zoo or os.path.join(tempfile.mkdtemp(prefix="bench-cond-"), "zoo")
    t0 = time.perf_counter()
    if os.path.exists(os.path.join(zdir, "_manifest")):
        zoo = open_zoo(zdir)
    else:
        zoo, _ = build_spec_zoo(HEADS_SPEC, zdir) if a.heads else build_subsets_zoo(zdir, init=a.init, max_tasks=a.max_tasks, select=a.select, hidden=a.hidden,
                                   norm=not a.no_norm, epochs=tuple(a.epochs))
    spec, held = read_zoo_spec(zoo.uri)
    print(f"zoo {zdir}: {len(zoo)} members, {len(zoo.conditions())} tasks, held out {held or HELD_OUT} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    from rayweights.sampling import SampleConfig

    d = SampleConfig()
    default = f"{d.method}:{d.t if d.method == 'one_step' else d.steps}"
    a.sampling = [default if x == "default" else x for x in a.sampling]
    for name in a.methods:
        cfg = train_config(os.path.join(ROOT, RECIPES[name]), a.set)
        m = make_method(name, zoo, cfg)
        t1 = time.perf_counter()
        losses = train_in_process(m, cfg, zoo, seed=cfg.seed, log=lambda s: print("  " + s, flush=True))
        last = {k: round(sum(v[-50:]) / len(v[-50:]), 4) for k, v in losses.items()}
        print(f"\n{name}: trained {time.perf_counter() - t1:.0f} s, final losses {last}", flush=True)
        for mode_spec in a.sampling:
            mode, _, arg = mode_spec.partition(":")
            t = int(arg) if mode == "one_step" and arg else 500
            steps = int(arg) if mode != "one_step" and arg else 50
            samples = {c: m.layout.denormalize(m.sample([c], a.samples, mode=mode, t=t, steps=steps, seed=100 + i))
                       for i, c in enumerate(held or HELD_OUT)}
            s = score(samples, zoo, spec)
            print(f"\nsampling {mode}{' t=' + str(t) if mode == 'one_step' else ' steps=' + str(steps)}, "
                  f"{a.samples} per task\n", flush=True)
            print(table(f"{name}, {mode_spec}", s), flush=True)
            print("\nseen tasks (fit): " + seen_fit(m, zoo, spec, a.samples, mode=mode, t=t, steps=steps), flush=True)
            wins_r = sum(t.beats_random for t in s.tasks)
            wins_n = sum(t.beats_nearest_noise for t in s.tasks)
            print(f"\nabove random on {wins_r}/{len(s.tasks)} held-out tasks, above nearest + noise on "
                  f"{wins_n}/{len(s.tasks)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
