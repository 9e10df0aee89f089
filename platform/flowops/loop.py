"""The continuous training loop: labels accumulate → retrain → validate → canary → promote or roll back.

The controller (`jobs/controller.py`, a long-lived Ray job started by `flowops loop start`) polls
the label inbox. When the new human labels reach the threshold (or the oldest waits longer than
`max_age_s`), it snapshots them into a new data version and drives one **rollout**:

    snapshot → train (Ray job, fine-tuned from production) → validate (registry gate)
    → canary (serving) → analysis (flowops.rollout) → promote | roll back → pseudo-label (Ray job)

Exactly once, across restarts: every rollout's progress lives in `<home>/loop/state.json`
(written atomically) and each stage is done so that redoing it after a crash is harmless — the
snapshot intent is recorded before the data version is cut, and a cut version is recognised by
the snapshot id in its message; Ray jobs are submitted through `flowops.jobs.run_pipeline` with a
pipeline id derived from the rollout, so a restarted controller adopts the job already running.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowops import data, events, labels
from flowops.errors import FlowOpsError, GateFailed, InvalidInput, NotFound
from flowops.rollout import AnalysisConfig, Decision, decide
from flowops.settings import Settings

DONE = {"promoted", "rolled_back", "rejected", "failed"}
ROLLOUT_EXPERIMENT = "rollouts"


class LoopConfig(BaseModel):
    """How the loop decides to retrain, how it trains, and how it analyses the canary."""

    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(50, ge=1, description="New human labels that trigger a retrain.")
    max_age_s: float | None = Field(None, gt=0, description="Also retrain when the oldest new "
                                    "label waited this long (needs at least min_labels).")
    min_labels: int = Field(1, ge=1, description="Fewest labels a max-age or drift retrain uses.")
    retrain_on_drift: bool = Field(True, description="Also retrain when the drift monitor flagged "
                                   "live inputs since the last rollout (needs at least min_labels).")
    poll_s: float = Field(2.0, gt=0, le=300, description="Seconds between inbox checks.")
    epochs: int = Field(3, ge=1, le=1000, description="Fine-tuning epochs.")
    workers: int = Field(2, ge=1, le=64, description="Ray Train workers.")
    cpus_per_worker: float = Field(0.5, gt=0, le=64, description="CPUs per worker: fractional, so "
                                   "fine-tuning fits beside the serving replicas on a small node.")
    train_args: list[str] = Field(default_factory=list, description="Extra jobs.train arguments.")
    pseudo_label: bool = Field(True, description="Refresh pseudo-labels after a promotion.")
    pseudo_label_args: list[str] = Field(default_factory=list)
    step_timeout_s: float = Field(1800, gt=0, description="Longest a pipeline job may run.")
    max_rollouts: int | None = Field(None, ge=1, description="Exit after this many rollouts.")
    gate_min_accuracy: float | None = Field(None, ge=0, le=1, description="Registry gate floor "
                                            "(default: the registry's FLOWOPS_GATE_ settings).")
    gate_max_regression: float | None = Field(None, ge=0, le=1, description="Allowed accuracy "
                                              "drop vs production at the gate.")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)


# Files and state ---------------------------------------------------------------------------


def loop_dir(settings: Settings) -> Path:
    return settings.home / "loop"


def _home_tag(settings: Settings) -> str:
    return hashlib.sha1(str(settings.home).encode()).hexdigest()[:6]


def controller_submission_id(settings: Settings) -> str:
    """The controller's Ray job id: fixed per home, so two controllers cannot run at once."""
    return f"flowops-loop-{_home_tag(settings)}"


def save_config(settings: Settings, config: LoopConfig) -> None:
    from flowops.durable import atomic_write_text

    loop_dir(settings).mkdir(parents=True, exist_ok=True)
    atomic_write_text(loop_dir(settings) / "config.json", config.model_dump_json(indent=2))


def load_config(settings: Settings) -> LoopConfig:
    path = loop_dir(settings) / "config.json"
    if not path.exists():
        return LoopConfig()
    try:
        return LoopConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise InvalidInput(f"{path}: {exc.errors()[0]['msg']}") from None


