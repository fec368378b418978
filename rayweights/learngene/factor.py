"""Learngene extraction (FINE): W_l = U Σ_l Vᵀ with U, V shared by all blocks of a layer type.

For one layer type with weights W_0 .. W_{L-1} (each reshaped to ``out x (in * kernel)``):

* ``mode="full"`` (Tucker-2 / higher-order SVD on the two matrix modes): U = leading left
  singular vectors of the horizontal stack [W_0 .. W_{L-1}], V = leading right singular vectors
  of the vertical stack; Σ_l = Uᵀ W_l V is a small dense r_u x r_v matrix.  At full rank
  (r_u = min(out, L*in), r_v = min(in, L*out)) U Uᵀ and V Vᵀ are projections onto spaces that
  contain every W_l's columns / rows, so W_l = U Σ_l Vᵀ is exact (up to float error).
* ``mode="diag"`` (the paper's form: Σ_l diagonal, the layer's "singular values" in a shared
  basis): W_l ≈ Σ_k s_lk u_k v_kᵀ, which is a CP / PARAFAC decomposition of the out x in x L
  tensor.  Initialised from the two SVDs above and refined by alternating least squares, which
  minimises Σ_l ||W_l - U diag(s_l) Vᵀ||² over U, V and all s_l: the weight-space form of FINE's
  learngene-learning stage.  Exact for a single layer (it is then that layer's SVD); for L > 1
  blocks the residual is reported (``rel_error``).

Rank: ``rank`` (a cap) and/or ``energy`` (the smallest rank keeping that fraction of the stacked
squared Frobenius norm); neither = full rank.  The factors are stored in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

from ..storage import read_bytes, resolve, write_bytes_atomic
from .layers import LayerMatch, LayerType, LearngeneError, match_layer_types

__all__ = ["Gene", "Learngene", "extract", "MODES", "FORMAT_VERSION"]

MODES = ("diag", "full")
FORMAT_VERSION = 1
WEIGHTS_FILE = "learngene.safetensors"
DESCRIPTION_FILE = "learngene.json"


@dataclass
class Gene:
    """The learngene of one layer type: shared U [out, r_u], V [in*kernel, r_v] and the source
    model's per-layer Σ ([L, r] diagonal or [L, r_u, r_v] full)."""

    layer_type: LayerType
    mode: str
    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    out_dim: int
    in_shape: tuple[int, ...]
    source_params: list[str] = field(default_factory=list)
    rel_error: float = 0.0
    energy: float = 1.0
    out_split: list[int] | None = None        # segment sizes of the source's out / in dimension
    in_split: list[int] | None = None

    def __post_init__(self):
        self.out_split = list(self.out_split or [self.out_dim])
        self.in_split = list(self.in_split or [self.in_shape[0]])

    @property
    def name(self) -> str:
        return self.layer_type.name

    @property
    def depth(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def rank(self) -> tuple[int, int]:
        return int(self.U.shape[1]), int(self.V.shape[1])

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.in_shape[1:])

    def num_params(self, with_sigma: bool = True) -> int:
        return self.U.numel() + self.V.numel() + (self.sigma.numel() if with_sigma else 0)

    def weight(self, layer: int) -> torch.Tensor:
        """Reconstructed weight of source layer ``layer`` in its original shape."""
        return compose(self.U, self.V, self.sigma[layer], self.mode).reshape(self.out_dim, *self.in_shape)

    def reconstruct(self) -> torch.Tensor:
        return torch.stack([self.weight(i) for i in range(self.depth)])

    def describe(self) -> dict[str, Any]:
        return {**self.layer_type.to_dict(), "out_split": self.out_split, "in_split": self.in_split,
                "mode": self.mode, "out_dim": self.out_dim, "in_shape": list(self.in_shape), "depth": self.depth,
                "rank": list(self.rank), "rel_error": self.rel_error, "energy": self.energy,
                "source_params": list(self.source_params), "num_params": self.num_params()}


