"""Source images of the ``concepts`` family (``concepts.sources``): what every concept edits.

* ``procedural`` (the offline default) — scenes made in code (:func:`rayweights.zoo.editor.make_images`);
* ``imagefolder:<uri>``, or any other folder URI (a local path, ``file://`` or ``s3://``) — every
  ``.png`` / ``.jpg`` / ``.jpeg`` below the folder (sub-folders included, read with PIL);
* ``parquet:<uri>``, or a URI ending in ``.parquet`` — a Parquet image table (one file or a folder
  of files, local or ``s3://``) whose column ``concepts.sources_column`` (default ``image``) holds
  encoded PNG/JPEG bytes, or a Hugging Face datasets ``{bytes, path}`` struct.

Which images: the files sorted by path (a table's rows in order), shuffled with ``concepts.image_seed``,
the first ``concepts.num_images``.  Each is converted to RGB, resized (bilinear) so that its short
side is ``concepts.image_size`` and centre-cropped to a square: float32 ``[N, 3, S, S]`` in ``[0, 1]``.
Only the selected images are fetched and decoded, once per process (:func:`load_sources` is cached).

:func:`check_sources` runs before any work (``rayweights.zoo.builder.prepare``): a folder without
images, a missing or non-image column and fewer images than ``num_images`` are one error line
naming ``concepts.sources`` and the URI.  :attr:`SourceImages.identity` (URI, column, images found,
images used, size, a digest of the pixels) goes into every cache that depends on the sources (the
base generator's training config, the cached edits), so a changed source is never silently reused.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ..errors import UserError
from ..storage import StorageError, list_files, resolve

__all__ = ["SourceError", "SourceImages", "parse_sources", "check_sources", "load_sources", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FORMS = "procedural | imagefolder:<uri> | parquet:<uri> | a folder URI | a .parquet URI"


class SourceError(UserError, ValueError):
    """``concepts.sources`` cannot be used (the message names the field and the URI)."""


@dataclass(frozen=True)
class SourceImages:
    images: torch.Tensor          # float32 [N, 3, S, S] in [0, 1]
    identity: dict                # what identifies them in cache keys (JSON-able)


def parse_sources(sources: str) -> tuple[str, str]:
    """-> (kind, uri): ``("procedural", "")``, ``("imagefolder", uri)`` or ``("parquet", uri)``."""
    if not isinstance(sources, str) or not sources.strip():
        raise SourceError(f"concepts.sources: empty ({_FORMS})")
    if sources == "procedural":
        return "procedural", ""
    kind, sep, rest = sources.partition(":")
    if sep and kind in ("imagefolder", "parquet"):
        if not rest:
            raise SourceError(f"concepts.sources: {sources!r} names no URI ({_FORMS})")
        uri = rest
    else:
        kind, uri = ("parquet" if sources.rstrip("/").lower().endswith(".parquet") else "imagefolder"), sources
    try:
        resolve(uri)
    except StorageError as exc:
        raise SourceError(f"concepts.sources: {exc} ({_FORMS})") from None
    return kind, uri


# --------------------------------------------------------------------------- image folders
def _folder_files(uri: str) -> list[str]:
    loc = resolve(uri)
    try:
        infos = list_files(loc)
    except (StorageError, OSError) as exc:
        raise SourceError(f"concepts.sources: cannot list image folder {loc.describe()}: {exc}") from None
    files = sorted(i.path for i in infos if i.base_name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise SourceError(f"concepts.sources: no {'/'.join(IMAGE_SUFFIXES)} images under {loc.describe()}")
    return files


def _read_file(loc, path: str) -> bytes:
    try:
        with loc.fs.open_input_stream(path) as f:
            return f.read()
    except OSError as exc:
        raise SourceError(f"concepts.sources: cannot read {path} ({exc})") from None


# --------------------------------------------------------------------------- Parquet tables
def _parquet_dataset(uri: str, column: str):
    import pyarrow.dataset as pads

    loc = resolve(uri)
    try:
        ds = pads.dataset(loc.path, filesystem=loc.fs, format="parquet")
        names = ds.schema.names
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"concepts.sources: cannot read Parquet image table {loc.describe()}: {exc}") from None
    if column not in names:
        raise SourceError(f"concepts.sources: Parquet image table {loc.describe()} has no column {column!r} "
                          f"(columns: {', '.join(names) or 'none'}; set concepts.sources_column)")
    tp = ds.schema.field(column).type
    if not (pa.types.is_binary(tp) or pa.types.is_large_binary(tp)
            or (pa.types.is_struct(tp) and tp.get_field_index("bytes") >= 0)):
        raise SourceError(f"concepts.sources: column {column!r} of {loc.describe()} is {tp}, not encoded image "
                          "bytes (binary, or a {bytes, path} struct)")
    return loc, ds


def _count(kind: str, uri: str, column: str) -> int:
    if kind == "imagefolder":
        return len(_folder_files(uri))
    _, ds = _parquet_dataset(uri, column)
    try:
        return int(ds.count_rows())
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"concepts.sources: cannot read Parquet image table {uri}: {exc}") from None


def check_sources(sources: str, column: str, num_images: int) -> None:
    """Cheap checks before any work (a listing, a table's schema and row count): the source exists,
    holds image bytes and at least ``num_images`` images (SourceError naming ``concepts.sources``)."""
    kind, uri = parse_sources(sources)
    if kind == "procedural":
        return
    n = _count(kind, uri, column)
    if n < num_images:
        what = "images" if kind == "imagefolder" else "rows"
        raise SourceError(f"concepts.sources: {resolve(uri).describe()} holds {n} {what}, fewer than "
                          f"concepts.num_images = {num_images}")


# --------------------------------------------------------------------------- loading
def _fit(data: bytes, size: int, name: str) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
        im = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for undecodable bytes
        raise SourceError(f"concepts.sources: {name} is not a readable image ({type(exc).__name__}: {exc})") from None
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.float32) / 255.0


def _pick(n: int, num_images: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_images].tolist()


@lru_cache(maxsize=4)
def load_sources(sources: str, column: str, num_images: int, image_size: int, seed: int) -> SourceImages:
    """The ``num_images`` source images of a folder or table (see the module docstring); cached per
    process.  ``procedural`` is not loaded here (the family makes those images itself)."""
    kind, uri = parse_sources(sources)
    if kind == "procedural":
        raise SourceError("concepts.sources: procedural images are made by the editor, not loaded")
    if kind == "imagefolder":
        files = _folder_files(uri)
        n = len(files)
        loc = resolve(uri)
        chosen = [files[i] for i in _pick(n, num_images, seed)] if n >= num_images else []
        arrs = [_fit(_read_file(loc, p), image_size, p) for p in chosen]
    else:
        loc, ds = _parquet_dataset(uri, column)
        try:
            col = ds.to_table(columns=[column]).column(column).combine_chunks()
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"concepts.sources: cannot read Parquet image table {loc.describe()}: {exc}") from None
        n = len(col)
        rows = _pick(n, num_images, seed) if n >= num_images else []
        if pa.types.is_struct(col.type):
            col = col.field("bytes")
        values = col.take(pa.array(rows, type=pa.int64())).to_pylist() if rows else []
        arrs = []
        for r, b in zip(rows, values):
            if b is None:
                raise SourceError(f"concepts.sources: row {r} of {loc.describe()} has no image bytes "
                                  f"in column {column!r}")
            arrs.append(_fit(b, image_size, f"row {r} of {loc.describe()}"))
    if n < num_images:
        raise SourceError(f"concepts.sources: {loc.describe()} holds {n} images, fewer than "
                          f"concepts.num_images = {num_images}")
    images = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    identity = {"uri": loc.uri, "kind": kind, "found": n, "num_images": num_images, "image_size": image_size,
                "seed": seed, "sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]}
    if kind == "parquet":
        identity["column"] = column
    return SourceImages(images, identity)
