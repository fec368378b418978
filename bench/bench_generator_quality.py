"""Generator quality on a seen task, p-diff Table 1 form, with diagnostics and memorisation baselines.

Builds (or reuses) p-diff's partial zoo — one 5-class digits task, ConvNet-3 base, 4 members training
the last two BatchNorm layers, a checkpoint after each of the last 25 steps (100 checkpoints of 64
weights) — trains p-diff with a recipe, samples 100 weight sets per sampler through the public
sampling API and prints:

1. zoo vs generated accuracy best / avg / median (validation split), NN distances, invalid fraction,
   diversity, per-tensor statistics check (``rayweights.evaluation.diagnostics``);
2. the diagnosis table of the first sampler;
3. Zeng et al.'s memorisation baselines vs the generator: accuracy and novelty
   (``rayweights.evaluation.memorisation``), with the accuracy-novelty scatter as a PNG.

    python bench/bench_generator_quality.py --work runs/bench-quality \\
        [--recipe jobs/configs/pdiff_tiny.yaml] [--train local|ray] [--samplers ddpm:1000,ddim:100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from rayweights.fmt import cell  # noqa: E402

TASK = "digits:3,5,7,8,9"


def build_zoo(uri: str, task: str) -> None:
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec
    from rayweights.zoo import build_zoo as build

    spec = load_config(ZooSpec, os.path.join(ROOT, "jobs", "specs", "partial_bn.yaml"),
                       [f'tasks=["{task}"]', "held_out=[]", "max_tasks=0", "members_per_task=4", "keep_last=25",
                        "batch_size=16", "base_epochs=2", "arch_options={width: 16}", "resources.workers=1",
                        f"output={uri}"])
    build(spec, use_ray=False, progress=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/bench-generator-quality", help="folder for the zoo, run and figures")
    p.add_argument("--zoo", default="", help="an existing zoo (default: build <work>/zoo)")
    p.add_argument("--task", default=TASK)
    p.add_argument("--family", default="partial", help="evaluation adapter family of the zoo")
    p.add_argument("--recipe", default=os.path.join(ROOT, "jobs", "configs", "pdiff_tiny.yaml"))
    p.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    p.add_argument("--train", choices=["local", "ray"], default="local",
                   help="local: rayweights.train.train_local; ray: train_generator (Ray Train + DeepSpeed)")
    p.add_argument("--samplers", default="ddpm:1000,ddim:100", help="mode:steps list (one_step:t too)")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--sigmas", default="0.01,0.05,0.1,0.3", help="noise baseline levels (x per-group zoo std)")
    p.add_argument("--plot", default=os.path.join(ROOT, "bench", "figures", "generator_memorisation.png"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)                  # tiny models: one thread is fastest (and fair on shared CPUs)

    from rayweights.config import load_config
    from rayweights.evaluation import make_adapter
    from rayweights.evaluation.diagnostics import diagnose, zoo_weights
    from rayweights.evaluation.memorisation import memorisation_study, score_weight_sets
    from rayweights.generators import load_generator
    from rayweights.sampling import load_sampler
    from rayweights.table import open_zoo
    from rayweights.train import GeneratorTrainConfig, train_generator, train_local

    os.makedirs(a.work, exist_ok=True)
    zoo_uri = a.zoo or os.path.join(a.work, "zoo")
    if not a.zoo and not os.path.exists(os.path.join(zoo_uri, "layout.json")):
        print(f"building the zoo at {zoo_uri} ...", flush=True)
        build_zoo(zoo_uri, a.task)
    zoo = open_zoo(zoo_uri)
    z, groups = zoo_weights(zoo)
    cfg = load_config(GeneratorTrainConfig, a.recipe,
                      [f"zoo={zoo_uri}", f"storage={os.path.join(a.work, 'runs')}", f"run_name=pdiff-{a.train}",
                       *a.set])
    t0 = time.perf_counter()
    if a.train == "ray":
        export = train_generator(cfg, show_progress=False).export_uri
    else:
        export = os.path.join(a.work, "runs", f"pdiff-{a.train}", "export")
        train_local(cfg, export=export)
    print(f"trained {cfg.method} ({a.train}) in {time.perf_counter() - t0:.0f} s -> {export}", flush=True)
    method = load_generator(export)
    L = method.layout                         # the zoo layout with the generator's normalisation stats
    recon = method.reconstruct(z.float()) if hasattr(method, "reconstruct") else None
    ad = make_adapter(a.family, a.task, zoo)
    zoo_acc, _ = score_weight_sets(ad, L, z)

    rows = ["| weight sets | n | acc best | acc avg | acc median | NN to zoo (median) | NN / zoo spacing | invalid | "
            "diversity | per-tensor stats within zoo range |", "|---|---|---|---|---|---|---|---|---|---|"]
    d0 = diagnose(z[::7], z, L, zoo_groups=groups)
    rows.append(f"| zoo checkpoints | {len(zoo_acc)} | {cell(zoo_acc.max())} | {cell(zoo_acc.mean())} | "
                f"{cell(float(np.median(zoo_acc)))} | — | spacing {cell(d0.spacing)} | "
                f"{cell(d0.zoo_invalid_fraction)} | {cell(d0.zoo_diversity)} | — |")
    generated, first = {}, None
    for spec in [s for s in a.samplers.split(",") if s]:
        mode, steps = spec.split(":")
        sampler = load_sampler(export, method=mode, t=int(steps), steps=int(steps))
        x = sampler.sample(None, a.num_samples, seed=0)
        gen = (L.denormalize(x) if sampler.normalized else x).reshape(a.num_samples, -1)
        acc, _ = score_weight_sets(ad, L, gen)
        d = diagnose(gen, z, L, reconstructions=recon, zoo_groups=groups)
        name = f"p-diff {mode.upper()}-{steps}" if mode != "one_step" else f"p-diff one-step t={steps}"
        generated[name] = gen
        first = first or (name, d)
        rows.append(f"| {name} | {a.num_samples} | {cell(acc.max())} | {cell(acc.mean())} | "
                    f"{cell(float(np.median(acc)))} | {cell(d.sample_to_zoo_nn['median'])} | {cell(d.nn_ratio, 2)} | "
                    f"{cell(d.sample_invalid_fraction)} | {cell(d.sample_diversity)} | {cell(d.groups_within)} |")
    print(f"\n## Zoo vs generated, task {a.task} (validation accuracy, {a.num_samples} samples)\n")
    print("\n".join(rows))
    if first:
        print(f"\n## Diagnosis: {first[0]}\n")
        print(first[1].table())
    sigmas = tuple(float(s) for s in a.sigmas.split(",") if s)
    res = memorisation_study(ad, L, z, dict(list(generated.items())[:1]), train_groups=groups, n=a.num_samples,
                             sigmas=sigmas, task=a.task)
    print("\n## Memorisation (Zeng et al. baselines)\n")
    print(res.table())
    if a.plot:
        os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
        print(f"\nscatter: {res.plot(a.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