def read_state(settings: Settings) -> dict[str, Any]:
    path = loop_dir(settings) / "state.json"
    if not path.exists():
        return {"rollouts": {}, "order": []}
    return json.loads(path.read_text())


def write_state(settings: Settings, state: dict[str, Any]) -> None:
    from flowops.durable import atomic_write_text

    loop_dir(settings).mkdir(parents=True, exist_ok=True)
    atomic_write_text(loop_dir(settings) / "state.json", json.dumps(state, indent=2, default=str))


def _state_lock(settings: Settings):
    from flowops.durable import file_lock

    return file_lock(loop_dir(settings) / "state.lock")


def update_rollout(settings: Settings, rid: str, **changes: Any) -> dict[str, Any]:
    """Change one rollout's record durably; returns the record."""
    with _state_lock(settings):
        state = read_state(settings)
        record = state["rollouts"].setdefault(rid, {"id": rid})
        record.update(changes)
        record["updated"] = time.time()
        if rid not in state["order"]:
            state["order"].append(rid)
        write_state(settings, state)
        return record


def latest_data_version(settings: Settings) -> str:
    """The newest data version of the local workspace (also inside Ray jobs, where
    FLOWOPS_DATA_REPO is set and "latest" is not resolved for us)."""
    version = data.latest_version(settings)
    if version is None:
        raise NotFound("no data version exists yet: run `flowops data init` first")
    return version


# Label inbox: files and simulated labelers ---------------------------------------------------


def add_labels_from_file(settings: Settings, path: Path, annotator: str = "") -> int:
    """Record a CSV of task_id,image_id,label after checking every row against the latest data
    version (known image outside the holdout, known class). All rows or none."""
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
    version = latest_data_version(settings)
    classes = [str(c) for c in data.read_meta(settings, version)["classes"]]
    manifest = data.read_manifest(settings, version).set_index("id")
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
    return labels.record_labels(settings, [
        labels.Label(r.task_id.strip(), r.image_id.strip(), r.label, source="file",
                     annotator=annotator) for r in frame.itertuples(index=False)])


def _queue_candidates(settings: Settings, count: int) -> tuple[list[str], str]:
    """Image ids to label next: the review queue's most uncertain first, else a random draw."""
    try:
        from flowops import queue

        frame = queue.review_queue(settings, top=count * 3)
        column = next(c for c in ("image_id", "id") if c in frame.columns)
        ids = [str(x) for x in frame[column]]
        if ids:
            return ids, "review queue (most uncertain first)"
    except (ImportError, AttributeError, StopIteration, FlowOpsError):
        pass
    manifest = data.read_manifest(settings, latest_data_version(settings))
    pool = manifest[manifest["split"] == "unlabeled"]["id"].sample(frac=1.0, random_state=0)
    return [str(x) for x in pool], "unlabeled pool (random order: no review queue yet)"


def simulate_labels(settings: Settings, count: int, annotator: str = "simulated",
                    wrong: bool = False) -> dict[str, Any]:
    """Simulated labelers: reveal the true labels (answers.csv) of the `count` images most worth
    labeling that are still unlabeled and not waiting in the inbox. `wrong` labels them wrongly
    (demo of a bad labeler)."""
    if count < 1:
        raise InvalidInput(f"--count must be at least 1, got {count}")
    version = latest_data_version(settings)
    root = data.materialize(settings, version)
    answers = pd.read_csv(root / "answers.csv", dtype=str, keep_default_na=False)
    truth = dict(zip(answers["id"], answers["label"], strict=False))
    manifest = data.read_manifest(settings, version)
    unlabeled = set(manifest.loc[manifest["split"] == "unlabeled", "id"])
    pending = {r["image_id"] for r in labels.new_labels(settings)}
    candidates, origin = _queue_candidates(settings, count)
    chosen = [i for i in candidates if i in unlabeled and i in truth and i not in pending][:count]
    classes = [str(c) for c in data.read_meta(settings, version)["classes"]]
    items = []
    for image_id in chosen:
        label = truth[image_id]
        if wrong:
            label = classes[(classes.index(label) + 1) % len(classes)]
        items.append(labels.Label(f"sim-{image_id}", image_id, label, source="simulated",
                                  annotator=annotator))
    n = labels.record_labels(settings, items)
    return {"recorded": n, "requested": count, "from": origin, "data_version": version,
            "inbox": labels.counts(settings)}


