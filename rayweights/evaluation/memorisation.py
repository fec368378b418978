"""Memorisation of weight generators, measured as Zeng et al. (2025) do ("Generative Modeling of
Weights: Generalization or Memorization?"): accuracy against *novelty* on a seen task, for the
generator and for three baselines built from the training checkpoints themselves.

* **novelty** of a weight set = 1 - max over training checkpoints of the IoU of the wrong-prediction
  sets (p-diff's similarity, :func:`rayweights.evaluation.metrics.wrong_iou`) on a held-out
  evaluation split (the adapter's ``test`` split, which no member trained on).  A replayed training
  checkpoint has novelty 0.
* **baselines** (all in raw weight space, over the flattened layout parameters):

  - ``noise σ=s``: a random training checkpoint plus Gaussian noise of standard deviation
    ``s`` x the zoo's per-group weight std (one draw per sample; the levels are ``sigmas``);
  - ``average of 16``: the mean of 16 training checkpoints drawn at random without replacement
    (``draws`` = 100 draws by default);
  - ``gaussian``: every coordinate drawn independently from a Gaussian with the zoo's
    per-coordinate mean and std.

* the **zoo reference**: each training member's checkpoints scored against the *other* members'
  checkpoints (leave one member out) — the novelty a fresh SGD run has.

A method is flagged as memorising when the median novelty of its samples is below half the zoo
reference's median (fresh training runs are that novel among themselves; replays score 0); not
decidable (None) when the zoo's own median novelty is 0.

    from rayweights.evaluation.memorisation import memorisation_study
    res = memorisation_study(adapter, layout, train_flat, {"p-diff": samples_flat}, train_groups=member_ids)
    print(res.table()); res.plot("memorisation.png"); res.memorising("p-diff")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..blocks import WeightLayout
from ..fmt import cell

__all__ = ["MethodScores", "MemorisationResult", "score_weight_sets", "novelty", "noise_baseline",
           "average_baseline", "gaussian_baseline", "baselines", "memorisation_study", "DEFAULT_SIGMAS",
           "MEMORISING_RATIO"]

DEFAULT_SIGMAS = (0.01, 0.05, 0.1, 0.3)
MEMORISING_RATIO = 0.5


def _flat(x: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to(torch.float32).cpu()
    return x.reshape(x.shape[0], layout.num_blocks * layout.block_size)


@torch.no_grad()
def score_weight_sets(adapter, layout: WeightLayout, flat: torch.Tensor, split: str = "test",
                      seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(accuracy [N], predictions per weight set) of raw flat weight sets on the adapter's ``split``,
    without fine-tuning (the layout's parameters loaded into ``adapter.build_model(seed)``)."""
    x = _flat(flat, layout)
    targets = adapter.targets(split)
    if targets is None:
        raise ValueError(f"adapter {type(adapter).__name__}: no predictions/targets (novelty needs a classifier)")
    accs, preds = [], []
    mask = layout.valid_mask.reshape(-1)
    for row in x:
        model = adapter.build_model(seed)
        finite = torch.isfinite(row).all()
        adapter.load_layout_state_dict(model, layout.detokenize((torch.nan_to_num(row) * mask).reshape(
            layout.num_blocks, layout.block_size)))
        p = np.asarray(adapter.predictions(model, split))
        if not finite:
            p = np.full_like(p, -1)                 # a non-finite weight set gets everything wrong
        preds.append(p)
        accs.append(float(np.mean(p == targets)))
    return np.asarray(accs), preds


def novelty(sample_preds: Sequence[np.ndarray], train_preds: Sequence[np.ndarray], targets: np.ndarray,
            sample_groups: Sequence | None = None, train_groups: Sequence | None = None) -> np.ndarray:
    """1 - max IoU of wrong-prediction sets against any training weight set -> [N].  With groups, a
    sample is never compared with training sets of its own group (leave-one-member-out)."""
    t = np.asarray(targets)
    if not train_preds:
        raise ValueError("novelty: no training predictions")
    W = np.stack([np.asarray(p) != t for p in train_preds]).astype(np.int32)          # [M, E]
    out = np.zeros(len(sample_preds))
    for i, p in enumerate(sample_preds):
        w = (np.asarray(p) != t).astype(np.int32)
        inter = W @ w
        union = W.sum(1) + w.sum() - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        if sample_groups is not None and train_groups is not None:
            iou = np.where(np.asarray([g == sample_groups[i] for g in train_groups]), -np.inf, iou)
        best = iou.max()
        out[i] = 1.0 - best if np.isfinite(best) else math.nan
    return out


