"""Where a lake's files live: a local folder or S3-compatible object storage, behind one small interface.

A ``Store`` is rooted at a location (``/data/lake`` or ``s3://bucket/prefix``) and knows what the lake needs:
read and write a file (whole, atomically: readers see the old bytes or the new, never a part), put a local file
(parts are written locally, then moved or uploaded), create a small file only if it is absent (the commit),
list, delete, and hand pyarrow a filesystem for DuckDB's reads. Paths below the root are relative, with ``/``.

S3 goes through s3fs (fsspec), configured as the AWS tools are (``AWS_ENDPOINT_URL`` for an S3-compatible server,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION``, or ``AWS_PROFILE``):
it offers create-only writes (``If-None-Match: *``), which the commit protocol needs, and retries throttled or
failed requests with backoff (botocore's standard mode, 5 attempts). Errors become ``StorageError`` with one
line for a person (wrong credentials, a missing bucket, an unreachable endpoint); no secret is ever printed.
s3fs and botocore are imported only for an S3 location.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RETRIES = 5  # attempts per S3 request (botocore "standard" retry mode: exponential backoff with jitter)


class StorageError(OSError):
    """Storage that cannot be used as asked, in words for a person."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith("s3://")


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the store's root
    size: int
    mtime_ns: int
    etag: str | None = None


class Store:
    """The interface; ``LocalStore`` and ``S3Store`` implement it."""

    url: str
    remote: bool

    def join(self, rel: str) -> str:
        """The full location of ``rel`` (a path, or an s3:// URL)."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` atomically."""
        raise NotImplementedError

    def put_file(self, local: Path, rel: str) -> None:
        """Move (local) or upload (S3) the finished file ``local`` to ``rel``, atomically."""
        raise NotImplementedError

    def get_file(self, rel: str, local: Path) -> None:
        """Copy ``rel`` to the local file ``local`` (written under a temporary name, then renamed)."""
        raise NotImplementedError

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist: True if this call created it, False if it was there."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def list(self, rel: str) -> list[Entry]:
        """The files below ``rel`` (recursively), with size and modification time; [] if there is none."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove the file ``rel`` (no error if it is gone)."""
        raise NotImplementedError

    def delete_tree(self, rel: str) -> None:
        raise NotImplementedError

    def arrow(self) -> tuple[Any, str]:
        """(a pyarrow FileSystem, the root's path in it) for pyarrow datasets (DuckDB reads the lake through them)."""
        raise NotImplementedError

    def local_path(self, rel: str = "") -> Path | None:
        """The local path of ``rel``, for a local store; None for S3."""
        return None

    def scratch(self) -> Path:
        """A local folder for files on their way into this store (for a local store: inside it, so the move is a
        rename)."""
        raise NotImplementedError