# Trigger and snapshot ------------------------------------------------------------------------


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
    rollouts = read_state(settings).get("rollouts", {})
    since = max((r.get("created") or 0 for r in rollouts.values()), default=0)
    drifts = [e for e in events.read_events(settings)
              if e.get("event") == "drift_detected" and float(e.get("ts") or 0) > since
              and e.get("model", settings.model_name) == settings.model_name]
    return drifts[-1] if drifts else None


def _apply_labels(chosen: dict[str, str], classes: list[str]) -> Callable[[Path], None]:
    """cut_version's edit: move labeled images to train (label_source=human), drop their answers
    and pseudo-labels. Files are renamed (hard links), never modified in place."""

    def apply(staging: Path) -> None:
        manifest = data._parse_manifest((staging / "manifest.csv").read_text())
        unknown = [i for i in chosen if i not in set(manifest["id"])]
        if unknown:
            raise InvalidInput(f"labeled image(s) not in the data version: {unknown[:5]}")
        for idx in manifest.index[manifest["id"].isin(list(chosen))]:
            row = manifest.loc[idx]
            if row["split"] == "holdout":  # never relabel the evaluation set
                continue
            label = chosen[row["id"]]
            if label not in classes:
                raise InvalidInput(f"label {label!r} of {row['id']} is not a class: {classes}")
            new_path = f"images/train/{label}/{row['id']}{Path(row['path']).suffix}"
            if new_path != row["path"]:
                (staging / new_path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / row["path"], staging / new_path)
            manifest.loc[idx, ["label", "split", "path", "label_source"]] = [
                label, "train", new_path, "human"]
        data.write_manifest(staging / "manifest.csv", manifest)
        for name in ("answers.csv", "pseudo_labels.csv"):
            path = staging / name
            if path.exists():
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
                frame = frame[~frame["id"].isin(list(chosen))]
                tmp = staging / f".{name}.tmp"
                frame.to_csv(tmp, index=False)
                os.replace(tmp, path)

    return apply


def snapshot_labels(settings: Settings, rid: str, reason: str) -> dict[str, Any]:
    """Turn the new labels into a data version, exactly once per rollout `rid`.

    1. the intent (which labels) is recorded before anything else;
    2. a version whose message names `rid` is the one already cut (a crash after cutting);
    3. the labels are marked used in that version (only those still as recorded).
    """
    record = read_state(settings)["rollouts"].get(rid, {})
    if "snapshot" not in record:
        pending = labels.new_labels(settings)
        chosen = {r["task_id"]: [r["image_id"], r["label"]] for r in pending}
        record = update_rollout(settings, rid, stage="snapshot", status="running",
                                created=time.time(), reason=reason,
                                snapshot={"labels": chosen})
        events.emit(settings, "retrain_triggered", rollout=rid, reason=reason,
                      labels=len(chosen))
    chosen = record["snapshot"]["labels"]
    version = record.get("data_version") or _version_for(settings, rid)
    if version is None:
        by_image = {image: label for image, label in chosen.values()}
        base = latest_data_version(settings)
        classes = [str(c) for c in data.read_meta(settings, base)["classes"]]
        info = data.cut_version(settings, f"loop {rid}: {len(by_image)} human labels",
                                _apply_labels(by_image, classes))
        version = info.id
    record = update_rollout(settings, rid, data_version=version)
    still = {r["task_id"] for r in labels.new_labels(settings)
             if chosen.get(r["task_id"]) == [r["image_id"], r["label"]]}
    labels.mark_used(settings, sorted(still), version)
    events.emit(settings, "data_version_cut", rollout=rid, data_version=version,
                  labels=len(chosen))
    return update_rollout(settings, rid, stage="train")


