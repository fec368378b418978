"""The Ray Train worker loop: DeepSpeed over one stage of a generator method.

Every worker builds the method from its serialised state, wraps the stage's loss module with
``deepspeed.initialize`` (ZeRO stage and precision from the config, ``torch.optim.AdamW`` through
DeepSpeed's ``torch_adam``), streams its shard of the table with
``get_dataset_shard("train").iter_torch_batches`` and reports every ``log_every`` steps.

Checkpoints (every ``checkpoint_every`` optimiser steps and at the last step) are DeepSpeed
checkpoints written by *every* rank into its local folder — DeepSpeed's file names carry the rank
(``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``; ZeRO-3 also per-rank model states) — and
reported by all ranks under one ``checkpoint_dir_name``, which Ray Train merges in storage.
Rank 0 adds ``rayweights_checkpoint.json`` (step, stage, world size, ZeRO stage, and
``fingerprints``: one :func:`state_fingerprint` per rank of the state that rank saved) and, at the
last step, ``model/``: the full fp32 weights gathered from the ZeRO partitions, ``save_pretrained``.

On (re)start the worker resumes from ``ray.train.get_checkpoint()`` (:func:`restore_checkpoint`);
DeepSpeed's files are read with ``torch.load(weights_only=True)`` and an explicit allowlist of
DeepSpeed's own classes. With the world size of the checkpoint, every rank recomputes its
fingerprint on the state it loaded and stops with an error naming stage, step and rank unless it
equals the saved one (a damaged checkpoint, or a load that left the state as it was). The first
report after a restore carries ``restored_step``, ``restored_world_size`` and
``restored_fingerprint`` (True: verified; False: not verified: a checkpoint of another world size,
whose model weights only are loaded, or one written without fingerprints).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import json
import logging
import os
import tempfile
import time

import torch

from ..generators import GeneratorMethod
from ..storage import exists, read_bytes, resolve, write_bytes_atomic
from .data import InMemoryShard

# DeepSpeed and Ray Train are imported inside the functions that run in a training worker: importing
# deepspeed probes accelerators and compiles nothing useful for the driver, which imports this module
# for the loop's name only.

log = logging.getLogger(__name__)

CKPT_META = "rayweights_checkpoint.json"
MODEL_DIR = "model"


# ----------------------------------------------------------------------------- DeepSpeed helpers
def effective_zero_stage(stage: int, world_size: int) -> int:
    """ZeRO-1/2 partition optimiser state and gradients across ranks: with one rank there is nothing to
    partition, and their flat-buffer copies only cost time (measured: bench/bench_train.py), so a single
    worker runs ZeRO-0. ZeRO-3 is kept: it is also how a model larger than one device is initialised."""
    return 0 if world_size == 1 and stage in (1, 2) else stage


def deepspeed_config(stage_cfg: dict, cfg: dict, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config of one stage (global batch = micro x accumulation x world size)."""
    accum = int(cfg["gradient_accumulation"])
    micro = stage_cfg["batch_size"] // (world_size * accum)
    lr, steps, warm = float(stage_cfg["lr"]), int(stage_cfg["steps"]), int(stage_cfg["warmup_steps"])
    if stage_cfg["lr_schedule"] == "constant":
        sched = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                "warmup_num_steps": max(1, warm), "warmup_type": "linear"}}
    elif stage_cfg["lr_schedule"] == "linear_decay":
        sched = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                     "warmup_num_steps": max(1, warm), "total_num_steps": steps,
                                                     "warmup_type": "linear"}}
    elif stage_cfg["lr_schedule"] == "cosine":
        sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": steps, "warmup_num_steps": max(1, warm),
                                                      "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}}
    else:
        raise ValueError(f"lr_schedule: {stage_cfg['lr_schedule']!r} is not constant, linear_decay or cosine")
    zero: dict = {"stage": effective_zero_stage(int(cfg["zero_stage"]), world_size)}
    if zero["stage"] == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "contiguous_gradients": True,
                     "overlap_comm": True})
    elif zero["stage"] in (1, 2):
        zero.update({"contiguous_gradients": True, "overlap_comm": bool(cfg.get("use_gpu"))})
    return {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": float(stage_cfg["weight_decay"]),
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "scheduler": sched,
        "gradient_clipping": float(stage_cfg["grad_clip"]),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def _deepspeed_safe_globals() -> list:
    """DeepSpeed classes that appear in its checkpoints (allowlist for weights_only loading)."""
    out: list = [argparse.Namespace, collections.OrderedDict]
    candidates = [
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler", "LossScaleProfile")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.runtime.zero.stage3", ()),
    ]
    for mod, names in candidates:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        out += [getattr(m, n) for n in names if hasattr(m, n)]
    return out


