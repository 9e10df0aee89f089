"""MLflow access shared by every stage: one place sets the URIs.

The platform's MLflow is a tracking server (`flowops up` starts it) that proxies artifacts: an
experiment created without an artifact location gets the server's `mlflow-artifacts:/<id>`, so a
Ray Train worker or a Serve replica on any node logs and loads models through the server, with no
path of the head's disk in any run.
"""

from __future__ import annotations

import logging
import os
import subprocess
from functools import lru_cache
from pathlib import Path

from flowops.settings import Settings


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Loading a model version downloads its artifacts: no progress bars on a command's stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def configure_mlflow(settings: Settings):
    """Point this process's MLflow at the platform's store and return an MlflowClient."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _quiet_mlflow_logs()
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def ensure_experiment(settings: Settings, name: str) -> str:
    """Return the id of experiment `name`, creating it (artifacts: the server's default location)."""
    client = configure_mlflow(settings)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(settings: Settings, experiment: str, run_name: str | None = None, **kwargs):
    """`mlflow.start_run` in the named experiment (created if needed)."""
    import mlflow

    experiment_id = ensure_experiment(settings, experiment)
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name, **kwargs)


@lru_cache(maxsize=1)
def project_commit() -> str:
    """The git commit of the FlowOps checkout running this code ('unknown' outside a checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FLOWOPS_GIT_COMMIT", "unknown")
