"""The drift_monitor workload: check one live-input window, or watch a folder of them, for drift
against the served model's training data (`flowops.drift` does the statistics and the windows).

The reference is built from the data version the model was trained on, through the model's own
preprocessing (so a window and the reference are the same kind of pixels), and cached per (data
version, model version).

Its config is one model on both sides of the job boundary: `flowops monitor drift --as-job|--watch`
sends `DriftMonitorConfig(...).model_dump_json()`, `python -m flowops.workloads.drift_monitor` parses it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowops import events
from flowops.drift import (
    EXPERIMENT,
    DriftConfig,
    DriftReport,
    Reference,
    build_reference,
    check_window,
    drift_dir,
    list_windows,
    load_window,
    raw_pixels,
    save_report,
)
from flowops.durable import wait_until
from flowops.errors import InvalidInput
from flowops.image_model import Preprocess
from flowops.refs import ModelRef
from flowops.settings import Settings


class DriftMonitorConfig(BaseModel):
    """What to check (one window file, or a folder to watch), against what, and how."""

    model_config = ConfigDict(extra="forbid")

    window: str | None = Field(None, description="One window (.npy or .parquet): a file, or a URI "
                               "in the storage (s3://…).")
    watch: str | None = Field(None, description="A folder or storage prefix to watch for new windows "
                              "(the serving app's: drift.windows_location).")
    model_uri: str | None = Field(None, description="Default: models:/<model_name>@production.")
    data_version: str | None = Field(None, description="Reference data version (default: the "
                                     "model's training data version, else the latest).")
    interval_s: float = Field(60.0, gt=0, description="Seconds between polls (watch).")
    max_checks: int | None = Field(None, ge=1, description="Stop after N checks (watch).")
    stop_after_s: float | None = Field(None, gt=0, description="Stop after N seconds (watch).")
    trigger: bool = Field(True, description="Emit drift_detected to the loop when drifted.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="The statistical tests.")

    @model_validator(mode="after")
    def _one_source(self) -> DriftMonitorConfig:
        if (self.window is None) == (self.watch is None):
            raise ValueError("give exactly one of window (a file) and watch (a folder)")
        return self


def run_drift_monitor(settings: Settings, config: DriftMonitorConfig) -> list[DriftReport]:
    """One check of `window`, or the checks of the windows arriving in `watch`."""
    common = {"model_uri": config.model_uri, "data_version": config.data_version,
              "config": config.drift, "trigger": config.trigger}
    if config.window is not None:
        return [run_drift_check(settings, config.window, **common)]
    return watch(settings, config.watch, interval_s=config.interval_s,
                 max_checks=config.max_checks, stop_after_s=config.stop_after_s, **common)


def reference_images(version, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training images of an opened data version as the model sees them (pixel values
    (N, C, H, W) in [0, 1]), their label indices, the classes. Read where they are (through
    `evaluate.version_split`: shards from the storage URI, or a folder version's files)."""
    from flowops.evaluate import version_split

    if version.rows("train", labeled=True).empty:
        raise InvalidInput(f"data version {version.tag} has no training images to build a reference from")
    train = version_split(version, "train", preprocess)
    return raw_pixels(train.x, preprocess), train.y, version.classes


def load_reference(settings: Settings, model_uri: str, data_version: str | None = None,
                   config: DriftConfig | None = None):
    """(reference, loaded model): the reference is cached per (data version, model version)."""
    from flowops import data
    from flowops.model import load_model

    config = config or DriftConfig()
    loaded = load_model(settings, model_uri)
    if data_version is None:
        data_version = _training_data_version(settings, loaded.name, loaded.version)
    data_version = data.resolve_version(settings, data_version)
    path = (drift_dir(settings) / "reference" /
            f"{data_version}-{loaded.name}-{loaded.version}-pc{config.embedding_components}.npz")
    if path.exists():
        return Reference.load(path), loaded
    images, labels, classes = reference_images(data.open_version(settings, data_version),
                                               loaded.preprocess)
    ref = build_reference(images, classes, model=loaded, labels=labels, config=config,
                          data_version=data_version, model_version=loaded.version)
    ref.save(path)
    return ref, loaded


def _training_data_version(settings: Settings, name: str, version: str) -> str | None:
    """The data version a model version was trained on (its run's `data_version` param/tag), if known."""
    from flowops.tracking import configure_mlflow

    client = configure_mlflow(settings)
    try:
        mv = client.get_model_version(name, version)
        found = mv.tags.get("data_version")
        if not found and mv.run_id:
            run = client.get_run(mv.run_id)
            found = run.data.params.get("data_version") or run.data.tags.get("data_version")
        return found or None
    except Exception:  # noqa: BLE001 - unknown lineage: fall back to the latest version
        return None


