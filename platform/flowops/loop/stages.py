"""The stages of one rollout, each safe to redo after a crash:

    snapshot → train (Ray job, fine-tuned from production) → validate (registry gate)
    → canary (serving) → analysis (flowops.rollout) → promote | roll back → pseudo-label (Ray job)

Each stage reads its rollout's record, does its work, and returns the record moved to the next
stage. The snapshot intent is recorded before the data version is cut, and a cut version is
recognised by the rollout id in its message; Ray jobs run through `flowops.jobs.run_pipeline`
with a pipeline id derived from the rollout, so a restarted controller adopts the job already
running; the analysis re-reads serving's routing, so a decision taken before a restart is
recognised rather than repeated.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from flowops import data, events, jobs, labels, registry, serving, shards, storage
from flowops.durable import atomic_write_text
from flowops.errors import FlowOpsError, GateFailed, InvalidInput, validated
from flowops.loop import timeline
from flowops.loop.state import AnalysisProgress, LoopConfig, RolloutRecord, RolloutStore, platform_tag
from flowops.pseudo_label import PseudoLabelConfig
from flowops.refs import ModelRef
from flowops.rollout import Decision, decide
from flowops.settings import Settings
from flowops.tracking import configure_mlflow, ensure_experiment
from flowops.train import TrainConfig

ROLLOUT_EXPERIMENT = "rollouts"


def pipeline_id(settings: Settings, rid: str, stage: str) -> str:
    """The pipeline of a rollout's Ray job: fixed, so a restarted controller adopts the job."""
    return f"loop-{platform_tag(settings)}-{rid}-{stage}"


# Snapshot -------------------------------------------------------------------------------------


def _apply_labels(chosen: dict[str, str], classes: list[str]) -> Callable[[Path], None]:
    """cut_version's edit of a folder version: move labeled images to train (label_source=human),
    drop their answers and pseudo-labels. Files are replaced (they are hard links), never
    modified in place. (A sharded version: `shards.apply_labels`, the manifest only.)"""

    def apply(staging: Path) -> None:
        manifest = pd.read_csv(staging / "manifest.csv", dtype=str, keep_default_na=False)
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
                atomic_write_text(path, frame[~frame["id"].isin(list(chosen))].to_csv(index=False))

    return apply


def snapshot_labels(settings: Settings, rid: str, reason: str) -> RolloutRecord:
    """Turn the new labels into a data version, exactly once per rollout `rid`.

    One snapshot at a time in the whole platform (`statedb.exclusive`: a cutter on another node
    waits, then finds the work done):
    1. the intent (which labels) is recorded before anything else;
    2. a version whose message names `rid` is the one already cut (a crash after cutting);
    3. the labels are marked used in that version (only those still as recorded).
    """
    from flowops import statedb

    with statedb.exclusive(settings, "label-snapshot"):
        return _snapshot_labels(settings, rid, reason)


def _snapshot_labels(settings: Settings, rid: str, reason: str) -> RolloutRecord:
    store = RolloutStore(settings)
    record = store.read().rollouts.get(rid)
    if record is not None and record.data_version and record.stage != "snapshot":
        return record  # another cutter finished this snapshot while we waited
    if record is None or record.snapshot is None:
        chosen = {r["task_id"]: [r["image_id"], r["label"]] for r in labels.new_labels(settings)}
        record = store.update(rid, stage="snapshot", status="running", created=time.time(),
                              reason=reason, snapshot={"labels": chosen})
        events.emit(settings, "retrain_triggered", rollout=rid, reason=reason, labels=len(chosen))
    chosen = record.snapshot.labels
    version = record.data_version or _version_cut_for(settings, rid)
    if version is None:
        by_image = {image: label for image, label in chosen.values()}
        latest = data.open_version(settings)
        edit = (shards.apply_labels(by_image, storage.open_storage(settings, "label snapshot"))
                if shards.is_sharded(latest) else _apply_labels(by_image, latest.classes))
        version = data.cut_version(settings, f"loop {rid}: {len(by_image)} human labels", edit).id
    store.update(rid, data_version=version)
    still = {r["task_id"] for r in labels.new_labels(settings)
             if chosen.get(r["task_id"]) == [r["image_id"], r["label"]]}
    labels.mark_used(settings, sorted(still), version)
    events.emit(settings, "data_version_cut", rollout=rid, data_version=version,
                labels=len(chosen))
    return store.update(rid, stage="train")


def _version_cut_for(settings: Settings, rid: str) -> str | None:
    """The data version a crashed snapshot of `rid` already cut, if any."""
    for info in reversed(data.list_versions(settings)):
        if info.message.startswith(f"loop {rid}:"):
            return info.id
    return None