def compose(U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor, mode: str) -> torch.Tensor:
    """U Σ Vᵀ as an [out, in*kernel] matrix (Σ a vector in ``diag`` mode, a matrix in ``full``)."""
    if mode == "diag":
        return (U * sigma) @ V.T
    return U @ sigma @ V.T


@dataclass
class Learngene:
    """All genes of a model plus a JSON-able description of where they came from."""

    mode: str
    genes: dict[str, Gene]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_types(self) -> list[LayerType]:
        return [g.layer_type for g in self.genes.values()]

    def num_params(self, with_sigma: bool = True) -> int:
        return sum(g.num_params(with_sigma) for g in self.genes.values())

    def num_bytes(self, with_sigma: bool = True) -> int:
        return 4 * self.num_params(with_sigma)

    def describe(self) -> dict[str, Any]:
        return {"format": "rayweights.learngene", "version": FORMAT_VERSION, "mode": self.mode,
                "source": self.source, "num_params": self.num_params(), "num_bytes": self.num_bytes(),
                "genes": [g.describe() for g in self.genes.values()]}

    # -- persistence: safetensors (tensors) + JSON (description); JSON written last --------------
    def save(self, uri: str) -> str:
        """Write ``<uri>/learngene.safetensors`` then ``<uri>/learngene.json`` (local or s3://).
        The JSON is written only after the tensors, so its presence marks a complete learngene."""
        tensors = {}
        for g in self.genes.values():
            tensors[f"{g.name}.U"] = g.U.detach().float().contiguous()
            tensors[f"{g.name}.V"] = g.V.detach().float().contiguous()
            tensors[f"{g.name}.sigma"] = g.sigma.detach().float().contiguous()
        loc = resolve(uri)
        write_bytes_atomic(loc.join(WEIGHTS_FILE), st_save(tensors, metadata={"format": "rayweights.learngene",
                                                                             "version": str(FORMAT_VERSION)}))
        write_bytes_atomic(loc.join(DESCRIPTION_FILE), json.dumps(self.describe(), indent=2).encode())
        return loc.uri

    @classmethod
    def load(cls, uri: str) -> "Learngene":
        """Read a learngene folder; errors name the file and the problem (never unpickles)."""
        loc = resolve(uri)
        desc_loc, w_loc = loc.join(DESCRIPTION_FILE), loc.join(WEIGHTS_FILE)
        try:
            desc = json.loads(read_bytes(desc_loc))
        except FileNotFoundError:
            raise LearngeneError(f"{desc_loc.uri}: not found (not a learngene folder, or an unfinished write)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LearngeneError(f"{desc_loc.uri}: not valid JSON ({exc})") from None
        if not isinstance(desc, dict) or desc.get("format") != "rayweights.learngene":
            raise LearngeneError(f"{desc_loc.uri}: not a rayweights learngene description")
        if int(desc.get("version", -1)) > FORMAT_VERSION:
            raise LearngeneError(f"{desc_loc.uri}: format version {desc.get('version')} is newer than {FORMAT_VERSION}")
        try:
            tensors = st_load(read_bytes(w_loc))
        except FileNotFoundError:
            raise LearngeneError(f"{w_loc.uri}: not found") from None
        except Exception as exc:  # safetensors raises its own error types on corrupt headers
            raise LearngeneError(f"{w_loc.uri}: not a readable safetensors file ({exc})") from None
        mode = desc.get("mode")
        if mode not in MODES:
            raise LearngeneError(f"{desc_loc.uri}: mode {mode!r} is not one of {MODES}")
        genes: dict[str, Gene] = {}
        for gd in desc.get("genes", []):
            try:
                name = gd["name"]
                lt = LayerType(name, gd["pattern"], gd.get("ndim"), gd.get("out_chunks"), gd.get("in_chunks"))
                U, V, S = (tensors[f"{name}.{k}"] for k in ("U", "V", "sigma"))
                out_dim, in_shape = int(gd["out_dim"]), tuple(int(x) for x in gd["in_shape"])
            except KeyError as exc:
                raise LearngeneError(f"{w_loc.uri}: gene {gd.get('name')!r} lacks {exc}") from None
            except ValueError as exc:
                raise LearngeneError(f"{desc_loc.uri}: {exc}") from None
            n_in = math.prod(in_shape)
            ok = (U.dim() == 2 and V.dim() == 2 and U.shape[0] == out_dim and V.shape[0] == n_in
                  and (S.shape[1:] == (U.shape[1],) and U.shape[1] == V.shape[1] if mode == "diag"
                       else S.shape[1:] == (U.shape[1], V.shape[1])))
            if not ok:
                raise LearngeneError(f"{w_loc.uri}: gene {name!r} has inconsistent shapes U {tuple(U.shape)}, "
                                     f"V {tuple(V.shape)}, sigma {tuple(S.shape)} for out {out_dim}, in {in_shape}")
            out_split, in_split = gd.get("out_split") or [out_dim], gd.get("in_split") or [in_shape[0]]
            if sum(out_split) != out_dim or sum(in_split) != in_shape[0]:
                raise LearngeneError(f"{desc_loc.uri}: gene {name!r}: out_split/in_split do not sum to its shape")
            genes[name] = Gene(lt, mode, U, V, S, out_dim, in_shape, list(gd.get("source_params", [])),
                               float(gd.get("rel_error", 0.0)), float(gd.get("energy", 1.0)), out_split, in_split)
        if not genes:
            raise LearngeneError(f"{desc_loc.uri}: no genes")
        return cls(mode, genes, dict(desc.get("source", {})))


# ----------------------------------------------------------------------------------------------
def _rank_for(evals: torch.Tensor, total: float, cap: int, rank: int | None, energy: float | None) -> int:
    r = cap
    if energy is not None and total > 0:
        cum = torch.cumsum(evals.clamp_min(0), 0) / total
        r = min(r, int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1)
    if rank is not None:
        r = min(r, rank)
    return max(1, r)


def _sym_eig_desc(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(G)
    return evals.flip(0), evecs.flip(1)


def _solve(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """rhs @ gram⁻¹ for a symmetric PSD gram (ridge-stabilised)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    ridge = 1e-12 * (gram.diagonal().abs().max().clamp_min(1e-30))
    return torch.linalg.solve(gram + ridge * eye, rhs.T).T


def _cp_als(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, iters: int, tol: float):
    """CP-ALS on W [L, m, n] from factor guesses U [m, r], V [n, r] -> (U, V, S [L, r])."""
    total = float((W * W).sum())

    def solve_s(U, V):
        rhs, G = torch.einsum("lmn,mr,nr->lr", W, U, V), (U.T @ U) * (V.T @ V)
        S = _solve(rhs, G)
        # ||W - R||² = ||W||² - 2 <W, R> + ||R||², all from the small matrices
        return S, total - 2 * float((S * rhs).sum()) + float(((S @ G) * S).sum())

    S, prev = solve_s(U, V)
    for _ in range(iters):
        U = _solve(torch.einsum("lmn,nr,lr->mr", W, V, S), (V.T @ V) * (S.T @ S))
        U = U / U.norm(dim=0, keepdim=True).clamp_min(1e-30)
        V = _solve(torch.einsum("lmn,mr,lr->nr", W, U, S), (U.T @ U) * (S.T @ S))
        V = V / V.norm(dim=0, keepdim=True).clamp_min(1e-30)
        S, err = solve_s(U, V)
        if prev - err <= tol * max(prev, 1e-30 * total):
            break
        prev = err
    order = torch.argsort((S * S).sum(0), descending=True)
    return U[:, order], V[:, order], S[:, order]


def decompose(weights: torch.Tensor, mode: str = "diag", rank: int | None = None, energy: float | None = None,
              als_iters: int = 25, als_tol: float = 1e-6):
    """weights [L, out, *in_shape] -> (U, V, sigma, rel_error, energy) in float32 (math in float64)."""
    if mode not in MODES:
        raise LearngeneError(f"mode: {mode!r} is not one of {MODES}")
    if rank is not None and rank < 1:
        raise LearngeneError(f"rank: must be >= 1, got {rank}")
    if energy is not None and not (0 < energy <= 1):
        raise LearngeneError(f"energy: must be in (0, 1], got {energy}")
    L, m = weights.shape[0], weights.shape[1]
    W = weights.detach().to(torch.float64).reshape(L, m, -1).cpu()
    n = W.shape[2]
    total = float((W * W).sum())
    if L == 1:  # a single layer: its own SVD is exact and optimal for both modes
        Uw, sv, Vh = torch.linalg.svd(W[0], full_matrices=False)
        eu = sv ** 2
        r = _rank_for(eu, total, len(sv), rank, energy)
        U, V = Uw[:, :r], Vh[:r].T
        S = sv[None, :r] if mode == "diag" else torch.diag(sv[:r])[None]
        R = (U * sv[:r]) @ V.T
        R = R[None]
    elif mode == "full":
        eu, Uf = _sym_eig_desc(torch.einsum("lmn,lkn->mk", W, W))
        ev, Vf = _sym_eig_desc(torch.einsum("lmn,lmk->nk", W, W))
        ru = _rank_for(eu, total, min(m, n * L), rank, energy)
        rv = _rank_for(ev, total, min(n, m * L), rank, energy)
        U, V = Uf[:, :ru], Vf[:, :rv]
        S = torch.einsum("mr,lmn,ns->lrs", U, W, V)
        R = torch.einsum("mr,lrs,ns->lmn", U, S, V)
    else:
        eu, Uf = _sym_eig_desc(torch.einsum("lmn,lkn->mk", W, W))
        ev, Vf = _sym_eig_desc(torch.einsum("lmn,lmk->nk", W, W))
        cap = min(m, n)
        r = max(_rank_for(eu, total, cap, rank, energy), _rank_for(ev, total, cap, rank, energy))
        U, V, S = _cp_als(W, Uf[:, :r], Vf[:, :r], als_iters, als_tol)
        R = torch.einsum("mr,nr,lr->lmn", U, V, S)
    err = float(((W - R) ** 2).sum())
    rel = math.sqrt(err / total) if total > 0 else 0.0
    kept = 1.0 - err / total if total > 0 else 1.0
    return U.float().contiguous(), V.float().contiguous(), S.float().contiguous(), rel, kept


def extract(model: nn.Module | Mapping[str, torch.Tensor], layer_types: Sequence[LayerType], mode: str = "diag",
            rank: int | None = None, energy: float | None = None, als_iters: int = 25,
            ranks: Mapping[str, int] | None = None, source: Mapping[str, Any] | None = None,
            progress: bool = False) -> Learngene:
    """Extract the learngene of every layer type matched in ``model`` (a module or a state_dict).

    ``ranks`` caps the rank per layer type (overrides ``rank``).  Layer types that match nothing
    are an error: a learngene silently missing a type would initialise it randomly."""
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    matches = match_layer_types(sd, layer_types, where="source model", require_all=True)
    unknown = sorted(set(ranks or {}) - set(matches))
    if unknown:
        raise LearngeneError(f"ranks: unknown layer type(s) {', '.join(unknown)}")
    genes: dict[str, Gene] = {}
    items = list(matches.items())
    if progress:
        items = tqdm(items, desc="extract learngenes", unit="type")
    for name, mt in items:
        stack = torch.stack([sd[p] for p in mt.params])
        U, V, S, rel, kept = decompose(stack, mode, (ranks or {}).get(name, rank), energy, als_iters)
        genes[name] = Gene(mt.layer_type, mode, U, V, S, mt.out_dim, mt.in_shape, mt.params, rel, kept,
                           mt.out_split, mt.in_split)
    return Learngene(mode, genes, dict(source or {}))


def layer_matches(model: nn.Module, layer_types: Sequence[LayerType], where: str = "model") -> dict[str, LayerMatch]:
    return match_layer_types(model.state_dict(), layer_types, where=where)
