"""Writing a zoo: :class:`ZooWriter` (one member at a time, each visible only once complete, resumable)
and :func:`retokenize` (a zoo's members under another layout).

A member is committed by its manifest entry ``members/<id>.json``, written after its blocks file.
A build also batches the entries' rows into manifest shards (:meth:`ZooWriter.write_manifest_shard`,
``_manifest/shards/<uuid>.parquet``): a reader takes an entry's row from a shard instead of GETting
the entry when the listing shows the very object the shard row copies, so :meth:`ZooWriter.consolidate`
of a freshly built zoo reads a few shards instead of every entry.  Shards are an index, never the
commit point: a missing, torn or stale shard only costs GETs.  Consolidation deletes the shards its
new snapshot covers."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..blocks import LayoutError, WeightLayout
from ..storage import (Location, StorageError, check_writable, delete, exists, list_files, read_bytes, resolve,
                       write_bytes_atomic)
from .format import (_RETOKENIZED_FILE, _SHARD_SCHEMA, _TABLE_FOLDERS, LAYOUT_FILE, MANIFEST_VERSION,
                     SHARDS_DIR, CheckpointRecord, ZooError, _layout_difference, _read_layout, _safe_key, block_schema)
from .reader import Zoo, _covered_shards, _entry_to_row, open_zoo

__all__ = ["ZooWriter", "retokenize"]

log = logging.getLogger(__name__)


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
        return self._write_member(member_id, task_id, condition, seed, checkpoints, hparams)[0]

    def write_member_row(self, member_id: str, task_id: str, condition: str, seed: int,
                         checkpoints: Sequence[CheckpointRecord], hparams: Mapping[str, Any] | None = None
                         ) -> tuple[dict, dict]:
        """:meth:`write_member`, and the entry's manifest-shard row: its snapshot row plus the entry
        object's storage mtime (one stat after the write), size and md5 (for
        :meth:`write_manifest_shard`)."""
        entry, data = self._write_member(member_id, task_id, condition, seed, checkpoints, hparams)
        loc = self.root.join("members", f"{member_id}.json")
        info = loc.fs.get_file_info(loc.path)
        row = {**_entry_to_row(entry), "entry_mtime_ns": int(info.mtime_ns or 0), "entry_size": len(data),
               "entry_md5": hashlib.md5(data).hexdigest()}
        return entry, row

    def _write_member(self, member_id, task_id, condition, seed, checkpoints, hparams) -> tuple[dict, bytes]:
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
        raw = json.dumps(entry, default=float).encode()
        write_bytes_atomic(self.root.join("members", f"{member_id}.json"), raw)
        # a success supersedes an earlier recorded failure
        delete(self.root.join("failures", f"{member_id}.json"))
        return entry, raw

    def write_manifest_shard(self, rows: Sequence[Mapping[str, Any]]) -> str | None:
        """Write the rows of :meth:`write_member_row` (entries already written) as one manifest shard
        ``_manifest/shards/<uuid>.parquet``; returns its path relative to the root (None: no rows)."""
        if not rows:
            return None
        rel = f"{SHARDS_DIR}/{uuid.uuid4().hex}.parquet"
        cols = {f.name: [r[f.name] for r in rows] for f in _SHARD_SCHEMA}
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols, schema=_SHARD_SCHEMA), sink)
        write_bytes_atomic(self.root.join(*rel.split("/")), sink.getvalue())
        return rel

    def record_failure(self, member_id: str, task_id: str, error: str, attempts: int = 1) -> None:
        _safe_key(member_id, "member_id")
        entry = {"member_id": member_id, "task_id": task_id, "error": error, "attempts": attempts,
                 "failed_at": time.time()}
        write_bytes_atomic(self.root.join("failures", f"{member_id}.json"), json.dumps(entry).encode())

    def consolidate(self) -> int:
        """Fold every manifest entry into a new snapshot; returns the new manifest version.  Entries
        that manifest shards copy are taken from the shards (no GET each); after ``CURRENT`` names the
        new snapshot, the shards it covers are deleted."""
        zoo = open_zoo(self.uri)
        version = zoo._publish(zoo._rows, zoo._entry_mtimes)
        published = {r["member_id"] for r in zoo._rows}
        covered = _covered_shards(zoo._shards, zoo._listed_mtimes,
                                  {m: t for m, t in zoo._entry_mtimes.items() if m in published})
        for rel in covered:
            delete(self.root.join(*rel.split("/")))
        return version


def retokenize(src: Zoo | str, dst: str, layout: WeightLayout, files: Mapping[str, bytes] | None = None,
               show_progress: bool = False) -> Zoo:
    """The members of zoo ``src`` written into a new zoo ``dst`` under another ``layout`` of the same
    parameters (another block size or grouping rule): same members, checkpoints, metrics and
    hparams, nothing retrained.  Every file of this zoo's folder that is not part of the table
    (a family's caches: base models, features) is copied, except the names in ``files``, which
    are written with the bytes given instead (e.g. a spec rewritten for the new layout).
    Idempotent: a finished ``dst`` is opened as is, an unfinished one is completed; its done
    marker is written last."""
    droot = resolve(dst)
    if exists(droot.join(_RETOKENIZED_FILE)):
        return open_zoo(dst)
    self = open_zoo(src) if isinstance(src, str) else src
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
