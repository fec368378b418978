"""Retention (vacuum) and the manifest-aware file list (zoo-files) of a zoo's tables."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from rayweights.table import (CheckpointRecord, compact_zoo, duckdb_source, files_main, live_files,
                              open_zoo, vacuum_main, vacuum_zoo)

from tests.test_table import check_exact, make_sd, write_zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_DIRS = ("blocks", "compacted", "_manifest")


def table_files(root) -> set[str]:
    """Every data and snapshot file below the zoo folder (relative), temporary files aside."""
    return {str(p.relative_to(root)) for d in TABLE_DIRS for p in (root / d).rglob("*.parquet")
            if ".tmp-" not in p.name}


def age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def write_orphan(root, w, member="m9", task="t9"):
    """A member file whose write died before its manifest entry."""
    path = root / "blocks" / f"task={task}" / f"member={member}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(w.build_table(member, task, "c", 9, [CheckpointRecord(0, make_sd(9))]), path)
    return path


# ----------------------------------------------------------------------------- 1. compaction + vacuum
def test_vacuum_after_compaction_leaves_only_the_live_files(tmp_path):
    root, uri = tmp_path / "zoo", str(tmp_path / "zoo")
    _, sds = write_zoo(uri, n_members=6)
    blocks_before = open_zoo(uri).blocks()
    nb = open_zoo(uri).layout.num_blocks
    for target, expected_version in ((nb * 5, 1), (nb * 100, 2)):
        v = compact_zoo(uri, target_rows=target)
        assert v == expected_version
        r = vacuum_zoo(uri, retain_seconds=0)
        zoo = open_zoo(uri)
        live = {f for f, _ in zoo.files}
        assert table_files(root) == live | {f"_manifest/snapshot-{v:06d}.parquet"}
        assert r.version == v and r.live == len(live) and r.kept == [] and r.freed_bytes > 0
        assert torch.equal(zoo.blocks(), blocks_before)
        check_exact(zoo, sds)
        assert zoo.verify() == [] and zoo.missing == []
    assert not (root / "compacted" / "v000001").exists()        # emptied folders go too
    assert len(os.listdir(root / "members")) == 6                 # manifest entries are never deleted
    assert vacuum_zoo(uri, retain_seconds=0).deleted == []        # idempotent


# ----------------------------------------------------------------------------- 2. the default window
def test_default_window_deletes_nothing_just_compacted_and_dry_run_deletes_nothing(tmp_path, capsys):
    root, uri = tmp_path / "zoo", str(tmp_path / "zoo")
    write_zoo(uri)
    before = table_files(root)
    compact_zoo(uri)
    everything = table_files(root)
    r = vacuum_zoo(uri)
    assert r.deleted == [] and table_files(root) == everything
    assert sorted(r.kept) == sorted(str(root / f) for f in before)   # superseded, inside the window
    # a dry run with no window names exactly what a real run deletes
    dry = vacuum_zoo(uri, retain_seconds=0, dry_run=True)
    assert table_files(root) == everything
    assert sorted(dry.deleted) == sorted(str(root / f) for f in before)
    assert vacuum_main([uri, "--retain-hours", "0", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert sorted(cap.out.split()) == sorted(dry.deleted) and "would delete 4 file(s)" in cap.err
    assert table_files(root) == everything
    assert vacuum_main([uri]) == 0
    assert "deleted 0 file(s)" in capsys.readouterr().out and table_files(root) == everything
    assert vacuum_main([uri, "--retain-hours", "0"]) == 0
    cap = capsys.readouterr()
    assert "deleted 4 file(s)" in cap.out and "warning: --retain-hours 0" in cap.err
    assert table_files(root) == everything - before


# ----------------------------------------------------------------------------- 3. what the window protects
def test_unreferenced_file_is_kept_inside_the_window_and_removed_after(tmp_path):
    root, uri = tmp_path / "zoo", str(tmp_path / "zoo")
    w, _ = write_zoo(uri)
    for p in (root / "blocks").rglob("*.parquet"):
        age(p, 7200)                                     # live files may be old: they stay
    orphan = write_orphan(root, w)                       # an in-flight write: no entry yet
    inflight = root / "compacted" / "v000001" / "part-00000.parquet"   # a compaction under way (v1 > v0)
    inflight.parent.mkdir(parents=True)
    inflight.write_bytes(orphan.read_bytes())
    age(inflight, 7200)
    r = vacuum_zoo(uri, retain_seconds=3600)
    assert r.deleted == [] and orphan.exists() and inflight.exists()
    assert sorted(r.kept) == sorted([str(orphan), str(inflight)])
    age(orphan, 7200)
    r = vacuum_zoo(uri, retain_seconds=3600)
    assert r.deleted == [str(orphan)] and not orphan.exists() and inflight.exists()
    assert len(open_zoo(uri)) == 4 and open_zoo(uri).verify() == []


def test_files_of_a_snapshot_superseded_inside_the_window_are_kept(tmp_path):
    """A reader that opened the previous manifest version (snapshot + the entries it merges) within
    the window can still read every file of it, however old the files themselves are."""
    root, uri = tmp_path / "zoo", str(tmp_path / "zoo")
    w, sds = write_zoo(uri)
    assert w.consolidate() == 1                          # v1: m0..m3 in the snapshot
    w.write_member("m4", "t0", "c", 4, [CheckpointRecord(0, make_sd(4))])   # v1 + a newer entry
    sds[("m4", 0)] = make_sd(4)
    reader_v1 = open_zoo(uri)
    expected = reader_v1.blocks()
    assert compact_zoo(uri) == 2                         # v2: everything compacted
    old_files = {f for f, _ in reader_v1.files}
    assert "blocks/task=t0/member=m4.parquet" in old_files
    for f in old_files | {"_manifest/snapshot-000001.parquet"}:
        age(root / f, 7200)
    r = vacuum_zoo(uri, retain_seconds=3600)             # v1 was superseded just now
    assert r.deleted == [] and all((root / f).exists() for f in old_files)
    assert torch.equal(reader_v1.blocks(), expected)     # the old reader still reads its files
    age(root / "_manifest" / "snapshot-000002.parquet", 7200)   # ... and now it was superseded long ago
    r = vacuum_zoo(uri, retain_seconds=3600)
    assert sorted(r.deleted) == sorted(str(root / f) for f in old_files | {"_manifest/snapshot-000001.parquet"})
    zoo = open_zoo(uri)
    assert table_files(root) == {f for f, _ in zoo.files} | {"_manifest/snapshot-000002.parquet"}
    assert torch.equal(zoo.blocks(), expected)
    check_exact(zoo, sds)


def test_bad_input_is_one_line_naming_the_field_or_file(tmp_path, capsys):
    uri = str(tmp_path / "zoo")
    write_zoo(uri)
    assert vacuum_main([uri, "--retain-hours", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --retain-hours: must be a finite number >= 0, got -1"]
    for argv, main in (([str(tmp_path / "nothing")], vacuum_main), ([str(tmp_path / "nothing")], files_main)):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: no zoo at ") and "layout.json is missing" in err[0]
    from rayweights.table import ZooError
    with pytest.raises(ZooError, match="retain_seconds: must be a finite number >= 0"):
        vacuum_zoo(uri, retain_seconds=float("nan"))
    assert len(open_zoo(uri)) == 4


# ----------------------------------------------------------------------------- 4. the live file list
def test_zoo_files_lists_what_open_zoo_reads_and_duckdb_reads_exactly_the_manifest_rows(tmp_path, capsys):
    import duckdb

    root, uri = tmp_path / "zoo", str(tmp_path / "zoo")
    w, _ = write_zoo(uri, n_members=6)
    nb = open_zoo(uri).layout.num_blocks
    compact_zoo(uri, target_rows=nb * 5)
    write_orphan(root, w)                                # a dead write: globbing finds it, the manifest does not
    # rewritten after the compaction: its old rows stay in a live compacted file
    w.write_member("m1", "t1", "c", 1, [CheckpointRecord(0, make_sd(42))])
    zoo = open_zoo(uri)
    reads = sorted(str(root / f) for f, _ in zoo.files)
    assert live_files(uri) == zoo.live_files() == reads
    assert files_main([uri]) == 0
    cap = capsys.readouterr()
    assert cap.out.split() == reads and "1 compacted file(s) also hold rows" in cap.err
    assert files_main([uri, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == reads and doc["members"] == 6 and doc["version"] == 1
    assert doc["row_filters"] == {str(root / zoo.file_of("m3")): ["m3", "m5"]}
    assert files_main([uri, "--format", "duckdb"]) == 0
    source = capsys.readouterr().out.strip()
    assert source == duckdb_source(zoo)

    con = duckdb.connect()
    rows = con.execute(f"select member_id, checkpoint, block_index from {source}").fetchall()
    assert len(rows) == len(set(rows)) == sum(zoo.members.column("num_rows").to_pylist())
    expected = {(r["member_id"], c) for r in zoo.members.to_pylist() for c in r["checkpoints"]}
    assert {(m, c) for m, c, _ in rows} == expected
    got = con.execute(f"select block from {source} where member_id = 'm1' order by block_index").fetchall()
    assert torch.equal(torch.tensor([b for (b,) in got]), zoo.blocks(["m1"])[0])
    # globbing sees superseded rows and the dead write
    glob = str(root / "**" / "*.parquet")
    assert con.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] > len(rows)
    # after compacting again and vacuuming, the plain list is exact for any reader
    compact_zoo(uri)
    vacuum_zoo(uri, retain_seconds=0)
    zoo = open_zoo(uri)
    assert zoo.row_filters() == {} and duckdb_source(zoo).startswith("read_parquet([")
    files = live_files(uri)
    n, distinct = con.execute("select count(*), count(distinct (member_id, checkpoint, block_index)) "
                              "from read_parquet($files)", {"files": files}).fetchone()
    assert n == distinct == len(rows) and table_files(root) == {f for f, _ in zoo.files} | {
        "_manifest/snapshot-000002.parquet"}
    import polars as pl
    assert pl.read_parquet(files).height == n


# ----------------------------------------------------------------------------- 5./6. a concurrent reader
READER = r"""
import hashlib, json, os, sys, time
import pyarrow.dataset as pads
from rayweights.table import open_zoo

