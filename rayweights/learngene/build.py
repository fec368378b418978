"""Models of other sizes from a learngene, the Σ-only phase, and conversion back to plain weights.

Width: U's rows are output units, V's rows are (input unit, kernel tap) pairs.  A narrower target
keeps the first rows (units are aligned across layers by index, so a unit dropped from one
layer's output is the unit dropped from the next layer's input) and the leading components.
A wider target appends rows (``extend``):

* ``orthogonal`` (default): the new units are orthonormal mixtures of the existing ones
  (rows ``P F`` with ``P Pᵀ = I``, blockwise when more than doubling), so they live in the learned
  row space with the same norms and are not copies (no symmetry to break);
* ``random``: i.i.d. normal rows with the factor's RMS;  ``zero``: zero rows.

With ``rescale_fan_in`` Σ is multiplied by sqrt(fan_in_source / fan_in_target) (the scaling of
default initialisers), so a wider/narrower input keeps the pre-activation scale.

Depth: Σ of the target's l-th block comes from the source's Σ along normalised depth
(``interpolate``: linear between neighbours; ``nearest``), or by index (``copy``: the first
blocks copied and extra blocks repeat the last; ``extrapolate``: extra blocks continue the
linear trend of the last two).  Everything a learngene does not cover keeps its default init.

Σ-only phase: ``init_from_learngene(..., factorized=True)`` registers a
``torch.nn.utils.parametrize`` parametrisation on each covered weight, W = U Σ Vᵀ with U, V
frozen buffers and Σ the only parameter; :func:`sigma_phase_parameters` freezes everything else
(except norm affine parameters if asked); :func:`materialize` turns W back into an ordinary
parameter for full training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .factor import Gene, Learngene, compose
from .layers import LayerType, LearngeneError, match_layer_types

__all__ = ["EXTEND_MODES", "DEPTH_MODES", "map_depth", "resize_rows", "resize_segments", "adapt_gene", "FactorizedWeight",
           "InitReport", "init_from_learngene", "build_model", "collect_learngene", "sigma_phase_parameters", "materialize",
           "factorized_weights", "norm_parameters"]

EXTEND_MODES = ("orthogonal", "random", "zero")
DEPTH_MODES = ("interpolate", "nearest", "copy", "extrapolate")


def map_depth(sigma: torch.Tensor, depth: int, how: str = "interpolate") -> torch.Tensor:
    """Source Σ [L, ...] -> [depth, ...] for a target with ``depth`` blocks."""
    if how not in DEPTH_MODES:
        raise LearngeneError(f"depth: {how!r} is not one of {DEPTH_MODES}")
    if depth < 1:
        raise LearngeneError(f"depth: target has {depth} blocks")
    L = sigma.shape[0]
    if L == depth:
        return sigma.clone()
    if how in ("interpolate", "nearest"):
        pos = torch.full((1,), (L - 1) / 2.0) if depth == 1 else torch.linspace(0, L - 1, depth)
        if how == "nearest":
            return sigma[pos.round().long()].clone()
        lo = pos.floor().long().clamp(0, L - 1)
        hi = (lo + 1).clamp(max=L - 1)
        w = (pos - lo.float()).view(-1, *[1] * (sigma.dim() - 1)).to(sigma.dtype)
        return (1 - w) * sigma[lo] + w * sigma[hi]
    idx = torch.arange(depth)
    out = sigma[idx.clamp(max=L - 1)].clone()
    if how == "extrapolate" and L >= 2 and depth > L:
        step = sigma[L - 1] - sigma[L - 2]
        k = (idx[L:] - (L - 1)).to(sigma.dtype).view(-1, *[1] * (sigma.dim() - 1))
        out[L:] = sigma[L - 1] + k * step
    return out


def _orthonormal_rows(n_new: int, n_old: int, gen: torch.Generator) -> torch.Tensor:
    """[n_new, n_old] made of blocks with orthonormal rows (a random orthogonal mixing)."""
    blocks, left = [], n_new
    while left > 0:
        k = min(left, n_old)
        q, r = torch.linalg.qr(torch.randn(n_old, k, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=q.dtype))
        blocks.append(q.T)
        left -= k
    return torch.cat(blocks)


def resize_rows(F: torch.Tensor, rows: int, extend: str, gen: torch.Generator) -> torch.Tensor:
    """Truncate / extend axis 0 of a factor ``F [d, ..., r]`` to ``rows``."""
    if extend not in EXTEND_MODES:
        raise LearngeneError(f"extend: {extend!r} is not one of {EXTEND_MODES}")
    d = F.shape[0]
    if rows <= d:
        return F[:rows].clone()
    flat = F.reshape(d, -1).to(torch.float64)
    n_new = rows - d
    if extend == "orthogonal":
        new = _orthonormal_rows(n_new, d, gen) @ flat
    elif extend == "random":
        rms = flat.pow(2).mean().sqrt()
        new = torch.randn(n_new, flat.shape[1], generator=gen, dtype=torch.float64) * rms
    else:
        new = torch.zeros(n_new, flat.shape[1], dtype=torch.float64)
    return torch.cat([flat, new]).to(F.dtype).reshape(rows, *F.shape[1:])


def resize_segments(F: torch.Tensor, src: Sequence[int], tgt: Sequence[int], extend: str, gen: torch.Generator,
                    what: str = "") -> torch.Tensor:
    """:func:`resize_rows` applied to each concatenated segment of axis 0 separately."""
    if len(src) != len(tgt):
        raise LearngeneError(f"{what}: the source has {len(src)} segments {list(src)}, the target "
                             f"{len(tgt)} {list(tgt)}")
    parts = torch.split(F, list(src), dim=0)
    return torch.cat([resize_rows(p, n, extend, gen) for p, n in zip(parts, tgt)])


def adapt_gene(gene: Gene, out_dim: int, in_shape: Sequence[int], depth: int, *, extend: str = "orthogonal",
               depth_mode: str = "interpolate", rescale_fan_in: bool = True, gen: torch.Generator | None = None,
               out_split: Sequence[int] | None = None, in_split: Sequence[int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (U' [out_dim, r'], V' [prod(in_shape), r''], Σ' [depth, ...]) for a target layer type whose
    out / in dimensions are made of ``out_split`` / ``in_split`` segments (default: one)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    in_shape = tuple(in_shape)
    if in_shape[1:] != gene.kernel:
        raise LearngeneError(f"layer type {gene.name!r}: target kernel {in_shape[1:]} differs from the "
                             f"learngene's {gene.kernel}; only widths and depth may change")
    ru, rv = gene.rank
    k = math.prod(gene.kernel)
    U = resize_segments(gene.U, gene.out_split, out_split or [out_dim], extend, gen, f"layer type {gene.name!r} out")
    V = resize_segments(gene.V.reshape(gene.in_shape[0], k, rv), gene.in_split, in_split or [in_shape[0]], extend,
                        gen, f"layer type {gene.name!r} in").reshape(-1, rv)
    n_src, n_tgt = math.prod(gene.in_shape), math.prod(in_shape)
    S = map_depth(gene.sigma, depth, depth_mode)
    if gene.mode == "diag":
        r = min(ru, out_dim, n_tgt)
        U, V, S = U[:, :r], V[:, :r], S[:, :r]
    else:
        a, b = min(ru, out_dim), min(rv, n_tgt)
        U, V, S = U[:, :a], V[:, :b], S[:, :a, :b]
    if rescale_fan_in and n_src != n_tgt:
        S = S * math.sqrt(n_src / n_tgt)
    return U.contiguous(), V.contiguous(), S.contiguous()


class FactorizedWeight(nn.Module):
    """Parametrisation W = (U Σ Vᵀ).reshape(shape); Σ is the parametrised tensor.  U, V are frozen
    buffers (the Σ-only phase) or, for learngene learning, ``nn.Parameter`` objects shared by every
    layer of the type (``model.parameters()`` lists each once)."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, shape: Sequence[int], mode: str, gene: str = "",
                 out_split: Sequence[int] | None = None, in_split: Sequence[int] | None = None):
        super().__init__()
        self.out_split = list(out_split or [shape[0]])
        self.in_split = list(in_split or [shape[1]])
        if isinstance(U, nn.Parameter):
            self.U, self.V = U, V
        else:
            self.register_buffer("U", U, persistent=False)
            self.register_buffer("V", V, persistent=False)
        self.shape = tuple(shape)
        self.mode = mode
        self.gene = gene

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return compose(self.U, self.V, sigma, self.mode).reshape(self.shape)

    @torch.no_grad()
    def right_inverse(self, W: torch.Tensor) -> torch.Tensor:
        """Least-squares Σ for a given W (used when a weight is assigned while parametrised)."""
        U, V = self.U.detach().double(), self.V.detach().double()
        M = W.reshape(U.shape[0], -1).double()
        if self.mode == "diag":
            G = (U.T @ U) * (V.T @ V)
            s = torch.linalg.lstsq(G, torch.einsum("mr,mn,nr->r", U, M, V)[:, None]).solution[:, 0]
        else:
            s = torch.linalg.pinv(U) @ M @ torch.linalg.pinv(V.T)
        return s.to(W.dtype)


