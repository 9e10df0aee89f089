"""Check live-input windows for drift against the served model's training data (a Ray job).

    python -m jobs.drift_monitor --config '{"window": "/path/window.npy"}'
    python -m jobs.drift_monitor --config '{"watch": "/path/windows/", "interval_s": 60,
        "max_checks": 10, "drift": {"alpha": 0.01, "correction": "bh"}}'

The config is `flowops.drift_monitor.DriftMonitorConfig` as JSON (or `--config @file.json`).
Each check keeps its report in the state database (exported as flowops_drift_* gauges), logs it to
MLflow (experiment drift-monitor) and, when the window drifted, appends a `drift_detected` event to
the loop's event log (unless `"trigger": false`). Prints one JSON line per report.
"""

from __future__ import annotations

import json

from flowops.drift_monitor import DriftMonitorConfig, run_drift_monitor
from flowops.entrypoint import run_job


def main(settings, config: DriftMonitorConfig) -> None:
    for report in run_drift_monitor(settings, config):
        print(json.dumps({"drifted": report.drifted, "score": report.score, "n": report.n,
                          "drifted_features": report.drifted_features,
                          "class_drifted": report.class_drifted,
                          "model_version": report.model_version}), flush=True)


if __name__ == "__main__":
    run_job(DriftMonitorConfig, main)
