"""Model stages through registry aliases: experiment -> staging (validated) -> production.

A new version is an *experiment* (tag stage=experiment). `validate_version` runs the gate: holdout
accuracy at or above a floor, and no regression beyond a tolerance against the current
`production` version, both measured now on the SAME holdout (the candidate's data version). Pass:
alias `staging`, tag validation=passed with the numbers. Fail: tag validation=failed with the
reasons, and GateFailed. `promote` moves alias `production` and refuses an unvalidated version.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flowops.errors import Conflict, GateFailed, InvalidInput, NotFound
from flowops.refs import PRODUCTION, STAGING, ModelRef, version_number
from flowops.settings import Settings


def _client(settings: Settings):
    from flowops.tracking import configure_mlflow

    return configure_mlflow(settings)


def get_version(settings: Settings, version: str | int, name: str | None = None):
    """The registry entry of a version; NotFound naming the versions that exist."""
    from mlflow.exceptions import MlflowException

    from flowops.model import describe_registered

    name = name or settings.model_name
    number = version_number(version)
    try:
        return _client(settings).get_model_version(name, number)
    except MlflowException:
        raise NotFound(f"model version {name}/{number} does not exist; "
                       f"{describe_registered(settings, name)}") from None


def aliases(settings: Settings, name: str | None = None) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        found = _client(settings).get_registered_model(name or settings.model_name).aliases
        return {alias: str(version) for alias, version in found.items()}
    except MlflowException:
        return {}


def production_version(settings: Settings, name: str | None = None) -> str | None:
    """The version the `production` alias points at (None if there is none)."""
    found = aliases(settings, name).get(PRODUCTION)
    return str(found) if found is not None else None


def version_registered_by(settings: Settings, run_name: str) -> str:
    """The model version that the training run named `run_name` registered (the newest such run):
    how a caller that trained through a Ray job learns the version it made."""
    from flowops.tracking import ensure_experiment

    runs = _client(settings).search_runs(
        [ensure_experiment(settings, "train")], filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    version = runs[0].data.tags.get("model_version") if runs else None
    if not version:
        raise NotFound(f"the training run {run_name!r} registered no model version")
    return str(version)


def _set_tags(settings: Settings, name: str, version: str, tags: dict[str, Any]) -> None:
    client = _client(settings)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def validate_version(
    settings: Settings,
    version: str | int,
    min_accuracy: float | None = None,
    max_regression: float | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Run the gate on a version; alias `staging` on pass, GateFailed (tagged) on failure."""
    from flowops import data
    from flowops.evaluate import evaluate_model, holdout_split
    from flowops.model import load_model

    name = name or settings.model_name
    mv = get_version(settings, version, name)
    number = str(mv.version)
    gate = settings.gate
    floor = gate.min_accuracy if min_accuracy is None else float(min_accuracy)
    tolerance = gate.max_regression if max_regression is None else float(max_regression)
    if not 0 <= floor <= 1 or not 0 <= tolerance <= 1:
        raise InvalidInput("--min-accuracy and --max-regression must be between 0 and 1")
    data_version = mv.tags.get("data_version")
    if not data_version:
        raise InvalidInput(f"version {name}/{number} has no data_version tag: not trained by flowops")
    opened = data.open_version(settings, data_version)
    classes = opened.classes
    candidate = load_model(settings, ModelRef.of(name, number).uri)
    holdout = holdout_split(opened, candidate.preprocess)
    accuracy = evaluate_model(candidate.model, holdout, classes)["accuracy"]
    report: dict[str, Any] = {
        "version": number, "data_version": data_version, "holdout_size": len(holdout),
        "accuracy": round(accuracy, 4), "min_accuracy": floor, "max_regression": tolerance,
        "production_version": None, "production_accuracy": None, "reasons": [],
    }
    if accuracy < floor:
        report["reasons"].append(f"holdout accuracy {accuracy:.4f} is below the floor {floor:.4f}")
    prod = production_version(settings, name)
    if prod is not None and prod != number:
        current = load_model(settings, ModelRef.of(name, prod).uri)
        report["production_version"] = prod
        if list(current.classes) != list(classes):
            report["reasons"].append(
                f"production version {prod} predicts classes {current.classes}, the holdout of "
                f"{data_version} has {classes}: not comparable"
            )
        else:
            # the same holdout images, each model seeing them through its own preprocessing
            prod_holdout = holdout if current.preprocess == candidate.preprocess else \
                holdout_split(opened, current.preprocess)
            prod_acc = evaluate_model(current.model, prod_holdout, classes)["accuracy"]
            report["production_accuracy"] = round(prod_acc, 4)
            if prod_acc - accuracy > tolerance:
                report["reasons"].append(
                    f"regression {prod_acc - accuracy:.4f} vs production version {prod} "
                    f"({prod_acc:.4f} on the same holdout) exceeds the tolerance {tolerance:.4f}"
                )
    report["passed"] = not report["reasons"]
    common = {
        "validation_accuracy": f"{accuracy:.4f}", "validation_min_accuracy": floor,
        "validation_max_regression": tolerance, "validation_data_version": data_version,
        "validation_production_version": report["production_version"] or "none",
        "validation_production_accuracy": report["production_accuracy"] if prod else "none",
        "validated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if report["passed"]:
        _set_tags(settings, name, number, {**common, "validation": "passed", "validation_reasons": "",
                                           "stage": "validation"})
        _client(settings).set_registered_model_alias(name, STAGING, number)
        return report
    _set_tags(settings, name, number, {**common, "validation": "failed",
                                       "validation_reasons": "; ".join(report["reasons"])})
    raise GateFailed(f"version {number} failed validation: {'; '.join(report['reasons'])}",
                     report=report)


def promote(settings: Settings, version: str | int, force: bool = False,
            name: str | None = None) -> dict[str, Any]:
    """Move alias `production` to a version that passed validation (force skips that check)."""
    name = name or settings.model_name
    mv = get_version(settings, version, name)
    number = str(mv.version)
    state = mv.tags.get("validation", "not run")
    if state != "passed" and not force:
        raise Conflict(
            f"version {number} has not passed validation (validation: {state}); run "
            f"`flowops models validate {number}` first"
        )
    previous = production_version(settings, name)
    _client(settings).set_registered_model_alias(name, PRODUCTION, number)
    tags = {"stage": "production", "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if previous and previous != number:
        tags["previous_production"] = previous
        _set_tags(settings, name, previous, {"stage": "archived"})
    _set_tags(settings, name, number, tags)
    return {"version": number, "previous_production": previous, "forced": force and state != "passed"}


def mark_rolled_back(settings: Settings, version: str | int, reasons: str | list[str],
                     name: str | None = None) -> dict[str, Any]:
    """Record that a version was rolled back; if it holds `production`, give it back to the
    version it replaced (or remove the alias when there was none)."""
    name = name or settings.model_name
    mv = get_version(settings, version, name)
    number = str(mv.version)
    text = reasons if isinstance(reasons, str) else "; ".join(reasons)
    _set_tags(settings, name, number, {"rolled_back": "true", "rolled_back_reasons": text,
                                       "rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "stage": "rolled_back"})
    restored = None
    client = _client(settings)
    current = aliases(settings, name)
    if str(current.get(PRODUCTION)) == number:
        restored = mv.tags.get("previous_production")
        if restored:
            client.set_registered_model_alias(name, PRODUCTION, restored)
            _set_tags(settings, name, restored, {"stage": "production"})
        else:
            client.delete_registered_model_alias(name, PRODUCTION)
    if str(current.get(STAGING)) == number:
        client.delete_registered_model_alias(name, STAGING)
    return {"version": number, "production": restored if restored else production_version(settings, name)}


def list_versions(settings: Settings, name: str | None = None) -> list[dict[str, Any]]:
    """Every version, newest first: aliases, stage, validation, key metrics, data version, lineage."""
    from mlflow.exceptions import MlflowException

    name = name or settings.model_name
    client = _client(settings)
    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, number in aliases(settings, name).items():
        by_version.setdefault(str(number), []).append(alias)
    rows = []
    for mv in sorted(found, key=lambda v: int(v.version), reverse=True):
        tags = mv.tags or {}
        rows.append({
            "version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
            "stage": tags.get("stage", ""), "validation": tags.get("validation", ""),
            "holdout_accuracy": tags.get("holdout_accuracy", ""), "macro_f1": tags.get("macro_f1", ""),
            "data_version": tags.get("data_version", ""),
            "base_model_version": tags.get("base_model_version", ""),
            "rolled_back": tags.get("rolled_back", "") == "true",
            "created": mv.creation_timestamp / 1000 if mv.creation_timestamp else None,
            "run_id": mv.run_id,
        })
    return rows


_AGE = re.compile(r"^(\d+)\s*([smhdw])$")


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '90m', '2w', '45s' -> timedelta."""
    match = _AGE.match(text.strip().lower())
    if not match:
        raise InvalidInput(f"age {text!r} must be a number and a unit s, m, h, d or w (e.g. 30d)")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match[2]]
    return timedelta(**{unit: int(match[1])})


def prune(settings: Settings, older_than: str | timedelta, dry_run: bool = False,
          name: str | None = None) -> dict[str, list[str]]:
    """Delete versions older than the age; never one that holds an alias."""
    age = parse_age(older_than) if isinstance(older_than, str) else older_than
    cutoff = time.time() - age.total_seconds()
    deleted, kept = [], []
    client = _client(settings)
    name = name or settings.model_name
    for row in list_versions(settings, name):
        if row["aliases"] or row["created"] is None or row["created"] > cutoff:
            kept.append(row["version"])
            continue
        if not dry_run:
            client.delete_model_version(name, row["version"])
        deleted.append(row["version"])
    return {"deleted": sorted(deleted, key=int), "kept": sorted(kept, key=int), "dry_run": dry_run}


def reproduce(settings: Settings, version: str | int, name: str | None = None,
              on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Re-run the training recorded on a version (not registered) and compare metrics and weights;
    `on_epoch` follows the re-run's epochs (`flowops.train.train`)."""
    from flowops.train import recorded_config, train

    name = name or settings.model_name
    mv = get_version(settings, version, name)
    if not mv.run_id:
        raise InvalidInput(f"version {name}/{mv.version} has no MLflow run to reproduce")
    config = recorded_config(settings, mv.run_id)
    config = config.model_copy(update={
        "register_version": False, "experiment": "reproduce", "run_name": f"reproduce-v{mv.version}",
    })
    original_hash = mv.tags.get("weights_hash", "")
    original_acc = float(mv.tags.get("holdout_accuracy", "nan"))
    result = train(settings, config, on_epoch=on_epoch)
    new_acc = round(result.metrics["holdout_accuracy"], 4)
    _client(settings).set_tag(result.run_id, "reproduces", f"{name}/{mv.version}")
    report = {
        "version": str(mv.version), "run_id": result.run_id,
        "weights_hash": original_hash, "reproduced_weights_hash": result.weights_hash,
        "holdout_accuracy": original_acc, "reproduced_holdout_accuracy": new_acc,
        "weights_match": original_hash == result.weights_hash,
        "metrics_match": abs(original_acc - new_acc) < 1e-4,
    }
    report["match"] = report["weights_match"] and report["metrics_match"]
    return report
