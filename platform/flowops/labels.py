"""The label inbox: human labels waiting to become a data version.

Labels arrive from the Label Studio webhook, `flowops labels add` (a CSV checked row by row by
`add_labels_from_file`), and simulated labelers (`flowops.queue.simulate_labels`); all go
through `record_labels`. The inbox is the `labels` table of the state database
(`flowops.statedb`), so a label posted to any replica on any node lands in the one inbox the
controller polls. `record_labels` returns only after its transaction committed (SQLite: WAL with
full fsync; PostgreSQL: a synchronous commit), so an acknowledged label survives a crash; it is
idempotent per task id (the latest label for a task wins). `snapshot_labels` (the retraining
loop) marks the labels a data version consumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flowops.errors import InvalidInput
from flowops.settings import Settings


@dataclass(frozen=True)
class Label:
    task_id: str
    image_id: str
    label: str
    source: str = "api"  # labelstudio, file, simulated, api
    annotator: str = ""


def record_labels(settings: Settings, labels: Iterable[Label]) -> int:
    """Store labels durably (one transaction); a newer label for a task id replaces the older.

    A label re-recorded after it was used in a data version becomes new again (a correction).
    """
    from flowops import statedb

    rows = []
    now = time.time()
    for item in labels:
        if not item.task_id or not item.image_id or item.label in (None, ""):
            raise InvalidInput(
                f"a label needs task_id, image_id and label; got {item!r}"
            )
        rows.append({"task_id": str(item.task_id), "image_id": str(item.image_id),
                     "label": str(item.label), "source": item.source,
                     "annotator": item.annotator, "received_at": now, "used_in": None})
    if not rows:
        return 0
    with statedb.transaction(settings) as conn:
        stmt = statedb.insert(conn, statedb.labels)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["task_id"],
            set_={c: stmt.excluded[c] for c in
                  ("image_id", "label", "source", "annotator", "received_at", "used_in")}),
            rows)
    return len(rows)


def new_labels(settings: Settings) -> list[dict]:
    """Labels not yet consumed by a data version, oldest first."""
    from flowops import statedb

    table = statedb.labels
    with statedb.reading(settings) as conn:
        rows = conn.execute(table.select().where(table.c.used_in.is_(None))
                            .order_by(table.c.received_at, table.c.task_id))
        return [dict(r._mapping) for r in rows]


def labeled_image_ids(settings: Settings) -> set[str]:
    """Every image a person has labeled through the inbox (used in a data version or not)."""
    import sqlalchemy as sa

    from flowops import statedb

    with statedb.reading(settings) as conn:
        return {r[0] for r in conn.execute(sa.select(statedb.labels.c.image_id).distinct())}


def counts(settings: Settings) -> dict[str, float | int | None]:
    """Inbox size: total, new (unused), and the age in seconds of the oldest new label."""
    import sqlalchemy as sa

    from flowops import statedb

    table = statedb.labels
    with statedb.reading(settings) as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        new, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(table.c.received_at))
                                   .where(table.c.used_in.is_(None))).one()
    return {"total": total, "new": new,
            "oldest_new_age_s": None if oldest is None else time.time() - oldest}


def mark_used(settings: Settings, task_ids: Iterable[str], version: str) -> int:
    """Mark labels as consumed by data version `version`; only those still new (one UPDATE, so a
    label is consumed by one version even when two snapshots race)."""
    from flowops import statedb

    ids = list(task_ids)
    table = statedb.labels
    with statedb.transaction(settings) as conn:
        for start in range(0, len(ids), 1000):  # bounded IN lists
            conn.execute(table.update()
                         .where(table.c.task_id.in_(ids[start:start + 1000]), table.c.used_in.is_(None))
                         .values(used_in=version))
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
