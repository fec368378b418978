import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from rayweights.blocks import WeightLayout
from rayweights.table import CheckpointRecord, ZooError, ZooWriter, compact_zoo, open_zoo, retokenize


def make_sd(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(6, 5, generator=g).to(dtype),
        "net.0.bias": torch.randn(6, generator=g).to(dtype),
        "net.1.weight": torch.randn(6, generator=g).to(dtype),
        "net.1.bias": torch.randn(6, generator=g).to(dtype),
        "net.3.weight": torch.randn(3, 6, generator=g).to(dtype),
    }


def write_zoo(uri, n_members=4, n_ckpt=2, block_size=8, rule=1, dtype=torch.float32):
    layout = WeightLayout.from_state_dict(make_sd(0, dtype), rule=rule, block_size=block_size)
    w = ZooWriter.create(uri, layout)
    sds = {}
    for m in range(n_members):
        ckpts = []
        for c in range(n_ckpt):
            sd = make_sd(100 * m + c, dtype)
            sds[(f"m{m}", c)] = sd
            ckpts.append(CheckpointRecord(step=c, state_dict=sd, metrics={"acc": 0.5 + m / 100}))
        w.write_member(member_id=f"m{m}", task_id=f"t{m % 2}", condition=f"cond-{m % 2}", seed=m,
                       checkpoints=ckpts, hparams={"lr": 0.1})
    return w, sds


def check_exact(zoo, sds):
    for (mid, c), sd in sds.items():
        steps_sds = dict(zoo.state_dicts(mid))
        for k, v in sd.items():
            assert torch.equal(steps_sds[c][k], v), (mid, c, k)


@pytest.mark.parametrize("rule", [1, 2, 3])
def test_local_round_trip(tmp_path, rule):
    w, sds = write_zoo(str(tmp_path / "zoo"), rule=rule)
    zoo = open_zoo(str(tmp_path / "zoo"))
    assert zoo.layout.same_structure(w.layout)
    assert sorted(zoo.members.column("member_id").to_pylist()) == ["m0", "m1", "m2", "m3"]
    assert zoo.conditions() == ["cond-0", "cond-1"]
    check_exact(zoo, sds)
    b = zoo.blocks(["m2", "m0"])
    assert tuple(b.shape) == (4, zoo.layout.num_blocks, 8)
    assert torch.equal(b[0], zoo.layout.tokenize(sds[("m2", 0)]))
    assert torch.equal(b[3], zoo.layout.tokenize(sds[("m0", 1)]))
    assert torch.equal(zoo.blocks(["m1"], last_k=1)[0], zoo.layout.tokenize(sds[("m1", 1)]))
    assert zoo.metrics("m3")[0]["acc"] == pytest.approx(0.53)
    # file:// URIs resolve to the same zoo
    assert len(open_zoo("file://" + str(tmp_path / "zoo"))) == 4


@pytest.mark.s3
def test_s3_round_trip_matches_local(tmp_path, s3_uri):
    w, sds = write_zoo(s3_uri, dtype=torch.bfloat16)
    w.consolidate()
    write_zoo(str(tmp_path / "zoo"), dtype=torch.bfloat16)
    s3, local = open_zoo(s3_uri), open_zoo(str(tmp_path / "zoo"))
    assert s3.version == 1
    check_exact(s3, sds)
    assert torch.equal(s3.blocks(), local.blocks())
    # files hold the zoo name (its folder), so their checksums differ between the two locations
    assert s3.members.drop(["file", "sha256", "size"]).equals(local.members.drop(["file", "sha256", "size"]))
    # pyarrow reads the S3 files as is
    import pyarrow.parquet as pq
    t = pq.read_table(s3.root.join(s3.members.column("file")[0].as_py()).path, filesystem=s3.root.fs)
    assert str(t.schema.field("block").type) == "fixed_size_list<element: float>[8]"