@dataclass
class InitReport:
    """What an initialisation touched: params per layer type, and what kept its default init."""

    initialised: dict[str, list[str]] = field(default_factory=dict)
    default: list[str] = field(default_factory=list)
    unmatched_genes: list[str] = field(default_factory=list)
    uncovered_types: list[str] = field(default_factory=list)
    factorized: bool = False

    @property
    def num_initialised(self) -> int:
        return sum(len(v) for v in self.initialised.values())

    def to_dict(self) -> dict:
        return {"initialised": self.initialised, "default": self.default, "unmatched_genes": self.unmatched_genes,
                "uncovered_types": self.uncovered_types, "factorized": self.factorized}


def _owner(model: nn.Module, pname: str) -> tuple[nn.Module, str]:
    mod_path, _, attr = pname.rpartition(".")
    return (model.get_submodule(mod_path) if mod_path else model), attr


@torch.no_grad()
def init_from_learngene(model: nn.Module, learngene: Learngene, *, layer_types: Sequence[LayerType] | None = None,
                        depth: str = "interpolate", extend: str = "orthogonal", rescale_fan_in: bool = True,
                        factorized: bool = False, train_factors: bool = False, seed: int = 0) -> InitReport:
    """Initialise, in place, every parameter of ``model`` that matches one of the learngene's layer
    types (or ``layer_types``, same names, other patterns: a target whose parameters are named
    differently).  With ``factorized`` the weights become U Σ Vᵀ parametrisations (Σ-only phase);
    ``train_factors`` makes U and V shared trainable parameters too (learngene learning, see
    :func:`collect_learngene`)."""
    if train_factors and not factorized:
        raise LearngeneError("train_factors needs factorized=True")
    if parametrize.is_parametrized(model) or any(parametrize.is_parametrized(m) for m in model.modules()):
        raise LearngeneError("model is already parametrised; call materialize() first")
    types = list(layer_types) if layer_types is not None else learngene.layer_types
    params = dict(model.named_parameters())
    matches = match_layer_types(params, types, where="target model")
    gen = torch.Generator().manual_seed(seed)
    report = InitReport(factorized=factorized)
    # layer types of the target that the source did not have (e.g. a deeper UNet level's middle
    # blocks) keep their default init; they are listed in the report
    report.uncovered_types = [n for n in matches if n not in learngene.genes]
    covered: set[str] = set()
    for name, gene in learngene.genes.items():
        mt = matches.get(name)
        if mt is None:
            report.unmatched_genes.append(name)
            continue
        U, V, S = adapt_gene(gene, mt.out_dim, mt.in_shape, mt.depth, extend=extend, depth_mode=depth,
                             rescale_fan_in=rescale_fan_in, gen=gen, out_split=mt.out_split, in_split=mt.in_split)
        dev, dt = params[mt.params[0]].device, params[mt.params[0]].dtype
        U_, V_ = U.to(dev, dt), V.to(dev, dt)
        if train_factors:
            U_, V_ = nn.Parameter(U_.clone()), nn.Parameter(V_.clone())
        for i, pname in enumerate(mt.params):
            p = params[pname]
            s = S[i].to(p.device, p.dtype)
            if factorized:
                mod, attr = _owner(model, pname)
                parametrize.register_parametrization(mod, attr, FactorizedWeight(U_, V_, p.shape, gene.mode, name,
                                                                                  mt.out_split, mt.in_split))
                getattr(mod.parametrizations, attr).original.copy_(s)
            else:
                p.copy_(compose(U_, V_, s, gene.mode).reshape(p.shape))
        report.initialised[name] = list(mt.params)
        covered.update(mt.params)
    report.default = [n for n in params if n not in covered]
    return report


