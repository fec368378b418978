"""Reading a zoo: :func:`open_zoo` -> :class:`Zoo` (members, blocks, state_dicts, a Ray Data
dataset, verification) and compaction under a new manifest version.  One module (~600 lines): the
manifest rules of :func:`open_zoo` and the reads of :class:`Zoo` are one contract and change together
(:mod:`.vacuum` reuses its manifest helpers, so retention protects exactly what a reader reads)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from ..blocks import WeightLayout
from ..runtime import worker_env
from ..storage import Location, StorageError, list_files, read_bytes, resolve, write_bytes_atomic
from .format import (_SNAPSHOT_SCHEMA, CURRENT_FILE, MANIFEST_VERSION, MEMBER_COLUMNS, SHARDS_DIR, BadMember,
                     ZooError, _read_layout)

__all__ = ["Zoo", "open_zoo", "compact_zoo"]

log = logging.getLogger(__name__)


def _entry_to_row(e: Mapping) -> dict:
    return {
        "member_id": e["member_id"], "task_id": e["task_id"], "condition": e.get("condition", ""),
        "seed": int(e.get("seed", 0)), "checkpoints": [int(c) for c in e["checkpoints"]],
        "metrics": json.dumps(e.get("metrics", [])), "hparams": json.dumps(e.get("hparams", {})),
        "file": e["file"], "num_rows": int(e["num_rows"]),
        "sha256": str(e.get("sha256", "") or ""), "size": int(e.get("size", -1)),
    }


def _read_parquet(fs: pafs.FileSystem, path: str, columns=None, describe: str | None = None) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise ZooError(f"blocks file missing: {describe or path}") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ZooError(f"corrupt or truncated Parquet file {describe or path}: {exc}") from exc


def _block_matrix(col: pa.ChunkedArray, block_size: int) -> np.ndarray:
    """fixed_size_list<float32> column -> float32 [rows, block_size] with one copy."""
    if col.num_chunks == 1:
        return col.chunk(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, block_size)
    out = np.empty((len(col), block_size), dtype=np.float32)
    i = 0
    for chunk in col.chunks:
        n = len(chunk)
        out[i:i + n] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(n, block_size)
        i += n
    return out


class _FileReader:
    """Ray Data UDF: one row per input file path -> the block rows of that file (numpy batch)."""

    def __init__(self, root_uri: str, unit: str, num_blocks: int, block_size: int,
                 columns: Sequence[str] | None):
        self.root_uri, self.unit = root_uri, unit
        self.num_blocks, self.block_size, self.columns = num_blocks, block_size, columns
        # the driver's S3 settings (never credentials) travel with the UDF: workers may have started before
        # they were set
        self.env = worker_env()
        self._root: Location | None = None

    def __call__(self, batch: dict) -> dict:
        if self._root is None:
            for k, v in self.env.items():
                os.environ.setdefault(k, v)
            self._root = resolve(self.root_uri)
        self.fs, self.root_path = self._root.fs, self._root.path
        tables = []
        for rel, keep in zip(batch["file"], batch["members"]):
            path = posixpath.join(self.root_path, rel)
            t = _read_parquet(self.fs, path, describe=path)
            if keep is not None and len(keep):
                t = t.filter(pc.is_in(t.column("member_id"), pa.array(list(keep), pa.string())))
            tables.append(t)
        t = pa.concat_tables(tables)
        arr = _block_matrix(t.column("block"), self.block_size)
        if self.unit == "checkpoint":
            nb = self.num_blocks
            order = np.lexsort((t.column("block_index").to_numpy(), t.column("checkpoint").to_numpy(),
                                t.column("member_id").to_numpy(zero_copy_only=False)))
            arr = arr[order].reshape(-1, nb * self.block_size)
            firsts = order[::nb]
            out = {c: t.column(c).to_numpy(zero_copy_only=False)[firsts]
                   for c in ("zoo", "task_id", "condition", "member_id", "seed", "checkpoint")}
            out["weights"] = arr
            return out
        out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in
               ("zoo", "task_id", "condition", "member_id", "seed", "checkpoint", "group", "block_index")}
        out["block"] = arr
        if self.columns:
            out = {k: v for k, v in out.items() if k in self.columns}
        return out


class Zoo:
    """A read view of a zoo at one manifest state (see :func:`open_zoo`)."""

    def __init__(self, root: Location, layout: WeightLayout, rows: list[dict], entry_mtimes: dict[str, int],
                 failures: list[dict], missing: list[str], version: int,
                 corrupt_entries: dict[str, str] | None = None,
                 shards: dict[str, list[tuple[str, int]]] | None = None, listed_mtimes: dict[str, int] | None = None):
        self.root = root
        self._shards = dict(shards or {})            # manifest shards read: path -> [(member_id, entry_mtime_ns)]
        self._listed_mtimes = dict(listed_mtimes or {})   # every listed entry's storage mtime
        self.layout = layout
        self._rows = rows
        self._entry_mtimes = entry_mtimes
        self.failure_entries = failures
        self.missing = missing       # members with an entry whose blocks file is gone
        self.corrupt_entries = dict(corrupt_entries or {})   # member_id -> why its entry cannot be read
        self.version = version

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.path.rstrip("/"))

    @property
    def members(self) -> pa.Table:
        cols = {c: [r[c] for r in self._rows] for c in MEMBER_COLUMNS}
        schema = pa.schema([f for f in _SNAPSHOT_SCHEMA if f.name != "entry_mtime_ns"])
        return pa.table(cols, schema=schema)

    @property
    def failures(self) -> pa.Table:
        return pa.table({
            "member_id": pa.array([f["member_id"] for f in self.failure_entries], pa.string()),
            "task_id": pa.array([f.get("task_id", "") for f in self.failure_entries], pa.string()),
            "error": pa.array([f.get("error", "") for f in self.failure_entries], pa.string()),
            "attempts": pa.array([int(f.get("attempts", 1)) for f in self.failure_entries], pa.int64()),
        })

    def __len__(self) -> int:
        return len(self._rows)

    def conditions(self) -> list[str]:
        return sorted({r["condition"] for r in self._rows})

    def _row(self, member_id: str) -> dict:
        for r in self._rows:
            if r["member_id"] == member_id:
                return r
        raise ZooError(f"member {member_id!r} is not in the zoo at {self.root.describe()}")

    def file_of(self, member_id: str) -> str:
        """The file holding the member's blocks, relative to the zoo root (``blocks/...`` or ``compacted/...``)."""
        return self._row(member_id)["file"]

    @property
    def files(self) -> list[tuple[str, list[str] | None]]:
        """Explicit (relative file, member filter) list: the plan for every read."""
        by_file: dict[str, list[str]] = {}
        for r in self._rows:
            by_file.setdefault(r["file"], []).append(r["member_id"])
        return [(f, (mids if f.startswith("compacted/") else None)) for f, mids in sorted(by_file.items())]

    def live_files(self) -> list[str]:
        """URIs of exactly the files this view reads (sorted): what an outside reader (duckdb,
        polars, Spark) should read instead of globbing ``blocks/**`` (which after a compaction
        also finds superseded files and files of unfinished writes)."""
        return [self.root.join(f).uri for f, _ in self.files]

    def row_filters(self) -> dict[str, list[str]]:
        """Live compacted files that also hold rows of members outside this view (members rewritten
        after the compaction): ``{file URI: the member ids to read from it}``.  Empty for a zoo whose
        live files hold exactly its rows (one footer read per compacted file)."""
        expected: dict[str, int] = {}
        for r in self._rows:
            if r["file"].startswith("compacted/"):
                expected[r["file"]] = expected.get(r["file"], 0) + int(r["num_rows"])

        def num_rows(rel: str) -> int:
            loc = self.root.join(rel)
            try:
                with loc.fs.open_input_file(loc.path) as f:
                    return pq.read_metadata(f).num_rows
            except FileNotFoundError:
                raise ZooError(f"blocks file missing: {loc.describe()}") from None
            except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
                raise ZooError(f"corrupt or truncated Parquet file {loc.describe()}: {exc}") from exc

        rels = sorted(expected)
        with ThreadPoolExecutor(max(1, min(16, len(rels) or 1))) as ex:
            counts = list(ex.map(num_rows, rels))
        members = dict(self.files)
        return {self.root.join(rel).uri: list(members[rel] or []) for rel, n in zip(rels, counts)
                if n != expected[rel]}

    def without(self, member_ids) -> "Zoo":
        """This zoo without ``member_ids`` (e.g. the members a verification found bad)."""
        drop = set(member_ids)
        return Zoo(self.root, self.layout, [r for r in self._rows if r["member_id"] not in drop],
                   self._entry_mtimes, self.failure_entries, self.missing, self.version, self.corrupt_entries)

    def verify(self, level: str = "checksum", member_ids: Sequence[str] | None = None,
               num_threads: int = 16) -> list[BadMember]:
        """Check the live files of (``member_ids`` or all) members against the manifest.

        ``level="footer"``: the Parquet footer parses and its row count is what the entries say
        (one small ranged read per file: the training pre-flight); ``"checksum"``: also the
        file's size and sha256 (reads every file whole).  Returns the bad members (empty: all
        good), each naming its file and the problem.  Corrupt manifest entries are not members;
        see :attr:`corrupt_entries`."""
        if level not in ("footer", "checksum"):
            raise ValueError(f"level must be 'footer' or 'checksum', got {level!r}")
        rows = self._rows if member_ids is None else [self._row(m) for m in member_ids]
        by_file: dict[str, list[dict]] = {}
        for r in rows:
            by_file.setdefault(r["file"], []).append(r)
        expected_rows: dict[str, int] = {}
        for r in self._rows:
            expected_rows[r["file"]] = expected_rows.get(r["file"], 0) + int(r["num_rows"])

        def check(rel: str) -> str:
            loc = self.root.join(rel)
            r0 = by_file[rel][0]
            try:
                if level == "checksum":
                    data = read_bytes(loc)
                    if int(r0.get("size", -1)) >= 0 and len(data) != int(r0["size"]):
                        return f"size {len(data)} B, the manifest says {r0['size']} B"
                    if r0.get("sha256") and hashlib.sha256(data).hexdigest() != r0["sha256"]:
                        return "sha256 differs from the manifest (file changed or corrupt)"
                    meta = pq.read_metadata(pa.BufferReader(data))
                else:
                    with loc.fs.open_input_file(loc.path) as f:
                        meta = pq.read_metadata(f)
            except FileNotFoundError:
                return "file missing"
            except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
                return f"not a readable Parquet file ({str(exc).strip().splitlines()[0][:120]})"
            if meta.num_rows != expected_rows[rel]:
                return f"{meta.num_rows} rows, the manifest says {expected_rows[rel]}"
            return ""

        files = sorted(by_file)
        with ThreadPoolExecutor(max(1, min(num_threads, len(files) or 1))) as ex:
            problems = list(ex.map(check, files))
        return [BadMember(r["member_id"], rel, why) for rel, why in zip(files, problems) if why
                for r in by_file[rel]]

    # ------------------------------------------------------------------ reads
    def dataset(self, unit: str = "block", columns: Sequence[str] | None = None, files_per_task: int = 1):
        """A streaming ``ray.data.Dataset`` of block rows (or whole checkpoints), planned from the
        manifest's file list (no listing, no per-file metadata requests at plan time)."""
        import ray.data       # heavy (seconds); only readers that stream the table through Ray Data need it

        if unit not in ("block", "checkpoint"):
            raise ValueError(f"unit must be 'block' or 'checkpoint', got {unit!r}")
        if not self._rows:
            raise ZooError(f"zoo at {self.root.describe()} has no members")
        items = [{"file": f, "members": list(m or [])} for f, m in self.files]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
        reader = _FileReader(self.root.uri, unit, self.layout.num_blocks, self.layout.block_size,
                             columns)
        return ds.map_batches(reader, batch_size=files_per_task, batch_format="numpy")

    def _member_table(self, r: dict, columns: Sequence[str] | None = None) -> pa.Table:
        path = posixpath.join(self.root.path, r["file"])
        if columns is not None and r["file"].startswith("compacted/"):
            columns = list(dict.fromkeys([*columns, "member_id"]))
        t = _read_parquet(self.root.fs, path, columns=columns, describe=self.root.join(r["file"]).describe())
        if r["file"].startswith("compacted/"):
            t = t.filter(pc.equal(t.column("member_id"), r["member_id"]))
        return t

    def _member_blocks(self, r: dict, last_k: int | None) -> tuple[list[int], np.ndarray]:
        t = self._member_table(r, columns=["checkpoint", "block_index", "block"])
        L = self.layout
        arr = _block_matrix(t.column("block"), L.block_size)
        ck = t.column("checkpoint").to_numpy()
        bi = t.column("block_index").to_numpy()
        key = ck.astype(np.int64) * L.num_blocks + bi
        steps = sorted(set(np.unique(ck).tolist()))
        if len(arr) != len(steps) * L.num_blocks:
            raise ZooError(f"blocks file {self.root.join(r['file']).describe()}: {len(arr)} rows, expected "
                           f"{len(steps)} x {L.num_blocks}")
        if len(key) > 1 and not bool(np.all(key[1:] > key[:-1])):   # our files are written in order
            arr = arr[np.argsort(key, kind="stable")]
        arr = arr.reshape(len(steps), L.num_blocks, L.block_size)
        if last_k:
            steps, arr = steps[-last_k:], arr[-last_k:]
        return steps, arr

    def blocks(self, member_ids: Sequence[str] | None = None, last_k: int | None = None,
               num_threads: int = 8) -> torch.Tensor:
        """float32 [members * checkpoints, num_blocks, block_size], members in the given order,
        checkpoints ascending (the last ``last_k`` of each member if given)."""
        rows = self._rows if member_ids is None else [self._row(m) for m in member_ids]
        if not rows:
            return torch.zeros(0, self.layout.num_blocks, self.layout.block_size)
        if len(rows) == 1:
            arr = self._member_blocks(rows[0], last_k)[1]
            return torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        with ThreadPoolExecutor(max(1, min(num_threads, len(rows)))) as ex:
            parts = list(ex.map(lambda r: self._member_blocks(r, last_k)[1], rows))
        return torch.from_numpy(np.concatenate(parts, axis=0))

    def state_dicts(self, member_id: str, last_k: int | None = None) -> list[tuple[int, dict]]:
        steps, arr = self._member_blocks(self._row(member_id), last_k)
        return [(s, self.layout.detokenize(torch.from_numpy(np.array(a)))) for s, a in zip(steps, arr)]

    def metrics(self, member_id: str) -> list[dict]:
        return json.loads(self._row(member_id)["metrics"])

    # ------------------------------------------------------------------ manifest
    def _publish(self, rows: list[dict], mtimes: dict[str, int]) -> int:
        version = self.version + 1
        snap_rel = f"_manifest/snapshot-{version:06d}.parquet"
        cols = {c: [r[c] for r in rows] for c in MEMBER_COLUMNS}
        cols["entry_mtime_ns"] = [int(mtimes.get(r["member_id"], 0)) for r in rows]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols, schema=_SNAPSHOT_SCHEMA), sink)
        write_bytes_atomic(self.root.join(snap_rel), sink.getvalue().to_pybytes())
        current = {"format_version": MANIFEST_VERSION, "version": version, "snapshot": snap_rel,
                   "members": len(rows), "created_at": time.time()}
        write_bytes_atomic(self.root.join(CURRENT_FILE), json.dumps(current).encode())   # the atomic swap
        self.version = version
        return version

    def compact(self, target_rows: int = 1_000_000) -> int:
        """Rewrite member files into files of about ``target_rows`` rows under a new manifest version.
        Deletes nothing: :func:`~rayweights.table.vacuum_zoo` deletes the superseded files later."""
        version = self.version + 1
        rows = sorted(self._rows, key=lambda r: (r["task_id"], r["member_id"]))
        new_rows, batch, batch_rows, part = [], [], 0, 0

        def flush():
            nonlocal batch, batch_rows, part
            if not batch:
                return
            rel = f"compacted/v{version:06d}/part-{part:05d}.parquet"
            table = pa.concat_tables([self._member_table(r) for r in batch])
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, row_group_size=max(self.layout.num_blocks, 64 * 1024))
            data = sink.getvalue()
            write_bytes_atomic(self.root.join(rel), data)
            digest = hashlib.sha256(data).hexdigest()
            new_rows.extend({**r, "file": rel, "sha256": digest, "size": data.size} for r in batch)
            batch, batch_rows, part = [], 0, part + 1

        for r in rows:
            batch.append(r)
            batch_rows += r["num_rows"]
            if batch_rows >= target_rows:
                flush()
        flush()
        self.version = version - 1
        self._publish(new_rows, self._entry_mtimes)
        self._rows = new_rows
        return version


