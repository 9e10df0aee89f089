"""A tiny Ray Tune search: trials are MLflow child runs; the best is registered."""

from __future__ import annotations

import pytest

from flowops.tune import TuneConfig, run_tune

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_search_registers_the_best_trial(stack, dataset):
    from flowops.tracking import configure_mlflow

    result = run_tune(stack, TuneConfig(data_version=dataset, trials=2, epochs=2, widths=[8, 16],
                                        experiment="it-tune"))
    assert result["version"] and result["trials"] == 2
    client = configure_mlflow(stack)
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    assert len(children) == 2
    best = client.get_run(result["best_run_id"])
    assert best.data.tags["model_version"] == result["version"]
