"""The drift monitor in the platform: a real Ray job (jobs/drift_monitor.py) against a registered
model and a data version; the report lands in MLflow, the exporter and the loop's event log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowops.errors import NotFound
from tests.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "drift-probe-classifier"  # its own registered name: other stages' versions stay untouched


@pytest.fixture(scope="module")
def registered(stack, dataset):
    """An (untrained, seeded) small CNN (the digits task) registered in the platform's MLflow,
    with lineage."""
    import torch

    from flowops import data, tracking
    from flowops.model import log_model_version
    from flowops.task import TaskSpec, load_task

    classes = data.open_version(stack, dataset).classes
    torch.manual_seed(0)
    task = load_task(TaskSpec())
    model = task.build_model(classes)
    with tracking.start_run(stack, "drift-monitor-test", run_name="probe-model"):
        import mlflow

        mlflow.log_param("data_version", dataset)
        version = log_model_version(stack, model, task, classes, registered_name=MODEL)
    return f"models:/{MODEL}/{version}", version


def _window(stack, dataset, transform) -> np.ndarray:
    """Holdout images of the data version (never in the reference) as the digits task sees them
    ((N, 1, 8, 8) in [0, 1]), transformed."""
    from flowops import data
    from flowops.evaluate import read_images
    from flowops.task import TaskSpec, load_task

    version = data.open_version(stack, dataset)
    rows = version.rows("holdout").head(120)
    return transform(read_images(version, list(rows["id"]), load_task(TaskSpec()).preprocess))


def test_drift_job_flags_inverted_window_and_reports_everywhere(stack, dataset, registered, tmp_path):
    from flowops import events, tracking
    from flowops.observability import render_metrics

    uri, version = registered
    path = tmp_path / "inverted.npy"
    np.save(path, _window(stack, dataset, lambda w: 1.0 - w))
    out = run_cli(
        "monitor", "drift", "--window", str(path), "--model", uri, "--as-job", "--json",
        "--persist", "1", timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)  # one JSON object, nothing before it: the job's notes on stderr
    assert report["job_id"].startswith("drift-monitor-") and report["status"] == "SUCCEEDED"
    assert report["drifted"] is True and report["model_version"] == version
    assert report["data_version"] == dataset  # lineage from the model's run
    assert "mean_intensity" in report["drifted_features"]

    assert any(e["event"] == "drift_detected" and e["version"] == version for e in events.read_events(stack))

    client = tracking.configure_mlflow(stack)
    exp = client.get_experiment_by_name("drift-monitor")
    runs = client.search_runs([exp.experiment_id], f"params.model_version = '{version}'")
    assert runs and runs[0].data.metrics["drifted"] == 1.0 and runs[0].data.metrics["drift_score"] > 0.5

    exported = render_metrics(stack)
    assert f'flowops_drift_detected{{model_version="{version}"}} 1.0' in exported


def test_unshifted_window_is_not_flagged_and_bad_input_is_one_line(stack, dataset, registered, tmp_path):
    uri, version = registered
    path = tmp_path / "fresh.npy"
    np.save(path, _window(stack, dataset, lambda w: w))
    out = run_cli("monitor", "drift", "--window", str(path), "--model", uri, "--json", "--no-trigger")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout[out.stdout.index("{") :])["drifted"] is False

    np.save(tmp_path / "bad.npy", np.zeros((50, 5, 5)))
    bad = run_cli("monitor", "drift", "--window", str(tmp_path / "bad.npy"), "--model", uri)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "error: window images are 1x5x5, the model expects 1x8x8 (channels x height x width)"]
    missing = run_cli("monitor", "drift", "--window", str(path), "--model", f"models:/{MODEL}/999")
    assert (
        missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )


def test_live_traffic_becomes_windows_that_the_monitor_checks(stack, dataset, registered):
    """Serving samples what it classifies into live-input windows; `flowops monitor drift` checks
    the newest one. Inverted digits sent over HTTP are flagged."""
    import time

    import httpx

    from flowops import drift, serving
    from tests.integration.conftest_serving import png_b64

    uri, version = registered
    serving.deploy(stack, stable=version, model_name=MODEL, input_window_s=1.0, input_window_min=40)
    windows = Path(drift.windows_location(stack))  # the storage URI: a folder on this stack
    before = set(windows.glob("*.npy"))
    inverted = _window(stack, dataset, lambda w: 1.0 - w)  # 120 images, sent 40 per request
    for i in range(0, len(inverted), 40):
        body = {"instances": [{"b64": png_b64(np.round(img[0] * 255))} for img in inverted[i:i + 40]]}
        assert httpx.post(f"{stack.serve_url}/predict", json=body, timeout=60).status_code == 200

    def written() -> int:
        return sum(len(np.load(p)) for p in set(windows.glob("*.npy")) - before)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and written() < len(inverted):
        time.sleep(0.5)
    assert written() == len(inverted)  # every image classified is in a window, once

    out = run_cli("monitor", "drift", "--model", uri, "--json", "--no-trigger")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout[out.stdout.index("{"):])["drifted"] is True

    # The scheduled monitor (a Ray job) checks the newest window as soon as it starts.
    from flowops import jobs

    def latest_ts():
        try:
            return drift.latest_report(stack)["ts"]
        except NotFound:
            return None

    before = latest_ts()
    started = run_cli("monitor", "drift", "--watch", "--interval", "1", "--model", uri, "--no-trigger")
    assert started.returncode == 0, started.stderr[-2000:]
    job_id = started.stdout.split("Ray job ")[1].split()[0]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and latest_ts() == before:
            assert jobs.info(stack, job_id).status in ("PENDING", "RUNNING"), jobs.logs(stack, job_id)
            time.sleep(1)
        report = drift.latest_report(stack)
        assert report["drifted"] is True and report["window"] == str(drift.newest_window(stack))
    finally:
        jobs.stop(stack, job_id)