def _group_std(train: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """Per-coordinate vector holding the zoo's std of that coordinate's layout group."""
    D = layout.num_blocks * layout.block_size
    out = torch.zeros(D)
    bs = layout.block_size
    for g in layout.groups:
        s = g.first_block * bs
        out[s:s + g.numel] = float(train[:, s:s + g.numel].double().std(unbiased=False))
    return out


def noise_baseline(train: torch.Tensor, layout: WeightLayout, sigma: float, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random training checkpoints plus N(0, (sigma x per-group std)^2) noise (raw, flat)."""
    x = _flat(train, layout)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n,), generator=g)
    noise = torch.randn(n, x.shape[1], generator=g) * _group_std(x, layout) * sigma
    return (x[idx] + noise) * layout.valid_mask.reshape(1, -1)


def average_baseline(train: torch.Tensor, layout: WeightLayout, k: int = 16, draws: int = 100,
                     seed: int = 0) -> torch.Tensor:
    """``draws`` averages of ``k`` training checkpoints picked at random without replacement."""
    x = _flat(train, layout)
    g = torch.Generator().manual_seed(seed)
    k = min(k, x.shape[0])
    return torch.stack([x[torch.randperm(x.shape[0], generator=g)[:k]].mean(0) for _ in range(draws)])


def gaussian_baseline(train: torch.Tensor, layout: WeightLayout, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` draws of an independent per-coordinate Gaussian fitted to the training checkpoints."""
    x = _flat(train, layout).double()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, x.shape[1], generator=g, dtype=torch.float64)
    return (x.mean(0) + z * x.std(0, unbiased=False)).float() * layout.valid_mask.reshape(1, -1)


def baselines(train: torch.Tensor, layout: WeightLayout, n: int = 100, sigmas: Sequence[float] = DEFAULT_SIGMAS,
              k: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Zeng et al.'s baselines by name: ``noise σ=…`` per level, ``average of k``, ``gaussian``."""
    out = {f"noise σ={s:g}": noise_baseline(train, layout, s, n, seed + i) for i, s in enumerate(sigmas)}
    out[f"average of {k}"] = average_baseline(train, layout, k, n, seed + 100)
    out["gaussian"] = gaussian_baseline(train, layout, n, seed + 200)
    return out


@dataclass
class MethodScores:
    name: str
    kind: str                       # "generated" | "baseline" | "zoo"
    accuracy: np.ndarray
    novelty: np.ndarray

    def summary(self) -> dict[str, float]:
        a, v = self.accuracy, self.novelty[np.isfinite(self.novelty)]
        return {"n": int(len(a)), "acc_best": float(a.max()), "acc_avg": float(a.mean()),
                "acc_median": float(np.median(a)), "novelty_median": float(np.median(v)) if len(v) else math.nan,
                "novelty_mean": float(v.mean()) if len(v) else math.nan}


@dataclass
class MemorisationResult:
    task: str
    methods: list[MethodScores] = field(default_factory=list)
    ratio: float = MEMORISING_RATIO

    def get(self, name: str) -> MethodScores:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"memorisation: no method {name!r} (have {[m.name for m in self.methods]})")

    @property
    def reference_novelty(self) -> float | None:
        """Median leave-one-member-out novelty of the zoo's own checkpoints (None: one member)."""
        z = [m for m in self.methods if m.kind == "zoo"]
        if not z:
            return None
        v = z[0].novelty[np.isfinite(z[0].novelty)]
        return float(np.median(v)) if len(v) else None

    def memorising(self, name: str) -> bool | None:
        """Median novelty of ``name`` below ``ratio`` x the zoo's own (fresh runs) median novelty;
        None when that is not decidable (one member, or the zoo's own median novelty is 0: members
        that make the same mistakes, as in a partial zoo on a shared base)."""
        ref = self.reference_novelty
        if ref is None or ref <= 0:
            return None
        return bool(self.get(name).summary()["novelty_median"] < self.ratio * ref)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "reference_novelty": self.reference_novelty, "ratio": self.ratio,
                "methods": {m.name: {"kind": m.kind, **m.summary(), "accuracy": m.accuracy.tolist(),
                                     "novelty": m.novelty.tolist(),
                                     "memorising": None if m.kind == "zoo" else self.memorising(m.name)}
                            for m in self.methods}}

    def table(self) -> str:
        ref = self.reference_novelty
        rows = [f"Task `{self.task}` — novelty = 1 - max wrong-prediction IoU vs any training checkpoint "
                f"(held-out split); memorising = median novelty < {self.ratio:g} x the zoo's own "
                f"({cell(ref)})", "",
                "| weight sets | kind | n | acc best | acc avg | acc median | novelty median | novelty mean | "
                "memorising |", "|---|---|---|---|---|---|---|---|---|"]
        for m in self.methods:
            s = m.summary()
            mem = "—" if m.kind == "zoo" else cell(self.memorising(m.name))
            rows.append(f"| {m.name} | {m.kind} | {s['n']} | {cell(s['acc_best'])} | {cell(s['acc_avg'])} | "
                        f"{cell(s['acc_median'])} | {cell(s['novelty_median'])} | {cell(s['novelty_mean'])} | {mem} |")
        return "\n".join(rows)

    def plot(self, path: str) -> str:
        """Accuracy vs novelty scatter: one panel per generated method, baselines and zoo in each."""
        import matplotlib         # the plotting backend is chosen only where a plot is made

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        gens = [m for m in self.methods if m.kind == "generated"] or [None]
        fig, axes = plt.subplots(1, len(gens), figsize=(5.5 * len(gens), 4.5), squeeze=False)
        others = [m for m in self.methods if m.kind != "generated"]
        cmap = plt.get_cmap("tab10")
        for ax, g in zip(axes[0], gens):
            for i, m in enumerate(others):
                marker = "*" if m.kind == "zoo" else "o"
                ax.scatter(m.novelty, m.accuracy, s=14 if m.kind != "zoo" else 40, alpha=0.55, marker=marker,
                           color=cmap((i + 1) % 10), label=m.name)
            if g is not None:
                ax.scatter(g.novelty, g.accuracy, s=22, color="black", marker="x", label=g.name)
                ax.set_title(f"{g.name}: accuracy vs novelty")
            ax.set_xlabel("novelty (1 - max wrong-set IoU vs training checkpoints)")
            ax.set_ylabel("accuracy (held-out split)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        fig.suptitle(f"memorisation on {self.task}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def memorisation_study(adapter, layout: WeightLayout, train: torch.Tensor, generated: Mapping[str, torch.Tensor],
                       train_groups: Sequence | None = None, n: int = 100, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                       k: int = 16, seed: int = 0, split: str = "test", task: str | None = None,
                       ratio: float = MEMORISING_RATIO) -> MemorisationResult:
    """Score generated weight sets (raw, flat ``[N, D]`` per method name) and Zeng et al.'s baselines
    against the training checkpoints ``train`` (raw, flat; ``train_groups``: member id per row)."""
    train = _flat(train, layout)
    targets = adapter.targets(split)
    _, train_preds = score_weight_sets(adapter, layout, train, split, seed)
    res = MemorisationResult(task or getattr(adapter, "condition", ""), ratio=ratio)
    if train_groups is not None and len(set(train_groups)) > 1:
        acc = np.asarray([float(np.mean(p == targets)) for p in train_preds])
        res.methods.append(MethodScores("zoo (vs other members)", "zoo", acc,
                                        novelty(train_preds, train_preds, targets, list(train_groups),
                                                list(train_groups))))
    for kind, sets in (("generated", generated), ("baseline", baselines(train, layout, n, sigmas, k, seed))):
        for name, flat in sets.items():
            acc, preds = score_weight_sets(adapter, layout, flat, split, seed)
            res.methods.append(MethodScores(name, kind, acc, novelty(preds, train_preds, targets)))
    return res