def stage_snapshot(settings: Settings, config: LoopConfig, rid: str) -> RolloutRecord:
    """Finish a snapshot that a crash interrupted (its intent is recorded)."""
    return snapshot_labels(settings, rid, RolloutStore(settings).get(rid).reason or "resumed")


# Train, validate ------------------------------------------------------------------------------


def _run_pipeline(settings: Settings, name: str, step: jobs.Step, pid: str, rid: str,
                  config: LoopConfig) -> None:
    """One Ray job as a resumable pipeline (a restart adopts it); JobFailed if it did not succeed
    (also when a previous controller recorded it as failed)."""
    store = RolloutStore(settings)
    last = [0.0]

    def beat(job: jobs.JobInfo) -> None:  # `loop status` shows a live controller while a job runs
        if time.monotonic() - last[0] >= 5.0:
            last[0] = time.monotonic()
            store.beat(status="running", rollout=rid, stage=name, job=job.id)

    jobs.run_pipeline(settings, name, [step], pipeline_id=pid, metadata={"rollout": rid},
                      on_poll=beat, step_timeout_s=config.step_timeout_s)


def stage_train(settings: Settings, config: LoopConfig, rid: str) -> RolloutRecord:
    """Fine-tune the production model on the rollout's data version (a Ray job, adopted on restart)."""
    store = RolloutStore(settings)
    record = store.get(rid)
    if record.base_version is None:  # pinned, so a restart trains from the same base
        record = store.update(rid, base_version=registry.production_version(settings))
    base = record.base_version
    run_name = f"loop-{platform_tag(settings)}-{rid}"
    train_config = validated(TrainConfig, "loop train config", **{
        "data_version": record.data_version, "epochs": config.epochs, "workers": config.workers,
        "cpus_per_worker": config.cpus_per_worker, "placement_strategy": config.placement_strategy,
        "run_name": run_name,
        "init_from": ModelRef.of(settings.model_name, base).uri if base else None,
        "model_name": settings.model_name, **config.train_overrides})
    events.emit(settings, "training_started", rollout=rid, data_version=record.data_version,
                base_version=base)
    _run_pipeline(settings, "retrain", jobs.Step("train", "train", train_config),
                  pipeline_id(settings, rid, "train"), rid, config)
    version = registry.version_registered_by(settings, run_name)
    events.emit(settings, "training_done", rollout=rid, version=version)
    return store.update(rid, model_version=version, stage="validate")


def stage_validate(settings: Settings, config: LoopConfig, rid: str) -> RolloutRecord:
    """The registry's gate; a failure ends the rollout as `rejected` (nothing was deployed)."""
    store = RolloutStore(settings)
    record = store.get(rid)
    version = record.model_version
    gate = {"min_accuracy": config.gate_min_accuracy,
            "max_regression": config.gate_max_regression,
            **record.gate.model_dump(exclude_none=True)}
    try:
        report = registry.validate_version(settings, version, **gate)
    except GateFailed as exc:
        events.emit(settings, "validation_failed", rollout=rid, version=version,
                    reasons=[str(exc)])
        return store.update(rid, stage="done", status="rejected", reasons=[str(exc)])
    events.emit(settings, "validated", rollout=rid, version=version, report=_jsonable(report))
    return store.update(rid, stage="canary")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# Canary and analysis --------------------------------------------------------------------------


def stage_canary(settings: Settings, config: LoopConfig, rid: str) -> RolloutRecord:
    """Deploy the candidate as a canary at the first weight beside the production model."""
    store = RolloutStore(settings)
    record = store.get(rid)
    version = record.model_version
    stable = record.stable_version or registry.production_version(settings)
    if stable is None or stable == version:  # first model ever: nothing to compare with
        serving.deploy(settings, stable=version, canary=None, weight=0)
        registry.promote(settings, version)
        events.emit(settings, "promoted", rollout=rid, version=version, first_model=True)
        return store.update(rid, stage="pseudo_label", status="promoted")
    weight = config.analysis.steps[0]
    routing = serving.deploy(settings, stable=stable, canary=version, weight=weight)
    if str(routing.get("canary")) != str(version):
        raise FlowOpsError(f"serving did not take canary v{version}: routing is stable "
                           f"v{routing.get('stable')}, canary {routing.get('canary')}")
    started = _canary_requests(settings, version)
    run_id = record.run_id or _start_rollout_run(settings, rid, version, stable, config)
    events.emit(settings, "canary_started", rollout=rid, version=version, stable=stable,
                weight=weight)
    return store.update(rid, stage="analysis", stable_version=stable, run_id=run_id,
                        analysis=AnalysisProgress(step=0, started=time.time(),
                                                  started_requests=started, began=time.time()))


