"""The classifier families' data: the base data sets come from :mod:`rayweights.datasets` (the one
registry: ``digits``, ``imagefolder:<path>``, ``torchvision:<Name>:<root>``, ``parquet:<uri>``);
here: the task splits and an optional frozen feature extractor.

``features: clip:<path>`` replaces images by the image embeddings of a CLIP vision model loaded
by path (D2NWG trains heads on CLIP features).  They are computed once per build and cached in
the zoo (``<zoo>/features/<key>.safetensors``) for every member to read.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ...datasets import TORCHVISION_ALLOWED, check_dataset, dataset_prefix, load_dataset, num_classes
from ...storage import exists, join, read_bytes, resolve, write_bytes_atomic

__all__ = ["load_dataset", "dataset_prefix", "num_classes", "check_dataset", "features_key",
           "compute_features", "load_features", "feature_dim", "check_features", "task_split", "TORCHVISION_ALLOWED"]


# --------------------------------------------------------------------------- frozen features
def features_key(dataset: str, features: str, image_size: int) -> str:
    return hashlib.sha1(f"{dataset}|{features}|{image_size}".encode()).hexdigest()[:16]


def check_features(features: str) -> None:
    if not features:
        return
    if not features.startswith("clip:"):
        raise ValueError(f"features: {features!r} is not '' or 'clip:<path>'")
    path = features.split(":", 1)[1]
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"features: {path} is not a CLIP model folder (no config.json)")


@torch.no_grad()
def compute_features(dataset: str, features: str, image_size: int, device: str = "cpu",
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP image embeddings of every example, standardised per dimension: -> (F float32 [N, D], y)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection   # heavy; only for CLIP features

    check_features(features)
    path = features.split(":", 1)[1]
    model = CLIPVisionModelWithProjection.from_pretrained(path).to(device).eval()
    cfg: CLIPVisionConfig = model.config
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    pp = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp):
        with open(pp) as f:
            d = json.load(f)
        mean, std = d.get("image_mean", mean), d.get("image_std", std)
    X, y = load_dataset(dataset, image_size)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(X), batch_size):
        x = X[i:i + batch_size].to(device) + 0.5
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                            align_corners=False)
        out.append(model(pixel_values=(x - m) / s).image_embeds.float().cpu())
    Fx = torch.cat(out)
    Fx = (Fx - Fx.mean(0)) / Fx.std(0).clamp_min(1e-6)      # standardised per dimension over the data set
    return Fx, y


_FEATURES: dict = {}


def load_features(output: str, dataset: str, features: str, image_size: int, device: str = "cpu",
                  store: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features from the zoo's cache (``<output>/features/<key>.safetensors``), else computed
    (and written there when ``store``)."""
    key = features_key(dataset, features, image_size)
    loc = resolve(join(output, "features", f"{key}.safetensors")) if output else None
    res = _FEATURES.get((output, key))
    if res is None and loc is not None and exists(loc):
        d = st_load(read_bytes(loc))
        res = (d["features"], d["labels"])
    elif res is None:
        res = compute_features(dataset, features, image_size, device)
    if store and loc is not None and not exists(loc):
        write_bytes_atomic(loc, st_save({"features": res[0].contiguous(), "labels": res[1].contiguous()},
                                        metadata={"dataset": dataset, "features": features,
                                                  "image_size": str(image_size)}))
    _FEATURES[(output, key)] = res
    return res


def feature_dim(features: str) -> int:
    """The embedding size of a ``clip:<path>`` extractor, read from its config (no weights loaded)."""
    check_features(features)
    with open(os.path.join(features.split(":", 1)[1], "config.json")) as f:
        cfg = json.load(f)
    dim = cfg.get("projection_dim") or cfg.get("vision_config", {}).get("projection_dim")
    if not dim:
        raise ValueError(f"features: {features} has no projection_dim in its config")
    return int(dim)


# --------------------------------------------------------------------------- task splits
def task_split(dataset: str, task, val_fraction: float = 0.3, seed: int = 0, max_per_class: int = 0,
               data: tuple[torch.Tensor, torch.Tensor] | None = None, image_size: int = 32):
    """Fixed train/val split of the task's examples; labels remapped to 0..k-1.

    ``max_per_class`` keeps that many examples per class (D2NWG's subsets of classes *and*
    examples); ``data`` = (X, y) replaces the data set (e.g. its frozen features)."""
    X, y = data if data is not None else load_dataset(dataset, image_size)
    mask = torch.zeros_like(y, dtype=torch.bool)
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.int64)
    for i, c in enumerate(task.classes):
        if c > int(y.max()):
            raise ValueError(f"tasks: class {c} of {task.condition} is not in {dataset} "
                             f"({int(y.max()) + 1} classes)")
        mask |= y == c
        remap[c] = i
    idx = mask.nonzero().squeeze(1)
    if max_per_class:
        g0 = torch.Generator().manual_seed(20_000 + seed)
        keep = []
        for c in task.classes:
            ci = idx[y[idx] == c]
            keep.append(ci[torch.randperm(len(ci), generator=g0)[:max_per_class]])
        idx = torch.cat(keep).sort().values
    Xs, ys = X[idx], remap[y[idx]]
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(ys), generator=g)
    n_val = int(len(ys) * val_fraction)
    return (Xs[perm[n_val:]], ys[perm[n_val:]]), (Xs[perm[:n_val]], ys[perm[:n_val]])
