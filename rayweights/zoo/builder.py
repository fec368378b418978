"""Build a zoo on Ray Data: one row per member, trained on an actor pool, written as table rows.

``build_zoo(spec)``:

1. :func:`prepare` checks everything that can fail before training — tasks (held-out ones
   reserved), data paths, the layout, and a probe write to the output URI — and writes
   ``zoo_spec.json`` (the spec and the held-out conditions, for later stages);
2. the family's shared work runs once (a base generator, per-dataset features), cached in the zoo;
3. members not yet in the manifest become a ``ray.data.Dataset`` of at most
   :func:`input_blocks` blocks (one member per block for small builds, several beyond
   ``max(256, 16 x workers)`` blocks: Ray Data's driver state is per block); they train inside
   ``map_batches`` on an actor pool (``compute=ActorPoolStrategy``) with ``num_cpus`` and
   fractional ``num_gpus`` per actor, so several members share a GPU.  A retried block (its actor
   or node died) skips the members this build already wrote (``_written_since``);
4. each member writes its blocks file, then its manifest entry (``ZooWriter.write_member``): the
   build is idempotent and resumable — rerunning skips finished members.  A member that raises is
   retried ``max_retries`` times (Ray also restarts crashed actors), then recorded in
   ``failures/`` with its traceback: never silently dropped, never half visible;
5. the worker hands the driver its entry's manifest row (``ZooWriter.write_member_row``: the row,
   the entry object's mtime, size and md5); the driver writes them as a manifest shard every
   ``SHARD_ROWS`` members and at the end, and keeps only counters, a bounded sample of member times
   and the failures (at most ``MAX_FAILURES_LISTED`` listed): its memory does not grow with the
   members built.  Entries stay the commit point (a shard lost with the driver only costs GETs);
6. the manifest is consolidated — from the shards, not one GET per entry — and a
   :class:`BuildSummary` returned.

Attempts are counted across processes and nodes: each attempt of a member first writes a marker
``_attempts/<member_id>/<token>.json`` (node, process, start time) and closes it with its outcome.
An attempt whose process died (its actor was killed, or its node was lost) leaves an open marker;
the next attempt, wherever Ray Data retries the member, counts it as a lost attempt and names why
(``node lost`` when the marker's node is no longer alive in the cluster, else ``worker lost``).
The member's manifest entry records ``attempts`` (all of them, lost ones included) and
``lost_attempts``; the markers are deleted once the member is written.  The summary says how many
members were retried and why.

One module (~490 lines): planning, the actor pool, attempt accounting and the manifest commit are
the exactly-once contract of a build and change together.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import random
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .. import runtime          # runtime.ray_init at call time: tests can forbid starting Ray
from ..blocks import LayoutError, WeightLayout
from ..config import from_dict, to_dict
from ..runtime import worker_env
from ..storage import delete, join, list_files, read_bytes, resolve, write_bytes_atomic
from ..table import CheckpointRecord, ZooError, ZooWriter
from . import families
from .families import Task, get_family, plan_tasks
from .spec import ZooSpec

log = logging.getLogger(__name__)
# Ray is imported inside the functions that use it: planning, a resume check or a build without Ray
# (use_ray=False) stay free of Ray's import cost.

SHARD_ROWS = 1000                 # manifest rows per shard the driver writes
MAX_FAILURES_LISTED = 100         # failures listed in a summary (all are counted, all are in failures/)
MEMBER_SECONDS_SAMPLE = 1000      # member times kept in a summary (a uniform sample beyond that)
MIN_INPUT_BLOCKS = 256            # the plan goes to Ray Data in max(this, 16 x workers) blocks at most


def input_blocks(members: int, workers: int) -> int:
    """How many Ray Data input blocks a plan of ``members`` is split into: one member per block up to
    ``max(MIN_INPUT_BLOCKS, 16 * workers)`` blocks, then several per block.  Ray Data's driver-side
    state and scheduling cost are per block (~12 KB and ~4 ms each, bench/RESULTS.md "Zoos of 10^4
    members"), so a bounded count keeps the driver flat in the number of members, and 16 blocks per
    worker keep the tail balanced."""
    return max(1, min(members, max(MIN_INPUT_BLOCKS, 16 * workers)))

__all__ = ["BuildSummary", "build_zoo", "prepare", "plan_tasks", "zoo_layout", "member_rows", "train_and_write"]


@dataclass
class BuildSummary:
    uri: str
    planned: int
    done: int
    skipped: int
    failed: int
    wall_seconds: float
    failures: list[tuple[str, str]]           # (member_id, error), the first MAX_FAILURES_LISTED
    held_out: int = 0
    score_metric: str = ""
    score_mean: float = float("nan")
    shared: dict = field(default_factory=dict)
    member_seconds: list[float] = field(default_factory=list)   # train+write times of this run's members
    # (all of them up to MEMBER_SECONDS_SAMPLE members, a uniform sample of that many beyond)
    retried: int = 0                # members (done or failed this run) that needed more than one attempt
    retry_reasons: dict = field(default_factory=dict)   # why attempts were repeated -> count of attempts

    @property
    def members_per_hour(self) -> float:
        return self.done / self.wall_seconds * 3600 if self.wall_seconds > 0 else 0.0

    def __str__(self) -> str:
        s = (f"zoo {self.uri}: {self.done} done, {self.skipped} skipped, {self.failed} failed "
             f"of {self.planned} planned in {self.wall_seconds:.1f} s ({self.members_per_hour:.0f} members/h)")
        if self.done and self.score_metric:
            s += f"; mean last-checkpoint {self.score_metric} {self.score_mean:.3f}"
        if self.retried:
            why = ", ".join(f"{n} {k}" for k, n in sorted(self.retry_reasons.items()))
            s += f"; {self.retried} member(s) retried ({why})"
        return s


def effective_select(spec: ZooSpec):
    return spec.select if spec.select is not None else get_family(spec.family).default_select(spec)


def zoo_layout(spec: ZooSpec) -> WeightLayout:
    sd = get_family(spec.family).template_state_dict(spec)
    try:
        return WeightLayout.from_state_dict(sd, rule=spec.rule, block_size=spec.block_size, select=effective_select(spec))
    except LayoutError as exc:
        raise ValueError(f"select: {exc}") from exc


def member_rows(spec: ZooSpec, tasks) -> list[dict]:
    """One row per member: id ``<task_id>-s<k>``, a seed derived from (spec seed, task, k)."""
    rows = []
    for t in tasks:
        for m in range(spec.members_per_task):
            seed = spec.seed * 1_000_003 + zlib.crc32(t.task_id.encode()) % 100_000 * 100 + m
            rows.append({"member_id": f"{t.task_id}-s{m}", "task_id": t.task_id, "condition": t.condition,
                         "group": t.group, "classes": ",".join(map(str, t.classes)), "seed": seed})
    return rows


def _row_task(row: dict) -> Task:
    classes = tuple(int(c) for c in row["classes"].split(",")) if row.get("classes") else ()
    return Task(row["task_id"], row["condition"], classes, row.get("group", ""))


def _injected_failures(spec: ZooSpec, member_id: str) -> int:
    """How many first attempts of ``member_id`` fault injection fails (a huge number = all)."""
    for f in spec.fail_members:
        mid, _, n = f.partition(":")
        if mid == member_id:
            return int(n) if n else 1 << 30
    return 0


def _where() -> dict:
    """The node and process an attempt runs in (the node id only under Ray)."""
    node = ""
    try:
        import ray                                    # deferred: see the note at the imports

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - accounting must never fail a member
        pass
    return {"node": node, "pid": os.getpid(), "host": socket.gethostname()}


def _dead_nodes(node_ids: set[str]) -> set[str]:
    """Which of ``node_ids`` the cluster no longer counts alive (empty outside Ray or on any error)."""
    try:
        import ray                                    # deferred: see the note at the imports

        if not node_ids or not ray.is_initialized():
            return set()
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return {n for n in node_ids if n and n not in alive}
    except Exception:  # noqa: BLE001
        return set()


class _Attempts:
    """The attempt markers of one member: ``_attempts/<member_id>/<token>.json``."""

    def __init__(self, writer: ZooWriter, member_id: str):
        self.dir = writer.root.join("_attempts", member_id)
        self.mine: list = []
        self.earlier: list[dict] = []

    def load_earlier(self) -> list[dict]:
        """Markers of attempts made before this process's first one; an open one (no ``outcome``)
        belonged to a process that died.  Adds ``reason`` to each open one."""
        out = []
        for info in list_files(self.dir, ".json"):
            try:
                out.append(json.loads(read_bytes(self.dir.join(posixpath.basename(info.path)))))
            except Exception:  # noqa: BLE001 - a torn marker still counts as an attempt
                out.append({"outcome": None, "node": "", "started": 0.0})
        dead = _dead_nodes({m.get("node", "") for m in out if m.get("outcome") is None})
        for m in out:
            if m.get("outcome") is None:
                m["reason"] = "node lost" if m.get("node") in dead else "worker lost"
            else:
                m["reason"] = "rebuilt" if str(m["outcome"]).startswith("done") else "error"
        self.earlier = sorted(out, key=lambda m: m.get("started", 0.0))
        return self.earlier

    def open(self) -> None:
        token = uuid.uuid4().hex[:12]
        loc = self.dir.join(f"{token}.json")
        self.mine.append((loc, {"started": time.time(), **_where(), "outcome": None}))
        write_bytes_atomic(loc, json.dumps(self.mine[-1][1]).encode())

    def close(self, outcome: str) -> None:
        loc, m = self.mine[-1]
        write_bytes_atomic(loc, json.dumps({**m, "outcome": outcome[-300:]}).encode())

    def clear(self) -> None:
        for info in list_files(self.dir, ".json"):
            delete(self.dir.join(posixpath.basename(info.path)))
        if not self.dir.is_s3:
            try:
                os.rmdir(self.dir.path)
            except OSError:
                pass


def train_and_write(spec: ZooSpec, writer: ZooWriter, row: dict, device: str | None = None) -> dict:
    """Train one member with retries; write it, or record its failure. Never raises.

    ``attempts`` counts every attempt of the member, also those of processes that died (read from
    the attempt markers), and ``retry_reasons`` says why earlier ones did not finish."""
    fam = get_family(spec.family)
    task = _row_task(row)
    hp = families.draw_hparams(spec.hparams, row["seed"])
    select_names = writer.layout.param_names
    device = device or families.resolve_device(spec)
    inject = _injected_failures(spec, row["member_id"])
    err = ""
    t0 = time.perf_counter()
    marks = _Attempts(writer, row["member_id"])
    earlier = marks.load_earlier()
    reasons = [m["reason"] for m in earlier]
    lost = sum(r != "error" for r in reasons)
    if lost:
        log.warning("member %s: %d earlier attempt(s) lost (%s); retrying here", row["member_id"], lost,
                    ", ".join(r for r in reasons if r != "error"))
    attempts = spec.max_retries + 1           # this process's own tries; lost ones do not use them up

    def result(status: str, error: str, score: float) -> dict:
        return {"member_id": row["member_id"], "status": status, "attempts": len(earlier) + len(marks.mine),
                "seconds": time.perf_counter() - t0, "error": error, "score": score,
                "retry_reasons": ",".join(reasons), "manifest_row": ""}

    for attempt in range(1, attempts + 1):
        try:
            marks.open()
            if attempt <= inject:
                raise RuntimeError(f"injected failure for {row['member_id']} (fail_members, attempt {attempt})")
            kept = fam.train_member(spec, task, row["seed"], hp, select_names, device)
            total = len(earlier) + len(marks.mine)
            _, manifest_row = writer.write_member_row(
                row["member_id"], row["task_id"], row["condition"], row["seed"],
                [CheckpointRecord(step=s, state_dict=sd, metrics=m) for s, sd, m in kept],
                hparams={**hp, "architecture": spec.architecture, "attempts": total,
                         "lost_attempts": lost, "retry_reasons": ",".join(reasons), "device": device})
            try:
                marks.close("done")
                marks.clear()
            except Exception:  # noqa: BLE001 - the member is written; a stale marker is only clutter
                log.warning("member %s: could not clear its attempt markers", row["member_id"])
            return {**result("done", "", float(kept[-1][2].get(fam.score_metric, float("nan")))),
                    "manifest_row": json.dumps(manifest_row)}
        except Exception:  # noqa: BLE001 - retried, then recorded: never silently dropped
            err = traceback.format_exc()
            last = err.strip().splitlines()[-1]
            log.warning("member %s attempt %d/%d failed: %s", row["member_id"], attempt, attempts, last)
            try:
                if marks.mine:
                    marks.close("error: " + last)
            except Exception:  # noqa: BLE001
                pass
            reasons.append("error")
            if attempt < attempts:
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
    reasons.pop()                             # the last error is the failure itself, not a retry reason
    total = len(earlier) + len(marks.mine)
    try:
        writer.record_failure(row["member_id"], row["task_id"], err, attempts=total)
    except Exception:  # noqa: BLE001 - the storage itself is failing; the summary still reports it
        err += "\n(recording the failure also failed: " + traceback.format_exc().strip().splitlines()[-1] + ")"
    return result("failed", err.strip().splitlines()[-1], float("nan"))


_RESULT_KEYS = ("member_id", "status", "attempts", "seconds", "error", "score", "retry_reasons", "manifest_row")


class _MemberTrainer:
    """Actor-pool UDF: each actor holds the spec and the writer; a batch is one or more members."""

    def __init__(self, spec: dict, layout_json: str, env: dict, skip_written_since: float | None = None):
        for k, v in env.items():
            os.environ.setdefault(k, v)
        self.spec = from_dict(ZooSpec, spec)
        torch.set_num_threads(max(1, int(self.spec.resources.num_cpus)))
        self.writer = ZooWriter(self.spec.output, WeightLayout.from_json(layout_json))
        self.device = families.resolve_device(self.spec)
        self.since = skip_written_since

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in _RESULT_KEYS}
        keys = ("member_id", "task_id", "condition", "group", "classes", "seed")
        for i in range(len(batch["member_id"])):
            row = {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys}
            res = None if self.since is None else _written_since(self.spec, self.writer, row, self.since)
            if res is None:
                res = train_and_write(self.spec, self.writer, row, self.device)
            for k in out:
                out[k].append(res[k])
        return out


def _written_since(spec: ZooSpec, writer: ZooWriter, row: dict, since: float) -> dict | None:
    """The result of a member this build already wrote (its entry parses and was written at or after
    ``since``, the build's start), or None.  When an input block holds several members and its task is
    retried (its actor or node died), the members the lost task had finished are not trained again.
    An entry from an earlier build (written before ``since``) or an unreadable one is not a skip: the
    plan only holds such members when the resume check found them missing or corrupt."""
    try:
        e = json.loads(read_bytes(writer.root.join("members", f"{row['member_id']}.json")))
        if float(e["written_at"]) < since:
            return None
        h = e.get("hparams") or {}
        last = (e.get("metrics") or [{}])[-1]
        score = float(last.get(get_family(spec.family).score_metric, float("nan")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    log.info("member %s: written earlier in this build (a retried input block); not trained again", row["member_id"])
    return {"member_id": row["member_id"], "status": "done", "attempts": int(h.get("attempts", 1)), "seconds": 0.0,
            "error": "", "score": score, "retry_reasons": str(h.get("retry_reasons", "")),
            "manifest_row": ""}          # not in a shard: consolidation GETs this entry


def prepare(spec: ZooSpec) -> tuple[ZooWriter, list[dict], list[Task]]:
    """Validate everything that can fail before training: tasks, data, layout, output URI.
    Raises ValueError('<field>: why'); creates the zoo's layout.json on success."""
    if not spec.output:
        raise ValueError("output: no output URI (set `output:` in the spec or pass --output)")
    fam = get_family(spec.family)
    fam.check(spec)
    train, held_out = plan_tasks(spec)
    layout = zoo_layout(spec)
    try:
        writer = ZooWriter.create(spec.output, layout)
    except ZooError as exc:
        raise ValueError(f"output: {exc}") from exc
    return writer, member_rows(spec, train), held_out


def _shared_task(spec_dict: dict, env: dict) -> dict:
    for k, v in env.items():
        os.environ.setdefault(k, v)
    s = from_dict(ZooSpec, spec_dict)
    torch.set_num_threads(max(1, int(s.resources.num_cpus)))
    return get_family(s.family).prepare(s, families.resolve_device(s))


def _run_shared(spec: ZooSpec, use_ray: bool) -> dict:
    """The family's once-per-build work, on a worker with the members' resources under Ray."""
    fam = get_family(spec.family)
    if not fam.needs_prepare(spec):
        return {}
    if not use_ray:
        return fam.prepare(spec, families.resolve_device(spec))
    import ray                                        # deferred: see the note at the imports

    env = worker_env()
    remote = ray.remote(num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus or None,
                        max_retries=spec.max_retries)(_shared_task)
    return ray.get(remote.remote(to_dict(spec), env))


def build_zoo(spec: ZooSpec, address: str | None = None, use_ray: bool = True, progress: bool = True) -> BuildSummary:
    """Build (or resume) the zoo described by ``spec``; returns the summary."""
    writer, rows, held_out = prepare(spec)
    write_bytes_atomic(resolve(join(spec.output, "zoo_spec.json")), json.dumps(
        {"spec": to_dict(spec), "held_out": [t.condition for t in held_out],
         "held_out_task_ids": [t.task_id for t in held_out]}, indent=1).encode())
    fam = get_family(spec.family)
    t0 = time.perf_counter()
    started = time.time()
    done_before = writer.done_members()
    todo = [r for r in rows if r["member_id"] not in done_before]
    skipped = len(rows) - len(todo)
    shared: dict = {}
    bar = tqdm(total=len(todo), desc=f"zoo {spec.name}", unit="member", disable=not progress or not todo)
    acc = _Tally(writer)

    def tick(res: dict):
        acc.add(res)
        bar.update(1)
        bar.set_postfix(done=acc.done, failed=acc.failed)

    if todo and use_ray:
        import ray                                    # deferred: see the note at the imports
        from ray.data import ActorPoolStrategy

        runtime.ray_init(address)
        shared = _run_shared(spec, use_ray=True)
        workers = max(1, min(spec.resources.workers, len(todo)))
        blocks = input_blocks(len(todo), workers)
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        env = worker_env()
        ds = ds.map_batches(_MemberTrainer, batch_size=1,
                            fn_constructor_kwargs={"spec": to_dict(spec), "layout_json": writer.layout.to_json(),
                                                   "env": env,
                                                   # several members per block: a retried block skips its
                                                   # members already written (one entry GET each)
                                                   "skip_written_since": started if blocks < len(todo) else None},
                            compute=ActorPoolStrategy(size=workers),
                            num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus or None)
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            tick({k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in batch.items()})
    elif todo:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(spec.resources.num_cpus)))     # as each actor does
        try:
            shared = _run_shared(spec, use_ray=False)
            device = families.resolve_device(spec)
            for r in todo:
                tick(train_and_write(spec, writer, r, device))
        finally:
            torch.set_num_threads(threads)
    bar.close()
    acc.flush()
    writer.consolidate()
    return BuildSummary(spec.output, len(rows), acc.done, skipped, acc.failed,
                        time.perf_counter() - t0, acc.failures,
                        held_out=len(held_out), score_metric=fam.score_metric,
                        score_mean=acc.score_sum / acc.scored if acc.scored else float("nan"), shared=shared or {},
                        member_seconds=acc.seconds, retried=acc.retried, retry_reasons=acc.reasons)


