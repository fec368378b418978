"""Moving model folders between local disk and a storage URI (local path, file:// or s3://)."""

from __future__ import annotations

import contextlib
import os
import tempfile

import pyarrow.fs as pafs

from ..storage import StorageError, exists, resolve

__all__ = ["upload_dir", "download_dir", "local_copy"]


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
