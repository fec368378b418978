"""The on-storage format of a zoo's tables: file names, Parquet schemas, manifest records, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import pyarrow as pa
import torch

from ..blocks import LayoutError, WeightLayout
from ..errors import UserError, check_id
from ..storage import Location, read_bytes

__all__ = ["ZooError", "BadMember", "CheckpointRecord", "block_schema", "LAYOUT_FILE", "CURRENT_FILE",
           "MANIFEST_VERSION", "MEMBER_COLUMNS", "SHARDS_DIR"]


LAYOUT_FILE = "layout.json"
CURRENT_FILE = "_manifest/CURRENT"
SHARDS_DIR = "_manifest/shards"                  # manifest shards: batches of entry rows written by builds
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
# A manifest shard (``_manifest/shards/<uuid>.parquet``): snapshot rows of the entries a build wrote, each
# with what identifies the entry object it copies: its storage mtime, byte size and md5.  A reader takes a
# row instead of GETting the entry only when the listing shows that very object (see reader._shard_row_matches).
_SHARD_SCHEMA = pa.schema([*_SNAPSHOT_SCHEMA, ("entry_size", pa.int64()), ("entry_md5", pa.string())])


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