uri, expected, members, rows, stop, out, ready = sys.argv[1:8]
stats = {"iterations": 0, "errors": [], "max_s": 0.0, "versions": []}
while not os.path.exists(stop):
    t0 = time.time()
    try:
        zoo = open_zoo(uri)
        got = hashlib.sha256(zoo.blocks(num_threads=2).numpy().tobytes()).hexdigest()
        if len(zoo) != int(members) or zoo.missing or zoo.corrupt_entries or got != expected:
            stats["errors"].append(f"v{zoo.version}: {len(zoo)} members, missing {zoo.missing}, sha256 {got[:12]}")
        # an outside reader of the live list (pyarrow.dataset): exactly the manifest's rows
        paths = [u[len("s3://"):] if u.startswith("s3://") else u for u in zoo.live_files()]
        n = pads.dataset(paths, filesystem=zoo.root.fs, format="parquet").count_rows()
        if n != int(rows):
            stats["errors"].append(f"v{zoo.version}: the live files hold {n} rows, not {rows}")
        stats["versions"].append(zoo.version)
    except Exception as exc:
        stats["errors"].append(f"{type(exc).__name__}: {str(exc)[:300]}")
    stats["max_s"] = max(stats["max_s"], time.time() - t0)
    stats["iterations"] += 1
    if stats["iterations"] == 1:
        open(ready, "w").close()
