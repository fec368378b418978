"""``rayweights zoo-info URI [--verify]`` and ``rayweights compact URI``."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from ..errors import job_main
from .reader import compact_zoo, open_zoo

__all__ = ["info_main", "compact_main"]


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
    print(f"compacted {a.uri}: manifest v{v}")
    return 0
