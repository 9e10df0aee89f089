"""After real traffic, Ray's scrape endpoints and the FlowOps exporter expose the metrics with the
right labels, and the loopback Prometheus (`flowops monitor prometheus start`) collects both."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import conftest_monitor
from tests.integration.conftest_monitor import PROBE_VERSION

monitoring = conftest_monitor.monitoring  # the shared live-scrape fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_serving_metrics_have_ray_prefix_and_version_label(monitoring):
    ray_text = monitoring["ray"]
    requests = [
        s
        for s in _samples(ray_text, "ray_flowops_serve_requests_total")
        if s.labels.get("version") == PROBE_VERSION
    ]
    assert requests and sum(s.value for s in requests) >= 25
    buckets = [
        s
        for s in _samples(ray_text, "ray_flowops_serve_latency_ms_bucket")
        if s.labels.get("version") == PROBE_VERSION
    ]
    assert {s.labels["le"] for s in buckets} >= {"1.0", "10.0", "100.0", "+Inf"}
    feedback = _samples(ray_text, "ray_flowops_serve_feedback_total")
    assert any(s.labels.get("correct") == "true" for s in feedback)
    # Ray Serve adds the deployment and application to every series of a Serve metric
    assert any(s.labels.get("application") == "flowops-metrics-probe" for s in requests)


def test_exporter_reports_jobs_pipelines_labels_and_loop_events(monitoring):
    text = monitoring["exporter"]
    submitted = {s.labels["workload"]: s.value for s in _samples(text, "flowops_jobs_submitted_total")}
    assert submitted.get("data_check", 0) >= 1
    assert monitoring["pipeline"].status == "SUCCEEDED"
    runs = {
        (s.labels["pipeline"], s.labels["status"]): s.value for s in _samples(text, "flowops_pipeline_runs")
    }
    assert runs[("retrain-probe", "SUCCEEDED")] >= 1
    steps = [
        s
        for s in _samples(text, "flowops_pipeline_step_duration_seconds_count")
        if s.labels == {"pipeline": "retrain-probe", "step": "check"}
    ]
    assert steps and steps[0].value >= 1
    durations = [
        s
        for s in _samples(text, "flowops_job_duration_seconds_count")
        if s.labels.get("workload") == "data_check"
    ]
    assert durations and durations[0].value >= 1
    inbox = {s.labels["state"]: s.value for s in _samples(text, "flowops_label_inbox")}
    assert inbox["new"] >= 3 and inbox["total"] >= 3
    events = {s.labels["event"]: s.value for s in _samples(text, "flowops_loop_events_total")}
    assert events["retrain_triggered"] >= 1
    up = {s.labels["source"]: s.value for s in _samples(text, "flowops_exporter_source_up")}
    assert up["jobs"] == up["pipelines"] == up["labels"] == 1


def test_prometheus_scrapes_ray_and_exporter_and_loads_the_rules(monitoring):
    url = monitoring["prometheus"]["url"]

    def query(q: str) -> list:
        body = httpx.get(f"{url}/api/v1/query", params={"query": q}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    deadline = time.monotonic() + 90
    while True:
        ready = (
            query('up{job="flowops"} == 1')
            and query('up{job="ray"} == 1')
            and query(f'ray_flowops_serve_requests_total{{version="{PROBE_VERSION}"}}')
            and query('flowops_jobs_submitted_total{workload="data_check"}')
        )
        if ready or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert ready, "Prometheus did not collect both Ray's and the exporter's metrics within 90 s"
    assert query("ray_node_cpu_utilization")
    rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    alerts = {r["name"] for g in rules for r in g["rules"] if r["type"] == "alerting"}
    assert "FlowOpsCanaryDegraded" in alerts and "FlowOpsDriftDetected" in alerts