def build_model(constructor: Callable[[], nn.Module], learngene: Learngene, **kw) -> tuple[nn.Module, InitReport]:
    """``constructor()`` (a model of the target size, default-initialised) then :func:`init_from_learngene`."""
    model = constructor()
    if not isinstance(model, nn.Module):
        raise LearngeneError(f"constructor returned {type(model).__name__}, not an nn.Module")
    return model, init_from_learngene(model, learngene, **kw)


def factorized_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(dotted weight name, owning module, attribute) of every FactorizedWeight parametrisation."""
    out = []
    for mname, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for attr, plist in mod.parametrizations.items():
                if any(isinstance(p, FactorizedWeight) for p in plist):
                    out.append((f"{mname}.{attr}" if mname else attr, mod, attr))
    return out


def _is_norm(mod: nn.Module) -> bool:
    return (isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
            or "Norm" in type(mod).__name__)


def norm_parameters(model: nn.Module) -> list[str]:
    """Names of the affine parameters owned directly by normalisation modules."""
    out = []
    for mname, mod in model.named_modules():
        if _is_norm(mod):
            for pname, _ in mod.named_parameters(recurse=False):
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def sigma_phase_parameters(model: nn.Module, train_norms: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """Freeze everything except Σ (and norm affine parameters / names matching ``extra`` regexes);
    returns the names of the parameters left trainable."""
    if not factorized_weights(model):
        raise LearngeneError("model has no factorised weights: build it with init_from_learngene(..., factorized=True)")
    norms = set(norm_parameters(model)) if train_norms else set()
    rx = [re.compile(e) for e in extra]
    trainable = []
    for n, p in model.named_parameters():
        keep = (".parametrizations." in n or n.startswith("parametrizations.")) and n.endswith(".original")
        keep = keep or n in norms or any(r.search(n) for r in rx)
        p.requires_grad_(keep)
        if keep:
            trainable.append(n)
    return trainable


@torch.no_grad()
def collect_learngene(model: nn.Module, report: InitReport, like: Learngene,
                      source: dict | None = None) -> Learngene:
    """Read U, V and every layer's Σ back out of a factorised model (after learngene learning);
    ``report`` is the one :func:`init_from_learngene` returned for it, ``like`` the learngene it
    was initialised from (layer types and mode)."""
    genes = {}
    for name, pnames in report.initialised.items():
        g = like.genes[name]
        mods = []
        for pname in pnames:
            mod, attr = _owner(model, pname)
            if not parametrize.is_parametrized(mod, attr):
                raise LearngeneError(f"{pname}: not factorised (materialised already?)")
            mods.append((mod, attr))
        plist = getattr(mods[0][0].parametrizations, mods[0][1])
        fw = plist[0]
        S = torch.stack([getattr(m.parametrizations, a).original.detach() for m, a in mods]).float().cpu()
        shape = fw.shape
        genes[name] = Gene(g.layer_type, g.mode, fw.U.detach().float().cpu().clone(),
                           fw.V.detach().float().cpu().clone(), S, shape[0], tuple(shape[1:]), list(pnames), 0.0, 1.0,
                           fw.out_split, fw.in_split)
    return Learngene(like.mode, genes, dict(source if source is not None else like.source))


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Replace every U Σ Vᵀ parametrisation by its current value as an ordinary parameter and make
    all parameters trainable again (the start of full training)."""
    for _, mod, attr in factorized_weights(model):
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
