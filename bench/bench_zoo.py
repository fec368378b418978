"""Zoo building throughput: members/hour with 1 and 2 actor-pool workers, and the Ray path's
per-member overhead against the same training in a plain Python loop.

    python bench/bench_zoo.py [--members 16] [--epochs 6]

GPU packing (1, 2, 4, 8 members per GPU) needs a GPU: run with --gpu-packing on a GPU node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayweights.config import load_config
from rayweights.zoo import ZooSpec, build_zoo
from rayweights.zoo.builder import prepare, train_and_write

SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "specs", "tiny.yaml")


ARCH = ["architecture=convnet3", "arch_options={width: 16}"]


def spec_for(out, members, epochs, *extra):
    tasks = max(1, members // 2)
    return load_config(ZooSpec, SPEC, [f"output={out}", f"max_tasks={tasks}", "members_per_task=2",
                                       f"hparams.epochs=[{epochs},{epochs}]", *ARCH, *extra])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--gpu-packing", action="store_true")
    ap.add_argument("--arch", default="convnet3", help="mlp3 | convnet3 | resnet_small")
    a = ap.parse_args()
    ARCH[0] = f"architecture={a.arch}"
    if a.arch == "mlp3":
        ARCH[1] = "arch_options={hidden: 16}"
    tmp = tempfile.mkdtemp(prefix="rw-bench-zoo-")
    from rayweights.runtime import ray_init
    ray_init()
    rows = []
    # plain loop: same members, same training, same writes, no Ray
    s = spec_for(os.path.join(tmp, "plain"), a.members, a.epochs)
    writer, todo, _ = prepare(s)
    import torch
    torch.set_num_threads(1)     # the same as each zoo actor
    per_member = []
    t0 = time.perf_counter()
    for r in todo:
        per_member.append(train_and_write(s, writer, r)["seconds"])
    plain = time.perf_counter() - t0
    rows.append(("plain loop (1 process)", len(todo), plain, len(todo) / plain * 3600, per_member))
    # warm-up build so Ray worker start-up is not billed to the 1-worker row only
    build_zoo(spec_for(os.path.join(tmp, "warm"), 2, 1, "max_tasks=1", "members_per_task=2", "keep_last=1"))
    for workers in (1, 2):
        s = spec_for(os.path.join(tmp, f"ray{workers}"), a.members, a.epochs, f"resources.workers={workers}")
        res = build_zoo(s)
        assert res.done == len(todo), res
        rows.append((f"Ray Data actor pool, {workers} worker(s)", res.done, res.wall_seconds, res.members_per_hour,
                     res.member_seconds))
    one, two = rows[1][3], rows[2][3]
    mean = [sum(r[4]) / len(r[4]) for r in rows]
    print(f"\n## Zoo build: {len(todo)} digits {a.arch} members, {a.epochs} epochs each, 2 cores"
          f" ({mean[0]:.2f} s of training + write per member in the plain loop)\n")
    print("| path | members | wall s | members/hour | s per member (train+write, in its process) | "
          "fixed cost s (wall - members' time / workers) |\n|---|---|---|---|---|---|")
    for (name, n, wall, mph, secs), m, w in zip(rows, mean, (1, 1, 2)):
        print(f"| {name} | {n} | {wall:.1f} | {mph:.0f} | {m:.2f} | {wall - sum(secs) / w:.1f} |")
    print(f"\n2 workers / 1 worker (members/hour): {two / one:.2f}x (goal >= 1.8x)")
    print(f"Ray 1-worker per-member overhead vs plain loop, per member in its process: "
          f"{(mean[1] / mean[0] - 1) * 100:+.1f} % (goal <= 10 %); end to end incl. the fixed cost: "
          f"{(rows[1][2] / plain - 1) * 100:+.1f} %")
    if a.gpu_packing:
        import torch
        if not torch.cuda.is_available():
            print("\nGPU packing: not measured (no GPU)")
        else:
            print("\n| members per GPU | members/hour |\n|---|---|")
            for k in (1, 2, 4, 8):
                s = spec_for(os.path.join(tmp, f"gpu{k}"), a.members, a.epochs,
                             f"resources.num_gpus={1 / k}", f"resources.workers={k}")
                res = build_zoo(s)
                print(f"| {k} | {res.members_per_hour:.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