def _version_for(settings: Settings, rid: str) -> str | None:
    """The data version a crashed snapshot of `rid` already cut, if any."""
    for info in reversed(data.list_versions(settings)):
        if info.message.startswith(f"loop {rid}:"):
            return info.id
    return None


# One rollout, stage by stage ----------------------------------------------------------------


def _tracking_client(settings: Settings):
    from flowops.tracking import configure_mlflow

    return configure_mlflow(settings)


def production_version(settings: Settings) -> str | None:
    """The version behind the `production` alias, or None when there is none yet."""
    from flowops.model import resolve_model_version

    try:
        return resolve_model_version(settings, f"models:/{settings.model_name}@production")[1]
    except NotFound:
        return None


def _pipeline_id(settings: Settings, rid: str, stage: str) -> str:
    return f"loop-{_home_tag(settings)}-{rid}-{stage}"


def _registered_version(settings: Settings, run_name: str) -> str:
    """The model version registered by the training run named `run_name`."""
    from flowops.tracking import ensure_experiment

    client = _tracking_client(settings)
    runs = client.search_runs([ensure_experiment(settings, "train")],
                              filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    version = runs[0].data.tags.get("model_version") if runs else None
    if not version:
        raise NotFound(f"the training run {run_name!r} registered no model version")
    return str(version)


def _run_pipeline(settings: Settings, name: str, step: Any, pipeline_id: str, rid: str,
                  config: LoopConfig) -> None:
    """One Ray job as a resumable pipeline (a restart adopts it); JobFailed if it did not succeed
    (also when a previous controller recorded it as failed)."""
    from flowops import jobs
    from flowops.errors import JobFailed

    last = [0.0]

    def beat(job: Any) -> None:  # `loop status` shows a live controller while a job runs
        if time.monotonic() - last[0] >= 5.0:
            last[0] = time.monotonic()
            _heartbeat(settings, status="running", rollout=rid, stage=name, job=job.id)

    run = jobs.run_pipeline(settings, name, [step], pipeline_id=pipeline_id,
                            metadata={"rollout": rid}, on_poll=beat,
                            step_timeout_s=config.step_timeout_s)
    if run.status != "SUCCEEDED":
        raise JobFailed(run.message or f"pipeline {pipeline_id} {run.status}")


def stage_train(settings: Settings, config: LoopConfig, rid: str) -> dict[str, Any]:
    """Fine-tune the production model on the rollout's data version (a Ray job, adopted on restart)."""
    from flowops import jobs

    record = read_state(settings)["rollouts"][rid]
    if "base_version" not in record:  # pinned once, so a restart trains from the same base
        record = update_rollout(settings, rid, base_version=production_version(settings))
    base = record["base_version"]
    run_name = f"loop-{_home_tag(settings)}-{rid}"
    args = ["--data-version", record["data_version"], "--epochs", str(config.epochs),
            "--workers", str(config.workers), "--cpus-per-worker", str(config.cpus_per_worker),
            "--run-name", run_name, *config.train_args]
    if base:
        args += ["--init-from", f"models:/{settings.model_name}/{base}"]
    events.emit(settings, "training_started", rollout=rid, data_version=record["data_version"],
                  base_version=base)
    _run_pipeline(settings, "retrain", jobs.Step("train", "train", args),
                  _pipeline_id(settings, rid, "train"), rid, config)
    version = _registered_version(settings, run_name)
    events.emit(settings, "training_done", rollout=rid, version=version)
    return update_rollout(settings, rid, model_version=version, stage="validate")


def stage_validate(settings: Settings, config: LoopConfig, rid: str) -> dict[str, Any]:
    """The registry's gate; a failure ends the rollout as `rejected` (nothing was deployed)."""
    from flowops import registry

    record = read_state(settings)["rollouts"][rid]
    version = record["model_version"]
    try:
        gate = {"min_accuracy": config.gate_min_accuracy,
                "max_regression": config.gate_max_regression, **record.get("gate", {})}
        report = registry.validate_version(settings, version, **gate)
    except GateFailed as exc:
        events.emit(settings, "validation_failed", rollout=rid, version=version,
                      reasons=[str(exc)])
        return update_rollout(settings, rid, stage="done", status="rejected", reasons=[str(exc)])
    events.emit(settings, "validated", rollout=rid, version=version,
                  report=_jsonable(report))
    return update_rollout(settings, rid, stage="canary")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def stage_canary(settings: Settings, config: LoopConfig, rid: str) -> dict[str, Any]:
    """Deploy the candidate as a canary at the first weight beside the production model."""
    from flowops import serving

    record = read_state(settings)["rollouts"][rid]
    version = record["model_version"]
    stable = record.get("stable_version") or production_version(settings)
    if stable is None or stable == version:  # first model ever: nothing to compare with
        serving.deploy(settings, stable=version, canary=None, weight=0)
        _set_production(settings, version)
        events.emit(settings, "promoted", rollout=rid, version=version, first_model=True)
        return update_rollout(settings, rid, stage="pseudo_label", status="promoted")
    weight = config.analysis.steps[0]
    routing = serving.deploy(settings, stable=stable, canary=version, weight=weight)
    if str(routing.get("canary")) != str(version):
        raise FlowOpsError(f"serving did not take canary v{version}: routing is stable "
                           f"v{routing.get('stable')}, canary {routing.get('canary')}")
    ledger = serving.ledger_snapshot(settings)
    started = int(ledger.get(str(version), {}).get("requests", 0))
    run_id = record.get("run_id") or _start_rollout_run(settings, rid, version, stable, config)
    events.emit(settings, "canary_started", rollout=rid, version=version, stable=stable,
                  weight=weight)
    return update_rollout(settings, rid, stage="analysis", stable_version=stable, run_id=run_id,
                          analysis={"step": 0, "started": time.time(),
                                    "started_requests": started})


def _start_rollout_run(settings: Settings, rid: str, version: str, stable: str,
                       config: LoopConfig) -> str:
    from flowops.tracking import ensure_experiment

    client = _tracking_client(settings)
    run = client.create_run(ensure_experiment(settings, ROLLOUT_EXPERIMENT),
                            run_name=f"rollout-{rid}-v{version}",
                            tags={"rollout": rid, "model_version": version,
                                  "stable_version": stable, "model_name": settings.model_name})
    for key, value in config.analysis.model_dump().items():
        client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, list)
                         else value)
    return run.info.run_id


