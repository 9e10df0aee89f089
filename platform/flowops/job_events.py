"""The job event log, `<home>/metrics/job_events.jsonl`: what FlowOps clients saw happen to the Ray
jobs they submitted (`{"ts", "event": "submitted|failed|finished", "workload", "duration_s"}`).

`flowops.jobs` writes it; the platform exporter (`flowops.observability`) counts it. It lives in
its own small module below both, so the writer never imports the exporter.
"""

from __future__ import annotations

import time
from pathlib import Path

from flowops.durable import append_jsonl
from flowops.settings import Settings, get_settings


def job_events_path(settings: Settings) -> Path:
    return settings.home / "metrics" / "job_events.jsonl"


def record_job_event(event: str, workload: str, duration_s: float | None = None) -> None:
    """Note a job event. Cheap, and never raises: metrics must not break jobs."""
    try:
        append_jsonl(
            job_events_path(get_settings()),
            {"ts": round(time.time(), 3), "event": str(event), "workload": str(workload),
             "duration_s": duration_s},
        )
    except Exception:  # noqa: BLE001 - best effort by contract
        pass
