"""Import what a home folder kept in files before the state database: the SQLite label inbox, the
loop's state.json and config.json, events.jsonl, pipeline records, job events, drift history.

Runs once per database, with the home folder of the process that migrates it (`flowops up` on the
head); files that are missing or unreadable are skipped and every file is left where it was.

Revision ID: 0002
Revises: 0001
"""

import contextlib
import json
import sqlite3
from pathlib import Path

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LABEL_COLUMNS = ("task_id", "image_id", "label", "source", "annotator", "received_at", "used_in")


def _table(name, *columns):
    return sa.table(name, *(sa.column(c, sa.JSON if c in ("record", "body", "report") else None)
                            for c in columns))


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if isinstance(record, dict):
            records.append(record)
    return records


def _labels(home: Path) -> list[dict]:
    path = home / "labels" / "inbox.sqlite"
    if not path.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(f"SELECT {', '.join(LABEL_COLUMNS)} FROM labels").fetchall()
    except sqlite3.Error:
        return []
    return [dict(zip(LABEL_COLUMNS, row, strict=True)) for row in rows]


def upgrade() -> None:
    home = context.config.attributes.get("home")
    if home is None:
        return
    home = Path(home)
    rows = _labels(home)
    if rows:
        op.bulk_insert(_table("labels", *LABEL_COLUMNS), rows)

    state = _json(home / "loop" / "state.json")
    if isinstance(state, dict):
        records = state.get("rollouts") or {}
        order = [r for r in state.get("order") or [] if r in records]
        order += [r for r in records if r not in order]
        op.bulk_insert(_table("rollouts", "id", "position", "record"),
                       [{"id": rid, "position": i, "record": records[rid]}
                        for i, rid in enumerate(order)])
        if state.get("controller"):
            op.bulk_insert(_table("documents", "name", "body"),
                           [{"name": "loop.controller", "body": state["controller"]}])
    config = _json(home / "loop" / "config.json")
    if isinstance(config, dict):
        op.bulk_insert(_table("documents", "name", "body"), [{"name": "loop.config", "body": config}])

    seen, events = set(), []
    for record in _jsonl(home / "loop" / "events.jsonl"):
        key = record.get("key")
        if key is not None and key in seen:
            continue
        seen.add(key)
        events.append({"key": key, "ts": float(record.get("ts") or 0),
                       "event": str(record.get("event", "")), "rollout": record.get("rollout"),
                       "record": record})
    if events:
        op.bulk_insert(_table("events", "key", "ts", "event", "rollout", "record"), events)

    pipelines = [p for p in map(_json, sorted((home / "pipelines").glob("*.json")))
                 if isinstance(p, dict) and p.get("id")]
    if pipelines:
        op.bulk_insert(_table("pipelines", "id", "created", "record"),
                       [{"id": p["id"], "created": float(p.get("created") or 0), "record": p}
                        for p in pipelines])

    jobs = [{"ts": float(r.get("ts") or 0), "event": str(r.get("event", "")),
             "workload": str(r.get("workload", "")), "duration_s": r.get("duration_s")}
            for r in _jsonl(home / "metrics" / "job_events.jsonl")]
    if jobs:
        op.bulk_insert(_table("job_events", "ts", "event", "workload", "duration_s"), jobs)

    reports = [{"ts": float(r.get("ts") or 0), "model": str(r.get("model", "")),
                "drifted": bool(r.get("drifted")), "report": r}
               for r in _jsonl(home / "drift" / "history.jsonl")]
    if reports:
        op.bulk_insert(_table("drift_reports", "ts", "model", "drifted", "report"), reports)
