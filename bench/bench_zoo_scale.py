"""Zoos of 10^4+ tiny members: build throughput, the driver's memory, consolidation, open_zoo, first read.

    python bench/bench_zoo_scale.py --members 10000 --storage local|s3|both [--workers 2]
    python bench/bench_zoo_scale.py --consolidate-only --members 100000 --storage local

The build mode trains digits MLP-3 members of 305 weights (hidden 4, no norm), one epoch of two
optimiser steps (batch 512), one checkpoint each, on the Ray Data actor pool of ``build_zoo``.
``--consolidate-only`` writes N synthetic members (the same writer calls a build's workers make:
blocks file, entry, entry row; rows batched into manifest shards of 1000) with a thread pool, no
training, so consolidation and open_zoo can be timed at 10^5 members quickly.

Every row reports: the build (or synthetic write) wall time, the fixed cost (start to the first
member finished), members/hour, the driver's peak RSS (sampled every 50 ms in a thread; also its
growth over the RSS before the build), consolidation with the manifest shards (what the build does)
and without (the same zoo with the snapshot and shards removed: one GET per entry), open_zoo and the
first read (``Zoo.blocks`` of 8 members).  S3 rows use a moto server on 127.0.0.1 (loopback only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import torch

from rayweights.blocks import WeightLayout
from rayweights.storage import delete, list_files, resolve
from rayweights.table import CheckpointRecord, ZooWriter, open_zoo

from bench_table import start_moto  # noqa: E402  (bench/ is on sys.path when run as a script)

SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "specs", "tiny.yaml")
TASKS = 250                      # digits 5-of-10 subsets, less the two held out


class PeakRSS:
    """The process's resident memory, sampled in a thread."""

    def __init__(self, every: float = 0.05):
        self.proc, self.every = psutil.Process(), every
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def drop_manifest(uri: str) -> None:
    """Remove CURRENT, the snapshots and the shards: consolidation must GET every entry again."""
    root = resolve(uri)
    for info in list_files(root.join("_manifest")):
        delete(resolve(uri).join(os.path.relpath(info.path, root.path)))


def consolidations(uri: str, writer: ZooWriter, row: dict, with_shards_s: float | None = None) -> dict:
    """Consolidate with the shards (unless the build already did: ``with_shards_s``), then without."""
    if with_shards_s is None:
        with_shards_s, _ = timed(writer.consolidate)
    row["consolidate_shards_s"] = with_shards_s
    row["open_zoo_s"], zoo = timed(lambda: open_zoo(uri))
    ids = zoo.members.column("member_id").to_pylist()[:8]
    row["first_read_s"], _ = timed(lambda: zoo.blocks(ids))
    row["zoo_members"] = len(zoo)
    drop_manifest(uri)
    row["consolidate_gets_s"], _ = timed(writer.consolidate)
    return row


def tiny_layout() -> WeightLayout:
    from rayweights.zoo.architectures import build as build_model

    model = build_model("mlp3", (64,), 5, hidden=4, norm=False)
    return WeightLayout.from_state_dict(model.state_dict(), rule=1, block_size=128)


def synthetic(uri: str, n: int, threads: int) -> dict:
    """N members written as a build's workers write them, rows batched into shards of 1000."""
    from rayweights.zoo.architectures import build as build_model

    layout = tiny_layout()
    writer = ZooWriter.create(uri, layout)
    sd = build_model("mlp3", (64,), 5, hidden=4, norm=False).state_dict()
    ck = [CheckpointRecord(step=2, state_dict=sd, metrics={"val_acc": 0.5})]
    row = {"mode": "synthetic", "members": n}
    pending, first = [], [None]

    def one(i):
        _, r = writer.write_member_row(f"m{i:06d}", f"t{i % TASKS:03d}", f"cond-{i % TASKS}", i, ck,
                                       hparams={"lr": 0.01})
        return r

    t0 = time.perf_counter()
    with PeakRSS() as mem, ThreadPoolExecutor(threads) as ex:
        for r in ex.map(one, range(n)):
            if first[0] is None:
                first[0] = time.perf_counter() - t0
            pending.append(r)
            if len(pending) == 1000:
                writer.write_manifest_shard(pending)
                pending = []
        writer.write_manifest_shard(pending)
        pending = []
        row["build_s"] = time.perf_counter() - t0
        consolidations(uri, writer, row)
    row.update(fixed_s=first[0], rss_peak_mb=mem.peak / 2**20, rss_growth_mb=(mem.peak - mem.base) / 2**20)
    return row


