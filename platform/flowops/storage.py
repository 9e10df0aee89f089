"""One storage URI for what is too big for git and must be reachable from every node.

`FLOWOPS_STORAGE_URI` is a local folder by default (`<home>/storage`), `s3://bucket/prefix` on a
cluster (`FLOWOPS_STORAGE_ENDPOINT_URL` for an S3-compatible store such as MinIO or Ceph;
credentials come from the usual AWS_* variables), or any URI that pyarrow's filesystems
(`gs://`, `hdfs://`, `abfs://`, `file://`) or fsspec know. It resolves to a pyarrow filesystem
because that is what Ray Data reads natively (`read_parquet(..., filesystem=...)`), so a task on
any node reads the same bytes without the head's disk.

`check()` probes the URI with a real write, read and delete before a command starts its work: an
unreachable or unwritable store is one line naming it (credentials masked) and the operation,
exit 5, instead of a failure half-way.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowops.errors import ClusterUnavailable
from flowops.settings import Settings

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3  # an unreachable endpoint fails in seconds, not after the SDK's default retries
_USERINFO = re.compile(r"(?<=://)[^/@]+@")


class StorageUnavailable(ClusterUnavailable):
    """The storage URI cannot be reached or written, or returned damaged data (exit 5)."""


def mask(uri: str) -> str:
    """A URI fit for messages: `s3://KEY:SECRET@bucket` -> `s3://***@bucket`."""
    return _USERINFO.sub("***@", uri)


@dataclass(frozen=True)
class Storage:
    """A pyarrow filesystem and the root path of FlowOps' files in it. Picklable: Ray tasks get it
    and read the store directly on their own node."""

    uri: str
    filesystem: Any  # pyarrow.fs.FileSystem
    root: str

    @property
    def display(self) -> str:
        return mask(self.uri)

    @property
    def is_local(self) -> bool:
        from pyarrow import fs

        return isinstance(self.filesystem, fs.LocalFileSystem)

    def path(self, rel: str) -> str:
        """The filesystem path of `rel` (a `/`-separated path under the root)."""
        return f"{self.root.rstrip('/')}/{rel}" if self.root else rel

    def url(self, rel: str) -> str:
        """`rel` as a URI for messages (credentials masked)."""
        return f"{self.display.rstrip('/')}/{rel}"

    def read_bytes(self, rel: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(rel)) as stream:
            return stream.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object: readers see all of it or nothing (an object store's PUT is atomic;
        a local file is written aside, then renamed)."""
        target = self.path(rel)
        if not self.is_local:
            with self.filesystem.open_output_stream(target) as out:
                out.write(data)
            return
        from flowops.durable import atomic_write_bytes

        Path(target).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(target), data)

    def size(self, rel: str) -> int | None:
        """The object's size in bytes, None when it does not exist."""
        from pyarrow import fs

        info = self.filesystem.get_file_info(self.path(rel))
        return None if info.type == fs.FileType.NotFound else int(info.size or 0)

    def list(self, rel: str) -> list[str]:
        """Paths (relative to the root) of the files under `rel`, sorted; [] when there is none."""
        from pyarrow import fs

        selector = fs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        prefix = self.path("")
        return sorted(info.path.removeprefix(prefix) for info in
                      self.filesystem.get_file_info(selector) if info.type == fs.FileType.File)

    def delete(self, rel: str) -> None:
        self.filesystem.delete_file(self.path(rel))


def filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, root path in it) for a folder or a filesystem URI."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    parts = urlsplit(uri)
    if parts.scheme in ("s3", "s3a"):
        return _s3(parts, endpoint_url), f"{parts.hostname or ''}{parts.path}".rstrip("/")
    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow does not know it: try fsspec (memory://, ...)
        import fsspec

        try:
            fsspec_fs, root = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError):
            raise exc from None
        return fs.PyFileSystem(fs.FSSpecHandler(fsspec_fs)), root


def _s3(parts: Any, endpoint_url: str | None) -> Any:
    from pyarrow import fs

    options: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    }
    if parts.username:  # s3://KEY:SECRET@bucket/prefix, as pyarrow's own URIs allow
        options["access_key"], options["secret_key"] = parts.username, parts.password or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint_url:
        endpoint = urlsplit(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        options["endpoint_override"] = endpoint.netloc
        options["scheme"] = endpoint.scheme
        region = region or "us-east-1"  # S3-compatible stores ignore it; the SDK wants one
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options)


def open_storage(settings: Settings, operation: str = "") -> Storage:
    """The configured storage (no I/O: `check` probes it)."""
    uri = settings.storage
    try:
        filesystem, root = filesystem_for(uri, settings.storage_endpoint_url)
    except (ValueError, OSError) as exc:
        raise StorageUnavailable(f"{operation}{': ' if operation else ''}storage {mask(uri)} "
                                 f"(FLOWOPS_STORAGE_URI) is not a usable filesystem URI: "
                                 f"{_first_line(exc)}") from None
    return Storage(uri, filesystem, root)


def check(settings: Settings, operation: str) -> Storage:
    """The storage, after a real write, read-back and delete of a small probe object: a store that
    is unreachable or unwritable fails here, before `operation` does any work."""
    return probe(open_storage(settings, operation), settings.storage_endpoint_url, operation)


def probe(storage: Storage, endpoint_url: str | None, operation: str, what: str = "storage") -> Storage:
    """`storage` after a real write, read-back and delete of a small object (see `check`); `what`
    names it in the one-line error (the storage, the DVC remote)."""
    key = f".flowops-check/{uuid.uuid4().hex}"
    payload = hashlib.sha256(key.encode()).hexdigest().encode()
    where = storage.display + (f" (endpoint {mask(endpoint_url)})"
                               if endpoint_url and not storage.is_local else "")
    try:
        if storage.is_local:
            Path(storage.root).mkdir(parents=True, exist_ok=True)
        storage.write_bytes(key, payload)
        if storage.read_bytes(key) != payload:
            raise OSError("what was read back differs from what was written")
        storage.delete(key)
    except Exception as exc:  # noqa: BLE001 - pyarrow, fsspec and the OS raise many kinds
        raise StorageUnavailable(f"{operation}: {what} {where} is unreachable or not writable: "
                                 f"{_first_line(exc)}") from None
    return storage


def _first_line(exc: BaseException) -> str:
    text = mask(str(exc).strip()) or type(exc).__name__
    return text.splitlines()[0][:300]
