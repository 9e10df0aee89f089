"""The loop controller: a long-lived Ray job (`jobs/controller.py`, started by `flowops loop
start`) that polls the label inbox and drives one rollout at a time.

When the new human labels reach the threshold (or the oldest waited longer than `max_age_s`, or
the drift monitor flagged live inputs), it snapshots them into a new data version and drives the
rollout's stages (`flowops.loop.stages`). A rollout left unfinished by a stopped controller is
resumed first. Its heartbeat in the state file tells `flowops loop status` that it is alive.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from flowops import events, jobs, labels, registry
from flowops.durable import wait_until
from flowops.errors import Conflict, FlowOpsError, JobFailed, NotFound, validated
from flowops.loop.stages import drive_rollout, snapshot_labels
from flowops.loop.state import (
    Gate,
    LoopConfig,
    RolloutStore,
    load_config,
    platform_tag,
    save_config,
)
from flowops.settings import Settings


def controller_submission_id(settings: Settings) -> str:
    """The controller's Ray job id: fixed per platform, so two controllers cannot run at once."""
    return f"flowops-loop-{platform_tag(settings)}"


# When to retrain ------------------------------------------------------------------------------


def should_retrain(settings: Settings, config: LoopConfig) -> str | None:
    """Why a retrain is due now (threshold, max age, or drift), or None."""
    counts = labels.counts(settings)
    if counts["new"] >= config.threshold:
        return f"{counts['new']} new labels >= threshold {config.threshold}"
    age = counts["oldest_new_age_s"]
    if config.max_age_s and age is not None and age >= config.max_age_s and \
            counts["new"] >= config.min_labels:
        return f"oldest of {counts['new']} new labels waited {age:.0f}s >= {config.max_age_s:.0f}s"
    if config.retrain_on_drift and counts["new"] >= config.min_labels:
        drift = unhandled_drift(settings)
        if drift is not None:
            return (f"drift detected in live inputs (score {float(drift.get('score') or 0):.2f}, "
                    f"model v{drift.get('version')}); {counts['new']} new labels")
    return None


def unhandled_drift(settings: Settings) -> dict[str, Any] | None:
    """The newest `drift_detected` event of the loop's model after the last rollout began (a
    rollout retrains on all labels up to then, so it answers every drift seen before it), or None."""
    since = RolloutStore(settings).last_created()
    drifts = [e for e in events.read_events(settings)
              if e.get("event") == "drift_detected" and float(e.get("ts") or 0) > since
              and e.get("model", settings.model_name) == settings.model_name]
    return drifts[-1] if drifts else None


def submit_candidate(settings: Settings, version: str, gate: dict[str, Any] | None = None,
                     reason: str = "candidate submitted by hand") -> str:
    """Queue an already-trained model version for validate → canary → decision (the controller
    picks it up). Returns the rollout id."""
    number = str(registry.get_version(settings, version).version)
    store = RolloutStore(settings)
    rid = store.next_id()
    store.update(rid, stage="validate", status="running", created=time.time(),
                 model_version=number, gate=validated(Gate, "gate", **(gate or {})),
                 reason=reason)
    events.emit(settings, "candidate_submitted", rollout=rid, version=number, reason=reason)
    return rid


# The controller -------------------------------------------------------------------------------


def run_controller(settings: Settings, config: LoopConfig | None = None,
                   should_stop: Callable[[], bool] = lambda: False,
                   say: Callable[[str], None] = print) -> int:
    """Poll the inbox, snapshot labels when due, drive rollouts; returns the rollouts driven."""
    config = config or load_config(settings)
    store = RolloutStore(settings)
    store.beat(status="running", pid=os.getpid(), started=time.time(), config=config.model_dump())
    say(f"loop controller: threshold {config.threshold}, steps {config.analysis.steps}")
    driven = 0
    try:
        while not should_stop():
            rid = store.unfinished()
            if rid is None:
                reason = should_retrain(settings, config)
                if reason is not None:
                    rid = store.next_id()
                    say(f"{rid}: {reason}")
                    try:
                        snapshot_labels(settings, rid, reason)
                    except FlowOpsError as exc:  # retried at the next poll (intent is recorded)
                        say(f"{rid}: snapshot failed, will retry: {exc}")
                        time.sleep(config.poll_s)
                        continue
            if rid is not None:
                say(f"{rid}: resuming at stage {store.get(rid).stage}")
                record = drive_rollout(settings, config, rid, should_stop)
                say(f"{rid}: {record.status} {record.reasons or ''}")
                driven += 1
                if config.max_rollouts and driven >= config.max_rollouts:
                    break
                continue
            store.beat(status="running")
            time.sleep(config.poll_s)
    finally:
        store.beat(status="stopped", stopped=time.time())
    return driven


# Starting, stopping and reporting -------------------------------------------------------------


def start_controller(settings: Settings, config: LoopConfig) -> str:
    """Submit the controller as a Ray job with the home's fixed id; refuse if one is running."""
    sid = controller_submission_id(settings)
    try:
        current = jobs.info(settings, sid)
    except NotFound:
        current = None
    if current is not None:
        if current.status not in jobs.TERMINAL:
            raise Conflict(f"the loop controller is already running as job {sid} "
                           f"({current.status}); stop it with `flowops loop stop`")
        jobs.client(settings).delete_job(sid)  # a finished controller: its id can be reused
    save_config(settings, config)
    return jobs.submit(settings, "controller", config, submission_id=sid,
                       metadata={"role": "loop-controller"})


def stop_controller(settings: Settings, wait_s: float = 60) -> str:
    """Stop the controller job and return its final status; a rollout in progress resumes where
    it was at the next start. JobFailed if the job has not ended within `wait_s`."""
    sid = controller_submission_id(settings)
    current = jobs.info(settings, sid)
    if current.status in jobs.TERMINAL:
        return current.status
    jobs.stop(settings, sid)

    def ended() -> jobs.JobInfo | None:
        info = jobs.info(settings, sid)
        return info if info.status in jobs.TERMINAL else None

    return wait_until(ended, wait_s, what=f"the loop controller (job {sid}) stopping",
                      error=JobFailed).status


def loop_status(settings: Settings) -> dict[str, Any]:
    """The controller's job and heartbeat, the inbox, recent rollouts and their pipelines."""
    store = RolloutStore(settings)
    sid = controller_submission_id(settings)
    try:
        job = jobs.info(settings, sid)
        controller = {"job_id": sid, "status": job.status, "message": job.message}
    except NotFound:
        controller = {"job_id": sid, "status": "NOT STARTED"}
    beat = store.heartbeat().heartbeat
    controller["heartbeat_age_s"] = round(time.time() - beat, 1) if beat else None
    prefix = f"loop-{platform_tag(settings)}-"
    pipelines = [{"id": p.id, "status": p.status,
                  "steps": [(s.name, s.status, s.job_id) for s in p.steps]}
                 for p in jobs.list_pipelines(settings) if p.id.startswith(prefix)]
    return {"controller": controller, "config": load_config(settings).model_dump(),
            "inbox": labels.counts(settings), "production": registry.production_version(settings),
            "rollouts": [r.model_dump(exclude_none=True) for r in store.records()[-10:]],
            "pipelines": pipelines[-10:]}
