"""The data_check workload: validate a data version, log the summary to MLflow, fail if invalid."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flowops import data, tracking
from flowops.entrypoint import print_result
from flowops.errors import InvalidInput
from flowops.settings import Settings

EXPERIMENT = "data-checks"


class DataCheckConfig(BaseModel):
    """Which data version to validate (the `data_check` job's config)."""

    model_config = ConfigDict(extra="forbid")

    data_version: str | None = Field(None, description="Data version id (vN); None = latest.")


def run_data_check(settings: Settings, config: DataCheckConfig) -> dict[str, Any]:
    import mlflow

    summary = data.check_version(settings, config.data_version)
    with tracking.start_run(settings, EXPERIMENT, run_name=f"data-check-{summary['version']}"):
        mlflow.set_tags({"data_version": summary["version"], "workload": "data_check",
                         "ok": str(summary["ok"]).lower()})
        mlflow.log_param("data_version", summary["version"])
        mlflow.log_metric("images", summary["images"])
        for split, n in summary["counts"].items():
            mlflow.log_metric(f"count_{split}", n)
        mlflow.log_dict(summary, "data_check.json")
    print_result(summary)  # the job's RESULT line, also when the version is invalid
    if not summary["ok"]:
        raise InvalidInput(f"data version {summary['version']} is invalid: "
                           + "; ".join(summary["problems"]))
    print(f"data version {summary['version']} OK: {summary['images']} images, {summary['counts']}")
    return summary
