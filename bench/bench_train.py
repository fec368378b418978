"""Generator training throughput: a plain single-process torch loop against the Ray Train V2 +
DeepSpeed path with 1 and 2 workers, on the same model, batch and table.

    python bench/bench_train.py [--method denoised_weights] [--steps 240] [--batch 64] [--members 384]

The default table (384 members x 4 checkpoints x 7 blocks = 10,752 rows, 168 batches per epoch)
is big enough that Ray Data's per-epoch pipeline start (about 1 s) is a few percent of an epoch,
as it is for real zoos; ``--members 32`` shows the small-table regime where it dominates.
Samples/s of the Ray rows are the steady-state rate the workers report (first report dropped);
"wall" includes Ray Train start-up, Ray Data streaming and checkpoints. On a GPU node,
``--gpu`` adds samples/s, MFU of the ~100 M-parameter BlockUNet1D (preset ``base``) in bf16 and
the peak memory per ZeRO stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rayweights.config import from_dict  # noqa: E402
from rayweights.table import open_zoo  # noqa: E402
from rayweights.train import GeneratorTrainConfig, preflight, train_generator  # noqa: E402
from rayweights.train.worker import PhaseTimer  # noqa: E402


def make_zoo(uri: str, members: int, hidden: int) -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.genkit import tiny_table

    conds = [f"digits:{a},{b},{c}" for a, b, c in [(0, 1, 2), (3, 4, 5), (6, 7, 8), (1, 5, 9)]]
    return tiny_table(uri, conditions=conds, members=max(1, members // len(conds)), checkpoints=4,
                      block_size=64, hidden=hidden)


def cfg_for(method, zoo, storage, run, steps, batch, workers, cpus, zero=2, data="auto"):
    stage = {"denoised_weights": "diffusion", "pdiff": "autoencoder", "d2nwg": "vae"}[method]
    return from_dict(GeneratorTrainConfig, dict(
        method=method, zoo=zoo, storage=storage, run_name=run, batch_size=batch, lr=1e-3, steps=steps,
        only_stages=[stage], num_workers=workers, cpus_per_worker=cpus, zero_stage=zero, precision="fp32",
        checkpoint_every=steps, log_every=max(1, steps // 6), max_failures=0, data_in_memory=data)), stage


def plain_loop(method: str, zoo_uri: str, steps: int, batch: int, threads: int) -> float:
    """The same stage loss and optimiser (AdamW) in one process, data already in memory."""
    cfg, stage = cfg_for(method, zoo_uri, tempfile.mkdtemp(), "plain", steps, batch, 1, 1)
    plan = preflight(cfg)
    m = plan.method
    zoo = open_zoo(zoo_uri)
    w = zoo.blocks()
    names = m.condition_names
    conds = []
    for row in zoo.members.to_pylist():
        conds += [names.index(row["condition"]) if row["condition"] in names else 0] * len(row["checkpoints"])
    cond = torch.tensor(conds)
    nb, bs = m.layout.num_blocks, m.layout.block_size
    if m.stage_unit[stage] == "block":
        data = {"block": w.reshape(-1, bs), "block_index": torch.arange(nb).repeat(w.shape[0]),
                "cond_id": cond.repeat_interleave(nb)}
    else:
        data = {"weights": w.reshape(w.shape[0], -1), "cond_id": cond}
    n = len(next(iter(data.values())))
    torch.set_num_threads(threads)
    module = m.trainer_module(stage)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = None
    phases = PhaseTimer()
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
            phases.report(1)                          # warm-up steps are not counted
            phases.start()
        idx = torch.randint(0, n, (batch,), generator=g)
        b = {k: v[idx] for k, v in data.items()}
        phases.lap("data")
        inputs = m.prepare(stage, b, "cpu")
        phases.lap("prepare")
        loss = module(**inputs)
        phases.lap("forward")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        phases.lap("backward")
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        phases.lap("step")
        float(loss.detach())
        phases.lap("report")
    return steps * batch / (time.perf_counter() - t0), {k[3:]: v for k, v in phases.report(steps).items()}


def ray_run(method, zoo_uri, storage, steps, batch, workers, cpus, zero=2, data="auto"):
    cfg, stage = cfg_for(method, zoo_uri, storage, f"w{workers}-{data}", steps, batch, workers, cpus, zero, data)
    t0 = time.perf_counter()
    try:
        train_generator(cfg, show_progress=False)
    except Exception as exc:  # only_stages leaves later stages untrained: expected
        if "only_stages" not in str(exc):
            raise
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in open(os.path.join(storage, f"w{workers}-{data}", "train_log.jsonl"))]
    reps = [r for r in log if r.get("stage") == stage and "samples_per_s" in r][1:]    # first: start-up
    sps = [r["samples_per_s"] for r in reps]
    ms = {k: sum(r.get(f"ms_{k}", 0.0) for r in reps) / len(reps) for k in PhaseTimer.PHASES}
    return sum(sps) / len(sps), wall, ms


def gpu_section(args) -> list[str]:
    """MFU of BlockUNet1D 'base' in bf16 and peak memory per ZeRO stage (needs CUDA)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rayweights.generators import BlockUNet1D, count_parameters, get_preset

    cfg = get_preset("denoised_weights", "base")["denoiser"]
    model = BlockUNet1D(**cfg, block_size=256, cross_attention_dim=384).cuda()
    n = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    B = args.gpu_batch
    x = torch.randn(B, 256, device="cuda")
    t = torch.randint(0, 1000, (B,), device="cuda")
    b = torch.randint(0, 64, (B,), device="cuda")
    c = torch.randn(B, 384, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x, t, b, c).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    iters = 30
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    peak = {"NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}
    name = torch.cuda.get_device_name()
    p = next((v for k, v in peak.items() if name.startswith(k)), 989e12)
    return [f"| BlockUNet1D base ({n / 1e6:.0f} M), bf16, batch {B} | {B / dt:,.0f} samples/s | "
            f"{flops / dt / 1e12:.1f} TFLOP/s | MFU {flops / dt / p:.1%} of {name} |",
            f"| peak memory (plain AdamW, bf16 autocast) | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | | |"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="denoised_weights", choices=["denoised_weights", "pdiff", "d2nwg"])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--members", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage of the Ray rows")
    ap.add_argument("--workers", default="1,2", help="worker counts of the Ray rows, comma-separated")
    ap.add_argument("--data", default="always,never", help="data_in_memory settings of the Ray rows, comma-separated "
                    "(always: each worker's shard read once and reshuffled in memory; never: streamed every epoch)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpu-batch", type=int, default=2048)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="rw-bench-train-")
    try:
        zoo = make_zoo(os.path.join(tmp, "zoo"), a.members, a.hidden)
        z = open_zoo(zoo)
        rows_per_epoch = sum(len(c) for c in z.members.column("checkpoints").to_pylist()) * z.layout.num_blocks
        print(f"table: {len(z)} members, {z.layout.num_blocks} blocks of {z.layout.block_size} "
              f"({rows_per_epoch} block rows = {rows_per_epoch // a.batch} batches per epoch); method {a.method}, "
              f"global batch {a.batch}, {a.steps} steps, fp32 on CPU")
        plain1, plain_ms = plain_loop(a.method, zoo, a.steps, a.batch, 1)
        from rayweights.runtime import ray_init

        ray_init()
        rows = [("plain torch loop, 1 process, 1 thread", plain1, None, 1.0, plain_ms)]
        rates = {}
        for data in a.data.split(","):
            for n in (int(w) for w in a.workers.split(",")):
                r, w, ms = ray_run(a.method, zoo, os.path.join(tmp, f"runs-z{a.zero}"), a.steps, a.batch, n,
                                   1.0 / n, a.zero, data)
                rates[data, n] = r
                rows.append((f"Ray Train + DeepSpeed ZeRO-{a.zero}, {n} worker{'s' if n > 1 else ''}, "
                             f"data_in_memory={data}", r, w, r / plain1, ms))
        print("\n| path | samples/s | wall s (incl. start-up) | vs plain loop |\n|---|---|---|---|")
        for name, sps, wall, ratio, _ in rows:
            print(f"| {name} | {sps:,.0f} | {'-' if wall is None else f'{wall:.1f}'} | {ratio:.2f} |")
        print("\nWhere a step's time goes (ms per optimiser step, rank 0; data = waiting for the batch, "
              "report = reporting and checkpoints):\n")
        print("| path | " + " | ".join(PhaseTimer.PHASES) + " | sum |\n|---|" + "---|" * (len(PhaseTimer.PHASES) + 1))
        for name, _, _, _, ms in rows:
            print(f"| {name} | " + " | ".join(f"{ms[k]:.2f}" for k in PhaseTimer.PHASES) + f" | {sum(ms.values()):.2f} |")
        print(f"\n{os.cpu_count()} cores on this machine, 1 CPU for all workers together")
        for data in a.data.split(","):
            if (data, 1) in rates:
                print(f"data_in_memory={data}: Ray+DeepSpeed overhead at 1 worker {plain1 / rates[data, 1] - 1:+.0%}",
                      end="")
                if (data, 2) in rates:
                    print(f"; 2 workers / 1 worker: {rates[data, 2] / rates[data, 1]:.2f}", end="")
                print()
        if a.gpu:
            if not torch.cuda.is_available():
                print("\n--gpu: no CUDA device here; GPU rows not measured")
            else:
                print("\n| GPU | | | |\n|---|---|---|---|")
                print("\n".join(gpu_section(a)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
