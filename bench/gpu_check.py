"""One row of the GPU check (bench/gpu_check.sh runs each row in its own process under a time limit).

    python bench/gpu_check.py ROW [--dry-run]      ROW: mfu | zero | sample | packing

Each row prints markdown table lines ``| row | what | value | goal |`` on stdout and nothing else there.

* ``mfu``: samples/s and model FLOPs utilisation of BlockUNet1D preset ``base`` (~108 M parameters) in bf16,
  one optimiser step per batch; FLOPs counted by ``torch.utils.flop_counter`` (forward + backward), peak
  taken from the device name (dense bf16 tensor-core peak); eager and ``torch.compile``.
* ``zero``: peak GPU memory and step time of the same model under DeepSpeed ZeRO 0/1/2/3 on one GPU
  (bf16, AdamW through DeepSpeed's torch_adam).
* ``sample``: one-step and 50-step DDIM time for one weight set of the Denoised Weights paper's size
  (854 blocks x 256), BlockUNet1D preset ``small``, through the production sampler.
* ``packing``: zoo members/hour with 1, 2, 4, 8 members packed per GPU (fractional ``num_gpus``).

``--dry-run``: the same code on the CPU with tiny sizes (CI runs it), numbers meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

# dense bf16 tensor-core peak, FLOP/s
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
             "NVIDIA A10G": 125e12}


def row(name: str, what: str, value: str, goal: str = "-") -> None:
    print(f"| {name} | {what} | {value} | {goal} |", flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _unet(preset: str, dev: torch.device):
    from rayweights.generators import BlockUNet1D, get_preset

    cfg = get_preset("denoised_weights", preset)["denoiser"]
    model = BlockUNet1D(**cfg, block_size=256, cross_attention_dim=384).to(dev)
    return model, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())   # ZeRO-3: partitioned


def _batch(model, B: int, dev: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn(B, 256, generator=g).to(dev), torch.randint(0, 1000, (B,), generator=g).to(dev),
            torch.randint(0, 64, (B,), generator=g).to(dev), torch.randn(B, 384, generator=g).to(dev))


def mfu(dry: bool) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device("cpu" if dry else "cuda")
    preset, B, iters = ("tiny", 8, 2) if dry else ("base", 2048, 30)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=not dry)
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if name.startswith(k)), None)
    for compiled in (False, True):
        model, n = _unet(preset, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
        x, t, b, c = _batch(model, B, dev)
        fwd = torch.compile(model) if compiled and not dry else model

        def step():
            with torch.autocast(**amp):
                loss = (fwd(x, t, b, c).float() - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as fc:
            with torch.autocast(**amp):
                loss = (model(x, t, b, c).float() - x).pow(2).mean()
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = fc.get_total_flops()
        for _ in range(2 if dry else 5):
            step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(dev)
        dt = (time.perf_counter() - t0) / iters
        label = f"BlockUNet1D {preset} ({n / 1e6:.0f} M), bf16, batch {B}, {'torch.compile' if compiled else 'eager'}"
        util = f"{flops / dt / peak:.1%} of {name}" if peak else f"{flops / dt / 1e12:.2f} TFLOP/s on {name}"
        row("mfu", label, f"{B / dt:,.0f} samples/s, {flops / dt / 1e12:.1f} TFLOP/s, MFU {util}", ">= 35 %")
        if dry:
            break


def zero(dry: bool) -> None:
    import deepspeed

    dev = torch.device("cpu" if dry else "cuda")
    preset, B = ("tiny", 8) if dry else ("base", 256)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29512"),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    deepspeed.init_distributed(dist_backend="gloo" if dry else "nccl", verbose=False)
    for stage in (0, 1, 2, 3):
        cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
               "zero_optimization": {"stage": stage}, "bf16": {"enabled": not dry}, "gradient_clipping": 1.0}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model, n = _unet(preset, torch.device("cpu"))
        else:
            model, n = _unet(preset, torch.device("cpu"))
        engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
        dtype = torch.bfloat16 if not dry else torch.float32
        x, t, b, c = _batch(model, B, engine.device)
        times = []
        for _ in range(3 if dry else 8):
            _sync(dev)
            t0 = time.perf_counter()
            loss = (engine(x.to(dtype), t, b, c.to(dtype)).float() - x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak" if dev.type == "cuda" else "no GPU memory"
        row("zero", f"DeepSpeed ZeRO-{stage}, BlockUNet1D {preset} ({n / 1e6:.0f} M), 1 device, batch {B}",
            f"{peak}, {min(times[1:]) * 1000:.1f} ms/step")
        engine.destroy()
        del engine, model


def sample(dry: bool) -> None:
    from bench_sample import make_sampler, paper_layout, time_one

    dev = torch.device("cpu" if dry else "cuda")
    preset, blocks = ("tiny", 64) if dry else ("small", 854)
    layout = paper_layout(blocks)
    for method, steps, goal in (("one_step", 1, "<= 0.1 s"), ("ddim", 2 if dry else 50, "-")):
        s, desc, _ = make_sampler(preset, layout, method, steps, 0, dev.type)
        secs = time_one(s, 1 if dry else 5, dev)
        row("sample", f"{blocks} x 256 weights, {method} ({steps} steps), {desc}", f"{secs:.3f} s", goal)


def packing(dry: bool) -> None:
    from bench_zoo import spec_for

    from rayweights.runtime import ray_init
    from rayweights.zoo import build_zoo

    ray_init()
    members, epochs = (2, 2) if dry else (32, 12)
    with tempfile.TemporaryDirectory(prefix="rw-gpu-check-") as tmp:
        for k in ((1,) if dry else (1, 2, 4, 8)):
            gpus = ["keep_last=1"] if dry else [f"resources.num_gpus={1 / k}"]
            res = build_zoo(spec_for(os.path.join(tmp, f"k{k}"), members, epochs, *gpus, f"resources.workers={k}"))
            row("packing", f"zoo build, {res.done} convnet3 members x {epochs} epochs, {k} per GPU"
                + (" (dry run: CPU)" if dry else ""), f"{res.members_per_hour:,.0f} members/hour")


ROWS = {"mfu": mfu, "zero": zero, "sample": sample, "packing": packing}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("row", choices=sorted(ROWS))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the code path only")
    a = ap.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    torch.manual_seed(0)
    if a.dry_run:
        torch.set_num_threads(1)
    ROWS[a.row](a.dry_run)