def _log_decision(settings: Settings, run_id: str, decision: Decision, index: int) -> None:
    client = _tracking_client(settings)
    metrics = {"weight": decision.weight, "step_requests": decision.evidence["step_requests"],
               "canary_requests": decision.evidence["canary_requests"]}
    for check in decision.checks:
        for side in ("canary", "stable"):
            value = getattr(check, side)
            if value is not None:
                metrics[f"{check.name}_{side}"] = float(value)
        if check.p_value is not None:
            metrics[f"{check.name}_p"] = float(check.p_value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=index)


def stage_analysis(settings: Settings, config: LoopConfig, rid: str,
                   should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Walk the weight steps, deciding from the serving ledger until promote or rollback."""
    from flowops import serving

    cfg = config.analysis
    record = read_state(settings)["rollouts"][rid]
    version, stable, run_id = record["model_version"], record["stable_version"], record["run_id"]
    routing = serving.routing_status(settings)
    deciding = record.get("deciding")
    if deciding == "promote" or str(routing.get("stable")) == str(version):
        return _finish_promote(settings, rid, record, None)  # decided before a restart
    if deciding == "rollback":
        if routing.get("canary"):
            serving.rollback(settings)
        return _finish_rollback(settings, rid, record, None, time.time(), time.time())
    if str(routing.get("canary")) != str(version):
        raise FlowOpsError(f"serving no longer routes to canary v{version} (routing: stable "
                           f"v{routing.get('stable')}, canary {routing.get('canary')}); "
                           "someone changed the routing by hand")
    analysis = record["analysis"]
    if int(routing.get("weight", -1)) != cfg.steps[analysis["step"]]:
        serving.set_weight(settings, cfg.steps[analysis["step"]])
    ticks = int(analysis.get("ticks", 0))
    while not should_stop():
        seen_at = time.time()
        snapshot = serving.ledger_snapshot(settings)
        decision = decide(snapshot, stable=stable, canary=version, step=analysis["step"],
                          step_started_requests=analysis["started_requests"],
                          step_elapsed_s=seen_at - analysis["started"], config=cfg)
        ticks += 1
        if decision.action == "wait":
            if ticks % 5 == 1:
                _log_decision(settings, run_id, decision, ticks)
                _heartbeat(settings, status="running", rollout=rid, stage="analysis")
            time.sleep(min(config.poll_s, 1.0))
            continue
        _log_decision(settings, run_id, decision, ticks)
        if decision.action == "rollback":
            update_rollout(settings, rid, deciding="rollback")
            serving.rollback(settings)
            return _finish_rollback(settings, rid, record, decision, seen_at, time.time())
        events.emit(settings, "analysis_step", rollout=rid, version=version,
                      key=f"{rid}:step:{analysis['step']}", weight=decision.weight,
                      evidence=_jsonable(decision.evidence))
        if decision.action == "promote":
            update_rollout(settings, rid, deciding="promote")
            return _finish_promote(settings, rid, record, decision)
        step = analysis["step"] + 1
        serving.set_weight(settings, cfg.steps[step])
        requests = int(serving.ledger_snapshot(settings).get(str(version), {}).get("requests", 0))
        analysis = {"step": step, "started": time.time(), "started_requests": requests,
                    "ticks": ticks}
        record = update_rollout(settings, rid, analysis=analysis)
    return record


def _set_production(settings: Settings, version: str) -> None:
    try:
        from flowops import registry

        registry.promote(settings, version)
    except ImportError:
        _tracking_client(settings).set_registered_model_alias(settings.model_name, "production",
                                                              version)


def _finish_promote(settings: Settings, rid: str, record: dict[str, Any],
                    decision: Decision | None) -> dict[str, Any]:
    from flowops import serving

    version = record["model_version"]
    events.emit(settings, "analysis_done", rollout=rid, version=version, decision="promote",
                  reasons=decision.reasons if decision else ["already promoted"])
    if str(serving.routing_status(settings).get("stable")) != str(version):
        serving.promote_canary(settings)
    _set_production(settings, version)
    client = _tracking_client(settings)
    if record.get("run_id"):
        client.set_tag(record["run_id"], "decision", "promote")
        if decision:
            client.log_dict(record["run_id"], decision.to_dict(), "decision.json")
        client.set_terminated(record["run_id"], "FINISHED")
    events.emit(settings, "promoted", rollout=rid, version=version,
                  previous=record.get("stable_version"))
    return update_rollout(settings, rid, stage="pseudo_label", status="promoted",
                          reasons=decision.reasons if decision else [])


def _finish_rollback(settings: Settings, rid: str, record: dict[str, Any],
                     decision: Decision | None, evidence_at: float,
                     stable_at: float) -> dict[str, Any]:
    version = record["model_version"]
    reasons = decision.reasons if decision else ["rolled back before a restart"]
    events.emit(settings, "analysis_done", rollout=rid, version=version, ts=evidence_at,
                  decision="rollback", reasons=reasons)
    client = _tracking_client(settings)
    text = "; ".join(reasons)[:4000]
    try:
        from flowops import registry

        registry.mark_rolled_back(settings, version, text)
    except (ImportError, AttributeError):
        client.set_model_version_tag(settings.model_name, version, "rolled_back", "true")
        client.set_model_version_tag(settings.model_name, version, "rolled_back_reasons", text)
    if record.get("run_id"):
        client.set_tag(record["run_id"], "decision", "rollback")
        client.set_tag(record["run_id"], "reasons", text[:4000])
        client.log_metric(record["run_id"], "rollback_s", stable_at - evidence_at)
        if decision:
            client.log_dict(record["run_id"], decision.to_dict(), "decision.json")
        client.set_terminated(record["run_id"], "FINISHED")
    rollback_s = round(stable_at - evidence_at, 3)
    events.emit(settings, "rolled_back", rollout=rid, version=version, ts=stable_at,
                  reasons=reasons, rollback_s=rollback_s, evidence_at=evidence_at)
    _record_metric("rolled_back", rollback_s)
    return update_rollout(settings, rid, stage="done", status="rolled_back", reasons=reasons,
                          rollback_s=rollback_s)


def _record_metric(event: str, value: float) -> None:
    """The observability stage's loop metric, when that module provides one."""
    try:
        from flowops import metrics
    except ImportError:
        return
    hook = getattr(metrics, "record_loop_event", None)
    if hook:
        hook(event, value)


def stage_pseudo_label(settings: Settings, config: LoopConfig, rid: str) -> dict[str, Any]:
    """Pseudo-label the remaining pool with the new production model (a Ray job)."""
    from flowops import jobs

    record = read_state(settings)["rollouts"][rid]
    if config.pseudo_label and "pseudo_label" in jobs.known_workloads():
        events.emit(settings, "pseudo_label_started", rollout=rid,
                      version=record["model_version"])
        args = ["--model-uri", f"models:/{settings.model_name}/{record['model_version']}",
                "--data-version", latest_data_version(settings),
                *config.pseudo_label_args]
        _run_pipeline(settings, "pseudo-label", jobs.Step("pseudo_label", "pseudo_label", args),
                      _pipeline_id(settings, rid, "pseudo"), rid, config)
        events.emit(settings, "pseudo_label_done", rollout=rid, version=record["model_version"])
    return update_rollout(settings, rid, stage="done")


def stage_snapshot(settings: Settings, config: LoopConfig, rid: str) -> dict[str, Any]:
    """Finish a snapshot that a crash interrupted (its intent is recorded)."""
    record = read_state(settings)["rollouts"][rid]
    return snapshot_labels(settings, rid, record.get("reason", "resumed"))


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "snapshot": stage_snapshot,
    "train": stage_train, "validate": stage_validate, "canary": stage_canary,
    "analysis": stage_analysis, "pseudo_label": stage_pseudo_label,
}


