"""Retention and the manifest-aware file list.

:func:`vacuum_zoo` deletes the files that no manifest a reader could still hold references
(superseded by compaction, or left by a write that died before its entry); :func:`live_files`
and :func:`duckdb_source` give outside readers exactly the files of the current manifest.

The retention contract: a reader that opened the zoo (read ``_manifest/CURRENT``) finishes
reading within ``retain_seconds``.  A manifest version stays protected until ``retain_seconds``
after the next one was published (the next snapshot file's storage time), so such a reader never
finds a file gone; timestamps are the storage's (whole seconds on some S3 servers), so keep the
window well above a few seconds.  ``retain_seconds=0`` deletes everything the current manifest
does not reference: only for a zoo that nothing reads, builds or compacts at the time.

Manifest shards (``_manifest/shards/``) are an index of entries, not data a reader needs (a reader
that finds one gone GETs the entries instead): a shard goes as soon as the current snapshot covers
every row of it, whatever its age; one that still indexes an entry newer than the snapshot stays.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from ..storage import StorageError, delete, list_files, resolve
from .format import ZooError, _read_layout
from .reader import (Zoo, _covered_shards, _list_entries, _list_shards, _newer_entries, _read_current, _read_entries,
                     _read_shards, _read_snapshot, _shard_members, open_zoo)

__all__ = ["DEFAULT_RETAIN_SECONDS", "VacuumReport", "vacuum_zoo", "live_files", "duckdb_source"]

DEFAULT_RETAIN_SECONDS = 7 * 24 * 3600.0          # like Delta Lake's default
_SNAPSHOT_NAME = re.compile(r"^snapshot-(\d+)\.parquet$")
_COMPACTED_DIR = re.compile(r"^compacted/v(\d+)/")


@dataclass(frozen=True)
class VacuumReport:
    """What :func:`vacuum_zoo` deleted (or would delete, ``dry_run``) and kept."""

    version: int                                       # the current manifest version
    live: int                                          # files the current manifest reads
    deleted: list[str] = field(default_factory=list)   # URIs
    freed_bytes: int = 0
    kept: list[str] = field(default_factory=list)      # unreferenced now, kept: inside the window
    dry_run: bool = False


def _recent(info: pafs.FileInfo, cutoff_ns: int) -> bool:
    return info.mtime_ns is None or info.mtime_ns > cutoff_ns       # unknown time: keep


def vacuum_zoo(uri: str, retain_seconds: float = DEFAULT_RETAIN_SECONDS, dry_run: bool = False) -> VacuumReport:
    """Delete the zoo's files that no reader can need any more (see the module's contract).

    A data file (``blocks/``, ``compacted/``) is deleted when no manifest view that was current
    within the last ``retain_seconds`` reads it (the current snapshot, every older snapshot
    superseded within the window, each with the newer entries that :func:`open_zoo` merges into
    it) and its own modification time is older than the window (a member file whose entry is not
    written yet is kept).  Files of a compaction under way (``compacted/v<N>`` above the current
    version) are never deleted.  Old snapshot files go by the same rule; the current one stays."""
    try:
        retain = float(retain_seconds)
    except (TypeError, ValueError):
        raise ZooError(f"retain_seconds: {retain_seconds!r} is not a number") from None
    if not math.isfinite(retain) or retain < 0:
        raise ZooError(f"retain_seconds: must be a finite number >= 0, got {retain_seconds!r}")
    try:
        root = resolve(uri)
    except StorageError as exc:
        raise ZooError(str(exc)) from exc
    _read_layout(root)                                   # a zoo, or a clear error
    cutoff_ns = int((time.time() - retain) * 1e9)
    # 1. the manifest first (anything published after this point is newer than what we delete)
    version, current_rel = _read_current(root)
    snaps: dict[int, pafs.FileInfo] = {}
    for info in list_files(root.join("_manifest"), ".parquet"):
        m = _SNAPSHOT_NAME.match(info.base_name)
        if m:
            snaps[int(m.group(1))] = info
    ordered = sorted(snaps)
    keep_snaps: set[int] = set()
    for i, v in enumerate(ordered):
        successor = snaps[ordered[i + 1]] if i + 1 < len(ordered) else None
        if v >= version or successor is None or _recent(successor, cutoff_ns):
            keep_snaps.add(v)
    views = [_read_snapshot(root, current_rel)]
    views += [_read_snapshot(root, f"_manifest/{snaps[v].base_name}") for v in sorted(keep_snaps)
              if f"_manifest/{snaps[v].base_name}" != current_rel]
    if version > 0 and ordered and ordered[0] == 1 and _recent(snaps[1], cutoff_ns):
        views.append(({}, {}))                           # the entries alone (before the first snapshot)
    entries = _list_entries(root)
    wanted: dict[str, pafs.FileInfo] = {}
    for snap, snap_mtimes in views:
        wanted.update(_newer_entries(entries, snap, snap_mtimes))
    entry_rows, _, corrupt = _read_entries(root, sorted(wanted.items()))
    protected: set[str] = set()
    for snap, snap_mtimes in views:
        protected |= {r["file"] for r in snap.values()}
        protected |= {entry_rows[mid]["file"] for mid, _ in _newer_entries(entries, snap, snap_mtimes)
                      if mid in entry_rows}
    current_snap, current_mtimes = views[0]
    current_newer = {mid for mid, _ in _newer_entries(entries, current_snap, current_mtimes)}
    live = set()                                         # exactly what open_zoo reads now
    for mid in entries:
        r = entry_rows.get(mid) if mid in current_newer else current_snap.get(mid)
        if r is not None:
            live.add(r["file"])
    # an unreadable entry may still name its member's file: keep that file (a resume rebuilds the member)
    unsure = {f"member={mid}.parquet" for mid in corrupt}
    # 2. then the data files
    deleted, kept, freed = [], [], 0
    to_delete = []
    for info in list_files(root.join("blocks"), ".parquet") + list_files(root.join("compacted"), ".parquet"):
        rel = posixpath.relpath(info.path, root.path)
        if rel in live:
            continue
        m = _COMPACTED_DIR.match(rel)
        if rel in protected or info.base_name in unsure or (m and int(m.group(1)) > version) \
                or _recent(info, cutoff_ns):
            kept.append(root.join(rel).uri)
        else:
            to_delete.append((rel, info))
    shard_infos = {posixpath.relpath(i.path, root.path): i for i in _list_shards(root)}
    shard_rows = _shard_members(_read_shards(root, list(shard_infos.values())))
    listed = {mid: info.mtime_ns or 0 for mid, info in entries.items()}
    current_in_snap = {mid: t for mid, t in current_mtimes.items() if mid in current_snap}
    for rel in _covered_shards(shard_rows, listed, current_in_snap):
        to_delete.append((rel, shard_infos[rel]))
    for rel, info in shard_infos.items():               # unreadable (torn): indexes nothing; by the window
        if rel not in shard_rows and not _recent(info, cutoff_ns):
            to_delete.append((rel, info))
    for v in ordered:
        rel = f"_manifest/{snaps[v].base_name}"
        if v not in keep_snaps and rel != current_rel and not _recent(snaps[v], cutoff_ns):
            to_delete.append((rel, snaps[v]))
    for rel, info in to_delete:                          # data files first, then shards, snapshots last
        loc = root.join(rel)
        if not dry_run:
            delete(loc)
        deleted.append(loc.uri)
        freed += max(0, info.size or 0)
    if not dry_run and not root.is_s3:                   # empty compacted/v<N> folders (only vacuum empties them)
        for d in sorted({posixpath.dirname(rel) for rel, _ in to_delete if _COMPACTED_DIR.match(rel)}):
            try:
                os.rmdir(root.join(d).path)
            except OSError:
                pass
    return VacuumReport(version=version, live=len(live), deleted=deleted, freed_bytes=freed, kept=kept,
                        dry_run=dry_run)


def live_files(uri: str) -> list[str]:
    """URIs of exactly the files the zoo's current manifest reads (see :meth:`Zoo.live_files`)."""
    return open_zoo(uri).live_files()


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def duckdb_source(zoo: Zoo) -> str:
    """A duckdb table expression over exactly the zoo's rows: ``read_parquet([...live files...])``,
    with a row filter on the compacted files that also hold superseded members (if any)."""
    files = zoo.live_files()
    if not files:
        raise ZooError(f"zoo at {zoo.root.describe()} has no members")
    listed = "[" + ", ".join(map(_sql_str, files)) + "]"
    filters = zoo.row_filters()
    if not filters:
        return f"read_parquet({listed})"
    shared = ", ".join(map(_sql_str, filters))
    keep = " OR ".join(f"(filename = {_sql_str(f)} AND member_id IN ({', '.join(map(_sql_str, mids))}))"
                       for f, mids in filters.items())
    return (f"(SELECT * EXCLUDE (filename) FROM read_parquet({listed}, filename = true) "
            f"WHERE filename NOT IN ({shared}) OR {keep})")
