"""``train_generator``: Ray Train V2 ``TorchTrainer`` + DeepSpeed over the stages of a method.

Run layout (``<storage>/<run_name>``, a local folder or ``s3://``)::

    <run>/layout.json                 the zoo layout with the fitted per-group stats (written first)
    <run>/<stage>/checkpoint-<step>/  Ray Train checkpoints: every rank's DeepSpeed shards and
                                      rayweights_checkpoint.json (step, tag, world size, one
                                      state fingerprint per rank, verified on restore)
    <run>/<stage>/fault-injected-*    (tests) markers of injected failures
    <run>/stages/<model>/             the trained model of a finished stage (save_pretrained) + done.json
    <run>/train_log.jsonl             one line per report: stage, step, loss, lr, samples/s and
                                      ms_<phase>: ms per step waiting for data, prepare, forward,
                                      backward, optimiser step, reporting (worker.PhaseTimer);
                                      the first report after a restore adds restored_step,
                                      restored_world_size, restored_fingerprint; one line per
                                      worker failure (event). Appended as reports arrive: the
                                      lines of a killed attempt or a failed stage stay
    <run>/export/                     the generator: generator.json, layout.json, scheduler/,
                                      conditions.safetensors, <model>/ per model (load_generator)

Stages run in order as separate Ray Train runs named after the stage.  Re-running the same config
(same ``run_name``) skips finished stages and resumes an unfinished one from its latest checkpoint
(Ray Train restores the run from storage); within a run ``FailureConfig(max_failures)`` restarts
the worker group from the latest checkpoint after a worker dies. Every rank verifies the state it
restored against the fingerprint saved with the checkpoint (``worker.restore_checkpoint``).

One module (~460 lines): preflight, the per-stage Ray Train run and its resume/skip rules are one
contract with the worker's checkpoint format (``worker.py``); the loop itself lives in the worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any


import pyarrow.fs as pafs
from tqdm.auto import tqdm

from .. import runtime          # runtime.ray_init at call time: tests can forbid starting Ray
from ..blocks import WeightLayout
from ..conditioning import ConditioningError
from ..config import ConfigError, to_dict
from ..errors import JobFailed, UserError
from ..generators import METHODS, GeneratorError, build_method
from ..runtime import worker_env
from ..storage import (StorageError, check_writable, exists, join, list_files, read_bytes, resolve,
                       write_bytes_atomic)
from ..table import ZooError, open_zoo
from ..zoo.spec import read_zoo_spec
from .config import GeneratorTrainConfig, resolved_stage
from .data import fit_stats, num_rows, sample_weights_for_stats, shard_megabytes, stage_dataset
from .worker import MODEL_DIR, train_loop_per_worker

# Ray (and Ray Train) are imported inside the functions that start or talk to a run: importing
# rayweights.train for a config check or preflight stays free of Ray's import cost.

__all__ = ["train_generator", "preflight", "TrainError", "TrainFailed", "TrainResult", "Plan"]

log = logging.getLogger(__name__)

WORKER_HEALTH_CHECK_TIMEOUT_S = 60      # RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S unless the environment sets it


class TrainError(UserError, RuntimeError):
    """Training cannot start or failed (the message names the field, file or stage)."""


class TrainFailed(JobFailed, TrainError):
    """A training stage started and failed (exit 1, one line naming the stage)."""


@dataclass
class Plan:
    cfg: GeneratorTrainConfig
    zoo: Any
    method: Any
    run_uri: str
    rows: dict[str, int]


@dataclass
class TrainResult:
    run_uri: str
    export_uri: str
    stages: dict[str, dict] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"run {self.run_uri}"]
        for s, info in self.stages.items():
            if info.get("skipped"):
                lines.append(f"  {s}: already trained ({info['model_uri']})")
            else:
                lines.append(f"  {s}: {info['steps']} steps, final loss {info.get('loss', float('nan')):.4g}, "
                             f"{info.get('samples_per_s', 0):.1f} samples/s, {len(info['checkpoints'])} checkpoints, "
                             f"{info['seconds']:.1f} s")
        lines.append(f"export: {self.export_uri}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- preflight
def preflight(cfg: GeneratorTrainConfig) -> Plan:
    """Check everything that can be wrong before any training: zoo, conditions, layout vs generator
    config, batch size vs rows, storage; fit normalisation stats; build the condition inputs."""
    if not cfg.zoo:
        raise TrainError("zoo: required (the URI of a zoo's weight-block tables)")
    try:
        zoo = open_zoo(cfg.zoo)
    except (ZooError, StorageError) as exc:
        raise TrainError(f"zoo: {exc}") from exc
    if zoo.corrupt_entries:
        log.warning("zoo %s: %d corrupt manifest entr(y/ies) left out: %s", zoo.uri, len(zoo.corrupt_entries),
                    ", ".join(sorted(zoo.corrupt_entries)[:10]))
    bad = zoo.verify("footer")              # cheap: one footer read per file the run will read
    if bad:
        names = ", ".join(str(b) for b in bad[:3]) + (" ..." if len(bad) > 3 else "")
        if not cfg.skip_bad_members:
            raise TrainError(f"zoo: {len(bad)} member file(s) fail the check: {names}; rebuild them (build-zoo "
                             "resumes only those), or set skip_bad_members: true")
        log.warning("zoo %s: skipping %d bad member(s) (skip_bad_members): %s", zoo.uri, len(bad), names)
        zoo = zoo.without(b.member_id for b in bad)
    if len(zoo) == 0:
        raise TrainError(f"zoo: {zoo.uri} has no members (empty table); build the zoo first")
    klass = METHODS[cfg.method]
    conds = [c for c in zoo.conditions() if c]
    if klass.conditioning is not None and not conds:
        raise TrainError(f"zoo: {zoo.uri} has no conditions, but method {cfg.method} is {klass.conditioning}-conditioned "
                         "(every member needs a condition: a prompt or a dataset name)")
    run_uri = join(cfg.storage, cfg.run_name)
    try:
        check_writable(run_uri)
    except StorageError as exc:
        raise TrainError(f"storage: {exc}") from exc
    layout = fit_stats(zoo, cfg.stats_members, cfg.seed, cfg.normalization)
    prev = resolve(run_uri).join("layout.json")
    if exists(prev):
        old = WeightLayout.from_json(read_bytes(prev))
        if not old.same_structure(layout):
            raise TrainError(f"run_name: {run_uri} was trained on a different layout ({old.num_blocks} blocks x "
                             f"{old.block_size} vs the zoo's {layout.num_blocks} x {layout.block_size}); "
                             "use another run_name")
        layout = old          # resume with exactly the stats the run started with
    kwargs: dict = dict(model_overrides=cfg.model, scheduler=cfg.scheduler, cond_dropout=cfg.cond_dropout)
    try:
        if klass.conditioning == "text":
            kwargs.update(text_encoder=cfg.text_encoder)
        elif klass.conditioning == "dataset":
            opts = {"samples_per_class": cfg.dataset_samples_per_class, "seed": cfg.seed}
            try:
                spec, _ = read_zoo_spec(cfg.zoo)
            except (ConfigError, KeyError, ValueError) as exc:
                raise TrainError(f"zoo: {cfg.zoo}/zoo_spec.json: {exc}") from exc
            if spec is not None:             # any dataset the zoo's family can build
                opts["zoo_spec"] = to_dict(spec)
            kwargs.update(condition_names=conds, dataset_options=opts)
        method = build_method(cfg.method, layout, cfg.preset, **kwargs)
        if klass.conditioning == "text":     # every prompt encoded once (token states too in tokens mode)
            method.build_condition_cache(conds, "default" if cfg.text_encoder in ("", "default") else None)
        if klass.conditioning == "dataset":
            method.build_features_bank()
        if hasattr(method, "fit_input_stats"):       # p-diff: per-coordinate input standardisation
            w = sample_weights_for_stats(zoo, cfg.stats_members, cfg.seed)
            method.fit_input_stats(w.reshape(w.shape[0], -1))
    except (GeneratorError, ConditioningError) as exc:
        raise TrainError(str(exc)) from exc
    rows = {}
    for stage in klass.stages:
        unit = klass.stage_unit[stage]
        rows[stage] = num_rows(zoo, unit)
        sc = resolved_stage(cfg, stage)
        micro = sc["batch_size"] // (cfg.num_workers * cfg.gradient_accumulation)
        if rows[stage] // cfg.num_workers < micro:
            raise TrainError(f"batch_size: stage {stage} needs {micro} {unit} rows per worker per micro-batch, but the "
                             f"table has {rows[stage]} rows for {cfg.num_workers} workers; lower batch_size")
    return Plan(cfg, zoo, method, run_uri, rows)


# ----------------------------------------------------------------------------- progress
def _progress_callback(queue):
    from ray.train.v2.api.callback import UserCallback   # deferred: see the note at the imports

    class ProgressCallback(UserCallback):
        """Runs on the Ray Train controller: forwards rank 0's reports to the driver's queue."""

        def __init__(self, q):
            self.q = q

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0]) if metrics else {}
            m["checkpoint"] = getattr(checkpoint, "path", None)
            try:
                self.q.put_nowait(m)
            except Exception:  # noqa: BLE001 - progress must never fail the run
                pass

        def after_exception(self, run_context, worker_exceptions):
            try:
                ranks = sorted(worker_exceptions)
                err = str(next(iter(worker_exceptions.values()))).strip().splitlines()
                self.q.put_nowait({"event": "worker_failure", "ranks": ranks, "error": err[-1][:300] if err else ""})
            except Exception:  # noqa: BLE001
                pass

    return ProgressCallback(queue)


class _LogSink:
    """``train_log.jsonl`` of a run, appended to as records arrive (flushed), so that the lines of an
    attempt that is killed, or of a stage that fails, stay. On S3 (no appends) the object is rewritten
    with the new lines added."""

    def __init__(self, run):
        self.loc = run.join("train_log.jsonl")
        self.lock = threading.Lock()

    def append(self, records: list) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
        try:
            with self.lock:
                if self.loc.is_s3:
                    old = read_bytes(self.loc) if exists(self.loc) else b""
                    write_bytes_atomic(self.loc, old + data)
                else:
                    os.makedirs(os.path.dirname(self.loc.path), exist_ok=True)
                    with open(self.loc.path, "ab") as f:
                        f.write(data)
                        f.flush()
        except Exception as exc:  # noqa: BLE001 - the log must never fail the run
            log.warning("%s: %d record(s) not written: %s", self.loc.uri, len(records), exc)


class _Drain(threading.Thread):
    """Takes the progress queue's records as they come: logs them, moves the progress bar, keeps them
    in ``records`` and appends each batch to the run's log (``sink``)."""

    def __init__(self, queue, stage: str, total: int, show: bool, records: list, sink: _LogSink | None = None):
        super().__init__(daemon=True)
        self.q, self.stage, self.records, self.stop = queue, stage, records, threading.Event()
        self.sink = sink
        self.bar = None
        if show:
            self.bar = tqdm(total=total, desc=f"train {stage}", unit="step", dynamic_ncols=True)

    def handle(self, m: dict) -> dict:
        m = {"time": time.time(), **m}
        self.records.append(m)
        if m.get("event") == "worker_failure":
            log.warning("stage %s: worker(s) %s failed (%s); Ray Train restarts from the latest checkpoint",
                        self.stage, m.get("ranks"), m.get("error"))
            return m
        log.info("stage %s step %s loss %.5g lr %.3g %.1f samples/s", self.stage, m.get("step"), m.get("loss", 0.0),
                 m.get("lr", 0.0), m.get("samples_per_s", 0.0))
        if self.bar is not None and "step" in m:
            self.bar.n = int(m["step"])
            self.bar.set_postfix(loss=f"{m.get('loss', 0):.4g}", sps=f"{m.get('samples_per_s', 0):.0f}")
            self.bar.refresh()
        return m

    def _take_all(self, first=None) -> None:
        """Handle ``first`` and whatever else is queued now, then append them to the log at once."""
        batch = [] if first is None else [first]
        while True:
            try:
                batch.append(self.q.get_nowait())
            except Exception:  # noqa: BLE001 - queue.Empty and shutdown races
                break
        done = []
        for m in batch:
            try:
                done.append(self.handle(m))
            except Exception:  # noqa: BLE001 - a malformed record must not stop the drain
                continue
        if self.sink is not None:
            self.sink.append(done)

    def run(self):
        while not self.stop.is_set():
            try:
                first = self.q.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty and shutdown races
                continue
            self._take_all(first)

    def finish(self):
        self.stop.set()
        self.join(timeout=5)
        self._take_all()
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- one stage
def _run_stage(plan: Plan, stage: str, show_progress: bool, records: list) -> dict:
    """One stage as one Ray Train run; its records go to ``records`` and, as they arrive, to the log."""
    import ray                                        # deferred: see the note at the imports
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cfg, method = plan.cfg, plan.method
    sc = resolved_stage(cfg, stage)
    gpu = cfg.use_gpu
    shard_mb = shard_megabytes(plan.zoo, method.stage_unit[stage], cfg.num_workers)
    in_memory = cfg.data_in_memory == "always" or (cfg.data_in_memory == "auto" and shard_mb <= cfg.in_memory_max_mb)
    log.info("stage %s: %.1f MB of rows per worker: %s", stage, shard_mb,
             "read once, reshuffled in memory each epoch" if in_memory else "streamed from the table each epoch")
    loop_cfg = {
        "in_memory": in_memory,
        "train": {**dataclasses.asdict(cfg), "run_uri": plan.run_uri},
        "stage": stage, "stage_cfg": sc, "bf16": cfg.bf16(gpu), "first_stage": cfg.train_stages[0],
        "method_state": method.to_state(),
        "env": worker_env(),
    }
    ds = stage_dataset(plan.zoo, method.stage_unit[stage], method.condition_names)
    run_loc = resolve(plan.run_uri)
    resources = {"CPU": cfg.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    # Placement on a cluster whose worker nodes may vanish: everything the run depends on besides its
    # workers lives on the driver's node (Ray pins the Train controller and the data split coordinator
    # there; the progress queue is pinned here), so losing a worker node costs only workers, which
    # FailureConfig restarts from the latest checkpoint.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    # A worker whose node is gone does not answer the controller's health check; Ray Train waits 10 min
    # by default before it counts that as a failure. A live worker answers at once (its actor does, not
    # its training thread): a minute is ample. Ray propagates the variable to the controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", str(WORKER_HEALTH_CHECK_TIMEOUT_S))
    records_stage: list = []
    drain = _Drain(queue, stage, sc["steps"], show_progress, records_stage, _LogSink(run_loc))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=stage, storage_path=run_loc.path, storage_filesystem=run_loc.fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             callbacks=[_progress_callback(queue)]),
        datasets={"train": ds})
    t0 = time.perf_counter()
    drain.start()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; name the stage
        drain.finish()
        raise TrainFailed(f"stage {stage}: training failed: {exc}") from exc
    finally:
        records.extend(records_stage)
    drain.finish()
    try:
        ray.kill(queue.actor)
    except Exception:  # noqa: BLE001
        pass
    if getattr(result, "error", None) is not None:
        raise TrainFailed(f"stage {stage}: training failed: {result.error}")
    ckpt = result.checkpoint
    if ckpt is None:
        raise TrainFailed(f"stage {stage}: the run ended without a checkpoint")
    src = ckpt.path.rstrip("/") + "/" + MODEL_DIR
    if ckpt.filesystem.get_file_info(src).type == pafs.FileType.NotFound:
        raise TrainFailed(f"stage {stage}: the last checkpoint {ckpt.path} has no {MODEL_DIR}/ (training did not finish)")
    key = method.stage_model[stage]
    dest = run_loc.join("stages", key)
    if not dest.is_s3:
        os.makedirs(dest.path, exist_ok=True)
    pafs.copy_files(src, dest.path, source_filesystem=ckpt.filesystem, destination_filesystem=dest.fs)
    ckpts = sorted({os.path.basename(os.path.dirname(i.path)) for i in list_files(run_loc.join(stage), ".json")
                    if os.path.basename(os.path.dirname(i.path)).startswith("checkpoint-")})
    reports = [r for r in records_stage if "step" in r]
    last = reports[-1] if reports else dict(result.metrics or {})
    info = {"steps": sc["steps"], "loss": last.get("loss", float("nan")),
            "samples_per_s": last.get("samples_per_s", 0.0), "checkpoints": ckpts,
            "failures": sum(1 for r in records_stage if r.get("event") == "worker_failure"),
            "seconds": time.perf_counter() - t0, "model_uri": dest.uri, "skipped": False,
            "world_size": last.get("world_size", cfg.num_workers)}
    write_bytes_atomic(dest.join("done.json"), json.dumps(info, default=str).encode())
    return info


