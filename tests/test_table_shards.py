"""Manifest shards: consolidation takes entry rows from shards instead of GETting each entry, and never
serves a shard row for an entry rewritten since (local and S3 on loopback)."""

import json
import os
import time

import pytest

from rayweights.storage import list_files, read_bytes, resolve
from rayweights.table import CheckpointRecord, open_zoo, vacuum_zoo
from rayweights.table import reader as reader_mod
from test_table import make_sd, write_zoo


def write_with_shard(uri, n_members=6, shard_every=3):
    w, _ = write_zoo(uri, n_members=0)
    rows = []
    for m in range(n_members):
        _, row = w.write_member_row(f"m{m}", f"t{m % 2}", f"cond-{m % 2}", m,
                                    [CheckpointRecord(step=0, state_dict=make_sd(m), metrics={"acc": m / 10})],
                                    hparams={"lr": 0.1})
        rows.append(row)
        if len(rows) == shard_every:
            w.write_manifest_shard(rows)
            rows = []
    w.write_manifest_shard(rows)
    return w


@pytest.fixture()
def entry_gets(monkeypatch):
    """Counts the GETs of manifest entries (members/<id>.json) made through the reader."""
    calls = []
    real = reader_mod.read_bytes

    def counting(loc):
        if "/members/" in loc.path:
            calls.append(loc.path)
        return real(loc)

    monkeypatch.setattr(reader_mod, "read_bytes", counting)
    return calls


def shard_files(uri):
    root = resolve(uri)
    return list_files(root.join("_manifest", "shards"), ".parquet")


def check_members(uri, n):
    zoo = open_zoo(uri)
    assert zoo.members.column("member_id").to_pylist() == [f"m{m}" for m in range(n)]
    assert [json.loads(x)[0]["acc"] for x in zoo.members.column("metrics").to_pylist()] == [m / 10 for m in range(n)]
    return zoo


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def uri(request, tmp_path):
    """A zoo URI in a local folder, and on S3 on loopback."""
    return str(tmp_path / "zoo") if request.param == "local" else request.getfixturevalue("s3_uri")


def test_consolidation_reads_shards_not_entries(uri, entry_gets):
    w = write_with_shard(uri)
    assert len(shard_files(uri)) == 2
    before = open_zoo(uri)      # before consolidation: the entries' rows come from the shards too
    entry_gets.clear()
    v = w.consolidate()
    assert v == 1 and entry_gets == []                    # zero GETs of entries
    assert shard_files(uri) == []                         # covered by the snapshot: deleted
    zoo = check_members(uri, 6)
    # the rows taken from the shards are the entries' own rows (each entry GET here, outside the reader)
    root = resolve(uri)
    from_entries = [reader_mod._entry_to_row(json.loads(read_bytes(root.join("members", f"m{m}.json"))))
                    for m in range(6)]
    assert zoo.members.to_pylist() == from_entries
    assert zoo._entry_mtimes == before._entry_mtimes
    entry_gets.clear()
    open_zoo(uri)
    assert entry_gets == []                               # the snapshot alone


def test_member_rewritten_after_its_shard_is_read_from_its_entry(uri, entry_gets):
    w = write_with_shard(uri)
    # m1 rewritten after its shard was written (within the same second on S3: whole-second mtimes)
    w.write_member("m1", "t1", "cond-1", 1, [CheckpointRecord(step=0, state_dict=make_sd(1), metrics={"acc": 9.0})],
                   hparams={"lr": 0.2})
    entry_gets.clear()
    zoo = open_zoo(uri)
    assert [p.rsplit("/", 1)[-1] for p in entry_gets] == ["m1.json"]
    assert json.loads(zoo.members.to_pylist()[1]["metrics"])[0]["acc"] == 9.0
    w.consolidate()
    # the shard holding the stale m1 row is covered (the snapshot has the newer entry): deleted
    assert shard_files(uri) == []
    assert json.loads(open_zoo(uri).members.to_pylist()[1]["hparams"])["lr"] == 0.2


def test_torn_or_missing_shard_falls_back_to_gets(tmp_path, entry_gets):
    uri = str(tmp_path / "zoo")
    w = write_with_shard(uri)
    first, second = sorted(shard_files(uri), key=lambda i: i.mtime_ns)
    with open(first.path, "r+b") as f:                   # torn: half its bytes
        f.truncate(os.path.getsize(first.path) // 2)
    real = reader_mod._read_shards

    def gone_after_listing(root, infos):                 # the second shard deleted between list and read
        os.remove(second.path)
        return real(root, infos)

    reader_mod._read_shards = gone_after_listing
    try:
        entry_gets.clear()
        zoo = check_members(uri, 6)
    finally:
        reader_mod._read_shards = real
    assert len(entry_gets) == 6
    assert zoo.members.num_rows == 6
    w.consolidate()
    check_members(uri, 6)
    # the torn shard indexes nothing: vacuum deletes it once outside the window
    assert vacuum_zoo(uri, retain_seconds=3600).deleted == []
    rep = vacuum_zoo(uri, retain_seconds=0)
    assert [os.path.basename(d) for d in rep.deleted] == [os.path.basename(first.path)]


def test_vacuum_keeps_shards_not_yet_covered(tmp_path):
    uri = str(tmp_path / "zoo")
    w = write_with_shard(uri, n_members=3, shard_every=3)
    w.consolidate()
    assert shard_files(uri) == []
    rows = []
    for m in (3, 4):
        rows.append(w.write_member_row(f"m{m}", "t0", "c", m, [CheckpointRecord(step=0, state_dict=make_sd(m))])[1])
    w.write_manifest_shard(rows)
    assert vacuum_zoo(uri, retain_seconds=0).deleted == []     # m3, m4 are newer than the snapshot
    assert len(shard_files(uri)) == 1
    time.sleep(0.01)
    w.consolidate()
    assert shard_files(uri) == []


def test_build_then_resume_exactly_once_with_shards(tmp_path, monkeypatch, entry_gets):
    from rayweights.config import load_config
    from rayweights.zoo import ZooSpec, build_zoo
    from rayweights.zoo import builder

    monkeypatch.setattr(builder, "SHARD_ROWS", 2)
    spec_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "specs", "tiny.yaml")
    out = str(tmp_path / "zoo")
    spec = load_config(ZooSpec, spec_file, [f"output={out}", "max_tasks=2", "members_per_task=2",
                                            "hparams.epochs=[1,1]", "keep_last=1", "fail_members=[]"])
    spec.fail_members = [f"{builder.plan_tasks(spec)[0][1].task_id}-s0"]       # fails every attempt
    spec.max_retries = 0
    entry_gets.clear()
    res = build_zoo(spec, use_ray=False, progress=False)
    assert (res.done, res.failed) == (3, 1)
    assert entry_gets == []                           # consolidation: from the shards
    assert shard_files(out) == []
    zoo = open_zoo(out)
    assert len(zoo) == 3
    spec.fail_members = []
    res2 = build_zoo(spec, use_ray=False, progress=False)
    assert (res2.done, res2.skipped, res2.failed) == (1, 3, 0)
    zoo2 = open_zoo(out)
    assert len(zoo2) == 4
    # exactly once: the three members of the first build are the same objects (not rebuilt)
    keep = {r["member_id"]: r["sha256"] for r in zoo.members.to_pylist()}
    assert {r["member_id"]: r["sha256"] for r in zoo2.members.to_pylist() if r["member_id"] in keep} == keep