def run_drift_check(
    settings: Settings,
    window: str | Path,
    *,
    model_uri: str | None = None,
    data_version: str | None = None,
    config: DriftConfig | None = None,
    trigger: bool = True,
    log_to_mlflow: bool = True,
    mlflow_step: int | None = None,
) -> DriftReport:
    """Check one window file against the served model's training data.

    Keeps the report in the state database (`drift.save_report`), logs it to MLflow
    (experiment drift-monitor: into the active run as step `mlflow_step` when one is open, as the
    watch does, else in a run of its own), and when the last `config.persist` windows of the
    model all drifted and `trigger` is set, appends a `drift_detected` event to the loop's event
    log.
    """
    config = config or DriftConfig()
    model_uri = model_uri or ModelRef.production(settings.model_name).uri
    reference, loaded = load_reference(settings, model_uri, data_version, config)
    images = load_window(window, reference.preprocess, settings)
    report = check_window(reference, images, model=loaded, config=config)
    record = report.to_dict() | {"window": str(window), "model_uri": model_uri, "model": loaded.name}
    save_report(settings, record)
    if log_to_mlflow:
        _log_report(settings, report, record, mlflow_step)
    if report.drifted and trigger and persisted(settings, loaded.name, config.persist):
        _emit_drift_event(settings, report, loaded.name, config.persist)
    return report


def persisted(settings: Settings, model_name: str, windows: int) -> bool:
    """Whether the last `windows` checked windows of the model all drifted (drift history)."""
    from flowops import statedb

    table = statedb.drift_reports
    with statedb.reading(settings) as conn:
        last = conn.execute(table.select().where(table.c.model == model_name)
                            .order_by(table.c.id.desc()).limit(windows)).all()
    return len(last) >= windows and all(r.drifted for r in last)


def _log_report(settings: Settings, report: DriftReport, record: dict[str, Any],
                step: int | None) -> None:
    import mlflow

    from flowops.tracking import start_run

    metrics = {"drift_score": report.score, "drifted": float(report.drifted),
               "min_p_adjusted": report.min_p_adjusted,
               "drifted_features": float(len(report.drifted_features))}
    if report.class_p is not None:
        metrics |= {"class_p": report.class_p, "class_psi": report.class_psi}
    metrics |= {f"ks_{f['name']}": f["statistic"] for f in report.features}
    if step is not None and mlflow.active_run() is not None:  # a window of a monitoring session
        mlflow.log_metrics(metrics, step=step)
        mlflow.log_dict(record, f"windows/{step:05d}.json")
        return
    with start_run(settings, EXPERIMENT, run_name=f"drift-v{report.model_version}-{int(report.ts)}"):
        mlflow.log_params({"model_version": report.model_version, "data_version": report.data_version,
                           "window": record["window"], "n": report.n, "correction": report.correction})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"drifted": str(report.drifted).lower(), "stage": "drift-monitor"})
        mlflow.log_dict(record, "drift_report.json")


def _emit_drift_event(settings: Settings, report: DriftReport, model_name: str, windows: int) -> None:
    """Tell the loop: a `drift_detected` event in the loop's event log."""
    fields = {"model": model_name, "score": report.score, "data_version": report.data_version,
              "drifted_features": report.drifted_features, "class_drifted": report.class_drifted,
              "windows": windows}
    events.emit(settings, "drift_detected", version=report.model_version, **fields)


def watch(settings: Settings, window_dir: str, *, interval_s: float, max_checks: int | None = None,
          stop_after_s: float | None = None, **kwargs: Any) -> list[DriftReport]:
    """Periodically check the newest unchecked window file in `window_dir` (the scheduled monitor).

    Stops after `max_checks` reports or `stop_after_s` seconds, whichever comes first (never, if
    neither is given). The session is one MLflow run, each window a step of it.
    """
    import mlflow

    from flowops.tracking import start_run

    with start_run(settings, EXPERIMENT, run_name=f"drift-watch-{int(time.time())}"):
        mlflow.set_tags({"stage": "drift-monitor", "window_dir": str(window_dir)})
        return _watch(settings, window_dir, interval_s=interval_s, max_checks=max_checks,
                      stop_after_s=stop_after_s, **kwargs)


def _watch(settings: Settings, window_dir: str, *, interval_s: float, max_checks: int | None,
           stop_after_s: float | None, **kwargs: Any) -> list[DriftReport]:
    seen: set[str] = set()
    reports: list[DriftReport] = []
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s

    def newest_unseen() -> str | None:
        """The newest window not seen yet; the older unseen ones are skipped (marked seen)."""
        pending = sorted(((mtime, w) for w, mtime in list_windows(settings, window_dir)
                          if w not in seen))
        seen.update(w for _, w in pending)
        return pending[-1][1] if pending else None

    while max_checks is None or len(reports) < max_checks:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            window = wait_until(newest_unseen, left, interval_s=interval_s, what="a new window")
        except TimeoutError:
            break
        reports.append(run_drift_check(settings, window, mlflow_step=len(reports), **kwargs))
    return reports
