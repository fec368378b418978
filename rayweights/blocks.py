"""The weight tokenizer: state_dicts <-> fixed-size weight blocks.

A :class:`WeightLayout` records, for a family of state_dicts with identical names/shapes/dtypes,
how parameters are grouped (a registered *grouping rule*), where each parameter sits inside its
group, and how every group is zero-padded to a multiple of ``block_size`` and cut into blocks.
Concatenating a checkpoint's blocks in block order gives the padded flat vector, so block-wise
generators (Denoised Weights) and whole-vector generators (p-diff, D2NWG) read the same data.

Grouping rules (Denoised Neural Weights, Sec. 5 ablation):

1. per layer *i*: its LoRA down, LoRA up, then its norm layer, each flattened and appended;
2. the same groups, but the tensors are concatenated along the channel dimension (dim 0) before
   flattening: channel *c* of every tensor of the group sits together (channel-interleaved);
3. every tensor its own group.

"Layer" = the module owning a parameter, with LoRA sub-modules (``lora_down``/``lora_up``/
``lora_A``/``lora_B``) folded into their host, and a module holding only 1-D tensors (BN, LN,
GN) attached to the preceding layer ("then its BN").  More rules can be added with
:func:`register_rule`.

Tokenize -> detokenize is bit-exact for float32, float16 and bfloat16 (every such value is exactly
representable in float32).  Per-group normalisation (mean/std fitted over a zoo) is kept in the
layout and applied/undone on block tensors with :meth:`WeightLayout.normalize` /
:meth:`WeightLayout.denormalize`; padding stays exactly zero.

One module (~540 lines): the grouping rules, the tokenizer and the normalisation share the layout's
index maps and its JSON form (``layout.json``, a stored format) and change together.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from .errors import UserError

__all__ = ["WeightLayout", "ParamSpec", "GroupSpec", "LayoutError", "GROUPING_RULES",
           "register_rule", "FORMAT_VERSION"]

FORMAT_VERSION = "rayweights.layout/1"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# per-tensor stats model these tensors as log(x) when every zoo value is positive (BatchNorm variances)
LOG_SUFFIXES = ("running_var",)
_LORA_RE = re.compile(r"(^|\.)(lora_down|lora_up|lora_A|lora_B|lora_a|lora_b)(\.default)?$")
_LORA_NAME_RE = re.compile(r"(^|\.)(lora_down|lora_up|lora_A|lora_B|lora_a|lora_b)(\.|$)")


class LayoutError(UserError, ValueError):
    """A state_dict, block tensor or layout file does not match the layout (names the parameter)."""


# --------------------------------------------------------------------------- grouping rules
Entry = tuple[str, tuple[int, ...]]
GroupDef = tuple[str, list[str], bool]          # (group name, parameter names, channel-interleave)
GROUPING_RULES: dict[int | str, Callable[[Sequence[Entry]], list[GroupDef]]] = {}


def register_rule(key: int | str):
    """Register a grouping rule: ``fn(entries: [(name, shape)]) -> [(group, [names], interleave)]``."""

    def deco(fn):
        GROUPING_RULES[key] = fn
        return fn

    return deco


def _layer_of(name: str) -> str:
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return _LORA_RE.sub("", module)


def _layer_groups(entries: Sequence[Entry]) -> list[tuple[str, list[str]]]:
    order: list[str] = []
    members: dict[str, list[Entry]] = {}
    for name, shape in entries:
        layer = _layer_of(name)
        if layer not in members:
            members[layer] = []
            order.append(layer)
        members[layer].append((name, shape))
    groups: list[tuple[str, list[str], bool]] = []  # name, params, has_matrix
    for layer in order:
        ents = members[layer]
        only_vectors = all(len(s) <= 1 for _, s in ents)
        if only_vectors and groups and groups[-1][2]:
            groups[-1][1].extend(n for n, _ in ents)   # "then its BN"
            groups[-1] = (groups[-1][0], groups[-1][1], False)  # a layer takes one norm
        else:
            groups.append((layer or "<root>", [n for n, _ in ents], not only_vectors))
    return [(g, names) for g, names, _ in groups]


@register_rule(1)
def _rule_append(entries: Sequence[Entry]) -> list[GroupDef]:
    return [(g, names, False) for g, names in _layer_groups(entries)]


@register_rule(2)
def _rule_channel_concat(entries: Sequence[Entry]) -> list[GroupDef]:
    return [(g, names, True) for g, names in _layer_groups(entries)]


@register_rule(3)
def _rule_per_tensor(entries: Sequence[Entry]) -> list[GroupDef]:
    return [(name, [name], False) for name, _ in entries]


# --------------------------------------------------------------------------- selection
def _norm_layers(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Modules that look like normalisation layers: only 1-D float params, with a weight."""
    mods: dict[str, list[str]] = {}
    for name, t in sd.items():
        mods.setdefault(_layer_of(name), []).append(name)
    out = []
    for mod, names in mods.items():
        floats = [n for n in names if torch.is_floating_point(sd[n])]
        if not floats:
            continue
        has_running = any(n.endswith("running_mean") for n in names)
        vectors = all(sd[n].dim() <= 1 for n in floats)
        if has_running or (vectors and any(n.endswith("weight") for n in floats)):
            out.append(mod)
    return out


