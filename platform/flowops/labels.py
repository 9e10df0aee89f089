"""The label inbox: human labels waiting to become a data version.

Labels arrive from the Label Studio webhook, `flowops labels add` (a CSV checked row by row by
`add_labels_from_file`), and simulated labelers (`flowops.queue.simulate_labels`); all go
through `record_labels`. The inbox is a SQLite database in the home folder, written in WAL mode
with full fsync, so an acknowledged label survives a crash; it is idempotent per task id (the
latest label for a task wins). `snapshot_labels` (the retraining loop) marks the labels a data
version consumed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flowops.errors import InvalidInput
from flowops.settings import Settings

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    task_id     TEXT PRIMARY KEY,
    image_id    TEXT NOT NULL,
    label       TEXT NOT NULL,
    source      TEXT NOT NULL,
    annotator   TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    used_in     TEXT            -- data version that consumed this label; NULL while new
);
CREATE INDEX IF NOT EXISTS labels_unused ON labels(used_in, received_at);
"""


@dataclass(frozen=True)
class Label:
    task_id: str
    image_id: str
    label: str
    source: str = "api"  # labelstudio, file, simulated, api
    annotator: str = ""


def inbox_path(settings: Settings) -> Path:
    return settings.home / "labels" / "inbox.sqlite"


@contextlib.contextmanager
def connect(settings: Settings) -> Iterator[sqlite3.Connection]:
    path = inbox_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        yield conn
    finally:
        conn.close()


def record_labels(settings: Settings, labels: Iterable[Label]) -> int:
    """Store labels durably (one transaction); a newer label for a task id replaces the older.

    A label re-recorded after it was used in a data version becomes new again (a correction).
    """
    rows = []
    for item in labels:
        if not item.task_id or not item.image_id or item.label in (None, ""):
            raise InvalidInput(
                f"a label needs task_id, image_id and label; got {item!r}"
            )
        rows.append((str(item.task_id), str(item.image_id), str(item.label), item.source,
                     item.annotator, time.time()))
    if not rows:
        return 0
    with connect(settings) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            """INSERT INTO labels(task_id, image_id, label, source, annotator, received_at, used_in)
               VALUES (?, ?, ?, ?, ?, ?, NULL)
               ON CONFLICT(task_id) DO UPDATE SET image_id=excluded.image_id,
                 label=excluded.label, source=excluded.source, annotator=excluded.annotator,
                 received_at=excluded.received_at, used_in=NULL""",
            rows,
        )
        conn.execute("COMMIT")
    return len(rows)


def new_labels(settings: Settings) -> list[dict]:
    """Labels not yet consumed by a data version, oldest first."""
    with connect(settings) as conn:
        conn.row_factory = sqlite3.Row
        cur = conn.execute(
            "SELECT * FROM labels WHERE used_in IS NULL ORDER BY received_at, task_id"
        )
        return [dict(r) for r in cur.fetchall()]


def counts(settings: Settings) -> dict[str, float | int | None]:
    """Inbox size: total, new (unused), and the age in seconds of the oldest new label."""
    with connect(settings) as conn:
        total = conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        new, oldest = conn.execute(
            "SELECT COUNT(*), MIN(received_at) FROM labels WHERE used_in IS NULL"
        ).fetchone()
    return {"total": total, "new": new,
            "oldest_new_age_s": None if oldest is None else time.time() - oldest}


def mark_used(settings: Settings, task_ids: Iterable[str], version: str) -> int:
    ids = list(task_ids)
    with connect(settings) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE labels SET used_in=? WHERE task_id=? AND used_in IS NULL",
            [(version, t) for t in ids],
        )
        conn.execute("COMMIT")
    return len(ids)


def add_labels_from_file(settings: Settings, path: Path, annotator: str = "") -> int:
    """Record a CSV of task_id,image_id,label after checking every row against the latest data
    version (known image outside the holdout, known class). All rows or none."""
    import pandas as pd  # not at import time: the serving app's label webhook imports this module

    from flowops import data

    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"--file {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"--file {path}: not a CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("task_id", "image_id", "label") if c not in frame.columns]
    if missing:
        raise InvalidInput(f"--file {path}: missing column(s) {', '.join(missing)}; "
                           "expected task_id,image_id,label")
    if frame.empty:
        raise InvalidInput(f"--file {path}: no rows")
    opened = data.open_version(settings)
    version, classes, manifest = opened.tag, opened.classes, opened.manifest.set_index("id")
    for i, row in enumerate(frame.itertuples(index=False), start=2):
        where = f"--file {path} line {i}"
        if not row.task_id.strip() or not row.image_id.strip():
            raise InvalidInput(f"{where}: task_id and image_id must not be empty")
        if row.label not in classes:
            raise InvalidInput(f"{where}: label {row.label!r} is not a class of data version "
                               f"{version}; classes: {', '.join(classes)}")
        if row.image_id not in manifest.index:
            raise InvalidInput(f"{where}: image {row.image_id!r} is not in data version {version}")
        if manifest.at[row.image_id, "split"] == "holdout":
            raise InvalidInput(f"{where}: image {row.image_id!r} is in the holdout set, which "
                               "is never relabeled (label unlabeled or train images)")
    return record_labels(settings, [
        Label(r.task_id.strip(), r.image_id.strip(), r.label, source="file", annotator=annotator)
        for r in frame.itertuples(index=False)])