class _Tally:
    """The driver's account of a build: counters, bounded lists, and the manifest rows not yet in a shard."""

    def __init__(self, writer: ZooWriter):
        self.writer = writer
        self.done = self.failed = self.retried = self.scored = self.seen = 0
        self.score_sum = 0.0
        self.failures: list[tuple[str, str]] = []
        self.reasons: dict[str, int] = {}
        self.seconds: list[float] = []
        self.pending: list[dict] = []
        self._rng = random.Random(0)

    def add(self, res: dict) -> None:
        self.seen += 1
        if res["status"] == "done":
            self.done += 1
            if res["score"] == res["score"]:
                self.score_sum += float(res["score"])
                self.scored += 1
            if res.get("manifest_row"):
                self.pending.append(json.loads(res["manifest_row"]))
                if len(self.pending) >= SHARD_ROWS:
                    self.flush()
        else:
            self.failed += 1
            if len(self.failures) < MAX_FAILURES_LISTED:
                self.failures.append((res["member_id"], res["error"]))
        self.retried += int(res["attempts"]) > 1
        for why in filter(None, str(res.get("retry_reasons", "")).split(",")):
            self.reasons[why] = self.reasons.get(why, 0) + 1
        sec = float(res["seconds"])                  # reservoir sample (Algorithm R)
        if len(self.seconds) < MEMBER_SECONDS_SAMPLE:
            self.seconds.append(sec)
        else:
            j = self._rng.randrange(self.seen)
            if j < MEMBER_SECONDS_SAMPLE:
                self.seconds[j] = sec

    def flush(self) -> None:
        """Write the pending rows as one manifest shard.  A failed write loses nothing (the entries are
        written; consolidation then GETs them)."""
        rows, self.pending = self.pending, []
        try:
            self.writer.write_manifest_shard(rows)
        except Exception as exc:  # noqa: BLE001 - the shard is an index only
            log.warning("zoo %s: could not write a manifest shard of %d rows (%s); consolidation reads "
                        "those entries one by one", self.writer.uri, len(rows), exc)