def test_other_tools_read_the_files(tmp_path):
    write_zoo(str(tmp_path / "zoo"))
    pattern = str(tmp_path / "zoo" / "blocks" / "*" / "*.parquet")
    import duckdb
    import polars as pl
    n, nb = duckdb.connect().execute(f"select count(*), count(distinct block_index) from read_parquet('{pattern}')").fetchone()
    zoo = open_zoo(str(tmp_path / "zoo"))
    assert n == 4 * 2 * zoo.layout.num_blocks and nb == zoo.layout.num_blocks
    df = pl.read_parquet(pattern).filter((pl.col("member_id") == "m1") & (pl.col("checkpoint") == 1)).sort("block_index")
    arr = np.stack(df["block"].to_list()).astype(np.float32)
    assert np.array_equal(arr, zoo.blocks(["m1"])[1].numpy())
    import pandas as pd
    assert len(pd.read_parquet(str(tmp_path / "zoo" / "blocks" / "task=t0"))) == 2 * 2 * zoo.layout.num_blocks


def test_rewrite_overwrites_instead_of_duplicating(tmp_path):
    uri = str(tmp_path / "zoo")
    write_zoo(uri)
    write_zoo(uri)
    zoo = open_zoo(uri)
    assert len(zoo) == 4 and zoo.blocks().shape[0] == 8


def test_nan_weights_rejected_naming_member(tmp_path):
    layout = WeightLayout.from_state_dict(make_sd(0), block_size=8)
    w = ZooWriter.create(str(tmp_path / "zoo"), layout)
    sd = make_sd(1)
    sd["net.3.weight"][0, 0] = float("nan")
    with pytest.raises(ZooError, match="member bad .*NaN"):
        w.write_member("bad", "t", "c", 0, [CheckpointRecord(0, sd)])
    assert len(open_zoo(str(tmp_path / "zoo"))) == 0
    assert not list((tmp_path / "zoo").glob("blocks/*/*bad*"))


def test_layout_mismatch_errors(tmp_path):
    uri = str(tmp_path / "zoo")
    w, _ = write_zoo(uri)
    other = WeightLayout.from_state_dict(make_sd(0), block_size=16)
    with pytest.raises(ZooError, match="block_size 8 vs 16"):
        ZooWriter.create(uri, other)
    sd = make_sd(0)
    sd["net.3.weight"] = torch.ones(4, 6)
    with pytest.raises(ZooError, match=r"net\.3\.weight: shape"):
        w.write_member("x", "t", "c", 0, [CheckpointRecord(0, sd)])


def test_missing_and_foreign_layout(tmp_path):
    with pytest.raises(ZooError, match="layout.json is missing"):
        open_zoo(str(tmp_path / "nothing"))
    uri = str(tmp_path / "zoo")
    write_zoo(uri)
    d = json.loads((tmp_path / "zoo" / "layout.json").read_text())
    d["format_version"] = "other/2"
    (tmp_path / "zoo" / "layout.json").write_text(json.dumps(d))
    with pytest.raises(ZooError, match="format_version"):
        open_zoo(uri)


def test_corrupt_file_named_others_readable(tmp_path):
    uri = str(tmp_path / "zoo")
    write_zoo(uri)
    zoo = open_zoo(uri)
    bad = tmp_path / "zoo" / zoo.file_of("m2")
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(ZooError, match=r"corrupt or truncated Parquet file .*member=m2\.parquet"):
        zoo.blocks(["m2"])
    assert zoo.blocks(["m0", "m1", "m3"]).shape[0] == 6


def test_member_whose_write_died_is_invisible(tmp_path):
    uri = str(tmp_path / "zoo")
    w, _ = write_zoo(uri, n_members=2)
    # a process died after writing its blocks file, before the manifest entry
    table = w.build_table("m9", "t9", "c", 9, [CheckpointRecord(0, make_sd(9))])
    import pyarrow.parquet as pq
    os.makedirs(tmp_path / "zoo" / "blocks" / "task=t9")
    pq.write_table(table, tmp_path / "zoo" / "blocks" / "task=t9" / "member=m9.parquet")
    # and another died mid-file: only a temporary file exists
    (tmp_path / "zoo" / "blocks" / "task=t9" / "member=m8.parquet.tmp-1234").write_bytes(b"PAR1partial")
    zoo = open_zoo(uri)
    assert sorted(zoo.members.column("member_id").to_pylist()) == ["m0", "m1"]
    assert w.done_members() == {"m0", "m1"}
    # an entry whose blocks file was deleted is not done (a resume redoes it)
    os.remove(tmp_path / "zoo" / zoo.file_of("m1"))
    assert w.done_members() == {"m0"}


