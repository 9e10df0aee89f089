"""The platform exporter computes its metrics from durable state (no cluster needed for these)."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowops import drift, events, jobs, labels
from flowops.job_events import read_job_events, record_job_event
from flowops.observability import exporter, prometheus
from flowops.settings import get_settings


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLOWOPS_DASHBOARD_PORT", "1030")  # nothing listens: the job API is "down"
    return get_settings()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_record_job_event_appends_and_never_raises(home, monkeypatch):
    record_job_event("submitted", "train", None)
    record_job_event("failed", "train", 12.5)
    lines = read_job_events(home)
    assert [(r["event"], r["workload"], r["duration_s"]) for r in lines] == [
        ("submitted", "train", None),
        ("failed", "train", 12.5),
    ]
    monkeypatch.setenv("FLOWOPS_HOME", "/proc/forbidden")  # unwritable: still no exception
    record_job_event("submitted", "train", None)


def test_exporter_reads_pipelines_labels_loop_events_and_drift(home):
    now = time.time()
    ok = jobs.PipelineRun(
        id="retrain-1",
        name="retrain",
        status="SUCCEEDED",
        created=now - 100,
        steps=[jobs.Step("train", "train", status="SUCCEEDED", started=now - 90, ended=now - 30)],
    )
    bad = jobs.PipelineRun(
        id="retrain-2",
        name="retrain",
        status="FAILED",
        created=now - 20,
        ended=now - 5,
        steps=[jobs.Step("train", "train", status="FAILED", started=now - 19, ended=now - 6)],
    )
    for run in (ok, bad):
        jobs.save_pipeline(home, run)
    labels.record_labels(home, [labels.Label(f"t{i}", f"d{i}", "3") for i in range(7)])
    labels.mark_used(home, ["t0", "t1"], "v2")
    for event in ("retrain_triggered", "retrain_triggered", "rolled_back"):
        events.emit(home, event, version="3", ts=now)
    drift.save_report(
        home,
        {
            "model_version": "3",
            "score": 0.61,
            "drifted": True,
            "min_p_adjusted": 1e-9,
            "class_psi": 0.4,
            "class_p": 1e-5,
            "n": 100,
            "ts": now,
            "features": [{"name": "mean_intensity", "statistic": 0.61}],
        },
    )

    s = _samples(exporter.render_metrics(home))
    assert s[("flowops_pipeline_runs", (("pipeline", "retrain"), ("status", "FAILED")))] == 1
    assert s[("flowops_pipeline_runs", (("pipeline", "retrain"), ("status", "SUCCEEDED")))] == 1
    assert s[("flowops_pipeline_last_run_failed", (("pipeline", "retrain"),))] == 1
    assert (
        s[("flowops_pipeline_step_duration_seconds_count", (("pipeline", "retrain"), ("step", "train")))] == 2
    )
    assert (
        s[
            (
                "flowops_pipeline_step_duration_seconds_bucket",
                (("le", "15.0"), ("pipeline", "retrain"), ("step", "train")),
            )
        ]
        == 1
    )  # 13 s; the 60 s one is not
    assert s[("flowops_label_inbox", (("state", "new"),))] == 5
    assert s[("flowops_label_inbox", (("state", "total"),))] == 7
    assert s[("flowops_loop_events_total", (("event", "retrain_triggered"),))] == 2
    assert s[("flowops_loop_events_total", (("event", "rolled_back"),))] == 1
    assert s[("flowops_loop_events_total", (("event", "promoted"),))] == 0  # known events start at 0
    assert s[("flowops_drift_detected", (("model_version", "3"),))] == 1
    assert (
        s[("flowops_drift_feature_statistic", (("feature", "mean_intensity"), ("model_version", "3")))]
        == 0.61
    )
    # sources that cannot be read are reported, not fatal
    assert s[("flowops_exporter_source_up", (("source", "jobs"),))] == 0
    assert s[("flowops_exporter_source_up", (("source", "pipelines"),))] == 1


def test_prometheus_config_scrapes_ray_service_discovery_and_exporter(home):
    config = prometheus.prometheus_config(home, exporter_port=18091)
    ray_job, flowops_job = config["scrape_configs"]
    assert ray_job["file_sd_configs"][0]["files"] == [
        str(home.ray_temp_dir / "prom_metrics_service_discovery.json")
    ]
    assert flowops_job["static_configs"][0]["targets"] == ["127.0.0.1:18091"]
    assert config["rule_files"] == [str(prometheus.RULES_FILE)]


def test_start_prometheus_without_binary_is_one_clear_error(home, monkeypatch):
    from flowops.errors import InvalidInput

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InvalidInput, match="prometheus` binary is not installed"):
        prometheus.start_prometheus(home)


def test_importing_the_package_loads_neither_ray_nor_prometheus_client():
    """`flowops monitor ...` and `flowops up` import it: Ray and prometheus_client load on use only."""
    import subprocess
    import sys

    code = ("import sys, flowops.observability; "
            "print(sorted(m for m in ('ray', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_monitor_settings_come_from_the_monitor_section(home, monkeypatch):
    from flowops.settings import get_settings

    monkeypatch.setenv("FLOWOPS_MONITOR_PROMETHEUS_PORT", "19090")
    monkeypatch.setenv("FLOWOPS_MONITOR_SCRAPE_INTERVAL_S", "7")
    monkeypatch.setenv("FLOWOPS_MONITOR_EXPORTER_PORT", "18091")
    settings = get_settings()
    assert prometheus.local_url(settings) == "http://127.0.0.1:19090"
    config = prometheus.prometheus_config(settings, settings.monitor.exporter_port,
                                          settings.monitor.scrape_interval_s)
    assert config["global"]["scrape_interval"] == "7s"
    assert config["scrape_configs"][1]["static_configs"][0]["targets"] == ["127.0.0.1:18091"]
