"""Weight-block tables: one Parquet file per zoo member, a consolidated members manifest.

On-storage layout of a zoo (``<root>`` = the zoo URI, a local folder, ``file://`` or ``s3://``)::

    <root>/layout.json                                   WeightLayout (written once)
    <root>/blocks/task=<task_id>/member=<member_id>.parquet   all kept checkpoints of one member
    <root>/members/<member_id>.json                      manifest entry, written after its file
    <root>/failures/<member_id>.json                     members that kept failing, with the error
    <root>/_manifest/CURRENT                             {"version": N, "snapshot": ...}
    <root>/_manifest/snapshot-<N>.parquet                consolidated entries (+ the entry mtimes)
    <root>/compacted/v<N>/part-<k>.parquet               files written by compaction

Visibility rules, which make partial writes invisible and reads cheap at 10^4-10^5 members:

* a member exists only once its entry ``members/<id>.json`` exists, and that entry is written only
  after its blocks file is complete (single PUT on S3, write + rename locally);
* :func:`open_zoo` reads ``CURRENT`` and its snapshot, then *lists* ``members/`` and ``blocks/``
  (one request per 1000 keys) and GETs only entries that are newer than the snapshot: no request
  per member, and readers plan reads from the explicit file list, never by listing for data;
* compaction writes the new large files, then a new snapshot, then swaps ``CURRENT`` (one atomic
  object write): a reader sees the old files or the new ones, never a mix.

Integrity: every manifest entry records its file's ``sha256`` and ``size`` (bytes) and the
member's ``num_rows``.  :meth:`Zoo.verify` checks the live files against them (``level="footer"``:
Parquet footer and row count, one small read per file, the training pre-flight; ``"checksum"``:
the whole file's sha256 as well, ``rayweights zoo-info --verify`` and a build's resume, which
rebuilds exactly the members that fail).  A manifest entry that cannot be parsed is reported by
name (:attr:`Zoo.corrupt_entries`) and left out; the rest of the zoo stays readable.

Rows (one per weight block): ``zoo, task_id, condition, member_id, seed, checkpoint (int32),
group (int32), block_index (int32, global), block (fixed_size_list<float32>[block_size])``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .blocks import LayoutError, WeightLayout
from .runtime import worker_env
from .storage import (Location, StorageError, check_writable, delete, exists, list_files, read_bytes, resolve,
                      write_bytes_atomic)
from .errors import UserError, check_id, job_main

__all__ = ["ZooWriter", "CheckpointRecord", "open_zoo", "Zoo", "ZooError", "BadMember", "compact_zoo", "block_schema"]

log = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"
CURRENT_FILE = "_manifest/CURRENT"
_TABLE_FOLDERS = ("blocks/", "members/", "_manifest/", "failures/", "compacted/")
_RETOKENIZED_FILE = "_retokenized.json"          # written last by Zoo.retokenize
MANIFEST_VERSION = "rayweights.manifest/1"


class ZooError(UserError, RuntimeError):
    """A zoo cannot be written or read (the message names the member or file)."""


def block_schema(block_size: int) -> pa.Schema:
    return pa.schema([
        ("zoo", pa.string()),
        ("task_id", pa.string()),
        ("condition", pa.string()),
        ("member_id", pa.string()),
        ("seed", pa.int64()),
        ("checkpoint", pa.int32()),
        ("group", pa.int32()),
        ("block_index", pa.int32()),
        ("block", pa.list_(pa.float32(), block_size)),
    ])


_SNAPSHOT_SCHEMA = pa.schema([
    ("member_id", pa.string()),
    ("task_id", pa.string()),
    ("condition", pa.string()),
    ("seed", pa.int64()),
    ("checkpoints", pa.list_(pa.int32())),
    ("metrics", pa.string()),
    ("hparams", pa.string()),
    ("file", pa.string()),
    ("num_rows", pa.int64()),
    ("sha256", pa.string()),          # of the member's file ("" in zoos written before checksums)
    ("size", pa.int64()),             # bytes of the member's file (-1: unknown)
    ("entry_mtime_ns", pa.int64()),
])
MEMBER_COLUMNS = [f.name for f in _SNAPSHOT_SCHEMA if f.name != "entry_mtime_ns"]


@dataclass(frozen=True)
class BadMember:
    """A member that fails verification: its id, its file (relative to the zoo root) and why."""

    member_id: str
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.member_id} ({self.file}): {self.problem}"


@dataclass
class CheckpointRecord:
    """One kept checkpoint of a member: a state_dict (or its blocks) and its metrics."""

    step: int
    state_dict: Mapping[str, torch.Tensor] | None = None
    blocks: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)


def _safe_key(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise ZooError(str(exc)) from None


def _read_layout(root: Location) -> WeightLayout:
    loc = root.join(LAYOUT_FILE)
    try:
        text = read_bytes(loc)
    except FileNotFoundError:
        raise ZooError(f"no zoo at {root.describe()}: {LAYOUT_FILE} is missing") from None
    try:
        return WeightLayout.from_json(text)
    except LayoutError as exc:
        raise ZooError(f"{loc.describe()}: {exc}") from exc


def _layout_difference(a: WeightLayout, b: WeightLayout) -> str:
    if a.block_size != b.block_size:
        return f"block_size {a.block_size} vs {b.block_size}"
    if a.rule != b.rule:
        return f"rule {a.rule} vs {b.rule}"
    an, bn = {p.name: p for p in a.params}, {p.name: p for p in b.params}
    for n in an:
        if n not in bn:
            return f"parameter {n} only in the existing layout"
        if an[n].shape != bn[n].shape or an[n].dtype != bn[n].dtype:
            return f"parameter {n}: {an[n].shape}/{an[n].dtype} vs {bn[n].shape}/{bn[n].dtype}"
    for n in bn:
        if n not in an:
            return f"parameter {n} only in the new layout"
    return "grouping differs"


class ZooWriter:
    """Writes members of one zoo. Picklable (holds a URI and a layout), so Ray workers can use it."""

    def __init__(self, uri: str, layout: WeightLayout):
        self.uri = uri
        self.layout = layout
        self._root: Location | None = None

    def __getstate__(self):
        return {"uri": self.uri, "layout": self.layout.to_json()}

    def __setstate__(self, state):
        self.uri = state["uri"]
        self.layout = WeightLayout.from_json(state["layout"])
        self._root = None

    @property
    def root(self) -> Location:
        if self._root is None:
            self._root = resolve(self.uri)
        return self._root

    @property
    def zoo_name(self) -> str:
        return posixpath.basename(self.root.path.rstrip("/"))

    @classmethod
    def create(cls, uri: str, layout: WeightLayout) -> "ZooWriter":
        """Open ``uri`` for writing; write ``layout.json`` unless an identical one is there."""
        try:
            root = check_writable(uri)
        except StorageError as exc:
            raise ZooError(str(exc)) from exc
        raw = WeightLayout.from_dict({**layout.to_dict(), "groups": [
            {**g, "mean": None, "std": None} for g in layout.to_dict()["groups"]]})
        loc = root.join(LAYOUT_FILE)
        if exists(loc):
            existing = _read_layout(root)
            if not existing.same_structure(raw):
                raise ZooError(f"{loc.describe()} already holds a different layout "
                               f"({_layout_difference(existing, raw)}); use another output URI")
        else:
            write_bytes_atomic(loc, raw.to_json().encode())
        return cls(uri, raw)

    # ------------------------------------------------------------------ members
    def member_file(self, task_id: str, member_id: str) -> str:
        return f"blocks/task={_safe_key(task_id, 'task_id')}/member={_safe_key(member_id, 'member_id')}.parquet"

    def done_members(self, verify: bool = True) -> set[str]:
        """Members a resume may skip: a readable manifest entry, and a blocks file that is present
        and (``verify``) passes :meth:`Zoo.verify` (checksum, footer, row count).  A member whose
        entry or file is corrupt is not done: the resume rebuilds it, and only it."""
        try:
            zoo = open_zoo(self.uri)
        except ZooError:
            if not exists(self.root.join(LAYOUT_FILE)):
                return set()
            raise
        done = set(zoo.members.column("member_id").to_pylist())
        if verify and done:
            bad = zoo.verify("checksum")
            for b in bad:
                log.warning("zoo %s: member %s will be rebuilt: %s", zoo.root.describe(), b.member_id, b.problem)
            done -= {b.member_id for b in bad}
        return done

    def build_table(self, member_id: str, task_id: str, condition: str, seed: int,
                    checkpoints: Sequence[CheckpointRecord]) -> pa.Table:
        L = self.layout
        if not checkpoints:
            raise ZooError(f"member {member_id}: no checkpoints to write")
        C, nb, bs = len(checkpoints), L.num_blocks, L.block_size
        flat = np.empty(C * nb * bs, dtype=np.float32)
        for ci, ck in enumerate(checkpoints):
            if ck.blocks is not None:
                b = ck.blocks.detach().to(torch.float32)
                if tuple(b.shape) != (L.num_blocks, L.block_size):
                    raise ZooError(f"member {member_id} checkpoint {ck.step}: blocks shape {tuple(b.shape)} "
                                   f"!= layout ({L.num_blocks}, {L.block_size})")
            elif ck.state_dict is not None:
                try:
                    b = L.tokenize(ck.state_dict)
                except LayoutError as exc:
                    raise ZooError(f"member {member_id} checkpoint {ck.step}: {exc}") from exc
            else:
                raise ZooError(f"member {member_id} checkpoint {ck.step}: neither state_dict nor blocks")
            if not bool(torch.isfinite(b).all()):
                bad = int((~torch.isfinite(b)).any(dim=1).nonzero()[0, 0])
                raise ZooError(f"member {member_id} checkpoint {ck.step}: NaN/Inf weights (first in block {bad}); "
                               "not written")
            flat[ci * nb * bs:(ci + 1) * nb * bs] = b.numpy().reshape(-1)
        n = C * nb
        steps = np.repeat(np.asarray([int(ck.step) for ck in checkpoints], dtype=np.int32), nb)
        bg = L.block_group.numpy().astype(np.int32)
        const = lambda v, t: pa.repeat(pa.scalar(v, t), n)
        return pa.Table.from_arrays([
            const(self.zoo_name, pa.string()),
            const(task_id, pa.string()),
            const(condition, pa.string()),
            const(member_id, pa.string()),
            const(int(seed), pa.int64()),
            pa.array(steps),
            pa.array(np.tile(bg, C)),
            pa.array(np.tile(np.arange(nb, dtype=np.int32), C)),
            pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), bs),
        ], schema=block_schema(bs))

    def write_member(self, member_id: str, task_id: str, condition: str, seed: int,
                     checkpoints: Sequence[CheckpointRecord], hparams: Mapping[str, Any] | None = None) -> dict:
        """Write a member's blocks file, then its manifest entry. Re-running overwrites both."""
        rel = self.member_file(task_id, member_id)
        table = self.build_table(member_id, task_id, condition, seed, checkpoints)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue()
        write_bytes_atomic(self.root.join(rel), data)
        entry = {
            "format_version": MANIFEST_VERSION,
            "member_id": member_id, "task_id": task_id, "condition": condition, "seed": int(seed),
            "checkpoints": [int(c.step) for c in checkpoints],
            "metrics": [dict(c.metrics) for c in checkpoints],
            "hparams": dict(hparams or {}),
            "file": rel, "num_rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(),
            "size": data.size, "written_at": time.time(),
        }
        write_bytes_atomic(self.root.join("members", f"{member_id}.json"),
                           json.dumps(entry, default=float).encode())
        # a success supersedes an earlier recorded failure
        delete(self.root.join("failures", f"{member_id}.json"))
        return entry

    def record_failure(self, member_id: str, task_id: str, error: str, attempts: int = 1) -> None:
        _safe_key(member_id, "member_id")
        entry = {"member_id": member_id, "task_id": task_id, "error": error, "attempts": attempts,
                 "failed_at": time.time()}
        write_bytes_atomic(self.root.join("failures", f"{member_id}.json"), json.dumps(entry).encode())

    def consolidate(self) -> int:
        """Fold every manifest entry into a new snapshot; returns the new manifest version."""
        zoo = open_zoo(self.uri)
        return zoo._publish(zoo._rows, zoo._entry_mtimes)