with open(out, "w") as f:
    json.dump(stats, f)
"""


def _concurrent_compaction_and_vacuum(uri, tmp_path, window=4.0, rounds=4):
    """A reader process loops open_zoo + every block (checksum) + the live files' row count while
    this one compacts and vacuums (window: ``window`` s) ``rounds`` times; ~30 s."""
    _, sds = write_zoo(uri, n_members=8, n_ckpt=2)
    zoo = open_zoo(uri)
    nb, total_rows = zoo.layout.num_blocks, sum(zoo.members.column("num_rows").to_pylist())
    expected = hashlib.sha256(zoo.blocks().numpy().tobytes()).hexdigest()
    stop, out, ready = (str(tmp_path / n) for n in ("stop", "out.json", "ready"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", READER, uri, expected, "8", str(total_rows), stop, out, ready],
                            env=env)
    deleted = []
    try:
        t0 = time.time()
        while not os.path.exists(ready):
            assert proc.poll() is None, "the reader process died"
            assert time.time() - t0 < 180, "the reader process did not start"
            time.sleep(0.2)
        for i in range(rounds):
            compact_zoo(uri, target_rows=nb * (3, 100, 5, 10 ** 6)[i % 4])
            deleted += vacuum_zoo(uri, retain_seconds=window).deleted   # right after the swap
            time.sleep(window / 2)
            deleted += vacuum_zoo(uri, retain_seconds=window).deleted
            time.sleep(window / 2 + 1.5)
            deleted += vacuum_zoo(uri, retain_seconds=window).deleted   # the previous version is past the window
    finally:
        open(stop, "w").close()
        proc.wait(timeout=120)
    stats = json.loads(open(out).read())
    assert stats["errors"] == []
    assert stats["iterations"] >= 10 and len(set(stats["versions"])) >= 3
    # the contract the guarantee rests on: each read finished well inside the window
    assert stats["max_s"] < window - 1.5, stats["max_s"]
    assert any("/blocks/" in d for d in deleted) and any("/compacted/" in d for d in deleted)
    assert any("/_manifest/snapshot-" in d for d in deleted)
    vacuum_zoo(uri, retain_seconds=0)
    zoo = open_zoo(uri)
    assert hashlib.sha256(zoo.blocks().numpy().tobytes()).hexdigest() == expected
    check_exact(zoo, sds)
    return zoo


@pytest.mark.slow
def test_concurrent_reader_sees_whole_views_while_compaction_and_vacuum_run(tmp_path):
    uri = str(tmp_path / "zoo")
    zoo = _concurrent_compaction_and_vacuum(uri, tmp_path)
    assert table_files(tmp_path / "zoo") == {f for f, _ in zoo.files} | {
        f"_manifest/snapshot-{zoo.version:06d}.parquet"}


@pytest.mark.s3
@pytest.mark.slow
def test_concurrent_reader_on_s3(tmp_path, s3_uri):
    zoo = _concurrent_compaction_and_vacuum(s3_uri, tmp_path)
    base = zoo.root.path + "/"
    left = {i.path[len(base):] for d in TABLE_DIRS for i in
            zoo.root.fs.get_file_info(pafs.FileSelector(base + d, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")}
    assert left == {f for f, _ in zoo.files} | {f"_manifest/snapshot-{zoo.version:06d}.parquet"}
    assert live_files(s3_uri) == [f"{s3_uri}/{f}" for f, _ in zoo.files]