def build(uri: str, n: int, workers: int, blocks: str = "bounded") -> dict:
    from rayweights.config import load_config
    from rayweights.runtime import ray_init
    from rayweights.zoo import ZooSpec, build_zoo
    from rayweights.zoo import builder

    per_task = -(-n // TASKS)
    spec = load_config(ZooSpec, SPEC, [f"output={uri}", f"max_tasks={-(-n // per_task)}", f"members_per_task={per_task}",
                                       "arch_options={hidden: 4, norm: false}", "hparams.epochs=[1,1]", "keep_last=1",
                                       "batch_size=512", f"resources.workers={workers}"])
    ray_init()
    first, cons = [], []
    real_add, real_cons = builder._Tally.add, ZooWriter.consolidate

    def add(self, res):
        if not first:
            first.append(time.perf_counter())
        return real_add(self, res)

    def consolidate(self):
        s, v = timed(lambda: real_cons(self))
        cons.append(s)
        return v

    real_blocks = builder.input_blocks
    builder._Tally.add, ZooWriter.consolidate = add, consolidate
    if blocks == "per-member":                       # the plan as one Ray Data block per member (before)
        builder.input_blocks = lambda members, workers: members
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = build_zoo(spec, progress=False)
            wall = time.perf_counter() - t0
    finally:
        builder._Tally.add, ZooWriter.consolidate = real_add, real_cons
        builder.input_blocks = real_blocks
    assert res.failed == 0, res.failures[:3]
    nblocks = n if blocks == "per-member" else real_blocks(n, workers)
    row = {"mode": f"build, {nblocks} input blocks", "members": res.done, "build_s": wall, "fixed_s": first[0] - t0,
           "rss_peak_mb": mem.peak / 2**20, "rss_growth_mb": (mem.peak - mem.base) / 2**20,
           "member_s_median": sorted(res.member_seconds)[len(res.member_seconds) // 2]}
    return consolidations(uri, ZooWriter(uri, open_zoo(uri).layout), row, with_shards_s=cons[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, nargs="+", default=[10000])
    ap.add_argument("--storage", choices=["local", "s3", "both"], default="local")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16, help="writer threads of --consolidate-only")
    ap.add_argument("--consolidate-only", action="store_true")
    ap.add_argument("--input-blocks", nargs="+", choices=["bounded", "per-member"], default=["bounded"],
                    help="how a build hands its plan to Ray Data: bounded (the builder's input_blocks) or one "
                         "block per member (before); several values run side by side")
    a = ap.parse_args()
    torch.set_num_threads(1)
    storages = ["local", "s3"] if a.storage == "both" else [a.storage]
    server = start_moto() if "s3" in storages else None
    tmp = tempfile.mkdtemp(prefix="rw-bench-scale-")
    rows = []
    try:
        for storage in storages:
            for n in a.members:
                for blocks in (["-"] if a.consolidate_only else a.input_blocks):
                    uri = os.path.join(tmp, f"zoo-{n}") if storage == "local" else \
                        f"s3://bench/scale-{n}-{time.time_ns()}"
                    r = synthetic(uri, n, a.threads) if a.consolidate_only else build(uri, n, a.workers, blocks)
                    r["storage"] = storage if storage == "local" else "s3-loopback"
                    rows.append(r)
                    print(r, flush=True)
                    if storage == "local":
                        shutil.rmtree(uri, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()
    print("\n| mode | storage | members | build/write wall s | fixed cost s | members/hour | driver peak RSS MB "
          "(growth) | consolidate, with shards s | consolidate, GET per entry s | open_zoo s | first read s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['storage']} | {r['members']} | {r['build_s']:.1f} | {r['fixed_s']:.2f} | "
              f"{r['members'] / r['build_s'] * 3600:.0f} | {r['rss_peak_mb']:.0f} ({r['rss_growth_mb']:+.0f}) | "
              f"{r['consolidate_shards_s']:.2f} | {r['consolidate_gets_s']:.2f} | {r['open_zoo_s']:.2f} | "
              f"{r['first_read_s']:.3f} |")


if __name__ == "__main__":
    main()
