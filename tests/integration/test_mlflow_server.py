"""The stack's MLflow is a real tracking server: every process tracks over HTTP, artifacts travel
through the server's proxy (a job with an empty home, as on another node, logs a model that the
driver then loads), and the UI answers on the server's port."""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration

# Runs as a Ray job: log an (untrained) classifier and register it, print its version.
LOG_MODEL = """
from flowops.model import log_model_version
from flowops.settings import get_settings
from flowops.task import load_task
from flowops.tracking import start_run

settings = get_settings()
assert settings.tracking_uri.startswith("http://"), settings.tracking_uri
task = load_task("flowops.tasks:small_cnn", {"width": 8})
classes = [str(i) for i in range(10)]
with start_run(settings, "mlflow-server-test", run_name="logged-by-a-job"):
    version = log_model_version(settings, task.build_model(classes), task, classes,
                                registered_name="proxy-test")
print(f"logged-model-version={version}")
"""


def test_the_stack_tracks_to_an_mlflow_server_with_its_ui(stack):
    assert stack.tracking_uri == f"http://127.0.0.1:{stack.mlflow_port}"
    assert httpx.get(f"{stack.tracking_uri}/health", timeout=10).text.strip() == "OK"
    ui = httpx.get(f"{stack.tracking_uri}/", timeout=30)
    assert ui.status_code == 200 and "<html" in ui.text.lower()
    report = json.loads(run_cli("status", "--json", check=True).stdout)["mlflow"]
    assert report["healthy"] and report["managed"] and report["processes"] >= 1
    assert report["ui"] == report["tracking_uri"] == stack.tracking_uri
    assert stack.job_env()["MLFLOW_TRACKING_URI"] == stack.tracking_uri


def test_a_model_logged_by_a_job_is_loaded_through_the_artifact_proxy(stack):
    """The job sees none of the head's files (its own empty FLOWOPS_HOME): the model reaches the
    server's artifact store over HTTP only, and the driver loads it back the same way."""
    from mlflow.tracking import MlflowClient

    from flowops import jobs
    from flowops.model import load_model
    from flowops.refs import ModelRef

    empty_home = tempfile.mkdtemp(prefix="fo-elsewhere-", dir="/tmp")
    job_id = jobs.client(stack).submit_job(
        entrypoint=shlex.join(["python", "-c", LOG_MODEL]),
        runtime_env=jobs.runtime_env(stack, {"FLOWOPS_HOME": empty_home}),
    )
    done = jobs.wait(stack, job_id, timeout_s=600)
    log = jobs.logs(stack, job_id)
    assert done.status == "SUCCEEDED", log[-2000:]
    version = re.search(r"logged-model-version=(\d+)", log).group(1)
    assert list(Path(empty_home).iterdir()) == []  # nothing written where the job ran

    client = MlflowClient(stack.tracking_uri)
    model_version = client.get_model_version("proxy-test", version)
    assert client.get_run(model_version.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    location = client.get_model_version_download_uri("proxy-test", version)
    assert location.startswith("mlflow-artifacts:/"), location  # the server's proxy ...
    relative = location.removeprefix("mlflow-artifacts:").lstrip("/")
    assert (stack.artifact_root / relative / "MLmodel").is_file()  # ... stored in the home

    loaded = load_model(stack, ModelRef.of("proxy-test", version).uri)
    assert loaded.classes == [str(i) for i in range(10)]