def _select(sd: Mapping[str, torch.Tensor], select) -> list[str]:
    floats = [n for n, t in sd.items() if torch.is_tensor(t) and torch.is_floating_point(t)]
    if select is None or select == "all":
        return floats
    if isinstance(select, str):
        if select == "lora":
            names = [n for n in floats if _LORA_NAME_RE.search(n)]
        elif select in ("norm", "bn"):
            norms = set(_norm_layers(sd))
            names = [n for n in floats if _layer_of(n) in norms and n.rsplit(".", 1)[-1] in ("weight", "bias")]
        elif m := re.fullmatch(r"(norm-)?last:(\d+)", select):
            k = int(m.group(2))
            if m.group(1):
                layers = _norm_layers(sd)[-k:] if k else []
                names = [n for n in floats if _layer_of(n) in set(layers) and n.rsplit(".", 1)[-1] in ("weight", "bias")]
            else:
                layers: list[str] = []
                for n in floats:
                    layer = _layer_of(n)
                    if layer not in layers:
                        layers.append(layer)
                keep = set(layers[-k:]) if k else set()
                names = [n for n in floats if _layer_of(n) in keep]
        else:
            raise LayoutError(f"select: unknown keyword {select!r} (all, lora, norm, last:K, norm-last:K, or a list of regexes)")
    elif isinstance(select, (list, tuple)):
        pats = [re.compile(p) for p in select]
        names = [n for n in floats if any(p.search(n) for p in pats)]
    else:
        raise LayoutError(f"select: expected None, a keyword or a list of regexes, got {type(select).__name__}")
    if not names:
        raise LayoutError(f"select={select!r} matched no floating-point parameter")
    return names


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int
    offset: int          # offset inside the group's unpadded (rule-1 order) vector
    mean: float | None = None     # per-tensor normalisation stats (``fit_stats(by="tensor")``)
    std: float | None = None
    transform: str | None = None  # "log": normalised as log(x) (a positive tensor, e.g. BN running_var)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class GroupSpec:
    name: str
    params: tuple[str, ...]
    numel: int
    num_blocks: int
    first_block: int
    interleave: bool = False
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True, eq=True)
class WeightLayout:
    block_size: int
    rule: int | str
    params: tuple[ParamSpec, ...]
    groups: tuple[GroupSpec, ...]
    excluded: tuple[str, ...] = ()
    select: str | None = None
    # ``fit_stats(by="element")``: the zoo's mean at every position (float32 bytes, [num_blocks, block_size],
    # in the tensor's transformed space), subtracted before the per-tensor std of the residuals divides
    position_mean: bytes | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], rule: int | str = 1, block_size: int = 256,
                        select=None) -> "WeightLayout":
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise LayoutError(f"block_size must be a positive integer, got {block_size!r}")
        if rule not in GROUPING_RULES:
            raise LayoutError(f"rule: unknown grouping rule {rule!r} (registered: {sorted(map(str, GROUPING_RULES))})")
        names = _select(sd, select)
        for n in names:
            if sd[n].dtype not in _DTYPE_NAMES:
                raise LayoutError(f"{n}: dtype {sd[n].dtype} is not supported (float32, float16, bfloat16)")
        entries = [(n, tuple(sd[n].shape)) for n in names]
        defs = GROUPING_RULES[rule](entries)
        seen = [n for _, ns, _ in defs for n in ns]
        if sorted(seen) != sorted(names):
            raise LayoutError(f"rule {rule!r} must place every selected parameter exactly once")
        params: list[ParamSpec] = []
        groups: list[GroupSpec] = []
        first = 0
        for gi, (gname, gnames, interleave) in enumerate(defs):
            off = 0
            for n in gnames:
                p = ParamSpec(n, tuple(sd[n].shape), _DTYPE_NAMES[sd[n].dtype], gi, off)
                params.append(p)
                off += p.numel
            nb = max(1, -(-off // block_size))
            groups.append(GroupSpec(gname, tuple(gnames), off, nb, first, bool(interleave)))
            first += nb
        excluded = tuple(n for n in sd if n not in set(names))
        sel = None if select is None else json.dumps(select) if not isinstance(select, str) else select
        return cls(block_size, rule, tuple(params), tuple(groups), excluded, sel)

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        g = self.groups[-1]
        return g.first_block + g.num_blocks

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def has_stats(self) -> bool:
        return all(g.mean is not None and g.std is not None for g in self.groups)

    @property
    def stats_by(self) -> str | None:
        """``"element"`` (a mean per position, a std per tensor), ``"tensor"`` (every parameter tensor
        has its own mean/std), ``"group"`` or None (no stats)."""
        if not self.has_stats:
            return None
        if self.position_mean is not None:
            return "element"
        return "tensor" if all(p.mean is not None and p.std is not None for p in self.params) else "group"

    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def block_group(self) -> torch.Tensor:
        """int64 [num_blocks]: group id of every block."""
        return self._cached("block_group", lambda: torch.repeat_interleave(
            torch.arange(len(self.groups)), torch.tensor([g.num_blocks for g in self.groups])))

    @property
    def valid_mask(self) -> torch.Tensor:
        """bool [num_blocks, block_size]: True where a real weight (not padding) sits."""
        def build():
            mask = torch.zeros(self.num_blocks * self.block_size, dtype=torch.bool)
            for g in self.groups:
                s = g.first_block * self.block_size
                mask[s:s + g.numel] = True
            return mask.view(self.num_blocks, self.block_size)
        return self._cached("valid_mask", build)

    def _global_offsets(self) -> list[int]:
        def build():
            return [self.groups[p.group].first_block * self.block_size + p.offset for p in self.params]
        return self._cached("offsets", build)

    def _pieces(self, gi: int) -> list[tuple[int, int, int, int, int, int]]:
        """Rule-2 plan for group ``gi`` as strided copies, no index arrays.

        Tensors are viewed as [rows_i, cols_i] (rows = channel dim 0).  Output order is channel
        by channel: row c of every tensor with rows_i > c, in tensor order.  Between consecutive
        distinct row counts the set of active tensors is fixed, so each tensor's rows land at a
        constant stride: piece = (param index, row0, row1, dst start, stride, column offset).
        """
        def build():
            g = self.groups[gi]
            members = [(i, p) for i, p in enumerate(self.params) if p.group == gi]
            dims = []
            for i, p in members:
                rows = p.shape[0] if len(p.shape) >= 1 else 1
                dims.append((i, rows, p.numel // rows if rows else 0))
            cuts = sorted({0} | {r for _, r, _ in dims})
            fixed, seg = [], g.first_block * self.block_size
            for r0, r1 in zip(cuts[:-1], cuts[1:]):
                active = [(i, cols) for i, rows, cols in dims if rows >= r1]
                stride = sum(c for _, c in active)
                col = 0
                for i, cols in active:
                    if cols:
                        fixed.append((i, r0, r1, seg, stride, col))
                    col += cols
                seg += (r1 - r0) * stride
            assert seg - g.first_block * self.block_size == g.numel
            return fixed
        return self._cached(("pieces", gi), build)

    # ------------------------------------------------------------------ tokenize
    def check_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Raise LayoutError naming the first missing/extra/misshaped parameter."""
        known = set(self.param_names)
        for p in self.params:
            if p.name not in sd:
                raise LayoutError(f"{p.name}: missing from the state_dict")
            t = sd[p.name]
            if tuple(t.shape) != p.shape:
                raise LayoutError(f"{p.name}: shape {tuple(t.shape)} does not match the layout's {p.shape}")
            if _DTYPE_NAMES.get(t.dtype) != p.dtype:
                raise LayoutError(f"{p.name}: dtype {t.dtype} does not match the layout's {p.dtype}")
        excluded = set(self.excluded)
        for n in sd:
            if n not in known and n not in excluded:
                raise LayoutError(f"{n}: extra parameter not in the layout")

    def tokenize_flat(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.check_state_dict(sd)
        out = torch.empty(self.num_blocks * self.block_size, dtype=torch.float32)
        for g in self.groups:   # zero only the padding tails (every weight position is written below)
            s = g.first_block * self.block_size
            out[s + g.numel:s + g.num_blocks * self.block_size].zero_()
        for p, off in zip(self.params, self._global_offsets()):
            if not self.groups[p.group].interleave:
                out[off:off + p.numel].copy_(sd[p.name].detach().reshape(-1))
        for gi, g in enumerate(self.groups):
            if g.interleave:
                for i, r0, r1, dst, stride, col in self._pieces(gi):
                    p = self.params[i]
                    t2d = sd[p.name].detach().reshape(max(p.shape[0], 1) if p.shape else 1, -1)
                    cols = t2d.shape[1]
                    out[dst:dst + (r1 - r0) * stride].view(r1 - r0, stride)[:, col:col + cols].copy_(t2d[r0:r1])
        return out

    def tokenize(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 [num_blocks, block_size], zero-padded per group."""
        return self.tokenize_flat(sd).view(self.num_blocks, self.block_size)

    def detokenize(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`tokenize`: original names, shapes and dtypes, bit-exact."""
        if not torch.is_tensor(blocks):
            raise LayoutError(f"blocks: expected a tensor, got {type(blocks).__name__}")
        expect = (self.num_blocks, self.block_size)
        if blocks.dim() == 1 and blocks.numel() == self.num_blocks * self.block_size:
            flat = blocks
        elif tuple(blocks.shape) == expect:
            flat = blocks.reshape(-1)
        else:
            raise LayoutError(f"blocks: shape {tuple(blocks.shape)} does not match the layout's {expect} "
                              f"(block_size {self.block_size})")
        flat = flat.detach().to(torch.float32)
        out = {}
        for p, off in zip(self.params, self._global_offsets()):
            if not self.groups[p.group].interleave:
                out[p.name] = flat[off:off + p.numel].reshape(p.shape).to(_DTYPES[p.dtype], copy=True)
        for gi, g in enumerate(self.groups):
            if g.interleave:
                bufs = {}
                for i, r0, r1, dst, stride, col in self._pieces(gi):
                    p = self.params[i]
                    rows = p.shape[0] if p.shape else 1
                    t2d = bufs.setdefault(i, torch.empty(rows, p.numel // max(rows, 1), dtype=_DTYPES[p.dtype]))
                    t2d[r0:r1].copy_(flat[dst:dst + (r1 - r0) * stride].view(r1 - r0, stride)[:, col:col + t2d.shape[1]])
                for i, t2d in bufs.items():
                    out[self.params[i].name] = t2d.reshape(self.params[i].shape)
                for i, p in enumerate(self.params):   # empty tensors have no pieces
                    if p.group == gi and p.name not in out:
                        out[p.name] = torch.empty(p.shape, dtype=_DTYPES[p.dtype])
        return {p.name: out[p.name] for p in self.params}

    # ------------------------------------------------------------------ normalisation
    def fit_stats(self, blocks: torch.Tensor, eps: float = 1e-8, by: str = "group") -> "WeightLayout":
        """Per-group mean/std over real weights of ``blocks`` [N, num_blocks, block_size]; with
        ``by="tensor"`` also every parameter tensor's own mean/std, which :meth:`normalize` then uses
        (a group mixes tensors of different scales: a layer's weights ~0 with its BatchNorm scale ~1
        and running variance > 0; one group mean/std leaves those far off zero in normalised space).

        ``by="element"``: the mean of every *position* over the N weight sets and, per tensor, the std
        of the residuals around it.  For zoos whose members share a starting point (``init: shared``,
        LoRA adapters from one initialisation) most of a tensor's spread is that common pattern; here
        it is subtracted, so normalised zeros decode to the zoo's average and the generator models only
        how members differ (what a condition can explain)."""
        if by not in ("group", "tensor", "element"):
            raise LayoutError(f"by: {by!r} is not group, tensor or element")
        if blocks.dim() == 2:
            blocks = blocks.unsqueeze(0)
        if tuple(blocks.shape[1:]) != (self.num_blocks, self.block_size):
            raise LayoutError(f"blocks: shape {tuple(blocks.shape)} does not match (N, {self.num_blocks}, {self.block_size})")
        x = blocks.to(torch.float64)
        mask = self.valid_mask.to(torch.float64)
        bg = self.block_group
        per_block_sum = (x * mask).sum(dim=(0, 2))
        per_block_sq = (x * x * mask).sum(dim=(0, 2))
        G = len(self.groups)
        s = torch.zeros(G, dtype=torch.float64).index_add_(0, bg, per_block_sum)
        sq = torch.zeros(G, dtype=torch.float64).index_add_(0, bg, per_block_sq)
        count = torch.tensor([max(g.numel, 1) for g in self.groups], dtype=torch.float64) * x.shape[0]
        mean = s / count
        std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(eps)
        groups = tuple(dataclasses.replace(g, mean=float(m), std=float(sd))
                       for g, m, sd in zip(self.groups, mean.tolist(), std.tolist()))
        params = tuple(dataclasses.replace(p, mean=None, std=None, transform=None) for p in self.params)
        position_mean = None
        if by in ("tensor", "element"):
            flat = x.reshape(x.shape[0], -1)
            pos = self._param_index().reshape(-1)
            pmean = torch.zeros(flat.shape[1], dtype=torch.float64)
            params = []
            for i, p in enumerate(self.params):
                sel = pos == i
                v = flat[:, sel]
                # a variance is modelled as its log, so every generated variance is positive (a
                # denoiser's error around a small variance otherwise crosses zero: an invalid network)
                log = p.name.endswith(LOG_SUFFIXES) and v.numel() > 0 and bool((v > 0).all())
                if log:
                    v = v.log()
                if by == "element":
                    m = v.mean(0)
                    pmean[sel] = m
                    mean, std = float(m.mean()), float((v - m).pow(2).mean().sqrt())
                else:
                    mean, std = float(v.mean()), float(v.std(unbiased=False))
                params.append(dataclasses.replace(p, mean=mean, std=max(std, eps), transform="log" if log else None))
            params = tuple(params)
            if by == "element":
                position_mean = pmean.to(torch.float32).numpy().tobytes()
        return dataclasses.replace(self, params=params, groups=groups, position_mean=position_mean, _cache={})

    def position_mean_tensor(self) -> torch.Tensor | None:
        """float32 [num_blocks, block_size]: the per-position mean of ``by="element"`` stats, else None."""
        if self.position_mean is None:
            return None
        return self._cached("position_mean", lambda: torch.frombuffer(bytearray(self.position_mean), dtype=torch.float32)
                            .view(self.num_blocks, self.block_size).clone())

    def _param_index(self) -> torch.Tensor:
        """int64 [num_blocks, block_size]: which parameter tensor sits at each position (-1: padding)."""
        def build():
            f32 = dataclasses.replace(self, params=tuple(dataclasses.replace(p, dtype="float32") for p in self.params),
                                      _cache={})             # exact indices whatever the tensors' dtype
            idx = f32.tokenize({p.name: torch.full(p.shape, float(i)) for i, p in enumerate(self.params)}).round().long()
            return torch.where(self.valid_mask, idx, torch.full_like(idx, -1))
        return self._cached("param_index", build)

    def _stat_vectors(self, device, dtype):
        """(mean, std, valid mask, log mask or None) broadcastable to [num_blocks, block_size]; built
        once per (device, dtype): normalize/denormalize run on every training step."""
        if not self.has_stats:
            raise LayoutError("layout has no normalisation stats: call fit_stats first")
        return self._cached(("stats", str(device), dtype), lambda: self._build_stat_vectors(device, dtype))

    def _build_stat_vectors(self, device, dtype):
        if self.stats_by in ("tensor", "element"):     # position-wise [num_blocks, block_size]
            pi = self._param_index().clamp_min(0).to(device)
            mean = torch.tensor([p.mean for p in self.params], dtype=dtype, device=device)[pi]
            if self.position_mean is not None:
                mean = self.position_mean_tensor().to(device=device, dtype=dtype)
            std = torch.tensor([p.std for p in self.params], dtype=dtype, device=device)[pi]
            valid = self.valid_mask.to(device)
            log = torch.tensor([p.transform == "log" for p in self.params], device=device)[pi] & valid
            return mean, std, valid.to(dtype), (log if bool(log.any()) else None)
        mean = torch.tensor([g.mean for g in self.groups], dtype=dtype, device=device)[self.block_group.to(device)]
        std = torch.tensor([g.std for g in self.groups], dtype=dtype, device=device)[self.block_group.to(device)]
        return mean[:, None], std[:, None], self.valid_mask.to(device=device, dtype=dtype), None

    def normalize(self, blocks: torch.Tensor, block_index: torch.Tensor | None = None) -> torch.Tensor:
        """(blocks - mean) / std on real weights (per group, or per tensor; a ``log`` tensor is
        standardised as log(x)); padding stays 0. ``blocks`` [..., nb, bs], or [..., bs] rows with
        their global ``block_index``."""
        mean, std, mask, log = self._stat_vectors(blocks.device, blocks.dtype)
        if block_index is not None:
            mean, std, mask = mean[block_index], std[block_index], mask[block_index]
            log = None if log is None else log[block_index]
        if log is not None:
            blocks = torch.where(log, blocks.clamp_min(torch.finfo(blocks.dtype).tiny).log(), blocks)
        return (blocks - mean) / std * mask

    def denormalize(self, blocks: torch.Tensor, block_index: torch.Tensor | None = None) -> torch.Tensor:
        mean, std, mask, log = self._stat_vectors(blocks.device, blocks.dtype)
        if block_index is not None:
            mean, std, mask = mean[block_index], std[block_index], mask[block_index]
            log = None if log is None else log[block_index]
        x = blocks * std + mean
        if log is not None:
            x = torch.where(log, x.exp(), x)
        return x * mask

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "rule": self.rule,
            "select": self.select,
            "num_blocks": self.num_blocks,
            "num_params": self.num_params,
            "params": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "group": p.group,
                        "offset": p.offset, **({"mean": p.mean, "std": p.std} if p.mean is not None else {}),
                        **({"transform": p.transform} if p.transform else {})}
                       for p in self.params],
            "groups": [{"name": g.name, "params": list(g.params), "numel": g.numel, "num_blocks": g.num_blocks,
                        "first_block": g.first_block, "padding": g.num_blocks * self.block_size - g.numel,
                        "interleave": g.interleave, "mean": g.mean, "std": g.std} for g in self.groups],
            "excluded": list(self.excluded),
            **({"position_mean": {"dtype": "float32", "shape": [self.num_blocks, self.block_size],
                                  "base64": base64.b64encode(self.position_mean).decode("ascii")}}
               if self.position_mean is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping) -> "WeightLayout":
        version = d.get("format_version") if isinstance(d, Mapping) else None
        if version != FORMAT_VERSION:
            raise LayoutError(f"layout format_version {version!r} is not supported (expected {FORMAT_VERSION!r})")
        try:
            params = tuple(ParamSpec(p["name"], tuple(p["shape"]), p["dtype"], p["group"], p["offset"],
                                     p.get("mean"), p.get("std"), p.get("transform")) for p in d["params"])
            groups = tuple(GroupSpec(g["name"], tuple(g["params"]), g["numel"], g["num_blocks"], g["first_block"],
                                     g.get("interleave", False), g.get("mean"), g.get("std")) for g in d["groups"])
            rule = d["rule"]
            pm = d.get("position_mean")
            position_mean = None if pm is None else base64.b64decode(pm["base64"], validate=True)
            layout = cls(int(d["block_size"]), rule, params, groups, tuple(d.get("excluded", ())), d.get("select"),
                         position_mean)
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"layout is malformed: missing or bad field {exc}") from exc
        if position_mean is not None and (pm.get("dtype") != "float32" or list(pm.get("shape", ())) !=
                                          [layout.num_blocks, layout.block_size] or
                                          len(position_mean) != 4 * layout.num_blocks * layout.block_size):
            raise LayoutError(f"layout: position_mean must be float32 [{layout.num_blocks}, {layout.block_size}]")
        for p in layout.params:
            if p.dtype not in _DTYPES:
                raise LayoutError(f"{p.name}: unknown dtype {p.dtype!r} in layout")
            if p.transform not in (None, "log"):
                raise LayoutError(f"{p.name}: unknown transform {p.transform!r} in layout (log or none)")
        return layout

    @classmethod
    def from_json(cls, text: str | bytes) -> "WeightLayout":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayoutError(f"layout is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    def same_structure(self, other: "WeightLayout") -> bool:
        """Equal up to normalisation stats."""
        strip = lambda L: (tuple(dataclasses.replace(g, mean=None, std=None) for g in L.groups),
                           tuple(dataclasses.replace(p, mean=None, std=None, transform=None) for p in L.params))
        return (self.block_size, self.rule, strip(self)) == (other.block_size, other.rule, strip(other))

    def describe(self) -> str:
        rows = [f"WeightLayout: {len(self.params)} tensors, {self.num_params} weights, {len(self.groups)} groups, "
                f"{self.num_blocks} blocks x {self.block_size} (rule {self.rule})"]
        for g in self.groups:
            rows.append(f"  [{g.first_block:>6}..{g.first_block + g.num_blocks - 1:>6}] {g.name}: {g.numel} weights"
                        f" in {len(g.params)} tensors")
        return "\n".join(rows)
