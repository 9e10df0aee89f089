"""Durable local state: atomic file writes (with a file mode), per-file locks, JSON lines, and the
one poll-until-deadline loop. Every stage that keeps records in the home folder uses these."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write a file so that readers see the old or the new content, never half of it.

    `mode` (for example 0o600 for secrets) is set before the file becomes visible under its name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # exactly `mode`, whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither half a file nor a stray one
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), mode)


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed). Non-blocking: BlockingIOError if held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line and fsync it (a crash loses at most a torn last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of a JSON-lines file, oldest first; torn or foreign lines are skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def wait_until(
    check: Callable[[], T],
    timeout_s: float | None,
    *,
    interval_s: float = 0.5,
    what: str = "condition",
    error: type[Exception] | None = None,
    on_poll: Callable[[], Any] | None = None,
) -> T:
    """Poll `check()` until it returns something truthy and return that value.

    `timeout_s=None` waits forever. On timeout raise `error` (default TimeoutError) saying what did
    not happen in how long. `on_poll` runs after each unsuccessful check (heartbeats, progress).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if deadline is not None and time.monotonic() >= deadline:
            raise (error or TimeoutError)(f"{what} did not happen within {timeout_s:.0f}s")
        if on_poll is not None:
            on_poll()
        time.sleep(interval_s)
