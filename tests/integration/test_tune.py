"""A tiny Ray Tune search through `flowops tune --json` (a Ray job): trials are MLflow child runs;
the best is registered; the job's id, status and result are one JSON object on stdout."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_search_registers_the_best_trial(stack, dataset):
    from flowops.tracking import configure_mlflow

    out = run_cli("tune", "--data-version", dataset, "--trials", "2", "--epochs", "2",
                  "--experiment", "it-tune", "--json", timeout=900, check=True)
    report = json.loads(out.stdout)  # all of stdout; the job's log went to stderr
    assert report["job_id"].startswith("tune-") and report["status"] == "SUCCEEDED"
    assert "Trial status:" in out.stderr  # Tune's trial table is on
    result = report["result"]
    assert result["version"] and result["trials"] == 2
    client = configure_mlflow(stack)
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    assert len(children) == 2
    best = client.get_run(result["best_run_id"])
    assert best.data.tags["model_version"] == result["version"]
