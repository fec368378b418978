"""Multi-node: real raylets side by side on this machine (tests/multinode.py), a worker node lost
mid-run, and the jobs (driver processes with ``RAY_ADDRESS``, as on a cluster) must finish with
exact accounting.  Heavy for a 2-core box: tiny specs, one cluster per module, marked slow."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from multinode import MultiNodeCluster, wait_for

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "specs" / "tiny.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, custom resource ``head``) + two 1-CPU worker nodes."""
    c = MultiNodeCluster(workers=2, head_resources={"head": 1})
    try:
        yield c
    finally:
        c.shutdown()


def _entries(zoo: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((zoo / "members").glob("*.json"))]


def _training_node(cluster, zoo: Path, started_within_s: float = 2.0):
    """A worker node on which a member started training in the last ``started_within_s`` seconds (its
    attempt marker is open and new), or None.  A new attempt leaves most of its training ahead, so
    the kill lands while the member is in flight, not after it was written."""
    for marker in (zoo / "_attempts").glob("*/*.json"):
        try:
            m = json.loads(marker.read_text())
        except (OSError, ValueError):          # being replaced atomically right now
            continue
        fresh = m.get("outcome") is None and time.time() - m.get("started", 0.0) < started_within_s
        if fresh and (node := cluster.node_of(m.get("node", ""))) is not None:
            return node
    return None


def _check_exactly_once(zoo: Path, planned: int) -> list[dict]:
    """Manifest entries = planned, distinct members in the Parquet files = planned, no duplicate
    ``(member, checkpoint, block_index)`` row, rows = what the entries say; returns the entries."""
    entries = _entries(zoo)
    ids = [e["member_id"] for e in entries]
    assert len(entries) == planned and len(set(ids)) == planned, ids
    seen, rows = set(), 0
    for f in glob.glob(str(zoo / "blocks" / "**" / "*.parquet"), recursive=True):
        t = pq.read_table(f, columns=["member_id", "checkpoint", "block_index"]).to_pylist()
        for r in t:
            key = (r["member_id"], r["checkpoint"], r["block_index"])
            assert key not in seen, f"duplicate row {key} in {f}"
            seen.add(key)
        rows += len(t)
    assert {k[0] for k in seen} == set(ids)
    assert rows == sum(e["num_rows"] for e in entries)
    assert not list((zoo / "_attempts").glob("*/*.json"))                       # markers cleared
    return entries


def _open_attempt(zoo: Path, started_within_s: float = 2.0):
    """An attempt marker opened in the last ``started_within_s`` seconds and still open (a member that
    has most of its training ahead): its contents, or None."""
    for marker in (zoo / "_attempts").glob("*/*.json"):
        try:
            m = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if m.get("outcome") is None and time.time() - m.get("started", 0.0) < started_within_s:
            return {**m, "member_id": marker.parent.name}
    return None


# 400 epochs: a member trains for ~10 s even on an idle machine, so a kill lands while one is in flight
# (at 150 epochs an idle machine finished a member ~2 s after it started, sometimes before the node died)
ZOO_ARGS = ["--no-progress", "--set", "max_tasks=3", "--set", "members_per_task=2", "--set", "hparams.epochs=[400,400]",
            "--set", "keep_last=2"]


def _build_and_kill(cluster, zoo: Path, find_victim, kill, what: str):
    """Start a 6-member build job; once a first member is written and ``find_victim(zoo)`` names a
    victim, ``kill(victim, job)``; wait for the job.  -> (victim, rc, the job's output)."""
    job = cluster.run_job(["jobs/build_zoo.py", "--config", str(TINY), "--output", str(zoo), *ZOO_ARGS])
    try:
        wait_for(lambda: _entries(zoo), 300, "a first member to be written")
        victim = wait_for(lambda: find_victim(zoo), 120, what, every=0.1)
        kill(victim, job)
        rc = job.wait(timeout=420)
    finally:
        if job.poll() is None:
            job.kill()
    return victim, rc, Path(job.log_path).read_text()