class LocalStore(Store):
    remote = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def join(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)

    def local_path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    def put_file(self, local: Path, rel: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.replace(local, path)
        except OSError:  # another file system: copy under a temporary name, then rename
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
            local.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def get_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(self.root / rel, tmp)
        os.replace(tmp, local)

    def create(self, rel: str, data: bytes) -> bool:
        """Exclusive create (O_CREAT | O_EXCL): of two writers, exactly one creates the file. The bytes are
        written to a temporary file first and linked into place, so the file is never seen half-written."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _written_beside(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def list(self, rel: str) -> list[Entry]:
        base = self.root / rel
        if not base.is_dir():
            return []
        out = []
        for path in base.rglob("*"):
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            if path.is_file():
                out.append(Entry(path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns))
        return out

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def delete_tree(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)

    def arrow(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)

    def scratch(self) -> Path:
        path = self.root / ".scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _written_beside(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temporary file next to ``path`` (same directory: renamed or linked into place)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write-then-rename in the same directory, fsynced: readers see the old file or the new, never a part."""
    os.replace(_written_beside(path, data), path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store(Store):
    remote = True

    def __init__(self, url: str) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{url!r} names no bucket: write s3://BUCKET/PREFIX")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.fs = s3_filesystem()
        self._tmp: Path | None = None

    def key(self, rel: str) -> str:
        """bucket/prefix/rel, as s3fs names objects."""
        return "/".join(p for p in (self.bucket, self.prefix, rel.strip("/")) if p)

    def join(self, rel: str) -> str:
        return "s3://" + self.key(rel)

    def read_bytes(self, rel: str) -> bytes:
        with s3_errors(self.join(rel)):
            return self.fs.cat_file(self.key(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with s3_errors(self.join(rel)):
            self.fs.pipe_file(self.key(rel), data)  # one PUT: an object is never seen half-written

    def put_file(self, local: Path, rel: str) -> None:
        with s3_errors(self.join(rel)):
            self.fs.put_file(str(local), self.key(rel))  # a (multipart) upload appears whole when it completes
        local.unlink(missing_ok=True)

    def get_file(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        with s3_errors(self.join(rel)):
            self.fs.get_file(self.key(rel), str(tmp))
        os.replace(tmp, local)

    def create(self, rel: str, data: bytes) -> bool:
        """A PUT with ``If-None-Match: *``: the server creates the object only if there is none (412 otherwise; a
        409 for a concurrent conflicting create is retried by the caller like a lost race)."""
        try:
            with s3_errors(self.join(rel)):
                self.fs.pipe_file(self.key(rel), data, mode="create")
        except FileExistsError:
            return False
        return True

    def exists(self, rel: str) -> bool:
        with s3_errors(self.join(rel)):
            return bool(self.fs.exists(self.key(rel)))

    def list(self, rel: str) -> list[Entry]:
        base = self.key(rel)
        with s3_errors(self.join(rel)):
            try:
                found = self.fs.find(base, detail=True, withdirs=False)
            except FileNotFoundError:
                found = {}
            if not found and not self.fs.exists(self.bucket):  # nothing there, because there is no bucket
                raise StorageError(describe(FileNotFoundError("NoSuchBucket"), self.url) or self.url)
        strip = len(self.key("")) + 1 if self.key("") else 0
        out = []
        for name, info in found.items():
            if info.get("type") == "directory":
                continue
            when = info.get("LastModified")
            ns = int(when.timestamp() * 1e9) if hasattr(when, "timestamp") else 0
            etag = str(info.get("ETag") or "").strip('"') or None
            out.append(Entry(name[strip:], int(info.get("size") or 0), ns, etag))
        return out

    def delete(self, rel: str) -> None:
        with s3_errors(self.join(rel)):
            try:
                self.fs.rm_file(self.key(rel))
            except FileNotFoundError:
                pass

    def delete_tree(self, rel: str) -> None:
        with s3_errors(self.join(rel)):
            try:
                self.fs.rm(self.key(rel), recursive=True)
            except FileNotFoundError:
                pass

    def arrow(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.key("")

    def scratch(self) -> Path:
        if self._tmp is None:
            from imgrec.config import cache_dir

            self._tmp = cache_dir() / "scratch"
            self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp


def s3_filesystem() -> Any:
    """An s3fs filesystem configured from the environment as the AWS tools read it (a fresh one: s3fs's cached
    instances do not survive a fork, and worker processes are forked)."""
    try:
        import s3fs
    except ImportError as exc:
        raise StorageError("S3 locations need s3fs: pip install s3fs") from exc
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    client: dict[str, Any] = {}
    if endpoint:
        client["endpoint_url"] = endpoint
    if region:
        client["region_name"] = region
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, client_kwargs=client,
                             config_kwargs={"retries": {"max_attempts": RETRIES, "mode": "standard"},
                                            "connect_timeout": 3, "read_timeout": 60})


class s3_errors:  # noqa: N801 (a context manager used like a function)
    """Turn botocore's and s3fs's errors into a one-line ``StorageError`` (FileNotFoundError and FileExistsError
    pass through: callers act on them)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, FileExistsError | StorageError):
            return False
        message = describe(exc, self.where)
        if message is None:
            return False
        if isinstance(exc, FileNotFoundError) and "bucket" not in message:
            return False
        raise StorageError(message) from None


def describe(exc: BaseException, where: str) -> str | None:
    """A person's words for an S3 failure (never a credential in them), or None for an error to keep as it is."""
    name = type(exc).__name__
    text = f"{exc} {exc.__cause__ or ''}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    bucket = where.removeprefix("s3://").split("/", 1)[0]
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return ("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for "
                f"{endpoint}")
    if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                               "Access Key Id you provided does not exist")):
        return (f"{endpoint} refused the credentials for {where} (wrong AWS_ACCESS_KEY_ID or "
                "AWS_SECRET_ACCESS_KEY)")
    if "NoSuchBucket" in text or (isinstance(exc, FileNotFoundError) and "bucket" in text.lower()):
        return f"the bucket {bucket!r} does not exist on {endpoint}: create it first"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or \
            "Could not connect to the endpoint" in text or "Connect timeout" in text:
        return f"cannot reach the S3 endpoint {endpoint} (for {where}): is it up, and is AWS_ENDPOINT_URL right?"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return (f"{endpoint} denied access to {where} (wrong AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or keys "
                "without the permission)")
    if "SlowDown" in text or "Throttl" in text or "ServiceUnavailable" in text or "InternalError" in text:
        return f"{endpoint} kept failing for {where} after {RETRIES} attempts ({name}); try again later"
    return None


def open_store(location: str | os.PathLike[str]) -> Store:
    """The store of a location: ``s3://bucket/prefix`` or a local folder."""
    return S3Store(str(location)) if is_remote(location) else LocalStore(location)


def walk_entries(store: Store, rel: str = "") -> Iterator[Entry]:
    """The store's files below ``rel`` in sorted order (what an S3 collection root's walk lists)."""
    yield from sorted(store.list(rel), key=lambda e: e.path)
