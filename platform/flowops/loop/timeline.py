"""The loop's timeline: `timeline()` turns the event log (`flowops.events`) into per-rollout stage
rows for `flowops loop report`; `rollout_page()` is one rollout's HTML report."""

from __future__ import annotations

import time
from typing import Any

from flowops.errors import NotFound
from flowops.events import read_events
from flowops.loop import report
from flowops.settings import Settings

# Stages in the order the report prints them: (label, event that starts it, event that ends it).
STAGES = [
    ("threshold reached", "retrain_triggered", "retrain_triggered"),
    ("data version cut", "retrain_triggered", "data_version_cut"),
    ("training", "training_started", "training_done"),
    ("validation", "training_done", "validated"),
    ("canary analysis", "canary_started", "analysis_done"),
    ("promoted", "analysis_done", "promoted"),
    ("rolled back", "analysis_done", "rolled_back"),
    ("pseudo-labels refreshed", "pseudo_label_started", "pseudo_label_done"),
]
END_EVENTS = {"promoted", "rolled_back", "validation_failed", "rollout_failed"}


def timeline(settings: Settings) -> list[dict[str, Any]]:
    """Per rollout: its events, stage rows (start, end, seconds) and the outcome."""
    by_rollout: dict[str, list[dict[str, Any]]] = {}
    for event in read_events(settings):
        if event.get("rollout"):
            by_rollout.setdefault(event["rollout"], []).append(event)
    out = []
    for rid, events in by_rollout.items():
        first = {}
        for e in events:
            first.setdefault(e["event"], e)
        rows = []
        for label, start_ev, end_ev in STAGES:
            if end_ev not in first:
                continue
            start = first.get(start_ev, first[end_ev])["ts"]
            end = first[end_ev]["ts"]
            rows.append({"stage": label, "start": start, "end": end,
                         "seconds": round(end - start, 2)})
        outcome = next((e["event"] for e in events if e["event"] in END_EVENTS), "in progress")
        entry: dict[str, Any] = {
            "rollout": rid, "outcome": outcome, "stages": rows,
            "version": next((e.get("version") for e in reversed(events) if e.get("version")), None),
            "data_version": next((e.get("data_version") for e in events
                                  if e.get("data_version")), None),
        }
        if "rolled_back" in first:
            rb = first["rolled_back"]
            entry["rollback_s"] = rb.get("rollback_s")
            entry["reasons"] = rb.get("reasons", [])
        if "promoted" in first and "retrain_triggered" in first:
            entry["threshold_to_100_s"] = round(
                first["promoted"]["ts"] - first["retrain_triggered"]["ts"], 2)
        out.append(entry)
    return sorted(out, key=lambda r: r["stages"][0]["start"] if r["stages"] else 0)


def format_timeline(rollouts: list[dict[str, Any]]) -> list[str]:
    """Human-readable lines of `timeline()`."""
    if not rollouts:
        return ["no rollout yet: the loop records one when new labels reach the threshold"]
    lines = []
    for r in rollouts:
        head = f"{r['rollout']}: model v{r['version'] or '?'}"
        if r.get("data_version"):
            head += f" on data {r['data_version']}"
        lines.append(f"{head} -> {r['outcome']}")
        t0 = r["stages"][0]["start"] if r["stages"] else 0
        for row in r["stages"]:
            stamp = time.strftime("%H:%M:%S", time.localtime(row["end"]))
            lines.append(f"  {stamp}  +{row['end'] - t0:7.1f}s  {row['stage']:<24} "
                         f"({row['seconds']:.1f}s)")
        if r.get("threshold_to_100_s") is not None:
            lines.append(f"  threshold reached -> new version at 100%: {r['threshold_to_100_s']:.1f}s")
        if r.get("rollback_s") is not None:
            lines.append(f"  decisive evidence -> 100% stable: {r['rollback_s']:.3f}s")
            for reason in r.get("reasons", []):
                lines.append(f"  reason: {reason}")
    return lines


def rollout_page(settings: Settings, rollout: str | None = None) -> tuple[str, str]:
    """(rollout id, its HTML report): the named rollout, or the latest one."""
    rows = {r["rollout"]: r for r in timeline(settings)}
    if not rows:
        raise NotFound("no rollout yet: the loop records one when new labels reach the threshold")
    rid = rollout or list(rows)[-1]
    if rid not in rows:
        raise NotFound(f"rollout {rid!r} does not exist; rollouts: {', '.join(rows)}")
    ticks = [e for e in read_events(settings, rid) if e["event"] == "analysis_tick"]
    return rid, report.render(rows[rid], ticks)
