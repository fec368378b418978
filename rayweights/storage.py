"""URIs to filesystems: a local folder, ``file://`` or ``s3://`` behave the same.

S3 credentials come from the standard AWS chain (environment, shared config, instance role);
an endpoint override (MinIO, moto on loopback, a VPC endpoint) comes from
``RAYWEIGHTS_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.  Nothing secret is
ever printed: :func:`describe` shows the bucket/path and the endpoint only.

All writes that readers may race with go through :func:`write_bytes_atomic`: a local file is
written to a temporary name and renamed; an S3 object appears whole on a single PUT.
"""

from __future__ import annotations

import json
import os
import posixpath
import struct
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs
from .errors import UserError

__all__ = ["Location", "resolve", "join", "write_bytes_atomic", "read_bytes", "exists",
           "StorageError", "check_writable", "s3_endpoint", "safetensors_metadata"]


class StorageError(UserError, OSError):
    """A URI cannot be resolved, read or written (the message names the URI)."""


def s3_endpoint() -> str | None:
    for var in ("RAYWEIGHTS_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        val = os.environ.get(var)
        if val:
            return val
    return None


_S3FS_CACHE: dict = {}


def _s3fs():
    """An s3fs filesystem (boto-based) for object writes: one PutObject below 50 MB."""
    import s3fs                    # only for s3:// writes (boto is slow to import)

    key = (s3_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _S3FS_CACHE:
        kwargs: dict = {}
        if s3_endpoint():
            kwargs["client_kwargs"] = {"endpoint_url": s3_endpoint()}
        _S3FS_CACHE[key] = s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
    return _S3FS_CACHE[key]


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme in ("http", "https"):
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc
        else:
            kwargs["endpoint_override"] = endpoint
        kwargs["allow_bucket_creation"] = True
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem plus the path inside it."""

    fs: pafs.FileSystem
    path: str          # bucket/key for S3, absolute path for local
    uri: str           # normalised URI (s3://bucket/key or /abs/path)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = ("s3://" + path) if self.is_s3 else path
        return Location(self.fs, path, uri)

    def describe(self) -> str:
        if self.is_s3:
            ep = s3_endpoint()
            return f"{self.uri}" + (f" (endpoint {ep})" if ep else "")
        return self.uri


def resolve(uri: str) -> Location:
    """Resolve a local path, ``file://`` URI or ``s3://bucket/key`` to a :class:`Location`."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"empty or invalid URI: {uri!r}")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: missing bucket name")
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
        return Location(_s3_filesystem(), path, "s3://" + path)
    if parsed.scheme == "file":
        path = os.path.abspath(parsed.path)
    elif parsed.scheme in ("", None) or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = os.path.abspath(os.path.expanduser(uri))
    else:
        raise StorageError(f"{uri}: unsupported URI scheme {parsed.scheme!r} (use a path, file:// or s3://)")
    return Location(pafs.LocalFileSystem(), path, path)


def join(uri: str, *parts: str) -> str:
    """``uri`` joined with ``parts`` as a normalised URI: ``s3://bucket/key/...`` or an absolute local
    path (never relative: it may be resolved by a Ray worker in another working directory)."""
    return resolve(uri).join(*parts).uri


def _ensure_parent(loc: Location) -> None:
    if not loc.is_s3:
        os.makedirs(posixpath.dirname(loc.path), exist_ok=True)


def write_bytes_atomic(loc: Location, data) -> None:
    """Write ``data`` (bytes or a buffer, e.g. a pyarrow Buffer) so that readers see either
    nothing/the old object or the whole new one."""
    try:
        if loc.is_s3:
            _s3fs().pipe_file(loc.path, data if isinstance(data, bytes) else memoryview(data).tobytes())
            return
        if not isinstance(data, (bytes, bytearray)):
            data = memoryview(data)
        _ensure_parent(loc)
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
    except OSError as exc:
        raise StorageError(f"cannot write {loc.describe()}: {exc}") from exc


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "NoSuchKey" in str(exc) or "does not exist" in str(exc) or "Path does not exist" in str(exc):
            raise FileNotFoundError(loc.describe()) from exc
        raise StorageError(f"cannot read {loc.describe()}: {exc}") from exc


def exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"cannot reach {loc.describe()}: {exc}") from exc


def list_files(loc: Location, suffix: str = "") -> list[pafs.FileInfo]:
    """Recursive listing below ``loc`` (one LIST request per 1000 keys on S3)."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {loc.describe()}: {exc}") from exc
    return [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
            and ".tmp-" not in i.base_name]


def delete(loc: Location) -> None:
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "NoSuchKey" not in str(exc) and "does not exist" not in str(exc):
            raise StorageError(f"cannot delete {loc.describe()}: {exc}") from exc


def check_writable(uri: str) -> Location:
    """Probe that ``uri`` can be written (write + delete a marker); raise StorageError if not.
    Leaves nothing behind: local folders the probe had to create are removed again."""
    loc = resolve(uri)
    probe = loc.join(f".rayweights-probe-{uuid.uuid4().hex[:8]}")
    created = None                       # the top-most local folder the probe creates
    if not loc.is_s3:
        d = loc.path.rstrip("/") or "/"
        while d and not os.path.exists(d) and d != os.path.dirname(d):
            created, d = d, os.path.dirname(d)
    try:
        write_bytes_atomic(probe, b"ok")
        delete(probe)
    except Exception as exc:  # noqa: BLE001 - S3 clients raise their own types (credentials, missing bucket)
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StorageError(f"output {loc.describe()} is not writable: {why}") from exc
    finally:
        if created is not None:
            d = loc.path.rstrip("/")
            while True:
                try:
                    os.rmdir(d)          # only empty folders: never anything another writer put there
                except OSError:
                    break
                if d == created:
                    break
                d = os.path.dirname(d)
    return loc


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (as read from object storage;
    ``safetensors.safe_open`` reads only local files): the header is a little-endian u64 length
    followed by that many bytes of JSON.  A blob that is not safetensors is a ``ValueError``."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("safetensors header longer than the file")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"safetensors header is not JSON ({exc})") from None
    return dict(header.get("__metadata__") or {}) if isinstance(header, dict) else {}