# ----------------------------------------------------------------------------- the job
def _finish_stage(method, stage: str, plan: Plan) -> None:
    """Driver-side work between stages: latent scale after a first stage, D2NWG condition cache."""
    w = None
    if getattr(method, "first_stage", None) == stage:
        w = sample_weights_for_stats(plan.zoo, plan.cfg.stats_members, plan.cfg.seed)
    finish_stage(method, stage, None if w is None else w.view(w.shape[0], -1))


def finish_stage(method, stage: str, weights=None) -> None:
    """Between stages: the latent scale after a first stage (from raw ``weights`` [N, D]), the
    D2NWG condition cache after its dataset encoder."""
    if getattr(method, "first_stage", None) == stage:
        scale = method.fit_latent_scale(weights)
        log.info("latent scale after %s: %.4g", stage, scale)
    if method.name == "d2nwg" and stage == "dataset_encoder":
        method.build_condition_cache()


def train_generator(cfg: GeneratorTrainConfig, address: str | None = None, show_progress: bool = True,
                    plan: Plan | None = None, extend_last_stage: bool = False) -> TrainResult:
    """Train every stage of ``cfg.method`` (skipping finished ones), then export the generator.

    ``extend_last_stage``: a finished last stage trained for fewer steps than ``cfg`` now asks is
    continued from its latest checkpoint instead of skipped (training in rounds, e.g. sweep trials)."""
    plan = plan or preflight(cfg)
    method, run = plan.method, resolve(plan.run_uri)
    write_bytes_atomic(run.join("layout.json"), method.layout.to_json().encode())
    write_bytes_atomic(run.join("train_config.json"),
                       json.dumps(dataclasses.asdict(cfg), indent=1, default=str).encode())
    runtime.ray_init(address)
    _check_cpus(cfg, address)
    result = TrainResult(plan.run_uri, run.join("export").uri)
    records: list = []
    for stage in method.stages:
        key = method.stage_model[stage]
        dest = run.join("stages", key)
        info = json.loads(read_bytes(dest.join("done.json"))) if exists(dest.join("done.json")) else None
        if info is not None and extend_last_stage and stage == method.stages[-1] \
                and int(info.get("steps", 0)) < resolved_stage(cfg, stage)["steps"]:
            info = None                      # continued below from the stage's latest checkpoint
        if info is not None:
            method.pretrained[key] = dest.uri
            result.stages[stage] = {**info, "skipped": True}
            log.info("stage %s: already trained (%s)", stage, dest.uri)
        elif stage in cfg.train_stages:
            result.stages[stage] = _run_stage(plan, stage, show_progress, records)
            method.pretrained[key] = dest.uri
            method.models.pop(key, None)
            method._trainers.pop(stage, None)
        else:
            raise TrainError(f"only_stages: stage {stage} has not been trained in {plan.run_uri} and is not selected")
        _finish_stage(method, stage, plan)
    result.log = records
    method.save_pretrained(result.export_uri)
    write_bytes_atomic(run.join("export", "train_config.json"),
                       json.dumps(dataclasses.asdict(cfg), indent=1, default=str).encode())
    return result


def _check_cpus(cfg: GeneratorTrainConfig, address: str | None) -> None:
    """On the embedded local Ray, the train workers must leave a CPU for Ray Data's read tasks
    (else the data pipeline waits forever). Clusters may autoscale: no check there."""
    import ray                                        # deferred: see the note at the imports

    if address or os.environ.get("RAY_ADDRESS"):
        return
    total = float(ray.cluster_resources().get("CPU", 0))
    need = cfg.num_workers * cfg.cpus_per_worker
    if total - need < 1.0 - 1e-9:
        raise TrainError(f"cpus_per_worker: {cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPU leave "
                         f"{max(total - need, 0):g} of this Ray's {total:g} CPUs for Ray Data reads (1 needed); "
                         "lower cpus_per_worker or num_workers")