def test_zoo_build_survives_node_loss_exactly_once(cluster, tmp_path):
    """A worker node dies while members train on it; a replacement joins.  Every planned member is
    done exactly once, the lost member was retried on a live node, and its attempts say so."""
    zoo = tmp_path / "zoo"
    planned = 6
    t0 = time.monotonic()
    killed_at = []
    # the victim is a worker node that has just started training a member: a new open attempt marker
    # names its node; looked for once a first member is written, so a member is lost mid-training
    # and not before the pool ran at all
    _, rc, out = _build_and_kill(cluster, zoo, lambda z: _training_node(cluster, z),
                                 lambda node, job: (killed_at.append(time.monotonic()), cluster.replace(node)),
                                 "a member training on a worker node")
    assert rc == 0, out[-3000:]
    entries = _check_exactly_once(zoo, planned)
    # attempts recorded truthfully: the member lost with the node counts its lost attempt
    lost = [e for e in entries if e["hparams"].get("lost_attempts", 0) >= 1]
    assert lost, "no member records a lost attempt; attempts: " + \
        str({e["member_id"]: e["hparams"].get("attempts") for e in entries})
    assert all("node lost" in e["hparams"]["retry_reasons"] for e in lost), [e["hparams"] for e in lost]
    assert sum(e["hparams"]["attempts"] for e in entries) == planned + len(lost)
    assert f"{len(lost)} member(s) retried ({len(lost)} node lost)" in out, out[-2000:]
    print(f"\nzoo node loss: {planned} planned, {len(entries)} entries, {len(lost)} retried after node loss; "
          f"killed at {killed_at[0] - t0:.0f} s, wall {time.monotonic() - t0:.0f} s")


def test_driver_sigkill_then_rerun_builds_only_the_rest(cluster, tmp_path):
    """The build's driver is SIGKILLed while members train (its actors die with it); a rerun skips
    every member already written, builds the rest, and the members that were in flight count the
    lost attempt."""
    zoo = tmp_path / "zoo"
    planned = 6
    inflight, _, _ = _build_and_kill(cluster, zoo, _open_attempt, lambda v, job: job.kill(),   # SIGKILL
                                     "a member in flight")
    time.sleep(3)                      # Ray notices the dead owner and stops its actors
    written_before = {e["member_id"] for e in _entries(zoo)}
    assert 0 < len(written_before) < planned, written_before
    rerun = cluster.run_job(["jobs/build_zoo.py", "--config", str(TINY), "--output", str(zoo), *ZOO_ARGS])
    rc = rerun.wait(timeout=420)
    out = Path(rerun.log_path).read_text()
    assert rc == 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("zoo ") and " planned in " in ln)
    done, skipped = (int(x) for x in re.search(r": (\d+) done, (\d+) skipped, 0 failed of 6 planned", line).groups())
    assert skipped >= len(written_before) and done + skipped == planned, line    # only the rest was built
    entries = _check_exactly_once(zoo, planned)
    by_id = {e["member_id"]: e for e in entries}
    if inflight["member_id"] not in written_before:
        h = by_id[inflight["member_id"]]["hparams"]
        assert h["lost_attempts"] >= 1 and "worker lost" in h["retry_reasons"], h
    assert sum(e["hparams"]["attempts"] for e in entries) == planned + sum(e["hparams"]["lost_attempts"] for e in entries)
    print(f"\ndriver SIGKILL: {len(written_before)} written before the kill; rerun: {line}")


def test_actor_process_sigkill_is_retried_and_counted(cluster, tmp_path):
    """One actor process (a member training in it) is SIGKILLed: Ray restarts the actor, the member
    is retried, the build finishes exactly once and the member's entry counts the lost attempt."""
    zoo = tmp_path / "zoo"
    victim, rc, out = _build_and_kill(cluster, zoo, _open_attempt,
                                      lambda v, job: os.kill(int(v["pid"]), signal.SIGKILL), "a member in flight")
    assert rc == 0, out[-3000:]
    entries = _check_exactly_once(zoo, 6)
    h = {e["member_id"]: e for e in entries}[victim["member_id"]]["hparams"]
    assert h["attempts"] >= 2 and h["lost_attempts"] >= 1 and "worker lost" in h["retry_reasons"], h
    assert "retried (" in out and "worker lost" in out, out[-2000:]
    print(f"\nactor SIGKILL: member {victim['member_id']} attempts {h['attempts']} ({h['retry_reasons']})")