def install_safe_checkpoint_loading(engine) -> None:
    """Make the engine read checkpoints with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine   # deferred: see the imports

    allow = _deepspeed_safe_globals()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allow):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)


def _tensors(obj, path: str = ""):
    """``(path, tensor)`` of every tensor in a nest of dicts, lists and tuples, in an order that depends
    on the keys only (dict keys sorted as text)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def state_fingerprint(module: torch.nn.Module, optimizer=None) -> str:
    """sha256 of the training state one rank holds: the bytes of ``module``'s parameters (under ZeRO-3
    the partition this rank owns, ``ds_tensor``) and of every tensor in ``optimizer.state_dict()``
    (DeepSpeed's ZeRO optimisers: this rank's fp32 partition and the moments of its partition; a
    torch optimiser: its moments and step counts), each with its name, dtype and shape.

    Bitwise: equal after a save and load that restored the state exactly, different if one element of
    a parameter or a moment differs. Local (no collective); costs one pass over the rank's state,
    about what writing its checkpoint costs."""
    h = hashlib.sha256()

    def feed(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, p in module.named_parameters():
        part = getattr(p, "ds_tensor", None)
        feed(f"param/{name}", p if part is None else part)
    if optimizer is not None:
        for path, t in _tensors(optimizer.state_dict()):
            feed(f"optim{path}", t)
    return h.hexdigest()


def gather_fingerprints(fingerprint: str, world: int, device) -> list[str]:
    """Every rank's fingerprint, in rank order, on every rank (one all_gather of 32 bytes a rank)."""
    dist = torch.distributed
    if world == 1 or not dist.is_initialized():
        return [fingerprint]
    mine = torch.frombuffer(bytearray(bytes.fromhex(fingerprint)), dtype=torch.uint8).to(device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [bytes(t.cpu().tolist()).hex() for t in out]


def gather_fp32_state_dict(engine, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of ``module`` from the (possibly ZeRO-partitioned, bf16) engine; collective:
    every rank must call it; returns the state_dict on rank 0, None elsewhere."""
    import deepspeed                                  # deferred: see the note at the imports
    from deepspeed.utils import safe_get_full_fp32_param

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().float().clone()
            else:
                full = p.detach().float()
        if rank == 0:
            out[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        if rank == 0:
            out[name] = b.detach().cpu().clone()
    return out if rank == 0 else None


def build_engine(method, stage: str, ds_cfg: dict, gradient_checkpointing: bool = False):
    """The DeepSpeed engine of one stage's trainer module, in a process whose torch.distributed
    group is already up (Ray Train's torch backend made it). Returns ``(engine, module)``.

    DeepSpeed keeps its own communication state (``deepspeed.comm``), separate from
    torch.distributed. ``zero.Init`` reads the world size from it *before* initialising it, and
    falls back to one rank when it is not yet up: under ZeRO-3 on N workers its batch check then
    reads ``train_batch_size != micro × accum × 1``. So attach deepspeed.comm to the existing group
    first (init_distributed wraps an initialised torch.distributed group, it does not make a new one).
    """
    import deepspeed                                  # deferred: see the note at the imports

    tdist = torch.distributed
    if tdist.is_available() and tdist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=tdist.get_backend())
    if int(ds_cfg["zero_optimization"]["stage"]) == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            module = method.trainer_module(stage)
    else:
        module = method.trainer_module(stage)
    model = method.model(method.stage_model[stage])
    if gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_cfg,
                                           model_parameters=[p for p in module.parameters() if p.requires_grad])
    install_safe_checkpoint_loading(engine)
    return engine, module


# ----------------------------------------------------------------------------- the loop
def _fault(cfg: dict, stage: str, step: int, rank: int, first_stage: str) -> None:
    fi = cfg["fault_injection"]
    if fi["step"] < 0 or step != fi["step"] or rank != fi["rank"] or (fi["stage"] or first_stage) != stage:
        return
    marker = resolve(cfg["run_uri"]).join(stage, f"fault-injected-step{step}")
    if exists(marker):       # inject once per run: the restarted attempt passes
        return
    write_bytes_atomic(marker, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode())
    every = int(cfg["checkpoint_every"])
    _wait_until_registered(resolve(cfg["run_uri"]).join(stage), (step - 1) // every * every)
    log.warning("fault injection: rank %d dies at step %d (%s)", rank, step, fi["mode"])
    if fi["mode"] == "exit":
        os._exit(17)
    raise RuntimeError(f"fault injection at step {step} on rank {rank}")


def _wait_until_registered(stage_loc, ckpt_step: int, timeout_s: float = 120.0) -> None:
    """Before an injected fault: wait until Ray Train registered the checkpoint of ``ckpt_step`` (its
    checkpoint manager snapshot names it), so that the restart resumes from it. A worker that dies right
    after reporting a checkpoint can die before the controller collected every rank's report, and the
    restart then starts from the checkpoint before (a real failure can do that; a test must not)."""
    if ckpt_step <= 0:
        return
    snap, name = stage_loc.join("checkpoint_manager_snapshot.json"), f"checkpoint-{ckpt_step:08d}"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if exists(snap) and name in read_bytes(snap).decode(errors="replace"):
                return
        except Exception:  # noqa: BLE001 - the snapshot is being rewritten
            pass
        time.sleep(0.2)
    log.warning("fault injection: %s not registered after %.0f s; failing anyway", name, timeout_s)


class PhaseTimer:
    """Wall time of a training step split into its phases (waiting for the batch, ``prepare``, forward,
    backward, optimiser step, reporting/checkpointing), summed between two reports and reported as
    milliseconds per step (``ms_<phase>``): where a step's time goes, at the cost of a clock read a phase."""

    PHASES = ("data", "prepare", "forward", "backward", "step", "report")

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.t = clock()

    def start(self) -> None:
        self.t = self.clock()

    def lap(self, phase: str) -> None:
        now = self.clock()
        self.totals[phase] += now - self.t
        self.t = now

    def report(self, steps: int) -> dict[str, float]:
        """``ms_<phase>`` per step since the last report (the reporting of this one lands in the next)."""
        out = {f"ms_{k}": 1e3 * v / max(steps, 1) for k, v in self.totals.items()}
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        return out


def train_loop_per_worker(config: dict) -> None:
    import ray.train                                  # deferred: see the note at the imports
    import ray.train.torch

    cfg, stage, sc = config["train"], config["stage"], config["stage_cfg"]
    for k, v in config.get("env", {}).items():
        os.environ.setdefault(k, v)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.get("cpus_per_worker", 1))))
    torch.manual_seed(int(cfg["seed"]) * 1000 + rank)
    bf16 = bool(config["bf16"])

    method = GeneratorMethod.from_state(config["method_state"])
    ds_cfg = deepspeed_config(sc, cfg, world, bf16)
    engine, module = build_engine(method, stage, ds_cfg, gradient_checkpointing=bool(cfg.get("gradient_checkpointing")))
    model_key = method.stage_model[stage]

    total = int(sc["steps"])
    step = 0
    restored: dict = {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step, restored = restore_checkpoint(engine, d, stage, world, rank, int(cfg["zero_stage"]), name=ckpt.path)

    shard = ray.train.get_dataset_shard("train")
    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    buffer = int(cfg.get("shuffle_buffer") or 0) or 8 * micro
    memory = InMemoryShard(shard) if config.get("in_memory") else None
    first_stage = config["first_stage"]
    loss_sum, loss_n, t_last, step_last, epoch = 0.0, 0, time.perf_counter(), step, 0
    phases = PhaseTimer()
    while step < total:
        got = 0
        seed = int(cfg["seed"]) * 7919 + epoch * 31 + rank
        batches = memory.epoch(micro, seed) if memory is not None else shard.iter_torch_batches(
            batch_size=micro, drop_last=True, local_shuffle_buffer_size=buffer, local_shuffle_seed=seed)
        phases.start()
        for batch in batches:
            phases.lap("data")
            got += 1
            inputs = method.prepare(stage, batch, device)
            phases.lap("prepare")
            loss = engine(**inputs)
            phases.lap("forward")
            engine.backward(loss)
            phases.lap("backward")
            engine.step()
            phases.lap("step")
            loss_sum += float(loss.detach())
            loss_n += 1
            if not engine.is_gradient_accumulation_boundary():
                phases.lap("report")
                continue
            step += 1
            _fault(cfg, stage, step, rank, first_stage)
            last = step >= total
            do_ckpt = last or step % int(cfg["checkpoint_every"]) == 0
            if do_ckpt or step % int(cfg["log_every"]) == 0:
                stats = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64)
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(stats)
                now = time.perf_counter()
                metrics = {"stage": stage, "step": step, "epoch": epoch, "loss": float(stats[0] / max(stats[1], 1)),
                           "lr": float(engine.get_lr()[0]),
                           "samples_per_s": (step - step_last) * ds_cfg["train_batch_size"] / max(now - t_last, 1e-9),
                           "world_size": world, **phases.report(step - step_last), **restored}
                restored = {}
                loss_sum, loss_n, t_last, step_last = 0.0, 0, now, step
                if do_ckpt:
                    _report_with_checkpoint(engine, method, model_key, metrics, stage, step, world, cfg, rank, last)
                else:
                    ray.train.report(metrics)
            phases.lap("report")
            if last:
                break
        if got == 0:
            raise RuntimeError(f"stage {stage}: worker {rank} got no full batch of {micro} rows from its shard "
                               "(too few rows for the batch size and number of workers)")
        epoch += 1


def restore_checkpoint(engine, d: str, stage: str, world: int, rank: int, zero_stage: int,
                       name: str | None = None) -> tuple[int, dict]:
    """Load the checkpoint in folder ``d`` into ``engine`` and verify it: returns the checkpoint's step
    and what the first report after the restore says about it (``restored_step``,
    ``restored_world_size``, ``restored_fingerprint``).

    With the checkpoint's world size the whole state (module, optimiser, LR schedule) is loaded and this
    rank's :func:`state_fingerprint` of it must equal the one saved for the rank, else RuntimeError.
    On another world size (ZeRO 0-2) the model weights only are loaded: the optimiser starts afresh and
    there is nothing to compare; ZeRO-3 partitions of another world size are refused."""
    name = name or d
    with open(os.path.join(d, CKPT_META)) as f:
        meta = json.load(f)
    if meta["stage"] != stage:
        raise RuntimeError(f"checkpoint {name} is of stage {meta['stage']!r}, not {stage!r}")
    step, saved_world = int(meta["step"]), int(meta["world_size"])
    info: dict = {"restored_step": step, "restored_world_size": saved_world}
    if saved_world == world:
        load_path, _ = engine.load_checkpoint(d, tag=meta["tag"])
        if load_path is None:
            raise RuntimeError(f"stage {stage}: checkpoint {name} (step {step}): DeepSpeed found nothing to load "
                               f"under {meta['tag']}/ on rank {rank}")
        saved = (meta.get("fingerprints") or [None] * world)[rank]
        if saved is None:
            log.warning("checkpoint %s has no state fingerprints: the restored state is not verified", name)
            info["restored_fingerprint"] = False
        else:
            now = state_fingerprint(engine.module, engine.optimizer)
            if now != saved:
                raise RuntimeError(
                    f"stage {stage}: the state restored from checkpoint {name} (step {step}) on rank {rank} is not "
                    f"the state saved there (fingerprint {now[:16]} != saved {saved[:16]}): the checkpoint is "
                    "damaged or was not fully loaded")
            info["restored_fingerprint"] = True
    elif zero_stage < 3:
        log.warning("resuming a %d-worker checkpoint on %d workers: model weights only, optimiser reset",
                    saved_world, world)
        engine.load_checkpoint(d, tag=meta["tag"], load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        info["restored_fingerprint"] = False
    else:
        raise RuntimeError(f"checkpoint has ZeRO-3 partitions of {saved_world} workers; resume with "
                           f"num_workers={saved_world} (running {world})")
    engine.global_steps = step
    if engine.lr_scheduler is not None and saved_world != world:
        engine.lr_scheduler.last_batch_iteration = step - 1
    return step, info


def write_checkpoint(engine, d: str, meta: dict, rank: int, world: int) -> list[str]:
    """DeepSpeed's checkpoint of every rank under ``d/<meta["tag"]>``, and on rank 0 :data:`CKPT_META`:
    ``meta`` with the folder's file names and every rank's :func:`state_fingerprint` (collective: every
    rank calls it). Returns the fingerprints."""
    fps = gather_fingerprints(state_fingerprint(engine.module, engine.optimizer), world, engine.device)
    engine.save_checkpoint(d, tag=meta["tag"])
    if rank == 0:
        with open(os.path.join(d, CKPT_META), "w") as f:
            json.dump({**meta, "files": sorted(os.listdir(os.path.join(d, meta["tag"]))), "fingerprints": fps}, f)
    return fps


def _report_with_checkpoint(engine, method, model_key, metrics, stage, step, world, cfg, rank, last):
    import ray.train                                  # deferred: see the note at the imports

    tag = f"step{step:08d}"
    with tempfile.TemporaryDirectory(prefix="rw-ckpt-") as d:
        write_checkpoint(engine, d, {"step": step, "stage": stage, "tag": tag, "world_size": world,
                                     "zero_stage": int(cfg["zero_stage"]), "method": method.name,
                                     "final": bool(last)}, rank, world)
        if last:
            sd = gather_fp32_state_dict(engine, method.model(model_key))
            if rank == 0:
                model = type(method.model(model_key)).from_config(method.model(model_key).config)
                model.load_state_dict(sd)
                model.save_pretrained(os.path.join(d, MODEL_DIR), safe_serialization=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-{step:08d}")
