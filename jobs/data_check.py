"""Validate a data version and log the summary to MLflow.

    python -m jobs.data_check --config '{"data_version": "v1"}'
    python -m jobs.data_check            # the latest version

The config is `flowops.data_check.DataCheckConfig` as JSON (or `--config @file.json`).
"""

from __future__ import annotations

from flowops.data_check import DataCheckConfig, run_data_check
from flowops.entrypoint import run_job

if __name__ == "__main__":
    run_job(DataCheckConfig, run_data_check)