def test_failures_are_recorded_and_superseded(tmp_path):
    uri = str(tmp_path / "zoo")
    w, _ = write_zoo(uri, n_members=1)
    w.record_failure("m5", "t1", "RuntimeError: boom", attempts=3)
    zoo = open_zoo(uri)
    assert zoo.failures.column("member_id").to_pylist() == ["m5"]
    assert "boom" in zoo.failures.column("error")[0].as_py()
    w.write_member("m5", "t1", "c", 5, [CheckpointRecord(0, make_sd(5))])
    assert open_zoo(uri).failures.num_rows == 0


def test_snapshot_plus_new_entries(tmp_path):
    uri = str(tmp_path / "zoo")
    w, _ = write_zoo(uri, n_members=3)
    assert w.consolidate() == 1
    # written after the snapshot: found through the listing, not the snapshot
    w.write_member("m7", "t1", "c", 7, [CheckpointRecord(0, make_sd(7))])
    # rewritten after the snapshot: the newer entry wins
    w.write_member("m0", "t0", "rewritten", 0, [CheckpointRecord(0, make_sd(1))])
    zoo = open_zoo(uri)
    assert sorted(zoo.members.column("member_id").to_pylist()) == ["m0", "m1", "m2", "m7"]
    rows = {r["member_id"]: r for r in zoo.members.to_pylist()}
    assert rows["m0"]["condition"] == "rewritten"
    assert w.consolidate() == 2
    assert open_zoo(uri).version == 2


def test_compaction_is_atomic_and_exact(tmp_path):
    uri = str(tmp_path / "zoo")
    _, sds = write_zoo(uri, n_members=6)
    before = open_zoo(uri)
    blocks_before = before.blocks()
    v = compact_zoo(uri, target_rows=before.layout.num_blocks * 5)
    after = open_zoo(uri)
    assert after.version == v
    files = {f for f, _ in after.files}
    assert all(f.startswith("compacted/") for f in files) and len(files) == 2   # 3 + 3 members
    assert torch.equal(after.blocks(), blocks_before)
    check_exact(after, sds)
    # a reader opened before the swap still reads its (old) files
    assert torch.equal(before.blocks(), blocks_before)
    # a member rewritten after compaction: its new file wins, the compacted copy is filtered out
    ZooWriter(uri, after.layout).write_member("m1", "t1", "c", 1, [CheckpointRecord(0, make_sd(42))])
    z = open_zoo(uri)
    assert z.blocks(["m1"]).shape[0] == 1
    assert torch.equal(z.blocks(["m1"])[0], z.layout.tokenize(make_sd(42)))
    assert z.blocks().shape[0] == 6 * 2 - 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_members=st.integers(1, 3), n_ckpt=st.integers(1, 3), block_size=st.sampled_from([1, 5, 64]),
       rule=st.sampled_from([1, 2, 3]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_table_round_trip_property(tmp_path_factory, n_members, n_ckpt, block_size, rule, dtype):
    uri = str(tmp_path_factory.mktemp("zoo"))
    _, sds = write_zoo(uri, n_members, n_ckpt, block_size, rule, dtype)
    zoo = open_zoo(uri)
    check_exact(zoo, sds)
    assert zoo.blocks().shape == (n_members * n_ckpt, zoo.layout.num_blocks, block_size)


def test_ray_dataset_streams_rows(tmp_path, ray_local):
    uri = str(tmp_path / "zoo")
    _, sds = write_zoo(uri, n_members=3)
    compact_zoo(uri, target_rows=1)   # mix of layouts on disk does not matter to readers
    zoo = open_zoo(uri)
    ds = zoo.dataset(unit="block")
    rows = ds.take_all()
    assert len(rows) == 3 * 2 * zoo.layout.num_blocks
    r = [x for x in rows if x["member_id"] == "m1" and x["checkpoint"] == 1 and x["block_index"] == 0][0]
    assert np.array_equal(r["block"], zoo.layout.tokenize(sds[("m1", 1)])[0].numpy())
    batch = next(iter(zoo.dataset(columns=["block", "block_index"]).iter_torch_batches(batch_size=5)))
    assert batch["block"].shape == (5, 8)
    ck = zoo.dataset(unit="checkpoint").take_all()
    assert len(ck) == 6
    one = [x for x in ck if x["member_id"] == "m2" and x["checkpoint"] == 0][0]
    assert np.array_equal(one["weights"], zoo.layout.tokenize_flat(sds[("m2", 0)]).numpy())


@pytest.mark.s3
def test_ray_dataset_on_s3(s3_uri, ray_local):
    _, sds = write_zoo(s3_uri, n_members=2)
    zoo = open_zoo(s3_uri)
    rows = zoo.dataset(unit="checkpoint").take_all()
    got = {(r["member_id"], int(r["checkpoint"])): r["weights"] for r in rows}
    for key, sd in sds.items():
        assert np.array_equal(got[key], zoo.layout.tokenize_flat(sd).numpy())


def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "zoo").write_text("a file where a folder should be")
    with pytest.raises(ZooError, match="not writable"):
        ZooWriter.create(str(ro / "zoo"), WeightLayout.from_state_dict(make_sd(0)))