def _read_current(root: Location) -> tuple[int, str | None]:
    """(version, snapshot path relative to the root) of ``_manifest/CURRENT``; (0, None) without one."""
    try:
        current = json.loads(read_bytes(root.join(CURRENT_FILE)))
        return int(current["version"]), str(current["snapshot"])
    except FileNotFoundError:
        return 0, None
    except (KeyError, ValueError, TypeError) as exc:
        raise ZooError(f"{root.join(CURRENT_FILE).describe()} is malformed: {exc}") from exc


def _read_snapshot(root: Location, rel: str | None) -> tuple[dict[str, dict], dict[str, int]]:
    """A snapshot's rows by member id and the entry mtimes it recorded (empty for ``rel=None``)."""
    snap: dict[str, dict] = {}
    mtimes: dict[str, int] = {}
    if rel is None:
        return snap, mtimes
    t = _read_parquet(root.fs, root.join(rel).path, describe=root.join(rel).describe())
    if "entry_mtime_ns" not in t.column_names or "member_id" not in t.column_names:
        raise ZooError(f"manifest snapshot {root.join(rel).describe()} lacks the member_id/entry_mtime_ns columns")
    for r in t.to_pylist():
        mtimes[r["member_id"]] = r.pop("entry_mtime_ns")
        r.setdefault("sha256", "")       # snapshots written before checksums
        r.setdefault("size", -1)
        snap[r["member_id"]] = r
    return snap, mtimes


