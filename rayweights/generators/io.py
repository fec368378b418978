"""Model folders on storage: moving them between local disk and a URI (local path, file:// or
s3://), and loading one (``from_pretrained`` of the class its ``config.json`` names)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import pyarrow.fs as pafs
from torch import nn

from ..conditioning import SetTransformer
from ..storage import StorageError, exists, resolve
from .block_unet import BlockUNet1D
from .errors import GeneratorError
from .latent_denoiser import LatentDenoiser1D
from .pdiff import PDiffAutoencoder
from .vae import WeightVAE

__all__ = ["upload_dir", "download_dir", "local_copy", "load_model", "MODEL_CLASSES"]

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    c.__name__: c for c in (BlockUNet1D, PDiffAutoencoder, LatentDenoiser1D, WeightVAE, SetTransformer)}


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy the folder ``local_dir`` to ``uri`` (streamed; multipart on S3)."""
    loc = resolve(uri)
    if not loc.is_s3:
        os.makedirs(loc.path, exist_ok=True)
    try:
        pafs.copy_files(os.path.abspath(local_dir), loc.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=loc.fs)
    except OSError as exc:
        raise StorageError(f"cannot write {loc.describe()}: {exc}") from exc


def download_dir(uri: str, local_dir: str) -> None:
    loc = resolve(uri)
    try:
        pafs.copy_files(loc.path, os.path.abspath(local_dir), source_filesystem=loc.fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {loc.describe()}: {exc}") from exc


@contextlib.contextmanager
def local_copy(uri: str):
    """A local folder holding the contents of ``uri`` (the folder itself when it is local)."""
    loc = resolve(uri)
    if not loc.is_s3:
        if not os.path.isdir(loc.path):
            raise FileNotFoundError(loc.describe())
        yield loc.path
        return
    if not exists(loc):
        raise FileNotFoundError(loc.describe())
    with tempfile.TemporaryDirectory(prefix="rw-model-") as tmp:
        download_dir(uri, tmp)
        yield tmp


def model_class(name: str | None, what: str) -> type[nn.Module]:
    if name not in MODEL_CLASSES:
        raise GeneratorError(f"{what}: unknown model class {name!r} (known: {sorted(MODEL_CLASSES)})")
    return MODEL_CLASSES[name]


def load_model(uri: str, cls: type | None = None) -> nn.Module:
    """``cls.from_pretrained`` on a folder at a local path or URI (class from its config if None)."""
    try:
        with local_copy(uri) as d:
            if cls is None:
                with open(os.path.join(d, "config.json")) as f:
                    cls = model_class(json.load(f).get("_class_name"), uri)
            return cls.from_pretrained(d)
    except FileNotFoundError:
        raise GeneratorError(f"{uri}: no model folder") from None
