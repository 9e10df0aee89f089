"""The platform's event log, `<home>/loop/events.jsonl`: the only module that writes or reads it.

Every stage of a rollout (and the drift monitor) appends an event
`{"ts", "event", "rollout", "version", "key", ...}`. Each event has a key (`rollout:event[:step]`)
and is written at most once, so a controller that restarts and redoes a stage does not
double-count it (the metrics exporter counts `retrain_triggered`, `promoted` and `rolled_back`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flowops.durable import append_jsonl, file_lock, read_jsonl
from flowops.settings import Settings


def events_path(settings: Settings) -> Path:
    return settings.home / "loop" / "events.jsonl"


def read_events(settings: Settings, rollout: str | None = None) -> list[dict[str, Any]]:
    """All events (optionally of one rollout), oldest first; a torn last line is ignored."""
    events = read_jsonl(events_path(settings))
    return events if rollout is None else [e for e in events if e.get("rollout") == rollout]


def emit(settings: Settings, event: str, *, rollout: str | None = None, version: str | None = None,
         key: str | None = None, ts: float | None = None, **fields: Any) -> dict[str, Any]:
    """Append an event durably (fsync) unless an event with the same key was already written."""
    key = key or (f"{rollout}:{event}" if rollout else None)
    record = {"ts": ts or time.time(), "event": event, "rollout": rollout, "version": version,
              "key": key, **fields}
    path = events_path(settings)
    with file_lock(path.with_name("events.lock")):
        if key is not None:
            for old in read_events(settings, rollout):
                if old.get("key") == key:
                    return old
        append_jsonl(path, record)
    return record
