"""Build a zoo on Ray Data: one row per member, trained on an actor pool, written as table rows.

Each member writes its blocks file, then its manifest entry (``ZooWriter.write_member``), so a
build is idempotent and resumable: members already in the manifest are skipped.  A member that
raises is retried ``max_retries`` times, then recorded in ``failures/`` with its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from dataclasses import dataclass

from ..blocks import WeightLayout
from ..config import from_dict, to_dict
from ..table import ZooError, ZooWriter
from . import families
from .spec import ZooSpec

log = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    uri: str
    planned: int
    done: int
    skipped: int
    failed: int
    wall_seconds: float
    failures: list[tuple[str, str]]

    @property
    def members_per_hour(self) -> float:
        return self.done / self.wall_seconds * 3600 if self.wall_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"zoo {self.uri}: {self.done} done, {self.skipped} skipped, {self.failed} failed "
                f"of {self.planned} planned in {self.wall_seconds:.1f} s ({self.members_per_hour:.0f} members/h)")


def plan_tasks(spec: ZooSpec) -> tuple[list[families.Task], list[families.Task]]:
    """-> (training tasks, held-out tasks)."""
    if spec.tasks:
        tasks = [families.task_from_condition(c) for c in spec.tasks]
    else:
        tasks = families.enumerate_tasks(spec.dataset, spec.classes_per_task)
    held = set(spec.held_out)
    held_out = [t for t in tasks if t.condition in held]
    for c in held - {t.condition for t in tasks}:
        held_out.append(families.task_from_condition(c))
    train = [t for t in tasks if t.condition not in held]
    if spec.held_out_every:
        held_out += [t for i, t in enumerate(train) if i % spec.held_out_every == spec.held_out_every - 1]
        train = [t for i, t in enumerate(train) if i % spec.held_out_every != spec.held_out_every - 1]
    if spec.max_tasks:
        train = train[:spec.max_tasks]
    if not train:
        raise ValueError("tasks: the task list is empty (after removing held-out tasks)")
    for t in train + held_out:
        if len(t.classes) != spec.classes_per_task:
            raise ValueError(f"tasks: {t.condition} has {len(t.classes)} classes, spec says {spec.classes_per_task}")
    return train, held_out


def zoo_layout(spec: ZooSpec) -> WeightLayout:
    sd = families.template_state_dict(spec, spec.classes_per_task)
    return WeightLayout.from_state_dict(sd, rule=spec.rule, block_size=spec.block_size, select=spec.select)


def member_rows(spec: ZooSpec, tasks) -> list[dict]:
    rows = []
    for t in tasks:
        for m in range(spec.members_per_task):
            seed = spec.seed * 1_000_003 + hash_str(t.task_id) % 100_000 * 100 + m
            rows.append({"member_id": f"{t.task_id}-s{m}", "task_id": t.task_id, "condition": t.condition,
                         "seed": seed})
    return rows


def hash_str(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode())


def train_and_write(spec: ZooSpec, writer: ZooWriter, row: dict) -> dict:
    """Train one member with retries; write it, or record its failure. Never raises."""
    task = families.task_from_condition(row["condition"])
    hp = families.draw_hparams(spec.hparams, row["seed"])
    select_names = writer.layout.param_names
    err = ""
    t0 = time.perf_counter()
    for attempt in range(1, spec.max_retries + 2):
        try:
            if row["member_id"] in spec.fail_members:
                raise RuntimeError(f"injected failure for {row['member_id']} (fail_members)")
            kept, _ = families.train_member(spec, task, row["seed"], hp, select_names)
            from ..table import CheckpointRecord
            writer.write_member(row["member_id"], row["task_id"], row["condition"], row["seed"],
                                [CheckpointRecord(step=e, state_dict=sd, metrics=m) for e, sd, m in kept],
                                hparams={**hp, "architecture": spec.architecture, "attempts": attempt})
            return {**row, "status": "done", "seconds": time.perf_counter() - t0, "error": "",
                    "val_acc": kept[-1][2]["val_acc"]}
        except Exception:  # noqa: BLE001 - recorded, never silently dropped
            err = traceback.format_exc()
            log.warning("member %s attempt %d failed: %s", row["member_id"], attempt, err.strip().splitlines()[-1])
    writer.record_failure(row["member_id"], row["task_id"], err, attempts=spec.max_retries + 1)
    return {**row, "status": "failed", "seconds": time.perf_counter() - t0, "error": err.strip().splitlines()[-1],
            "val_acc": float("nan")}


class _MemberTrainer:
    """Actor-pool UDF: each actor holds the spec and the writer; one batch = some members."""

    def __init__(self, spec: dict, uri: str, layout_json: str, env: dict):
        for k, v in env.items():
            os.environ.setdefault(k, v)
        import torch
        torch.set_num_threads(1)
        self.spec = from_dict(ZooSpec, spec)
        self.writer = ZooWriter(uri, WeightLayout.from_json(layout_json))

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("member_id", "task_id", "condition", "seed", "status", "seconds", "error", "val_acc")}
        for i in range(len(batch["member_id"])):
            row = {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i])
                   for k in ("member_id", "task_id", "condition", "seed")}
            res = train_and_write(self.spec, self.writer, row)
            for k in out:
                out[k].append(res[k])
        return out


_ENV = ("RAYWEIGHTS_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


def prepare(spec: ZooSpec) -> tuple[ZooWriter, list[dict], list]:
    """Validate everything that can fail before training: tasks, layout, output URI."""
    if not spec.output:
        raise ValueError("output: no output URI (set `output:` in the spec or pass --output)")
    train, held_out = plan_tasks(spec)
    layout = zoo_layout(spec)
    try:
        writer = ZooWriter.create(spec.output, layout)
    except ZooError as exc:
        raise ValueError(f"output: {exc}") from exc
    return writer, member_rows(spec, train), held_out


def build_zoo(spec: ZooSpec, address: str | None = None, use_ray: bool = True) -> BuildSummary:
    """Build (or resume) the zoo described by ``spec``; returns the summary."""
    writer, rows, held_out = prepare(spec)
    from ..storage import join, write_bytes_atomic, resolve
    import json
    write_bytes_atomic(resolve(join(spec.output, "zoo_spec.json")), json.dumps(
        {"spec": to_dict(spec), "held_out": [t.condition for t in held_out]}, indent=1).encode())
    t0 = time.perf_counter()
    done_before = writer.done_members()
    todo = [r for r in rows if r["member_id"] not in done_before]
    skipped = len(rows) - len(todo)
    results: list[dict] = []
    if todo and use_ray:
        import ray
        from ray.data import ActorPoolStrategy

        from ..runtime import ray_init

        ray_init(address)
        workers = max(1, min(spec.resources.workers, len(todo)))
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        env = {k: v for k, v in os.environ.items() if k in _ENV}
        ds = ds.map_batches(_MemberTrainer, batch_size=1,
                            fn_constructor_kwargs={"spec": to_dict(spec), "uri": spec.output,
                                                   "layout_json": writer.layout.to_json(), "env": env},
                            compute=ActorPoolStrategy(size=workers),
                            num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus or None)
        results = ds.take_all()
    elif todo:
        from tqdm import tqdm
        results = [train_and_write(spec, writer, r) for r in tqdm(todo, desc="members")]
    writer.consolidate()
    failed = [r for r in results if r["status"] == "failed"]
    return BuildSummary(spec.output, len(rows), len(results) - len(failed), skipped, len(failed),
                        time.perf_counter() - t0, [(r["member_id"], r["error"]) for r in failed])