# ---------------------------------------------------------------------- reading
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
                import pyarrow.compute as pc
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
                 corrupt_entries: dict[str, str] | None = None):
        self.root = root
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

    @property
    def files(self) -> list[tuple[str, list[str] | None]]:
        """Explicit (relative file, member filter) list: the plan for every read."""
        by_file: dict[str, list[str]] = {}
        for r in self._rows:
            by_file.setdefault(r["file"], []).append(r["member_id"])
        return [(f, (mids if f.startswith("compacted/") else None)) for f, mids in sorted(by_file.items())]

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
        import ray.data

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
            import pyarrow.compute as pc
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
        """Rewrite member files into files of about ``target_rows`` rows under a new manifest version."""
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


    # ------------------------------------------------------------------ re-tokenising
    def retokenize(self, dst: str, layout: WeightLayout, files: Mapping[str, bytes] | None = None,
                   show_progress: bool = False) -> "Zoo":
        """This zoo's members written into a new zoo ``dst`` under another ``layout`` of the same
        parameters (another block size or grouping rule): same members, checkpoints, metrics and
        hparams, nothing retrained.  Every file of this zoo's folder that is not part of the table
        (a family's caches: base models, features) is copied, except the names in ``files``, which
        are written with the bytes given instead (e.g. a spec rewritten for the new layout).
        Idempotent: a finished ``dst`` is opened as is, an unfinished one is completed; its done
        marker is written last."""
        droot = resolve(dst)
        if exists(droot.join(_RETOKENIZED_FILE)):
            return open_zoo(dst)
        files = dict(files or {})
        writer = ZooWriter.create(dst, layout)
        done = writer.done_members()
        rows = [r for r in self.members.to_pylist() if r["member_id"] not in done]
        for r in tqdm(rows, desc=f"re-tokenise (block {layout.block_size})", unit="member",
                      disable=not show_progress or not rows):
            sds = self.state_dicts(r["member_id"])
            metrics = json.loads(r["metrics"]) if r.get("metrics") else [{}] * len(sds)
            hparams = json.loads(r["hparams"]) if r.get("hparams") else {}
            writer.write_member(r["member_id"], r["task_id"], r["condition"], int(r["seed"]),
                                [CheckpointRecord(step=s, state_dict=sd, metrics=m)
                                 for (s, sd), m in zip(sds, metrics)], hparams=hparams)
        base = self.root.path.rstrip("/") + "/"
        for info in list_files(self.root):
            rel = info.path[len(base):] if info.path.startswith(base) else info.base_name
            if rel.startswith(_TABLE_FOLDERS) or rel in (LAYOUT_FILE, _RETOKENIZED_FILE) or rel in files \
                    or rel.startswith(".rayweights-probe"):
                continue
            target = droot.join(*rel.split("/"))
            if not exists(target):
                write_bytes_atomic(target, read_bytes(self.root.join(*rel.split("/"))))
        for rel, data in files.items():
            write_bytes_atomic(droot.join(*rel.split("/")), data)
        writer.consolidate()
        write_bytes_atomic(droot.join(_RETOKENIZED_FILE), json.dumps(
            {"source": self.uri, "block_size": layout.block_size, "members": len(self)}).encode())
        return open_zoo(dst)