def _list_entries(root: Location) -> dict[str, pafs.FileInfo]:
    """The manifest entries ``members/<id>.json`` by member id (listing only: no GET)."""
    return {posixpath.basename(i.path)[:-5]: i for i in list_files(root.join("members"), ".json")}


def _newer_entries(entries: Mapping[str, pafs.FileInfo], snap: Mapping[str, dict],
                   snap_mtimes: Mapping[str, int]) -> list[tuple[str, pafs.FileInfo]]:
    """The entries a reader of this snapshot GETs: members it lacks, or entries written after it."""
    return [(mid, info) for mid, info in entries.items()
            if mid not in snap or (info.mtime_ns or 0) > snap_mtimes.get(mid, 0)]


def _read_entries(root: Location, items: Sequence[tuple[str, pafs.FileInfo]]
                  ) -> tuple[dict[str, dict], dict[str, int], dict[str, str]]:
    """GET entries: (rows by member, their mtimes, {member: why} for the corrupt ones)."""

    def get(item):
        mid, info = item
        try:
            e = json.loads(read_bytes(Location(root.fs, info.path, info.path)))
            if not isinstance(e, dict):
                raise ValueError(f"expected a JSON object, got {type(e).__name__}")
            if e.get("member_id") != mid:
                raise ValueError(f"member_id {e.get('member_id')!r} != the entry's name {mid!r}")
            return mid, info, _entry_to_row(e), ""
        except FileNotFoundError:
            return mid, info, None, ""
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:   # JSONDecodeError is a ValueError
            return mid, info, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"

    fresh: dict[str, dict] = {}
    mtimes: dict[str, int] = {}
    corrupt: dict[str, str] = {}
    with ThreadPoolExecutor(16) as ex:
        for mid, info, row, why in ex.map(get, items):
            if row is not None:
                fresh[mid] = row
                mtimes[mid] = info.mtime_ns or 0
            elif why:
                corrupt[mid] = why
    return fresh, mtimes, corrupt


