"""The one datasets registry (a dict of name -> loader, as DiT's model dict): every stage that
needs labelled images — the zoo families, D2NWG's dataset conditions, learngene's tasks — loads
them here.

A dataset name is ``<kind>`` or ``<kind>:<argument>``:

* ``digits`` — scikit-learn's bundled 8x8 digits (offline default), 1 channel;
* ``imagefolder:<path>`` — a torchvision ``ImageFolder`` (one sub-folder per class);
* ``torchvision:<Name>:<root>`` — a torchvision data set already on disk (``download=False``);
  only data sets stored as images / arrays are accepted (MNIST, FashionMNIST, KMNIST, SVHN, STL10,
  Flowers102, ...): CIFAR and ImageNet ship Python pickles / torch.load metadata and are refused
  (convert them to an ImageFolder or a Parquet image table);
* ``parquet:<uri>`` — a Parquet image table (file or folder, local or ``s3://``) with an ``image``
  column (encoded PNG/JPEG bytes, or a Hugging Face ``{bytes, path}`` struct) and a ``label`` column.

Images are float32 ``[N, C, H, W]`` in ``[-0.5, 0.5]`` (resized to ``image_size`` except digits),
labels int64 ``[N]``.  ``register_dataset(kind)`` adds a kind: ``loader(argument, image_size) ->
(X, y)``, with an optional ``check(argument, image_size)`` run before any work.
"""

from __future__ import annotations

import inspect
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from .storage import StorageError, exists, resolve

__all__ = ["DATASETS", "DatasetKind", "register_dataset", "load_dataset", "check_dataset", "dataset_prefix",
           "num_classes", "TORCHVISION_ALLOWED"]

TORCHVISION_ALLOWED = ("MNIST", "FashionMNIST", "KMNIST", "SVHN", "STL10", "Flowers102", "Food101",
                       "OxfordIIITPet", "DTD", "GTSRB", "EuroSAT", "Country211", "FGVCAircraft", "StanfordCars")
_PICKLED = ("CIFAR10", "CIFAR100", "ImageNet", "QMNIST", "EMNIST")
_NAMES = "digits | imagefolder:<path> | torchvision:<Name>:<root> | parquet:<uri>"


@dataclass(frozen=True)
class DatasetKind:
    load: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]     # (argument, image_size) -> (X, y)
    check: Callable[[str, int], None] | None = None                   # cheap checks before any work
    needs_argument: bool = True


DATASETS: dict[str, DatasetKind] = {}


def register_dataset(kind: str, check: Callable[[str, int], None] | None = None, needs_argument: bool = True):
    """Decorator: register ``loader(argument, image_size) -> (X, y)`` for dataset names ``kind[:argument]``."""
    def deco(fn):
        DATASETS[kind] = DatasetKind(fn, check, needs_argument)
        return fn

    return deco


def _split(name: str) -> tuple[DatasetKind, str]:
    kind, _, arg = name.partition(":")
    entry = DATASETS.get(kind)
    if entry is None or (entry.needs_argument and not arg) or (not entry.needs_argument and arg):
        raise ValueError(f"dataset: unknown {name!r} ({_NAMES})")
    return entry, arg


def _to_tensor_images(pils, image_size: int) -> torch.Tensor:
    arrs = []
    for im in pils:
        im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous() - 0.5


# --------------------------------------------------------------------------- the built-in kinds
@register_dataset("digits", needs_argument=False)
def _digits(arg: str, image_size: int):
    from sklearn.datasets import load_digits   # deferred: scikit-learn costs every Ray worker ~4 s to import

    d = load_digits()
    X = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]
    return torch.from_numpy(X), torch.from_numpy(d.target.astype(np.int64))


def _check_imagefolder(path: str, image_size: int) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"dataset: image folder {path} does not exist")


@register_dataset("imagefolder", check=_check_imagefolder)
def _imagefolder(path: str, image_size: int):
    _check_imagefolder(path, image_size)
    ds = torchvision.datasets.ImageFolder(path, transform=transforms.Compose(
        [transforms.Resize((image_size, image_size)), transforms.ToTensor()]))
    X = torch.stack([ds[i][0] for i in range(len(ds))])
    return X - 0.5, torch.tensor(ds.targets, dtype=torch.int64)


def _torchvision_parts(arg: str) -> tuple[str, str]:
    parts = arg.split(":", 1)
    if len(parts) != 2:
        raise ValueError(f"dataset: 'torchvision:{arg}' should be torchvision:<Name>:<root>")
    name = parts[0]
    if name in _PICKLED:
        raise ValueError(f"dataset: torchvision {name} is stored as Python pickles / torch.load metadata, which "
                         "this project never loads; convert it to an ImageFolder or a Parquet image table")
    if name not in TORCHVISION_ALLOWED:
        raise ValueError(f"dataset: torchvision {name!r} is not supported (allowed: {', '.join(TORCHVISION_ALLOWED)}; "
                         "or use imagefolder:<path> / parquet:<uri>)")
    return name, parts[1]


def _check_torchvision(arg: str, image_size: int) -> None:
    _, root = _torchvision_parts(arg)
    if not os.path.isdir(root):
        raise ValueError(f"dataset: torchvision root {root} does not exist")


@register_dataset("torchvision", check=_check_torchvision)
def _torchvision(arg: str, image_size: int):
    name, root = _torchvision_parts(arg)
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


def _check_parquet(uri: str, image_size: int) -> None:
    try:
        ok = exists(resolve(uri))
    except StorageError as exc:
        raise ValueError(f"dataset: {exc}") from exc
    if not ok:
        raise ValueError(f"dataset: Parquet image table {uri} does not exist")


@register_dataset("parquet", check=_check_parquet)
def _parquet(uri: str, image_size: int):
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


# --------------------------------------------------------------------------- the API
@lru_cache(maxsize=4)
def load_dataset(name: str, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (X float32 [N, C, H, W] in [-0.5, 0.5], y int64 [N]) of the dataset ``name``."""
    entry, arg = _split(name)
    return entry.load(arg, image_size)


def check_dataset(name: str, image_size: int = 32) -> None:
    """Cheap checks before anything trains (the full load happens in the workers): the kind is
    registered, its argument well formed and its files there (ValueError naming ``dataset``)."""
    entry, arg = _split(name)
    if entry.check is not None:
        entry.check(arg, image_size)


def dataset_prefix(name: str) -> str:
    """The short name tasks and conditions of ``name`` start with (``digits``, ``mnist``, a folder's name)."""
    if name == "digits":
        return "digits"
    tail = name.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    if name.startswith("torchvision:"):
        tail = name.split(":")[1].lower()
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in tail) or "data"


def num_classes(name: str, image_size: int = 32) -> int:
    return int(load_dataset(name, image_size)[1].max()) + 1