def open_zoo(uri: str) -> Zoo:
    """Open the zoo at ``uri`` (local folder, ``file://`` or ``s3://``) at its current manifest."""
    try:
        root = resolve(uri)
    except StorageError as exc:
        raise ZooError(str(exc)) from exc
    layout = _read_layout(root)
    # 1. the consolidated snapshot (if any)
    version: int = 0
    snap: dict[str, dict] = {}
    snap_mtimes: dict[str, int] = {}
    try:
        current = json.loads(read_bytes(root.join(CURRENT_FILE)))
        version = int(current["version"])
        t = _read_parquet(root.fs, root.join(current["snapshot"]).path, describe=root.join(current["snapshot"]).describe())
        for r in t.to_pylist():
            snap_mtimes[r["member_id"]] = r.pop("entry_mtime_ns")
            r.setdefault("sha256", "")       # snapshots written before checksums
            r.setdefault("size", -1)
            snap[r["member_id"]] = r
    except FileNotFoundError:
        pass
    except (KeyError, ValueError) as exc:
        raise ZooError(f"{root.join(CURRENT_FILE).describe()} is malformed: {exc}") from exc
    # 2. entries listed now (one LIST per 1000 keys); GET only those newer than the snapshot
    entries = {posixpath.basename(i.path)[:-5]: i for i in list_files(root.join("members"), ".json")}
    to_read = [(mid, info) for mid, info in entries.items()
               if mid not in snap or (info.mtime_ns or 0) > snap_mtimes.get(mid, 0)]

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
    corrupt: dict[str, str] = {}
    mtimes = {mid: snap_mtimes[mid] for mid in entries if mid in snap_mtimes}
    with ThreadPoolExecutor(16) as ex:
        for mid, info, row, why in ex.map(get, to_read):
            if row is not None:
                fresh[mid] = row
                mtimes[mid] = info.mtime_ns or 0
            elif why:
                corrupt[mid] = why
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
    return Zoo(root, layout, rows, mtimes, failures, missing, version, corrupt)