def _list_entries_tagged(root: Location) -> tuple[dict[str, pafs.FileInfo], dict[str, str]]:
    """:func:`_list_entries` plus, on S3, each entry's ETag (the same one LIST, through boto)."""
    if not root.is_s3:
        return _list_entries(root), {}
    from ..storage import _s3fs

    prefix = root.join("members").path
    try:
        found = _s3fs().find(prefix, detail=True)
    except FileNotFoundError:
        found = {}
    except OSError as exc:
        raise StorageError(f"cannot list {root.join('members').describe()}: {exc}") from exc
    finally:
        _s3fs().invalidate_cache(prefix)
    entries: dict[str, pafs.FileInfo] = {}
    etags: dict[str, str] = {}
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    for path, d in found.items():
        name = posixpath.basename(path)
        if not name.endswith(".json") or ".tmp-" in name or d.get("type", "file") != "file":
            continue
        lm = d.get("LastModified")
        mtime_ns = (lm - epoch) // datetime.timedelta(microseconds=1) * 1000 if lm is not None else None
        entries[name[:-5]] = pafs.FileInfo(path, pafs.FileType.File, mtime_ns=mtime_ns, size=d.get("size"))
        etags[name[:-5]] = str(d.get("ETag", "")).strip('"')
    return entries, etags


