"""Stage folders shared between runs: named after a hash of the stage's effective config, built once
under a file lock when several runs (sweep trials) reach the same stage together."""

from __future__ import annotations

import contextlib
import fcntl          # POSIX only, as Ray itself
import hashlib
import json
import os
from typing import Any, Iterator

__all__ = ["stage_hash", "stage_lock"]


def stage_hash(obj: Any, n: int = 8) -> str:
    """A short stable hash of a JSON-able config (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@contextlib.contextmanager
def stage_lock(folder: str, name: str) -> Iterator[None]:
    """An exclusive file lock ``<folder>/.lock-<name>`` so concurrent runs build a shared stage once.
    Object stores (``s3://``) and an empty ``folder`` get no lock."""
    if not folder or "://" in folder:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".lock-{name}"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
