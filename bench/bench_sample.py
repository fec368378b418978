"""Sampling speed and memory: one full weight set of the Denoised Weights paper's size.

    python bench/bench_sample.py [--threads 2] [--repeats 3] [--presets tiny,small] [--memory-preset small]

* time to generate one complete weight set (854 blocks x 256 = 0.22 M weights) with one-step direct
  recovery and with 50-step DDIM through the production path (a DenoisedWeights generator's
  ``sample``, as ``GeneratorSampler`` calls it: all blocks in one batched forward per step), on CPU,
  and on GPU when one is present (else "not measured");
* peak memory (RSS high-water mark of a fresh process during sampling, and above its RSS just
  before) as the number of blocks grows 10x, all blocks in one forward vs block-wise chunks of 256 rows.

The denoiser is ``rayweights.generators``' BlockUNet1D (randomly initialised: speed and memory do
not depend on the weights) at the given presets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from rayweights.blocks import WeightLayout

PAPER_BLOCKS, BLOCK = 854, 256


def paper_layout(num_blocks: int = PAPER_BLOCKS) -> WeightLayout:
    """A LoRA-like layout of exactly ``num_blocks`` blocks of 256 (14 blocks per layer group)."""
    sd, per, k = {}, 14, 0
    left = num_blocks
    while left > 0:
        nb = min(per, left)
        sd[f"layers.{k}.lora_down.weight"] = torch.zeros(8, nb * BLOCK // 16)
        sd[f"layers.{k}.lora_up.weight"] = torch.zeros(nb * BLOCK // 16, 8)
        left -= nb
        k += 1
    L = WeightLayout.from_state_dict(sd, rule=1, block_size=BLOCK)
    assert L.num_blocks == num_blocks, L.num_blocks
    return L.fit_stats(torch.randn(2, L.num_blocks, BLOCK) * 0.02)


def make_sampler(preset: str, layout: WeightLayout, method: str, steps: int, chunk: int, device: str):
    """(sampler with .sample(condition, n, seed), description, parameter count): the production path,
    a DenoisedWeights method object (BlockUNet1D at ``preset``, text condition from a cached 384-d
    embedding, as MiniLM gives) sampled through ``GeneratorSampler`` = ``method.sample``."""
    from rayweights.conditioning import ConditionCache
    from rayweights.generators import build_method, count_parameters
    from rayweights.sampling import GeneratorSampler

    cache = ConditionCache(["a concept"], torch.randn(1, 384, generator=torch.Generator().manual_seed(0)), "text",
                           "fixed")
    m = build_method("denoised_weights", layout, preset, conditions=cache)
    n = count_parameters(m.model("denoiser"))          # instantiated now, not inside the measured call
    s = GeneratorSampler(m, method, t=500, steps=steps, chunk_blocks=chunk, device=device)
    return s, f"BlockUNet1D preset {preset!r} via DenoisedWeights.sample ({n / 1e6:.2f} M parameters)", n


def time_one(sampler, repeats: int, device) -> float:
    sampler.sample("a concept", 1, seed=0)                     # warm-up
    best = float("inf")
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        sampler.sample("a concept", 1, seed=r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def child(num_blocks: int, chunk: int, method: str, preset: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    L = paper_layout(num_blocks)
    s, _, _ = make_sampler(preset, L, method, 2, chunk, "cpu")
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:     # reset the RSS high-water mark (VmHWM)
        f.write("5")
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    s.sample("a concept", 1, seed=0)
    secs = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024, "seconds": secs}))


def forward_flops(preset: str, num_blocks: int) -> float:
    """FLOPs of one BlockUNet1D forward over ``num_blocks`` blocks (counted on 8 blocks, scaled)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rayweights.generators import BlockUNet1D, get_preset

    m = BlockUNet1D(**get_preset("denoised_weights", preset)["denoiser"], block_size=BLOCK,
                    cross_attention_dim=384).eval()
    B = 8
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        m(torch.randn(B, BLOCK), torch.full((B,), 500), torch.arange(B), torch.randn(B, 384))
    return fc.get_total_flops() / B * num_blocks


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_memory(num_blocks: int, chunk: int, method: str, preset: str, threads: int) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--_child", str(num_blocks), str(chunk), method, preset],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--presets", default="tiny,small", help="BlockUNet1D presets, comma-separated")
    p.add_argument("--memory-preset", default="small")
    p.add_argument("--skip-ddim", action="store_true")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        child(int(a._child[0]), int(a._child[1]), a._child[2], a._child[3])
        return 0
    torch.set_num_threads(a.threads)
    L = paper_layout()
    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    presets = [p for p in a.presets.split(",") if p]
    for preset in presets:
        for dev in devices:
            for method, steps, goal in (("one_step", 1, "<= 1 s" if dev.type == "cpu" else "<= 0.1 s"),
                                        ("ddim", 50, "-")):
                if method == "ddim" and a.skip_ddim:
                    continue
                s, desc, nparams = make_sampler(preset, L, method, steps, 0, str(dev))
                secs = time_one(s, a.repeats if method == "one_step" else 1, dev)
                rows.append((desc, dev.type.upper(), f"{method} ({steps} forward{'s' if steps > 1 else ''})",
                             f"{secs:.3f}", goal))
                print(f"  measured: {rows[-1]}", file=sys.stderr)
    print(f"weight set: {L.num_blocks} blocks x {BLOCK} = {L.num_blocks * BLOCK / 1e6:.3f} M weights; "
          f"CPU threads: {a.threads}\n")
    if not torch.cuda.is_available():
        for preset in presets:
            rows += [(f"BlockUNet1D preset {preset!r}", "GPU", "one_step (1 forward)",
                      "not measured on this machine (no GPU)", "<= 0.1 s"),
                     (f"BlockUNet1D preset {preset!r}", "GPU", "ddim (50 forwards)",
                      "not measured on this machine (no GPU)", "-")]
    print("| generator | device | method | seconds per weight set | goal |\n|---|---|---|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nWhat the CPU allows: FLOPs of one forward over the whole weight set (torch.utils.flop_counter) and "
          "the time this CPU needs for them at its own fp32 matrix-multiply rate (a 2048^3 matmul, same threads):\n")
    rate = matmul_gflops()
    print("| generator | TFLOP per forward | CPU fp32 matmul GFLOP/s | lower bound s per forward |\n|---|---:|---:|---:|")
    for preset in presets:
        f = forward_flops(preset, L.num_blocks)
        print(f"| BlockUNet1D {preset!r} | {f / 1e12:.3f} | {rate:.0f} | {f / rate / 1e9:.2f} |")
    print(f"\nPeak memory of one-step sampling, preset {a.memory_preset!r} (fresh process; peak RSS while sampling, "
          "and above the RSS just before):\n")
    print("| blocks | weights (M) | rows per forward | peak RSS (MiB) | above baseline (MiB) | seconds |")
    print("|---:|---:|---|---:|---:|---:|")
    for nb in (PAPER_BLOCKS, 10 * PAPER_BLOCKS):
        for chunk in (0, 256):
            m = measure_memory(nb, chunk, "one_step", a.memory_preset, a.threads)
            print(f"| {nb} | {nb * BLOCK / 1e6:.2f} | {'all (one forward)' if chunk == 0 else chunk} | "
                  f"{m['peak_mib']:.0f} | {m['peak_mib'] - m['before_mib']:.0f} | {m['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