def _shard_row_matches(row: Mapping, info: pafs.FileInfo, etag: str | None) -> bool:
    """Whether shard ``row`` copies exactly the entry object the listing shows (``info``, ``etag``).

    S3 timestamps are whole seconds, so a rewrite within the second of the shard's copy would show the
    same mtime: there the listing's ETag (the md5 of a single-PUT object's bytes) must equal the md5
    recorded in the shard, a content check; an ETag that is not a plain md5 (multipart, SSE-KMS) never
    matches, and the entry is GET.  Locally the mtime is the filesystem's (nanoseconds, ticking every
    few ms) and must match with the size; a whole-second mtime (a coarse filesystem) is in doubt: GET."""
    if info.size is not None and int(row["entry_size"]) != int(info.size):
        return False
    if etag is not None:
        return bool(etag) and etag == row["entry_md5"]
    mtime = info.mtime_ns or 0
    return mtime % 1_000_000_000 != 0 and int(row["entry_mtime_ns"]) == mtime


def _read_shards(root: Location, infos: Sequence[pafs.FileInfo]) -> dict[str, list[dict]]:
    """The manifest shards' rows by shard path (relative to the root), read in parallel; a shard deleted
    since the listing, or torn, is left out (its entries are GET)."""

    def read(info):
        rel = posixpath.relpath(info.path, root.path)
        try:
            return rel, pq.read_table(info.path, filesystem=root.fs).to_pylist()
        except FileNotFoundError:
            return rel, None
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            if "NoSuchKey" in str(exc) or "does not exist" in str(exc):
                return rel, None
            log.warning("zoo %s: manifest shard %s unreadable (%s); its entries are read one by one",
                        root.describe(), rel, str(exc).strip().splitlines()[0][:120])
            return rel, None

    out: dict[str, list[dict]] = {}
    if not infos:
        return out
    with ThreadPoolExecutor(max(1, min(16, len(infos)))) as ex:
        for rel, rows in ex.map(read, infos):
            if rows is not None:
                out[rel] = rows
    return out


