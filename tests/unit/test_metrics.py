"""The platform exporter computes its metrics from durable state (no cluster needed for these)."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowops import jobs, labels, metrics
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
    metrics.record_job_event("submitted", "train", None)
    metrics.record_job_event("failed", "train", 12.5)
    lines = [json.loads(x) for x in metrics.job_events_path(home).read_text().splitlines()]
    assert [(r["event"], r["workload"], r["duration_s"]) for r in lines] == [
        ("submitted", "train", None),
        ("failed", "train", 12.5),
    ]
    monkeypatch.setenv("FLOWOPS_HOME", "/proc/forbidden")  # unwritable: still no exception
    metrics.record_job_event("submitted", "train", None)


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
        metrics.append_jsonl(metrics.loop_events_path(home), {"ts": now, "event": event, "version": "3"})
    with open(metrics.loop_events_path(home), "a") as fh:
        fh.write('{"ts": 1, "event": "promo')  # a torn last line is ignored
    metrics.drift_latest_path(home).parent.mkdir(parents=True)
    metrics.drift_latest_path(home).write_text(
        json.dumps(
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
            }
        )
    )

    s = _samples(metrics.render_metrics(home))
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
    config = metrics.prometheus_config(home, exporter_port=18091)
    ray_job, flowops_job = config["scrape_configs"]
    assert ray_job["file_sd_configs"][0]["files"] == [
        str(home.ray_temp_dir / "prom_metrics_service_discovery.json")
    ]
    assert flowops_job["static_configs"][0]["targets"] == ["127.0.0.1:18091"]
    assert config["rule_files"] == [str(metrics.RULES_FILE)]


def test_start_prometheus_without_binary_is_one_clear_error(home, monkeypatch):
    from flowops.errors import InvalidInput

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InvalidInput, match="prometheus` binary is not installed"):
        metrics.start_prometheus(home)
