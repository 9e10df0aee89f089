"""The job event log, the `job_events` table of the state database: what FlowOps clients saw happen
to the Ray jobs they submitted (`{"ts", "event": "submitted|failed|finished", "workload",
"duration_s"}`).

`flowops.jobs` writes it; the platform exporter (`flowops.observability`) counts it. It lives in
its own small module below both, so the writer never imports the exporter.
"""

from __future__ import annotations

import time
from typing import Any

from flowops.settings import Settings, get_settings


def record_job_event(event: str, workload: str, duration_s: float | None = None) -> None:
    """Note a job event. Cheap, and never raises: metrics must not break jobs."""
    try:
        from flowops import statedb

        with statedb.transaction(get_settings()) as conn:
            conn.execute(statedb.job_events.insert().values(
                ts=round(time.time(), 3), event=str(event), workload=str(workload),
                duration_s=duration_s))
    except Exception:  # noqa: BLE001 - best effort by contract
        pass


def read_job_events(settings: Settings) -> list[dict[str, Any]]:
    """Every job event, oldest first."""
    from flowops import statedb

    table = statedb.job_events
    with statedb.reading(settings) as conn:
        return [dict(r._mapping) for r in conn.execute(table.select().order_by(table.c.id))]
