"""Grafana dashboards are valid and every query parses into metric names (checked live in
tests/integration/test_dashboards.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest_monitor import DASHBOARDS, dashboard_metric_names, metric_names

FILES = sorted(DASHBOARDS.glob("*.json"))


def test_dashboards_exist_for_every_required_view():
    assert {p.stem for p in FILES} == {"serving", "platform", "drift", "resources"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_dashboard_is_valid_grafana_json(path: Path):
    board = json.loads(path.read_text())
    assert board["uid"].startswith("flowops-") and board["title"].startswith("FlowOps")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.95, sum by (version, le) (rate(ray_flowops_serve_latency_ms_bucket"
        '{version=~"$version",x="a(b)"}[5m]))) * on(version) group_left(role) flowops_serving_version_info'
        " > 2 and time() - flowops_drift_last_check_timestamp_seconds < 1e3"
    )
    assert metric_names(expr) == {
        "ray_flowops_serve_latency_ms_bucket",
        "flowops_serving_version_info",
        "flowops_drift_last_check_timestamp_seconds",
    }


def test_dashboards_cover_golden_signals_canary_jobs_drift_and_resources():
    names = dashboard_metric_names()
    for needed in (
        "ray_flowops_serve_requests_total",
        "ray_flowops_serve_errors_total",
        "ray_flowops_serve_latency_ms_bucket",
        "ray_serve_replica_processing_queries",
        "flowops_canary_weight_percent",
        "flowops_jobs_submitted_total",
        "flowops_pipeline_step_duration_seconds_sum",
        "flowops_drift_score",
        "ray_node_cpu_utilization",
        "ray_node_mem_used",
        "ray_node_gpus_utilization",
    ):
        assert needed in names, needed
