"""Base data sets for the classifier families, and an optional frozen feature extractor.

``dataset`` (spec field):

* ``digits`` — scikit-learn's bundled 8x8 digits (offline default), 1 channel;
* ``imagefolder:<path>`` — a torchvision ``ImageFolder`` (one sub-folder per class);
* ``torchvision:<Name>:<root>`` — a torchvision data set already on disk (``download=False``);
  only data sets stored as images / arrays are accepted (MNIST, FashionMNIST, KMNIST, SVHN, STL10,
  Flowers102, ...): CIFAR and ImageNet ship Python pickles / torch.load metadata and are refused
  (convert them to an ImageFolder or a Parquet image table);
* ``parquet:<uri>`` — a Parquet image table (file or folder, local or ``s3://``) with an ``image``
  column (encoded PNG/JPEG bytes, or a Hugging Face ``{bytes, path}`` struct) and a ``label`` column.

Images are float32 ``[N, C, H, W]`` in ``[-0.5, 0.5]`` (resized to ``image_size`` except digits).

``features: clip:<path>`` replaces images by the image embeddings of a CLIP vision model loaded
by path (D2NWG trains heads on CLIP features).  They are computed once per build and cached in
the zoo (``<zoo>/features/<key>.safetensors``) for every member to read.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
from functools import lru_cache

import numpy as np
import torch

__all__ = ["load_dataset", "dataset_prefix", "num_classes", "check_dataset", "features_key",
           "compute_features", "load_features", "feature_dim", "check_features", "task_split", "TORCHVISION_ALLOWED"]

TORCHVISION_ALLOWED = ("MNIST", "FashionMNIST", "KMNIST", "SVHN", "STL10", "Flowers102", "Food101",
                       "OxfordIIITPet", "DTD", "GTSRB", "EuroSAT", "Country211", "FGVCAircraft", "StanfordCars")
_PICKLED = ("CIFAR10", "CIFAR100", "ImageNet", "QMNIST", "EMNIST")


def _to_tensor_images(pils, image_size: int) -> torch.Tensor:
    from PIL import Image

    arrs = []
    for im in pils:
        im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous() - 0.5


def _load_parquet(uri: str, image_size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ...storage import resolve

    loc = resolve(uri)
    try:
        table = pq.read_table(loc.path, filesystem=loc.fs, columns=["image", "label"])
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ValueError(f"dataset: cannot read Parquet image table {loc.describe()} "
                         f"(needs columns image, label): {exc}") from exc
    col = table.column("image")
    if pa.types.is_struct(col.type):
        col = col.combine_chunks().field("bytes")
    images = [Image.open(io.BytesIO(b)) for b in col.to_pylist()]
    y = torch.tensor(table.column("label").to_pylist(), dtype=torch.int64)
    return _to_tensor_images(images, image_size), y


def _load_torchvision(name: str, root: str, image_size: int):
    import torchvision
    from torchvision import transforms

    if name in _PICKLED:
        raise ValueError(f"dataset: torchvision {name} is stored as Python pickles / torch.load metadata, which "
                         "this project never loads; convert it to an ImageFolder or a Parquet image table")
    if name not in TORCHVISION_ALLOWED:
        raise ValueError(f"dataset: torchvision {name!r} is not supported (allowed: {', '.join(TORCHVISION_ALLOWED)}; "
                         "or use imagefolder:<path> / parquet:<uri>)")
    cls = getattr(torchvision.datasets, name)
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    kw = {"download": False, "transform": tf}
    params = inspect.signature(cls).parameters
    if "train" in params:
        kw["train"] = True
    elif "split" in params:
        kw["split"] = "train"
    try:
        ds = cls(root, **kw)
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"dataset: torchvision {name} not found under {root} ({exc})") from exc
    X, y = zip(*[ds[i] for i in range(len(ds))])
    X = torch.stack(X)
    return X - 0.5, torch.tensor([int(v) for v in y], dtype=torch.int64)


@lru_cache(maxsize=4)
def load_dataset(name: str, image_size: int = 32):
    """-> (X float32 [N, C, H, W] in [-0.5, 0.5], y int64 [N])."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]
        return torch.from_numpy(X), torch.from_numpy(d.target.astype(np.int64))
    if name.startswith("imagefolder:"):
        from torchvision import datasets, transforms

        path = name.split(":", 1)[1]
        if not os.path.isdir(path):
            raise ValueError(f"dataset: image folder {path} does not exist")
        ds = datasets.ImageFolder(path, transform=transforms.Compose(
            [transforms.Resize((image_size, image_size)), transforms.ToTensor()]))
        X = torch.stack([ds[i][0] for i in range(len(ds))])
        return X - 0.5, torch.tensor(ds.targets, dtype=torch.int64)
    if name.startswith("torchvision:"):
        parts = name.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"dataset: {name!r} should be torchvision:<Name>:<root>")
        return _load_torchvision(parts[1], parts[2], image_size)
    if name.startswith("parquet:"):
        return _load_parquet(name.split(":", 1)[1], image_size)
    raise ValueError(f"dataset: unknown {name!r} (digits | imagefolder:<path> | torchvision:<Name>:<root> | "
                     "parquet:<uri>)")


def check_dataset(name: str, image_size: int = 32) -> None:
    """Cheap existence checks before anything trains (the full load happens in the workers)."""
    if name.startswith("imagefolder:") and not os.path.isdir(name.split(":", 1)[1]):
        raise ValueError(f"dataset: image folder {name.split(':', 1)[1]} does not exist")
    if name.startswith("torchvision:"):
        parts = name.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"dataset: {name!r} should be torchvision:<Name>:<root>")
        if parts[1] in _PICKLED or parts[1] not in TORCHVISION_ALLOWED:
            _load_torchvision(parts[1], parts[2], image_size)     # raises the explanatory error
        if not os.path.isdir(parts[2]):
            raise ValueError(f"dataset: torchvision root {parts[2]} does not exist")
    if name.startswith("parquet:"):
        from ...storage import StorageError, exists, resolve

        try:
            ok = exists(resolve(name.split(":", 1)[1]))
        except StorageError as exc:
            raise ValueError(f"dataset: {exc}") from exc
        if not ok:
            raise ValueError(f"dataset: Parquet image table {name.split(':', 1)[1]} does not exist")
    if name != "digits" and not name.startswith(("imagefolder:", "torchvision:", "parquet:")):
        load_dataset(name)        # raises the "unknown dataset" error


def dataset_prefix(name: str) -> str:
    if name == "digits":
        return "digits"
    tail = name.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    if name.startswith("torchvision:"):
        tail = name.split(":")[1].lower()
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in tail) or "data"


def num_classes(name: str, image_size: int = 32) -> int:
    return int(load_dataset(name, image_size)[1].max()) + 1


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
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    check_features(features)
    path = features.split(":", 1)[1]
    model = CLIPVisionModelWithProjection.from_pretrained(path).to(device).eval()
    cfg: CLIPVisionConfig = model.config
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    pp = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp):
        import json

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
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from ...storage import exists, join, read_bytes, resolve, write_bytes_atomic

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
    import json

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
