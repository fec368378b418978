"""Metric functions of the evaluation protocols (p-diff, Denoised Weights, D2NWG, Zeng et al.).

All functions are pure (numpy / torch in, floats out) so they can be checked by hand.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["wrong_set", "wrong_iou", "pairwise_iou", "nearest_iou", "summarize", "epochs_to_reach",
           "time_to_reach", "reached", "nn_distances", "l1_error", "speedup"]


def wrong_set(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Indices of the wrong predictions."""
    p, t = np.asarray(predictions), np.asarray(targets)
    if p.shape != t.shape:
        raise ValueError(f"predictions shape {p.shape} != targets shape {t.shape}")
    return np.flatnonzero(p != t)


def wrong_iou(pred_a: np.ndarray, pred_b: np.ndarray, targets: np.ndarray) -> float:
    """p-diff's similarity: |W_a ∩ W_b| / |W_a ∪ W_b| over the indices of wrong predictions.

    Two models that are both never wrong are identical in this sense (IoU 1)."""
    wa, wb = set(wrong_set(pred_a, targets).tolist()), set(wrong_set(pred_b, targets).tolist())
    union = wa | wb
    if not union:
        return 1.0
    return len(wa & wb) / len(union)


def pairwise_iou(preds: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Symmetric [K, K] matrix of :func:`wrong_iou` (diagonal 1)."""
    k = len(preds)
    wrong = [np.asarray(p) != np.asarray(targets) for p in preds]
    out = np.ones((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            union = np.logical_or(wrong[i], wrong[j]).sum()
            inter = np.logical_and(wrong[i], wrong[j]).sum()
            out[i, j] = out[j, i] = 1.0 if union == 0 else inter / union
    return out


def nearest_iou(sample_preds: Sequence[np.ndarray], ref_preds: Sequence[np.ndarray],
                targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample: (max IoU with any reference model, index of that model)."""
    best = np.zeros(len(sample_preds))
    idx = np.zeros(len(sample_preds), dtype=np.int64)
    for i, p in enumerate(sample_preds):
        ious = [wrong_iou(p, r, targets) for r in ref_preds]
        idx[i] = int(np.argmax(ious))
        best[i] = ious[idx[i]]
    return best, idx


def summarize(values: Iterable[float], higher_is_better: bool = True) -> dict[str, float]:
    """p-diff's best / avg / median (and worst) over N samples; NaNs are ignored."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"best": math.nan, "avg": math.nan, "median": math.nan, "worst": math.nan, "n": 0}
    best, worst = (v.max(), v.min()) if higher_is_better else (v.min(), v.max())
    return {"best": float(best), "avg": float(v.mean()), "median": float(np.median(v)), "worst": float(worst),
            "n": int(v.size)}


def reached(value: float, target: float, higher_is_better: bool, tol: float = 0.0) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= target - tol if higher_is_better else value <= target + tol


def epochs_to_reach(curve: Sequence[float], target: float, higher_is_better: bool = True,
                    tol: float = 0.0) -> int | None:
    """First epoch index (0 = before any training) whose metric reaches ``target``; None if never."""
    for e, v in enumerate(curve):
        if reached(v, target, higher_is_better, tol):
            return e
    return None


def time_to_reach(curve: Sequence[float], wall: Sequence[float], target: float, higher_is_better: bool = True,
                  tol: float = 0.0) -> float | None:
    """Cumulative wall time (``wall[e]`` = seconds spent when epoch e's metric was measured)."""
    e = epochs_to_reach(curve, target, higher_is_better, tol)
    return None if e is None else float(wall[e])


def speedup(reference: float | None, value: float | None) -> float | None:
    """reference / value (e.g. from-scratch epochs / epochs from this init); inf if value is 0."""
    if reference is None or value is None:
        return None
    if value == 0:
        return math.inf
    return reference / value


def nn_distances(samples: torch.Tensor, reference_chunks: Iterable,
                 sample_groups: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour L2 distance from each row of ``samples`` [S, ...] to the reference rows,
    given as an iterable of chunks (streamed: memory is one chunk at a time).

    A chunk is a tensor [R, ...] or a pair (tensor, groups) with one group label per row; when
    ``sample_groups`` is given, a sample never matches a reference row of its own group (a zoo
    member's own checkpoints, for the zoo's internal distances).  Returns (distance [S], global
    reference row index [S]); distance is inf and index -1 where nothing could match."""
    s = samples.reshape(samples.shape[0], -1).to(torch.float64)
    best = torch.full((s.shape[0],), math.inf, dtype=torch.float64)
    idx = torch.full((s.shape[0],), -1, dtype=torch.int64)
    offset = 0
    for chunk in reference_chunks:
        groups = None
        if isinstance(chunk, tuple):
            chunk, groups = chunk
        r = chunk.reshape(chunk.shape[0], -1).to(torch.float64)
        if r.shape[1] != s.shape[1]:
            raise ValueError(f"reference rows have {r.shape[1]} values, samples {s.shape[1]}")
        d = torch.cdist(s, r, compute_mode="donot_use_mm_for_euclid_dist")
        if sample_groups is not None and groups is not None:
            same = torch.tensor([[a == b for b in groups] for a in sample_groups], dtype=torch.bool)
            d = d.masked_fill(same, math.inf)
        m, a = d.min(dim=1)
        better = m < best
        best[better] = m[better]
        idx[better] = a[better] + offset
        offset += r.shape[0]
    return best.to(torch.float32), idx


def l1_error(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Mean absolute error between two image batches of the same shape (image translation L1)."""
    a = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred, dtype=torch.float64)
    b = torch.as_tensor(np.asarray(target) if not torch.is_tensor(target) else target, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"L1: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return float((a - b).abs().mean())