# ----------------------------------------------------------------------------- integrity
def _corrupt_two(root, zoo):
    """Truncate m1's file, fill m2's with random bytes of the same size."""
    f1, f2 = root / zoo.file_of("m1"), root / zoo.file_of("m2")
    f1.write_bytes(f1.read_bytes()[: f1.stat().st_size // 2])
    f2.write_bytes(np.random.default_rng(0).bytes(f2.stat().st_size))


def test_manifest_entries_carry_checksum_and_rows(tmp_path):
    write_zoo(str(tmp_path / "zoo"))
    entry = json.loads((tmp_path / "zoo" / "members" / "m0.json").read_text())
    data = (tmp_path / "zoo" / entry["file"]).read_bytes()
    import hashlib
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert entry["num_rows"] == 2 * open_zoo(str(tmp_path / "zoo")).layout.num_blocks
    assert open_zoo(str(tmp_path / "zoo")).verify() == []


@pytest.mark.parametrize("level", ["footer", "checksum"])
def test_verify_names_corrupt_member_files(tmp_path, level):
    uri = str(tmp_path / "zoo")
    w, _ = write_zoo(uri)
    w.consolidate()
    zoo = open_zoo(uri)
    _corrupt_two(tmp_path / "zoo", zoo)
    bad = zoo.verify(level)
    assert sorted(b.member_id for b in bad) == ["m1", "m2"]
    assert all("member=" in b.file and b.problem for b in bad)
    # a file rewritten with valid Parquet but other content: only the checksum sees it
    f3 = tmp_path / "zoo" / zoo.file_of("m3")
    f0 = tmp_path / "zoo" / zoo.file_of("m0")
    f3.write_bytes(f0.read_bytes())
    names = sorted(b.member_id for b in open_zoo(uri).verify(level))
    assert names == (["m1", "m2", "m3"] if level == "checksum" else ["m1", "m2"])


def test_zoo_info_verify_reports_bad_members_and_fails(tmp_path, capsys):
    from rayweights.table import info_main
    uri = str(tmp_path / "zoo")
    write_zoo(uri)
    assert info_main([uri, "--verify"]) == 0
    assert "all 4 members' files match" in capsys.readouterr().out
    _corrupt_two(tmp_path / "zoo", open_zoo(uri))
    assert info_main([uri, "--verify"]) == 1
    cap = capsys.readouterr()
    assert "m1 (blocks/task=t1/member=m1.parquet)" in cap.out and "m2 (" in cap.out
    assert cap.err.strip().splitlines()[-1].startswith("error: zoo") and "m1, m2" in cap.err


def test_corrupt_manifest_entry_is_named_and_the_rest_stays_readable(tmp_path, capsys):
    uri = str(tmp_path / "zoo")
    w, sds = write_zoo(uri)
    (tmp_path / "zoo" / "members" / "m1.json").write_bytes(b'{"member_id": "m1", "task_')    # torn write
    (tmp_path / "zoo" / "members" / "m2.json").write_text('{"member_id": "m2"}')            # keys missing
    zoo = open_zoo(uri)
    assert sorted(zoo.members.column("member_id").to_pylist()) == ["m0", "m3"]
    assert sorted(zoo.corrupt_entries) == ["m1", "m2"]
    assert zoo.blocks(["m0", "m3"]).shape[0] == 4
    # a resume redoes exactly those two
    assert w.done_members() == {"m0", "m3"}
    from rayweights.table import info_main
    assert info_main([uri]) == 0
    out = capsys.readouterr().out
    assert "2 corrupt manifest entries" in out and "m1: members/m1.json" in out
    assert info_main([uri, "--verify"]) == 1


def test_resume_treats_members_failing_verification_as_not_done(tmp_path):
    uri = str(tmp_path / "zoo")
    w, _ = write_zoo(uri)
    _corrupt_two(tmp_path / "zoo", open_zoo(uri))
    assert w.done_members() == {"m0", "m3"}
    # rewriting them makes them done again
    for m in (1, 2):
        w.write_member(f"m{m}", f"t{m % 2}", f"cond-{m % 2}", m, [CheckpointRecord(0, make_sd(m))])
    assert w.done_members() == {"m0", "m1", "m2", "m3"}
    assert open_zoo(uri).verify() == []


def test_compacted_zoo_verifies(tmp_path):
    uri = str(tmp_path / "zoo")
    write_zoo(uri)
    compact_zoo(uri, target_rows=10 ** 6)
    zoo = open_zoo(uri)
    assert zoo.verify() == [] and zoo.verify("footer") == []
    part = tmp_path / "zoo" / zoo.file_of("m0")
    part.write_bytes(part.read_bytes()[:-20])
    assert sorted(b.member_id for b in open_zoo(uri).verify("footer")) == ["m0", "m1", "m2", "m3"]


def test_retokenize_writes_the_same_members_under_another_layout(tmp_path):
    src = str(tmp_path / "zoo")
    _, sds = write_zoo(src, n_members=3)
    (tmp_path / "zoo" / "base").mkdir()
    (tmp_path / "zoo" / "base" / "cache.bin").write_bytes(b"family cache")
    (tmp_path / "zoo" / "spec.json").write_text("old")
    zoo = open_zoo(src)
    layout = WeightLayout.from_state_dict(make_sd(0), rule=3, block_size=4)
    dst = str(tmp_path / "zoo-b4")
    out = retokenize(zoo, dst, layout, files={"spec.json": b"new"})
    assert (out.layout.block_size, out.layout.num_blocks) == (4, layout.num_blocks) != (8, zoo.layout.num_blocks)
    assert len(out) == 3 and out.members.column("member_id").to_pylist() == zoo.members.column("member_id").to_pylist()
    check_exact(out, sds)                                    # same weights, bit for bit
    assert out.metrics("m2") == zoo.metrics("m2")
    assert (tmp_path / "zoo-b4" / "base" / "cache.bin").read_bytes() == b"family cache"   # caches copied
    assert (tmp_path / "zoo-b4" / "spec.json").read_bytes() == b"new"                     # replaced files written
    # idempotent: a finished copy is returned as is, nothing rewritten
    mtime = os.path.getmtime(tmp_path / "zoo-b4" / "spec.json")
    assert len(retokenize(src, dst, layout, files={"spec.json": b"other"})) == 3
    assert os.path.getmtime(tmp_path / "zoo-b4" / "spec.json") == mtime