def compact_zoo(uri: str, target_rows: int = 1_000_000) -> int:
    """Compact the zoo at ``uri``; returns the new manifest version."""
    return open_zoo(uri).compact(target_rows)


# ---------------------------------------------------------------------- small CLIs
@job_main
def info_main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rayweights zoo-info", description="print a zoo's layout and members")
    p.add_argument("uri")
    p.add_argument("--members", type=int, default=10, help="how many member rows to print")
    p.add_argument("--verify", action="store_true",
                   help="check every live file (footer, row count, size, sha256) against the manifest; "
                        "exit 1 naming the bad members if any")
    a = p.parse_args(argv)
    zoo = open_zoo(a.uri)
    print(zoo.layout.describe())
    print(f"\n{len(zoo)} members, {zoo.failures.num_rows} failed, {len(zoo.files)} files, manifest v{zoo.version}")
    if len(zoo):
        print(zoo.members.select(["member_id", "task_id", "condition", "seed", "checkpoints", "file"])
              .slice(0, a.members).to_pandas().to_string(index=False))
    if zoo.failures.num_rows:
        print("\nfailures:")
        for f in zoo.failure_entries[: a.members]:
            print(f"  {f['member_id']}: {str(f.get('error', '')).strip().splitlines()[-1:]}")
    if zoo.corrupt_entries:
        print(f"\n{len(zoo.corrupt_entries)} corrupt manifest entr{'y' if len(zoo.corrupt_entries) == 1 else 'ies'} "
              "(left out; a build resume rebuilds them):")
        for mid, why in sorted(zoo.corrupt_entries.items()):
            print(f"  {mid}: members/{mid}.json: {why}")
    if not a.verify:
        return 0
    bad = zoo.verify("checksum")
    if not bad and not zoo.corrupt_entries and not zoo.missing:
        print(f"\nverify: all {len(zoo)} members' files match the manifest (footer, rows, size, sha256)")
        return 0
    print(f"\nverify: {len(bad) + len(zoo.corrupt_entries) + len(zoo.missing)} bad member(s):")
    for b in bad:
        print(f"  {b}")
    for mid in zoo.missing:
        print(f"  {mid}: blocks file missing")
    names = sorted({b.member_id for b in bad} | set(zoo.corrupt_entries) | set(zoo.missing))
    print(f"error: zoo {zoo.root.describe()}: {len(names)} bad member(s): {', '.join(names[:20])}"
          f"{' ...' if len(names) > 20 else ''}", file=os.sys.stderr)
    return 1


@job_main
def compact_main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rayweights compact", description="compact a zoo's member files")
    p.add_argument("uri")
    p.add_argument("--target-rows", type=int, default=1_000_000)
    a = p.parse_args(argv)
    v = compact_zoo(a.uri, a.target_rows)
    print(f"compacted {a.uri}: manifest v{v}")
    return 0
