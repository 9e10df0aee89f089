"""The platform's event log, the `events` table of the state database: the only module that writes
or reads it.

Every stage of a rollout (and the drift monitor) appends an event
`{"ts", "event", "rollout", "version", "key", ...}`. Each event has a key (`rollout:event[:step]`)
and is written at most once (a unique key in the database, so this holds for writers on every
node), so a controller that restarts and redoes a stage does not double-count it (the metrics
exporter counts `retrain_triggered`, `promoted` and `rolled_back`).
"""

from __future__ import annotations

import time
from typing import Any

from flowops.settings import Settings


def read_events(settings: Settings, rollout: str | None = None) -> list[dict[str, Any]]:
    """All events (optionally of one rollout), oldest first."""
    from flowops import statedb

    table = statedb.events
    query = table.select().order_by(table.c.id)
    if rollout is not None:
        query = query.where(table.c.rollout == rollout)
    with statedb.reading(settings) as conn:
        return [row.record for row in conn.execute(query)]


def emit(settings: Settings, event: str, *, rollout: str | None = None, version: str | None = None,
         key: str | None = None, ts: float | None = None, **fields: Any) -> dict[str, Any]:
    """Append an event durably unless an event with the same key was already written (then that
    one is returned)."""
    from flowops import statedb

    key = key or (f"{rollout}:{event}" if rollout else None)
    record = {"ts": ts or time.time(), "event": event, "rollout": rollout, "version": version,
              "key": key, **fields}
    table = statedb.events
    with statedb.transaction(settings) as conn:
        stmt = statedb.insert(conn, table).values(
            key=key, ts=record["ts"], event=event, rollout=rollout, record=record)
        if key is None:
            conn.execute(stmt)
            return record
        inserted = stmt.on_conflict_do_nothing(index_elements=["key"]).returning(table.c.id)
        if conn.execute(inserted).first() is not None:
            return record
        return conn.execute(table.select().where(table.c.key == key)).one().record
