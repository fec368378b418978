"""FINE learngenes vs random init vs direct pretraining, for a zoo architecture and the generator.

    python bench/bench_learngene.py [--config jobs/configs/learngene_resnet.yaml ...] [--modes full,diag]
                                    [--set key=value ...] [--output DIR]

For every config (default: both ``jobs/configs/learngene_*.yaml``) and every extraction mode asked
for, runs the whole ``learngene`` job (Ray: one task per size x method x seed) and prints, side by
side: the metric of each size after the fixed step budget (random init vs FINE), direct
pretraining (the whole run from scratch), steps to the target and the speed-up, total training
steps for all sizes, and the storage of the learngenes vs the separate models.  Steps, not
seconds, are compared, so the numbers do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.config import load_config  # noqa: E402
from rayweights.fmt import cell  # noqa: E402
from rayweights.learngene.experiment import plan_learngene, run_learngene  # noqa: E402
from rayweights.learngene.spec import LearngeneConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(ROOT, "jobs", "configs", n) for n in ("learngene_resnet.yaml", "learngene_block_unet.yaml")]


def _f(v, nd=4):
    return cell(v, nd, "g")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", default=None, help="learngene config(s); default: both shipped")
    ap.add_argument("--modes", default="full", help="comma-separated extraction modes to compare (full,diag)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", default=None, help="keep the runs' outputs here (default: a temp folder)")
    a = ap.parse_args(argv)
    out_root = a.output or tempfile.mkdtemp(prefix="rw-bench-learngene-")
    rows, totals = [], []
    for path in a.config or CONFIGS:
        for mode in a.modes.split(","):
            cfg = load_config(LearngeneConfig, path, [*a.overrides, f"extract.mode={mode}"])
            plan = plan_learngene(cfg)
            out = os.path.join(out_root, f"{cfg.name}-{mode}")
            t0 = time.perf_counter()
            s = run_learngene(plan, out, progress=False)
            wall = time.perf_counter() - t0
            tag = f"{cfg.name} [{mode}]"
            for e in s["sizes"]:
                ab, fn, st = e["at_budget"], e["final"], e["steps_to_target"]
                rows.append([tag, e["name"], f"{e['params']:,}", _f(ab.get("scratch")), _f(ab.get("fine")),
                             _f(ab.get("fine_nosigma")), _f(fn.get("scratch")), _f(fn.get("fine")),
                             _f(e["target"]), _f(st.get("scratch")), _f(st.get("fine")), _f(st.get("fine_nosigma")),
                             f"{e['speedup']:.2f}×" if e.get("speedup") is not None else "—"])
            t, sto = s["totals"], s["storage"]
            totals.append([tag, s["metric"], f"B={s['budget']}, S={s['steps']}, Σ={s['sigma_steps']}",
                           f"{t['direct_steps']:,}", f"{t['fine_steps']:,}" if t["fine_steps"] is not None else
                           f"— ({t['fine_sizes_reached']}/{t['sizes']} reached)",
                           f"{t['step_ratio']:.2f}×" if t.get("step_ratio") else "—",
                           f"{sto['learngene_bytes'] / 1024:.1f}", f"{sto['models_bytes'] / 1024:.1f}",
                           f"{sto['ratio']:.2f}×", f"{sto['ratio_with_sigmas']:.2f}×", f"{wall:.0f}"])
            print(f"[{tag}] done in {wall:.0f} s -> {out}", file=sys.stderr, flush=True)
    head = ["config", "size", "params", "random @B", "FINE @B", "no-Σ @B", "direct PT @S", "FINE @S", "target",
            "steps→target random", "FINE", "no-Σ", "speedup"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    head = ["config", "metric", "budgets", "steps, direct (all sizes)", "steps, FINE (source incl.)", "ratio",
            "learngene KiB", "N models KiB", "storage ratio", "ratio incl. Σs", "wall s"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in totals:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