def drive_rollout(settings: Settings, config: LoopConfig, rid: str,
                  should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run a rollout's remaining stages (resuming where its record says it stopped)."""
    record = read_state(settings)["rollouts"][rid]
    while record.get("stage") != "done" and not should_stop():
        stage = record["stage"]
        _heartbeat(settings, status="running", rollout=rid, stage=stage, job=None)
        try:
            if stage == "analysis":
                record = stage_analysis(settings, config, rid, should_stop)
            else:
                record = STAGES[stage](settings, config, rid)
        except FlowOpsError as exc:
            events.emit(settings, "rollout_failed", rollout=rid,
                          version=record.get("model_version"), stage=stage, reasons=[str(exc)])
            return update_rollout(settings, rid, stage="done", status="failed",
                                  reasons=[f"{stage}: {exc}"])
    return record


def submit_candidate(settings: Settings, version: str, gate: dict[str, Any] | None = None,
                     reason: str = "candidate submitted by hand") -> str:
    """Queue an already-trained model version for validate → canary → decision (the controller
    picks it up). Returns the rollout id."""
    from flowops.model import resolve_model_version

    resolve_model_version(settings, f"models:/{settings.model_name}/{version}")
    rid = next_rollout_id(settings)
    update_rollout(settings, rid, stage="validate", status="running", created=time.time(),
                   model_version=str(version), gate=gate or {}, reason=reason)
    events.emit(settings, "candidate_submitted", rollout=rid, version=str(version),
                  reason=reason)
    return rid


def next_rollout_id(settings: Settings) -> str:
    return f"r{len(read_state(settings)['order']) + 1:03d}"


def unfinished_rollout(settings: Settings) -> str | None:
    state = read_state(settings)
    return next((rid for rid in state["order"]
                 if state["rollouts"][rid].get("stage") != "done"), None)


# The controller ------------------------------------------------------------------------------


def _heartbeat(settings: Settings, **fields: Any) -> None:
    with _state_lock(settings):
        state = read_state(settings)
        state["controller"] = {**state.get("controller", {}), **fields, "heartbeat": time.time()}
        write_state(settings, state)


def run_controller(settings: Settings, config: LoopConfig | None = None,
                   should_stop: Callable[[], bool] = lambda: False,
                   say: Callable[[str], None] = print) -> int:
    """Poll the inbox, snapshot labels when due, drive rollouts; returns the rollouts driven."""
    config = config or load_config(settings)
    _heartbeat(settings, status="running", pid=os.getpid(), started=time.time(),
               config=config.model_dump())
    say(f"loop controller: threshold {config.threshold}, steps {config.analysis.steps}")
    driven = 0
    try:
        while not should_stop():
            rid = unfinished_rollout(settings)
            if rid is None:
                reason = should_retrain(settings, config)
                if reason is not None:
                    rid = next_rollout_id(settings)
                    say(f"{rid}: {reason}")
                    try:
                        snapshot_labels(settings, rid, reason)
                    except FlowOpsError as exc:  # retried at the next poll (intent is recorded)
                        say(f"{rid}: snapshot failed, will retry: {exc}")
                        time.sleep(config.poll_s)
                        continue
            if rid is not None:
                say(f"{rid}: resuming at stage {read_state(settings)['rollouts'][rid]['stage']}")
                record = drive_rollout(settings, config, rid, should_stop)
                say(f"{rid}: {record.get('status')} {record.get('reasons', '')}")
                driven += 1
                if config.max_rollouts and driven >= config.max_rollouts:
                    break
                continue
            _heartbeat(settings, status="running")
            time.sleep(config.poll_s)
    finally:
        _heartbeat(settings, status="stopped", stopped=time.time())
    return driven


# Starting, stopping and reporting --------------------------------------------------------------


def start_controller(settings: Settings, config: LoopConfig) -> str:
    """Submit the controller as a Ray job with the home's fixed id; refuse if one is running."""
    from flowops import jobs
    from flowops.errors import Conflict

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
    return jobs.submit(settings, "controller", [], submission_id=sid,
                       metadata={"role": "loop-controller"})


def stop_controller(settings: Settings, wait_s: float = 60) -> str:
    """Stop the controller job; a rollout in progress resumes where it was at the next start."""
    from flowops import jobs

    sid = controller_submission_id(settings)
    current = jobs.info(settings, sid)
    if current.status in jobs.TERMINAL:
        return current.status
    jobs.stop(settings, sid)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        current = jobs.info(settings, sid)
        if current.status in jobs.TERMINAL:
            break
        time.sleep(0.5)
    return current.status


def loop_status(settings: Settings) -> dict[str, Any]:
    """The controller's job and heartbeat, the inbox, recent rollouts and their pipelines."""
    from flowops import jobs

    state = read_state(settings)
    sid = controller_submission_id(settings)
    try:
        job = jobs.info(settings, sid)
        controller = {"job_id": sid, "status": job.status, "message": job.message}
    except NotFound:
        controller = {"job_id": sid, "status": "NOT STARTED"}
    heartbeat = state.get("controller", {})
    controller["heartbeat_age_s"] = (round(time.time() - heartbeat["heartbeat"], 1)
                                     if heartbeat.get("heartbeat") else None)
    prefix = f"loop-{_home_tag(settings)}-"
    pipelines = [{"id": p.id, "status": p.status, "steps": [(s.name, s.status, s.job_id)
                                                           for s in p.steps]}
                 for p in jobs.list_pipelines(settings) if p.id.startswith(prefix)]
    rollouts = [state["rollouts"][rid] for rid in state["order"]][-10:]
    return {"controller": controller, "config": load_config(settings).model_dump(),
            "inbox": labels.counts(settings), "production": production_version(settings),
            "rollouts": rollouts, "pipelines": pipelines[-10:]}


def parse_config(raw: dict[str, Any]) -> LoopConfig:
    """A LoopConfig from CLI values; one clear line when something is out of range."""
    try:
        return LoopConfig.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidInput(f"invalid loop setting {where}: {first['msg']}") from None
