"""``rayweights zoo-info URI [--verify]``, ``compact URI``, ``vacuum URI`` and ``zoo-files URI``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..errors import UserError, job_main
from .reader import compact_zoo, open_zoo
from .vacuum import DEFAULT_RETAIN_SECONDS, duckdb_source, vacuum_zoo

__all__ = ["info_main", "compact_main", "vacuum_main", "files_main"]


@job_main
def info_main(argv: Sequence[str] | None = None) -> int:
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
    p = argparse.ArgumentParser(prog="rayweights compact", description="compact a zoo's member files")
    p.add_argument("uri")
    p.add_argument("--target-rows", type=int, default=1_000_000)
    a = p.parse_args(argv)
    v = compact_zoo(a.uri, a.target_rows)
    print(f"compacted {a.uri}: manifest v{v} (the superseded files stay for readers; "
          "`rayweights vacuum` deletes them once the retention window has passed)")
    return 0


@job_main
def vacuum_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rayweights vacuum",
        description="delete a zoo's files that no manifest a reader could hold references: files superseded "
                    "by compaction, or left by a write that died before its entry, older than the retention "
                    "window, and old manifest snapshots. Readers must finish within the window.")
    p.add_argument("uri")
    p.add_argument("--retain-hours", type=float, default=DEFAULT_RETAIN_SECONDS / 3600,
                   help="retention window in hours (default %(default)g); 0 deletes everything the current "
                        "manifest does not reference: only while nothing reads, builds or compacts the zoo")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    a = p.parse_args(argv)
    if not a.retain_hours >= 0 or a.retain_hours == float("inf"):
        raise UserError(f"--retain-hours: must be a finite number >= 0, got {a.retain_hours:g}")
    if a.retain_hours == 0:
        print("warning: --retain-hours 0: files a running reader, build or compaction still needs may be deleted",
              file=sys.stderr)
    r = vacuum_zoo(a.uri, retain_seconds=a.retain_hours * 3600, dry_run=a.dry_run)
    if a.dry_run:
        for uri in r.deleted:
            print(uri)
    verb = "would delete" if a.dry_run else "deleted"
    print(f"vacuum {a.uri} (manifest v{r.version}, {r.live} live files, retention {a.retain_hours:g} h): "
          f"{verb} {len(r.deleted)} file(s), {r.freed_bytes / 1e6:.1f} MB; kept {len(r.kept)} unreferenced "
          "file(s) inside the window", file=sys.stderr if a.dry_run else sys.stdout)
    return 0


@job_main
def files_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rayweights zoo-files",
        description="print the files a zoo's current manifest reads (for duckdb, polars, Spark: never glob "
                    "blocks/**, which also finds superseded files and unfinished writes)")
    p.add_argument("uri")
    p.add_argument("--format", choices=["lines", "json", "duckdb"], default="lines",
                   help="lines: one URI per line; json: files, members, version and row filters; duckdb: a "
                        "table expression (read_parquet([...]) with any row filter)")
    a = p.parse_args(argv)
    zoo = open_zoo(a.uri)
    if a.format == "duckdb":
        print(duckdb_source(zoo))
        return 0
    filters = zoo.row_filters()
    if a.format == "json":
        print(json.dumps({"uri": zoo.uri, "version": zoo.version, "members": len(zoo),
                          "files": zoo.live_files(), "row_filters": filters}, indent=1))
        return 0
    for uri in zoo.live_files():
        print(uri)
    if filters:
        print(f"warning: {len(filters)} compacted file(s) also hold rows of members rewritten after the compaction; "
              "use --format duckdb or json for the row filter, or compact again", file=sys.stderr)
    return 0
