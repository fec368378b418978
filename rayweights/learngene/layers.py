"""Layer types: which parameters of a model share learngenes, and which block each belongs to.

A :class:`LayerType` names one kind of weight matrix that repeats over a network's depth
(an attention q projection, an MLP input layer, a 3x3 conv of a residual block) by a regular
expression over parameter names.  The expression must match the *whole* name; its first
capture group (or the named group ``block``) is the block index.  Indices are ranked, not used
as-is, so ``(\\d+)\\.conv1\\.weight`` works for ``nn.Sequential`` children numbered 3, 4, 5.
An expression without a group matches one parameter (a stem or a head: a "depth-1" type).

Every parameter of one type must have the same shape in one model (U and V are shared);
layers of different widths (the levels of a UNet) are separate types.  ``ndim`` optionally
restricts a pattern to tensors of that rank (``(\\d+)\\.weight`` + ``ndim: 2`` = the Linear in
a Sequential, not its BatchNorms).

``out_chunks`` / ``in_chunks`` say that the output rows / input columns are a concatenation of
segments that are resized separately when the width changes: an int k (k equal parts: GEGLU's
[value, gate] is 2, attention heads are ``num_heads``) or explicit sizes (a UNet up-block's input
[h, skip] is ``[c_h, c_skip]``).  Source and target must have the same number of segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from ..errors import UserError

__all__ = ["LayerType", "LearngeneError", "match_layer_types", "LayerMatch"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class LearngeneError(UserError, ValueError):
    """Bad layer types, incompatible shapes, or a malformed learngene file (message names it)."""


@dataclass
class LayerType:
    name: str
    pattern: str
    ndim: int | None = None
    out_chunks: int | list[int] | None = None
    in_chunks: int | list[int] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"layer_types.name: {self.name!r} must be an identifier ([A-Za-z_][A-Za-z0-9_-]*)")
        try:
            rx = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"layer_types[{self.name}].pattern: invalid regex {self.pattern!r}: {exc}") from None
        if rx.groups > 1 and "block" not in rx.groupindex:
            raise ValueError(f"layer_types[{self.name}].pattern: more than one capture group; "
                             "name the block index (?P<block>...)")
        if self.ndim is not None and self.ndim < 2:
            raise ValueError(f"layer_types[{self.name}].ndim: must be >= 2 (a matrix or a conv kernel)")
        for f in ("out_chunks", "in_chunks"):
            v = getattr(self, f)
            if v is None:
                continue
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, (list, tuple)) and v
                                                                   and all(isinstance(x, int) for x in v))):
                raise ValueError(f"layer_types[{self.name}].{f}: expected an int or a list of ints, got {v!r}")
            if (isinstance(v, int) and v < 1) or (not isinstance(v, int) and min(v) < 1):
                raise ValueError(f"layer_types[{self.name}].{f}: segments must be >= 1, got {v!r}")

    def to_dict(self) -> dict:
        d = {"name": self.name, "pattern": self.pattern, "ndim": self.ndim}
        for f in ("out_chunks", "in_chunks"):
            if getattr(self, f) is not None:
                d[f] = getattr(self, f) if isinstance(getattr(self, f), int) else list(getattr(self, f))
        return d

    def split(self, which: str, dim: int) -> list[int]:
        """Segment sizes of the out (``which="out"``) or in dimension of size ``dim``."""
        v = self.out_chunks if which == "out" else self.in_chunks
        if v is None:
            return [dim]
        if isinstance(v, int):
            if dim % v:
                raise LearngeneError(f"layer type {self.name!r}: {which} dimension {dim} is not divisible "
                                     f"into {v} chunks")
            return [dim // v] * v
        if sum(v) != dim:
            raise LearngeneError(f"layer type {self.name!r}: {which}_chunks {list(v)} do not sum to {dim}")
        return list(v)

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)

    def block_of(self, param_name: str) -> str | None:
        """The raw block label of ``param_name`` ("" for a group-less pattern), None if no match."""
        m = self.regex.fullmatch(param_name)
        if m is None:
            return None
        if self.regex.groups == 0:
            return ""
        return m.group("block") if "block" in self.regex.groupindex else m.group(1)


@dataclass
class LayerMatch:
    """The parameters of one layer type in one model, in block order."""

    layer_type: LayerType
    params: list[str]
    shape: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.params)

    @property
    def out_dim(self) -> int:
        return self.shape[0]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def out_split(self) -> list[int]:
        return self.layer_type.split("out", self.shape[0])

    @property
    def in_split(self) -> list[int]:
        return self.layer_type.split("in", self.shape[1])


def _sort_key(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def match_layer_types(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      layer_types: Sequence[LayerType], where: str = "model",
                      require_all: bool = False) -> dict[str, LayerMatch]:
    """Assign parameters to layer types.  Errors (naming the parameter) when a name matches two
    types, a type's tensors differ in shape, or a matched tensor is not at least 2-D.  A type
    that matches nothing is left out (or is an error with ``require_all``)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    names = [lt.name for lt in layer_types]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LearngeneError(f"layer_types: duplicate name(s) {', '.join(dup)}")
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {lt.name: {} for lt in layer_types}
    owner: dict[str, str] = {}
    for pname, t in items:
        for lt in layer_types:
            label = lt.block_of(pname)
            if label is None or (lt.ndim is not None and t.dim() != lt.ndim):
                continue
            if pname in owner:
                raise LearngeneError(f"{where}: parameter {pname!r} matches layer types "
                                     f"{owner[pname]!r} and {lt.name!r}")
            if t.dim() < 2:
                raise LearngeneError(f"{where}: layer type {lt.name!r} matched {pname!r} of shape "
                                     f"{tuple(t.shape)}; only matrices / conv kernels are decomposed")
            if label in found[lt.name]:
                raise LearngeneError(f"{where}: layer type {lt.name!r} has two parameters for block "
                                     f"{label!r}: {found[lt.name][label][0]!r} and {pname!r}")
            owner[pname] = lt.name
            found[lt.name][label] = (pname, t)
    out: dict[str, LayerMatch] = {}
    for lt in layer_types:
        hits = found[lt.name]
        if not hits:
            if require_all:
                raise LearngeneError(f"{where}: layer type {lt.name!r} (pattern {lt.pattern!r}) matches no parameter")
            continue
        ordered = [hits[k] for k in sorted(hits, key=_sort_key)]
        shapes = {tuple(t.shape) for _, t in ordered}
        if len(shapes) > 1:
            detail = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in ordered)
            raise LearngeneError(f"{where}: layer type {lt.name!r} mixes shapes ({detail}); "
                                 "U and V are shared, so split it into one type per shape")
        mt = LayerMatch(lt, [n for n, _ in ordered], tuple(ordered[0][1].shape))
        mt.out_split, mt.in_split  # noqa: B018  (validates the chunk spec against the shape)
        out[lt.name] = mt
    return out