def _canary_requests(settings: Settings, version: str) -> int:
    """Requests the serving ledger has counted for `version` so far."""
    return int(serving.ledger_snapshot(settings).get(str(version), {}).get("requests", 0))


def _start_rollout_run(settings: Settings, rid: str, version: str, stable: str,
                       config: LoopConfig) -> str:
    """The MLflow run that records the canary analysis (its parameters, each step, the decision)."""
    client = configure_mlflow(settings)
    run = client.create_run(ensure_experiment(settings, ROLLOUT_EXPERIMENT),
                            run_name=f"rollout-{rid}-v{version}",
                            tags={"rollout": rid, "model_version": version,
                                  "stable_version": stable, "model_name": settings.model_name})
    for key, value in config.analysis.model_dump().items():
        client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, list)
                         else value)
    return run.info.run_id


def _log_decision(settings: Settings, rid: str, run_id: str, decision: Decision, index: int,
                  at: float) -> None:
    """One look, kept twice: MLflow step metrics of the rollout run, and an `analysis_tick` event
    (what `flowops loop report --html` draws)."""
    client = configure_mlflow(settings)
    metrics = {"weight": decision.weight, "canary_requests": decision.evidence["canary_requests"],
               "stable_requests": decision.evidence["stable_requests"]}
    for check in decision.checks:
        for bound in ("estimate", "lower", "upper"):
            value = getattr(check, bound)
            if value is not None:
                metrics[f"{check.name}_{bound}"] = float(value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=index)
    events.emit(settings, "analysis_tick", rollout=rid, version=decision.evidence["canary"],
                key=f"{rid}:tick:{index}", ts=at, **_jsonable(decision.tick()))


def stage_analysis(settings: Settings, config: LoopConfig, rid: str,
                   should_stop: Callable[[], bool] = lambda: False) -> RolloutRecord:
    """Walk the weight steps, deciding from the serving ledger until promote or rollback."""
    cfg = config.analysis
    store = RolloutStore(settings)
    record = store.get(rid)
    version, stable, run_id = record.model_version, record.stable_version, record.run_id
    routing = serving.routing_status(settings)
    if record.deciding == "promote" or str(routing.get("stable")) == str(version):
        return _finish_promote(settings, record, None)  # decided before a restart
    if record.deciding == "rollback":
        if routing.get("canary"):
            serving.rollback(settings)
        return _finish_rollback(settings, record, None, time.time(), time.time())
    if str(routing.get("canary")) != str(version):
        raise FlowOpsError(f"serving no longer routes to canary v{version} (routing: stable "
                           f"v{routing.get('stable')}, canary {routing.get('canary')}); "
                           "someone changed the routing by hand")
    analysis = record.analysis
    if int(routing.get("weight", -1)) != cfg.steps[analysis.step]:
        serving.set_weight(settings, cfg.steps[analysis.step])
    ticks = analysis.ticks
    while not should_stop():
        seen_at = time.time()
        decision = decide(serving.ledger_snapshot(settings), stable=stable, canary=version,
                          step=analysis.step, step_elapsed_s=seen_at - analysis.started,
                          elapsed_s=seen_at - (analysis.began or analysis.started), config=cfg)
        ticks += 1
        if decision.action == "wait":
            if ticks % 5 == 1:
                _log_decision(settings, rid, run_id, decision, ticks, seen_at)
                analysis = analysis.model_copy(update={"ticks": ticks, "waiting": decision.reasons})
                store.update(rid, analysis=analysis)
                store.beat(status="running", rollout=rid, stage="analysis")
            time.sleep(min(config.poll_s, 1.0))
            continue
        _log_decision(settings, rid, run_id, decision, ticks, seen_at)
        if decision.action == "rollback":
            store.update(rid, deciding="rollback")
            serving.rollback(settings)
            return _finish_rollback(settings, record, decision, seen_at, time.time())
        events.emit(settings, "analysis_step", rollout=rid, version=version,
                    key=f"{rid}:step:{analysis.step}", weight=decision.weight,
                    evidence=_jsonable(decision.evidence))
        if decision.action == "promote":
            store.update(rid, deciding="promote")
            return _finish_promote(settings, record, decision)
        step = analysis.step + 1
        serving.set_weight(settings, cfg.steps[step])
        analysis = AnalysisProgress(step=step, started=time.time(),
                                    started_requests=_canary_requests(settings, version),
                                    ticks=ticks, began=analysis.began or analysis.started)
        record = store.update(rid, analysis=analysis)
    return record


# Finishing ------------------------------------------------------------------------------------