def test_members_pack_on_a_node_that_declares_a_gpu_without_calling_cuda(cluster, tmp_path):
    """A node declares one GPU it does not have; members ask for half a GPU each: two actors pack on
    that node's GPU (fractional placement) and train on the CPU, since no CUDA device is visible."""
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1})
    try:
        zoo = tmp_path / "zoo"
        job = cluster.run_job(["jobs/build_zoo.py", "--config", str(TINY), "--output", str(zoo), "--no-progress",
                               "--set", "max_tasks=2", "--set", "members_per_task=2", "--set", "hparams.epochs=[2,2]",
                               "--set", "resources.num_gpus=0.5", "--set", "resources.workers=2"])
        rc = job.wait(timeout=420)
        out = Path(job.log_path).read_text()
        assert rc == 0, out[-3000:]
        entries = _check_exactly_once(zoo, 4)
        assert {e["hparams"]["device"] for e in entries} == {"cpu"}, [e["hparams"] for e in entries]
        assert "cuda" not in out.lower(), [ln for ln in out.splitlines() if "cuda" in ln.lower()]
    finally:
        cluster.kill_node(gpu_node)


DW = ROOT / "jobs" / "configs" / "denoised_weights_tiny.yaml"


@pytest.fixture(scope="module")
def train_cluster():
    """Head (0 CPUs) + two 3-CPU worker nodes: a 2-CPU training worker per node leaves each node a CPU
    for Ray Data's reads (without it training waits at step 0)."""
    c = MultiNodeCluster(workers=2, worker_args={"num_cpus": 3}, head_resources={"head": 1})
    try:
        yield c
    finally:
        c.shutdown()


@pytest.mark.timeout(1200)
def test_training_survives_node_loss(train_cluster, tmp_path):
    """Two Ray Train workers (DeepSpeed ZeRO-2) on two nodes; one node dies after the first checkpoint:
    the run restarts from that checkpoint on the survivor and the replacement with the saved model and
    optimizer state (fingerprints verified), ends at the planned step with the planned checkpoints,
    keeps the killed attempt's log lines, and the driver exits by itself."""
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo

    spec = load_config(ZooSpec, TINY, ["max_tasks=3", "members_per_task=2", "hparams.epochs=[3,3]",
                                       f"output={tmp_path / 'zoo'}"])
    assert build_zoo(spec, use_ray=False, progress=False).done == 6
    run = tmp_path / "runs" / "denoised-weights-tiny"
    t0 = time.monotonic()
    job = train_cluster.run_job([
        "jobs/train_generator.py", "--config", str(DW), "--set", f"zoo={tmp_path / 'zoo'}",
        "--set", f"storage={tmp_path / 'runs'}", "--set", "num_workers=2", "--set", "cpus_per_worker=2",
        "--set", "zero_stage=2", "--set", "max_failures=2", "--set", "steps=60", "--set", "checkpoint_every=20",
        "--set", "batch_size=4", "--set", "log_every=5"])
    try:
        # the checkpoint counts once Ray Train registered it (a node lost while the ranks upload is a
        # restart from the one before): its snapshot names it
        snap = run / "diffusion" / "checkpoint_manager_snapshot.json"
        wait_for(lambda: snap.exists() and "checkpoint-00000020" in snap.read_text(), 900, "the first checkpoint")
        killed_at = time.monotonic()
        train_cluster.replace(train_cluster.workers[0])
        rc = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    out = Path(job.log_path).read_text()
    assert rc == 0, out[-3000:]
    ckpts = sorted(p.name for p in (run / "diffusion").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000020", "checkpoint-00000040", "checkpoint-00000060"], ckpts
    done = json.loads((run / "stages" / "denoiser" / "done.json").read_text())
    assert done["steps"] == 60 and done["failures"] >= 1, done
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    fail_at = next(i for i, r in enumerate(log) if r.get("event") == "worker_failure")
    after = [r["step"] for r in log[fail_at + 1:] if r.get("stage") == "diffusion" and "step" in r]
    assert after and after[0] > 20 and after[-1] == 60, after      # resumed from step 20, not from scratch
    # the state was restored, not only the step: every rank's model + optimizer fingerprint after
    # load_checkpoint equals the one saved with the checkpoint
    first = next(r for r in log[fail_at + 1:] if "restored_step" in r)
    assert first["restored_step"] in (20, 40) and first["restored_world_size"] == 2, first
    assert first["restored_fingerprint"] is True, first
    print(f"\ntraining node loss: killed at {killed_at - t0:.0f} s, {done['failures']} failure(s), "
          f"resumed at step {after[0]}, exit {time.monotonic() - killed_at:.0f} s after the kill")