def _list_shards(root: Location) -> list[pafs.FileInfo]:
    """The manifest shards present now (one listing)."""
    return list_files(root.join(*SHARDS_DIR.split("/")), ".parquet")


def _shard_members(shard_rows: Mapping[str, Sequence[Mapping]]) -> dict[str, list[tuple[str, int]]]:
    """What each shard indexes: ``{shard path: [(member_id, entry_mtime_ns)]}`` (for :func:`_covered_shards`)."""
    return {rel: [(r["member_id"], int(r["entry_mtime_ns"])) for r in rows] for rel, rows in shard_rows.items()}


def _covered_shards(shards: Mapping[str, Sequence[tuple[str, int]]], listed_mtimes: Mapping[str, int],
                    snap_mtimes: Mapping[str, int]) -> list[str]:
    """The shards a snapshot covers: each row's member is no longer listed, or the snapshot holds an
    entry of it at least as new as the row's (deleting a shard never loses a member: entries commit)."""
    return [rel for rel, rows in shards.items()
            if all(mid not in listed_mtimes or snap_mtimes.get(mid, -1) >= mtime for mid, mtime in rows)]


def open_zoo(uri: str) -> Zoo:
    """Open the zoo at ``uri`` (local folder, ``file://`` or ``s3://``) at its current manifest.

    The manifest is the snapshot ``CURRENT`` names, merged with the entries ``members/<id>.json``
    listed now that it lacks or that were written after it.  Such an entry is taken from a manifest
    shard (``_manifest/shards/``, all read in parallel) when a shard row copies the very object
    listed (:func:`_shard_row_matches`), else GET: a fresh 10^4-member build is consolidated from ten
    shards, not 10^4 GETs, and a missing, torn or stale shard only costs GETs."""
    try:
        root = resolve(uri)
    except StorageError as exc:
        raise ZooError(str(exc)) from exc
    layout = _read_layout(root)
    # 1. the consolidated snapshot (if any)
    version, snap_rel = _read_current(root)
    snap, snap_mtimes = _read_snapshot(root, snap_rel)
    # 2. manifest shards (a build's batches of entry rows), then the entries listed now (one LIST per 1000
    #    keys); an entry newer than the snapshot comes from a shard row copying that very object, else a GET
    shard_infos = _list_shards(root)
    if shard_infos:
        entries, etags = _list_entries_tagged(root)
    else:
        entries, etags = _list_entries(root), {}
    shard_rows = _read_shards(root, shard_infos)
    by_member: dict[str, list[dict]] = {}
    for rows_ in shard_rows.values():
        for r in rows_:
            by_member.setdefault(r["member_id"], []).append(r)
    fresh, fresh_mtimes, to_get = {}, {}, []
    for mid, info in _newer_entries(entries, snap, snap_mtimes):
        hit = next((r for r in by_member.get(mid, ()) if _shard_row_matches(
            r, info, etags.get(mid, "") if root.is_s3 else None)), None)
        if hit is None:
            to_get.append((mid, info))
        else:
            fresh[mid] = {c: hit[c] for c in MEMBER_COLUMNS}
            fresh_mtimes[mid] = info.mtime_ns or 0
    got, got_mtimes, corrupt = _read_entries(root, to_get)
    fresh.update(got)
    fresh_mtimes.update(got_mtimes)
    shards = _shard_members(shard_rows)
    del by_member, shard_rows
    mtimes = {mid: snap_mtimes[mid] for mid in entries if mid in snap_mtimes}
    mtimes.update(fresh_mtimes)
    for mid in corrupt:
        mtimes.pop(mid, None)
    if corrupt:
        mid = sorted(corrupt)[0]
        log.warning("zoo %s: %d corrupt manifest entr%s left out (e.g. %s: %s); a build resume rebuilds them",
                    root.describe(), len(corrupt), "y" if len(corrupt) == 1 else "ies",
                    root.join("members", mid + ".json").describe(), corrupt[mid])
    rows = []
    for mid in sorted(entries):
        if mid in corrupt:
            continue
        r = fresh.get(mid) or snap.get(mid)
        if r is not None:
            rows.append({c: r[c] for c in MEMBER_COLUMNS})
    # 3. data files present? (listing again, no per-member request)
    present = {posixpath.relpath(i.path, root.path) for i in list_files(root.join("blocks"), ".parquet")}
    needs_compacted = any(r["file"].startswith("compacted/") for r in rows)
    if needs_compacted:
        present |= {posixpath.relpath(i.path, root.path) for i in list_files(root.join("compacted"), ".parquet")}
    missing = [r["member_id"] for r in rows if r["file"] not in present]
    if missing:
        log.warning("zoo %s: %d member(s) have a manifest entry but no blocks file (e.g. %s); ignored",
                    root.describe(), len(missing), missing[0])
    rows = [r for r in rows if r["file"] in present]
    failures = []
    done = {r["member_id"] for r in rows}
    for info in list_files(root.join("failures"), ".json"):
        try:
            f = json.loads(read_bytes(Location(root.fs, info.path, info.path)))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if f.get("member_id") not in done:
            failures.append(f)
    return Zoo(root, layout, rows, mtimes, failures, missing, version, corrupt, shards=shards,
               listed_mtimes={mid: info.mtime_ns or 0 for mid, info in entries.items()})


def compact_zoo(uri: str, target_rows: int = 1_000_000) -> int:
    """Compact the zoo at ``uri``; returns the new manifest version."""
    return open_zoo(uri).compact(target_rows)


