"""Generator diagnostics: does a generator's output look like the zoo it was trained on?

All quantities are in raw (denormalised) weight space, on flat vectors ``[N, num_blocks * block_size]``
(padding positions are zero in samples and zoo alike, so they add nothing to a distance)::

    from rayweights.evaluation.diagnostics import diagnose, nn_distances, group_stats, invalid_fraction, diversity
    d = diagnose(samples, zoo, layout, reconstructions=None)    # samples: [N, D] / [N, nb, bs] / state_dicts
    print(d.table()); d.to_dict()

* ``nn_distances(a, b, exclude_self)``: L2 from each row of ``a`` to its nearest row of ``b``;
* ``group_stats(flat, layout)``: mean and std of every parameter tensor (and group) over all rows;
* ``invalid_fraction(x, layout)``: fraction of weight sets holding an impossible value (non-finite,
  a negative variance such as a BatchNorm ``running_var``, or a magnitude above ``max_abs``);
* ``diversity(samples)``: mean pairwise L2 between rows;
* ``diagnose(...)``: all of the above for samples vs the zoo (a :class:`Diagnosis`), with the
  reconstruction error of an autoencoder/VAE when given, against the zoo's nearest-neighbour spacing.

A healthy generator has sample->zoo nearest-neighbour distances on the order of the zoo's own
spacing (not 10x it), per-tensor statistics within the zoo's range, no invalid weight sets, and a
sample diversity comparable to the zoo's (0 = collapsed; equal NN distance 0 = replays the zoo).

``rayweights diagnose-generator EXPORT ZOO [--num-samples N] [--output URI]`` runs it for any export
that :func:`rayweights.sampling.load_sampler` can open.

One module (~430 lines): the statistics, the verdict thresholds and the report of one diagnosis.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..blocks import WeightLayout
from ..errors import UserError, expected, job_main
from ..fmt import cell
from ..sampling import load_sampler
from ..storage import resolve, write_bytes_atomic
from ..table import open_zoo

__all__ = ["nn_distances", "group_stats", "invalid_fraction", "diversity", "diagnose", "Diagnosis", "GroupCheck",
           "flat_weights", "zoo_weights", "main"]

_VARIANCE_RE = re.compile(r"(running_var|(^|[._])var(iance)?|(^|[._])std)$")


# ----------------------------------------------------------------------------- inputs
def flat_weights(x, layout: WeightLayout) -> torch.Tensor:
    """Raw weights as float64 ``[N, num_blocks * block_size]`` from a tensor ``[N, D]`` /
    ``[N, num_blocks, block_size]`` / ``[D]``, or a sequence of state_dicts of the layout's parameters."""
    D = layout.num_blocks * layout.block_size
    if isinstance(x, Mapping):
        x = [x]
    if isinstance(x, (list, tuple)):
        if not x:
            return torch.zeros(0, D, dtype=torch.float64)
        if isinstance(x[0], Mapping):
            x = torch.stack([_tokenize_loose(sd, layout) for sd in x])
        else:
            x = torch.stack([torch.as_tensor(v) for v in x])
    if not torch.is_tensor(x):
        raise TypeError(f"weights: expected a tensor or state_dicts, got {type(x).__name__}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != D:
        raise ValueError(f"weights: {x.shape[1]} values per row, the layout has {layout.num_blocks} x "
                         f"{layout.block_size} = {D}")
    return x.detach().to(torch.float64).cpu()


_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tokenize_loose(sd: Mapping[str, torch.Tensor], layout: WeightLayout) -> torch.Tensor:
    """tokenize_flat of the layout's parameters of ``sd`` (other entries ignored, dtypes cast)."""
    missing = [p.name for p in layout.params if p.name not in sd]
    if missing:
        raise ValueError(f"state_dict: missing {missing[0]} (and {len(missing) - 1} more) of the layout")
    return layout.tokenize_flat({p.name: torch.as_tensor(sd[p.name]).detach().cpu().to(_DT[p.dtype])
                                 for p in layout.params})


def _tensor_values(x: torch.Tensor, layout: WeightLayout, p) -> torch.Tensor:
    """The values of parameter ``p`` in every row of flat ``x`` [N, D] -> [N, numel]."""
    g = layout.groups[p.group]
    if g.interleave:
        return torch.stack([layout.detokenize(r.to(torch.float32))[p.name].reshape(-1).to(x.dtype) for r in x])
    s = g.first_block * layout.block_size + p.offset
    return x[:, s:s + p.numel]


def zoo_weights(zoo, last_k: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(raw flat weights [rows, D], member id of every row) of a :class:`rayweights.table.Zoo`."""
    rows = zoo.members.to_pylist()
    mids = [r["member_id"] for r in rows]
    blocks = zoo.blocks(mids, last_k=last_k)
    groups: list[str] = []
    for r in rows:
        n = len(r["checkpoints"] or [])
        groups += [r["member_id"]] * (min(n, last_k) if last_k else n)
    if len(groups) != blocks.shape[0]:           # checkpoints column disagrees with the files: no grouping
        groups = [str(i) for i in range(blocks.shape[0])]
    return blocks.reshape(blocks.shape[0], -1).to(torch.float64), groups


# ----------------------------------------------------------------------------- the measures
def nn_distances(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False,
                 groups_a: Sequence | None = None, groups_b: Sequence | None = None) -> torch.Tensor:
    """L2 distance from each row of ``a`` [N, D] to its nearest row of ``b`` [M, D] -> [N].

    ``exclude_self``: ``a`` and ``b`` are the same rows; row i never matches row i.  With
    ``groups_a``/``groups_b`` (one label per row), a row never matches a row of its own group
    (e.g. a zoo member's own checkpoints).  ``inf`` where nothing is left to match."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"nn_distances: rows of a have {a.shape[1]} values, rows of b {b.shape[1]}")
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    if b.shape[0] == 0:
        return torch.full((a.shape[0],), math.inf, dtype=torch.float64)
    if exclude_self and a.shape[0] != b.shape[0]:
        raise ValueError(f"nn_distances: exclude_self needs a and b of the same rows ({a.shape[0]} vs {b.shape[0]})")
    out = torch.empty(a.shape[0], dtype=torch.float64)
    ga = None if groups_a is None else list(groups_a)
    gb = None if groups_b is None else list(groups_b)
    for s in range(0, a.shape[0], 1024):
        d = torch.cdist(a[s:s + 1024], b, compute_mode="donot_use_mm_for_euclid_dist")
        if exclude_self:
            idx = torch.arange(s, s + d.shape[0])
            d[torch.arange(d.shape[0]), idx] = math.inf
        if ga is not None and gb is not None:
            same = torch.tensor([[x == y for y in gb] for x in ga[s:s + 1024]], dtype=torch.bool)
            d = d.masked_fill(same, math.inf)
        out[s:s + d.shape[0]] = d.min(dim=1).values
    return out


def _row_stats(flat: torch.Tensor, layout: WeightLayout, by: str = "tensor") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (per-row mean [N], per-row std [N]) of every tensor (``by="tensor"``) or group."""
    x = flat.reshape(flat.shape[0], -1).to(torch.float64)
    out = {}
    bs = layout.block_size
    if by == "group":
        for g in layout.groups:
            s = g.first_block * bs
            v = x[:, s:s + g.numel]
            out[g.name] = (v.mean(dim=1), v.std(dim=1, unbiased=False))
        return out
    if by != "tensor":
        raise ValueError(f"by: {by!r} is not tensor or group")
    for p in layout.params:
        vals = _tensor_values(x, layout, p)
        out[p.name] = (vals.mean(dim=1), vals.std(dim=1, unbiased=False))
    return out


def group_stats(flat: torch.Tensor, layout: WeightLayout, by: str = "tensor") -> dict[str, tuple[float, float]]:
    """Mean and std of every parameter tensor (``by="tensor"``, the default) or parameter group
    (``by="group"``) pooled over all rows of ``flat`` [N, D] (raw weights) -> name -> (mean, std)."""
    x = flat_weights(flat, layout)
    bs = layout.block_size
    out = {}
    if by == "group":
        for g in layout.groups:
            s = g.first_block * bs
            v = x[:, s:s + g.numel]
            out[g.name] = (float(v.mean()), float(v.std(unbiased=False)))
        return out
    if by != "tensor":
        raise ValueError(f"by: {by!r} is not tensor or group")
    for p in layout.params:
        vals = _tensor_values(x, layout, p)
        out[p.name] = (float(vals.mean()), float(vals.std(unbiased=False)))
    return out


def _invalid_rows(x: torch.Tensor, layout: WeightLayout, max_abs: float) -> torch.Tensor:
    bad = ~torch.isfinite(x).all(dim=1)
    xf = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    bad |= xf.abs().amax(dim=1) > max_abs
    for p in layout.params:
        if not _VARIANCE_RE.search(p.name):
            continue
        vals = _tensor_values(xf, layout, p)
        bad |= (vals < 0).any(dim=1)
    return bad


def invalid_fraction(state_dicts_or_flat, layout: WeightLayout, max_abs: float = 1e6) -> float:
    """Fraction of weight sets (rows / state_dicts) holding an impossible value: a non-finite
    number, a negative variance (a parameter named ``running_var``, ``var``, ``variance`` or ``std``,
    e.g. BatchNorm's running variance) or a magnitude above ``max_abs`` (an exploded sample)."""
    x = flat_weights(state_dicts_or_flat, layout)
    if x.shape[0] == 0:
        return 0.0
    return float(_invalid_rows(x, layout, max_abs).double().mean())


def diversity(samples: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the rows of ``samples`` [N, D] (0 for fewer than 2 rows)."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    if x.shape[0] < 2:
        return 0.0
    x = torch.nan_to_num(x)
    return float(torch.pdist(x).mean())


# ----------------------------------------------------------------------------- the report
@dataclass
class GroupCheck:
    """One tensor's (or group's) statistics: samples pooled vs zoo pooled, and the zoo's range of
    per-checkpoint mean/std; ``within``: the samples' pooled mean and std both lie inside the zoo's
    per-checkpoint range widened by ``margin`` of its width (plus a floor of 1e-3 of the zoo's std)."""

    name: str
    sample_mean: float
    sample_std: float
    zoo_mean: float
    zoo_std: float
    zoo_mean_range: tuple[float, float]
    zoo_std_range: tuple[float, float]
    within: bool
    samples_within_fraction: float        # share of samples whose own mean and std are inside the range


@dataclass
class Diagnosis:
    num_samples: int
    num_zoo: int
    sample_to_zoo_nn: dict[str, float]           # median / mean / min / max of each sample's NN distance to the zoo
    zoo_to_zoo_nn: dict[str, float]              # each zoo checkpoint to its nearest other checkpoint
    zoo_member_nn: dict[str, float] | None       # ... nearest checkpoint of another member (None: no member ids)
    recon_error: dict[str, float] | None         # ||x - dec(enc(x))|| over zoo rows (AE/VAE), None if not given
    sample_diversity: float
    zoo_diversity: float
    sample_invalid_fraction: float
    zoo_invalid_fraction: float
    groups: list[GroupCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> float:
        """The zoo's nearest-neighbour spacing: between members when known, else between checkpoints."""
        ref = self.zoo_member_nn if self.zoo_member_nn else self.zoo_to_zoo_nn
        return ref["median"]

    @property
    def nn_ratio(self) -> float:
        """median sample->zoo NN distance / the zoo's spacing (about 1 or below: samples sit among the zoo)."""
        sp = self.spacing
        return self.sample_to_zoo_nn["median"] / sp if sp > 0 else math.inf

    @property
    def groups_within(self) -> bool:
        return all(g.within for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"], d["nn_ratio"], d["groups_within"] = self.spacing, self.nn_ratio, self.groups_within
        return d

    def table(self, nd: int = 4) -> str:
        c = lambda v: cell(v, nd)      # noqa: E731
        rows = ["| quantity | samples | zoo | note |", "|---|---|---|---|"]
        s, z = self.sample_to_zoo_nn, self.zoo_to_zoo_nn
        rows.append(f"| weight sets | {self.num_samples} | {self.num_zoo} | |")
        rows.append(f"| NN distance, median (samples->zoo / zoo->zoo) | {c(s['median'])} | {c(z['median'])} | "
                    f"ratio to the zoo's spacing {cell(self.nn_ratio, 2)} |")
        rows.append(f"| NN distance, min / max | {c(s['min'])} / {c(s['max'])} | {c(z['min'])} / {c(z['max'])} | "
                    f"0 = a replayed zoo checkpoint |")
        if self.zoo_member_nn:
            m = self.zoo_member_nn
            rows.append(f"| NN distance to another member, median | — | {c(m['median'])} | the zoo's spacing |")
        if self.recon_error:
            r = self.recon_error
            rows.append(f"| reconstruction L2, median / max | — | {c(r['median'])} / {c(r['max'])} | "
                        f"{'below' if r['median'] < self.spacing else 'ABOVE'} the zoo's spacing |")
        rows.append(f"| diversity (mean pairwise L2) | {c(self.sample_diversity)} | {c(self.zoo_diversity)} | |")
        rows.append(f"| invalid weight sets | {c(self.sample_invalid_fraction)} | {c(self.zoo_invalid_fraction)} | "
                    f"non-finite, negative variance, exploded |")
        for g in self.groups:
            lo, hi = g.zoo_mean_range
            slo, shi = g.zoo_std_range
            rows.append(f"| `{g.name}` mean / std | {c(g.sample_mean)} / {c(g.sample_std)} | {c(g.zoo_mean)} / "
                        f"{c(g.zoo_std)} | zoo range mean [{c(lo)}, {c(hi)}], std [{c(slo)}, {c(shi)}]; "
                        f"{'within' if g.within else 'OUTSIDE'} ({cell(g.samples_within_fraction, 2)} of samples) |")
        out = "\n".join(rows)
        if self.notes:
            out += "\n\n" + "\n".join(f"- {n}" for n in self.notes)
        return out


def _summary(v: torch.Tensor) -> dict[str, float]:
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return {"median": math.nan, "mean": math.nan, "min": math.nan, "max": math.nan}
    return {"median": float(v.median()), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def diagnose(samples, zoo, layout: WeightLayout | None = None, reconstructions=None,
             zoo_groups: Sequence | None = None, margin: float = 0.1, max_abs: float = 1e6) -> Diagnosis:
    """Samples vs zoo, in raw weight space.

    ``samples``: raw weights ``[N, D]`` / ``[N, num_blocks, block_size]`` or state_dicts.  ``zoo``: a
    :class:`rayweights.table.Zoo` (member ids are read from it) or raw weights ``[M, D]`` with optional
    ``zoo_groups`` (member id per row).  ``layout``: the zoo's (default: ``zoo.layout``).
    ``reconstructions``: raw ``dec(enc(zoo row))`` per zoo row, same order, for the AE/VAE check."""
    if layout is None:
        if not hasattr(zoo, "layout"):
            raise ValueError("layout: required when zoo is a tensor")
        layout = zoo.layout
    if hasattr(zoo, "members") and hasattr(zoo, "blocks"):
        z, zoo_groups = zoo_weights(zoo)
    else:
        z = flat_weights(zoo, layout)
    x = flat_weights(samples, layout)
    if x.shape[0] == 0 or z.shape[0] == 0:
        raise ValueError(f"diagnose: need samples and zoo rows (got {x.shape[0]} and {z.shape[0]})")
    notes = []
    x_bad = _invalid_rows(x, layout, max_abs)
    xs = torch.nan_to_num(x, nan=0.0, posinf=max_abs, neginf=-max_abs)
    s_nn = nn_distances(xs, z)
    z_nn = nn_distances(z, z, exclude_self=True)
    m_nn = None
    if zoo_groups is not None and len(set(zoo_groups)) > 1:
        m_nn = _summary(nn_distances(z, z, groups_a=zoo_groups, groups_b=zoo_groups))
    rec = None
    if reconstructions is not None:
        r = flat_weights(reconstructions, layout)
        if r.shape != z.shape:
            raise ValueError(f"reconstructions: shape {tuple(r.shape)} != zoo rows {tuple(z.shape)}")
        rec = _summary((torch.nan_to_num(r) - z).norm(dim=1))
    zr = _row_stats(z, layout)
    xr = _row_stats(xs, layout)
    zpool = group_stats(z, layout)
    xpool = group_stats(xs, layout)
    checks = []
    for name in zr:
        zm, zs = zr[name]
        xm, xsd = xr[name]
        mlo, mhi = float(zm.min()), float(zm.max())
        slo, shi = float(zs.min()), float(zs.max())
        floor = 1e-3 * max(zpool[name][1], 1e-12)
        mw = margin * (mhi - mlo) + floor
        sw = margin * (shi - slo) + floor
        within_m = lambda v: (v >= mlo - mw) & (v <= mhi + mw)     # noqa: E731
        within_s = lambda v: (v >= slo - sw) & (v <= shi + sw)     # noqa: E731
        pm, ps = xpool[name]
        ok = bool(within_m(torch.tensor(pm))) and bool(within_s(torch.tensor(float(xsd.mean()))))
        frac = float((within_m(xm) & within_s(xsd)).double().mean())
        checks.append(GroupCheck(name, pm, ps, zpool[name][0], zpool[name][1], (mlo, mhi), (slo, shi), ok, frac))
    d = Diagnosis(num_samples=x.shape[0], num_zoo=z.shape[0], sample_to_zoo_nn=_summary(s_nn),
                  zoo_to_zoo_nn=_summary(z_nn), zoo_member_nn=m_nn, recon_error=rec,
                  sample_diversity=diversity(xs), zoo_diversity=diversity(z),
                  sample_invalid_fraction=float(x_bad.double().mean()),
                  zoo_invalid_fraction=float(_invalid_rows(z, layout, max_abs).double().mean()), groups=checks,
                  notes=notes)
    if d.sample_to_zoo_nn["max"] == 0.0:
        notes.append("every sample is an exact zoo checkpoint (the generator replays the zoo)")
    elif d.nn_ratio > 3:
        notes.append(f"samples lie {d.nn_ratio:.1f}x the zoo's spacing from the nearest zoo checkpoint")
    if rec is not None and rec["median"] >= d.spacing:
        notes.append("the autoencoder's reconstruction error is not below the zoo's spacing")
    if x.shape[0] > 1 and d.sample_diversity < 1e-6:
        notes.append("all samples are identical (collapsed)")
    if not d.groups_within:
        bad = [g.name for g in checks if not g.within]
        notes.append(f"per-tensor statistics outside the zoo's range: {', '.join(bad[:5])}"
                     + (f" (+{len(bad) - 5})" if len(bad) > 5 else ""))
    if d.sample_invalid_fraction > 0:
        notes.append(f"{d.sample_invalid_fraction:.0%} of the samples hold invalid weights")
    return d


# ----------------------------------------------------------------------------- the command
@job_main
def main(argv: Sequence[str] | None = None) -> int:
    """``rayweights diagnose-generator EXPORT ZOO [--num-samples N] [--output URI]``."""
    p = argparse.ArgumentParser(prog="rayweights diagnose-generator",
                                description="samples of a generator vs its zoo: NN distances, reconstruction, "
                                            "per-tensor statistics, invalid weights, diversity")
    p.add_argument("export", help="generator export, sample-weights output or sampler folder (local or s3://)")
    p.add_argument("zoo", help="the zoo table the generator was trained on")
    p.add_argument("--num-samples", type=int, default=32, help="samples per condition (default 32)")
    p.add_argument("--mode", default="ddpm", choices=["ddpm", "ddim", "one_step"], help="sampling (default ddpm)")
    p.add_argument("--steps", type=int, default=1000, help="DDPM/DDIM steps (default 1000)")
    p.add_argument("--t", type=int, default=500, help="one-step timestep")
    p.add_argument("--condition", action="append", default=None,
                   help="condition to sample (repeatable; default: the zoo's conditions, or none if unconditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None, help="folder / URI for diagnosis.json and diagnosis.md")
    a = p.parse_args(argv)
    if a.num_samples < 1:
        raise UserError("--num-samples: must be >= 1")
    with expected(ValueError):       # storage, zoo and sampler errors are UserErrors already
        zoo = open_zoo(a.zoo)
        sampler = load_sampler(a.export, method=a.mode, t=a.t, steps=a.steps, device=a.device)
    if not sampler.layout.same_structure(zoo.layout):
        raise UserError(f"zoo: {a.zoo} does not have the layout of {a.export}")
    method = getattr(sampler, "method", None)
    conditional = getattr(method, "conditioning", "unknown") is not None
    conds = a.condition or (zoo.conditions()[:8] if conditional else [None])
    layout = sampler.layout
    parts = []
    for i, c in enumerate(conds):
        b = sampler.sample(c, a.num_samples, seed=a.seed + i)
        parts.append(layout.denormalize(b.float()) if sampler.normalized else b.float())
    samples = torch.cat(parts).reshape(len(parts) * a.num_samples, -1)
    recon = None
    if method is not None and hasattr(method, "reconstruct"):
        z, _ = zoo_weights(zoo)
        recon = method.reconstruct(z.float())
    d = diagnose(samples, zoo, zoo.layout, reconstructions=recon)
    title = (f"# Generator diagnosis\n\nexport `{a.export}`, zoo `{a.zoo}`, {len(conds)} condition(s) x "
             f"{a.num_samples} samples, {a.mode}" + (f" ({a.steps} steps)" if a.mode != "one_step" else "") + "\n\n")
    print(title + d.table())
    if a.output:
        out = resolve(a.output)
        write_bytes_atomic(out.join("diagnosis.json"), json.dumps(d.to_dict(), indent=1).encode())
        write_bytes_atomic(out.join("diagnosis.md"), (title + d.table() + "\n").encode())
    return 0