def _log_report(settings: Settings, record: RolloutRecord) -> None:
    """The rollout's HTML report, an artifact of its MLflow run."""
    if record.run_id:
        _, page = timeline.rollout_page(settings, record.id)
        configure_mlflow(settings).log_text(record.run_id, page, "rollout_report.html")


def _finish_promote(settings: Settings, record: RolloutRecord,
                    decision: Decision | None) -> RolloutRecord:
    rid, version = record.id, record.model_version
    events.emit(settings, "analysis_done", rollout=rid, version=version, decision="promote",
                reasons=decision.reasons if decision else ["already promoted"])
    if str(serving.routing_status(settings).get("stable")) != str(version):
        serving.promote_canary(settings)
    registry.promote(settings, version)
    if record.run_id:
        client = configure_mlflow(settings)
        client.set_tag(record.run_id, "decision", "promote")
        if decision:
            client.log_dict(record.run_id, decision.to_dict(), "decision.json")
        client.set_terminated(record.run_id, "FINISHED")
    events.emit(settings, "promoted", rollout=rid, version=version,
                previous=record.stable_version)
    _log_report(settings, record)
    return RolloutStore(settings).update(rid, stage="pseudo_label", status="promoted",
                                         reasons=decision.reasons if decision else [])


def _finish_rollback(settings: Settings, record: RolloutRecord, decision: Decision | None,
                     evidence_at: float, stable_at: float) -> RolloutRecord:
    rid, version = record.id, record.model_version
    reasons = decision.reasons if decision else ["rolled back before a restart"]
    events.emit(settings, "analysis_done", rollout=rid, version=version, ts=evidence_at,
                decision="rollback", reasons=reasons)
    text = "; ".join(reasons)[:4000]
    registry.mark_rolled_back(settings, version, text)
    if record.run_id:
        client = configure_mlflow(settings)
        client.set_tag(record.run_id, "decision", "rollback")
        client.set_tag(record.run_id, "reasons", text)
        client.log_metric(record.run_id, "rollback_s", stable_at - evidence_at)
        if decision:
            client.log_dict(record.run_id, decision.to_dict(), "decision.json")
        client.set_terminated(record.run_id, "FINISHED")
    rollback_s = round(stable_at - evidence_at, 3)
    events.emit(settings, "rolled_back", rollout=rid, version=version, ts=stable_at,
                reasons=reasons, rollback_s=rollback_s, evidence_at=evidence_at)
    _log_report(settings, record)
    return RolloutStore(settings).update(rid, stage="done", status="rolled_back", reasons=reasons,
                                         rollback_s=rollback_s)


def stage_pseudo_label(settings: Settings, config: LoopConfig, rid: str) -> RolloutRecord:
    """Pseudo-label the remaining pool with the new production model (a Ray job)."""
    store = RolloutStore(settings)
    version = store.get(rid).model_version
    if config.pseudo_label and "pseudo_label" in jobs.known_workloads():
        events.emit(settings, "pseudo_label_started", rollout=rid, version=version)
        job_config = validated(PseudoLabelConfig, "loop pseudo-label config", **{
            "model_uri": ModelRef.of(settings.model_name, version).uri,
            "data_version": data.resolve_version(settings, None), **config.pseudo_label_overrides})
        _run_pipeline(settings, "pseudo-label",
                      jobs.Step("pseudo_label", "pseudo_label", job_config),
                      pipeline_id(settings, rid, "pseudo"), rid, config)
        events.emit(settings, "pseudo_label_done", rollout=rid, version=version)
    return store.update(rid, stage="done")


# Driving a rollout ----------------------------------------------------------------------------

STAGES: dict[str, Callable[[Settings, LoopConfig, str], RolloutRecord]] = {
    "snapshot": stage_snapshot, "train": stage_train, "validate": stage_validate,
    "canary": stage_canary, "pseudo_label": stage_pseudo_label,
}


def drive_rollout(settings: Settings, config: LoopConfig, rid: str,
                  should_stop: Callable[[], bool] = lambda: False) -> RolloutRecord:
    """Run a rollout's remaining stages (resuming where its record says it stopped); a stage that
    raises ends the rollout as `failed` with the reason."""
    store = RolloutStore(settings)
    record = store.get(rid)
    while not record.done and not should_stop():
        stage = record.stage
        store.beat(status="running", rollout=rid, stage=stage, job=None)
        try:
            if stage == "analysis":
                record = stage_analysis(settings, config, rid, should_stop)
            else:
                record = STAGES[stage](settings, config, rid)
        except FlowOpsError as exc:
            events.emit(settings, "rollout_failed", rollout=rid, version=record.model_version,
                        stage=stage, reasons=[str(exc)])
            return store.update(rid, stage="done", status="failed", reasons=[f"{stage}: {exc}"])
    return record
