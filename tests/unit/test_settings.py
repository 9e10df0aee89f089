"""Settings: env, config file, defaults, validation; nothing read at import time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowops.errors import InvalidInput
from flowops.settings import get_settings


@pytest.fixture(autouse=True)
def _no_flowops_env(monkeypatch):
    """These tests check defaults: the test session's own FLOWOPS_* variables are hidden."""
    for key in [k for k in os.environ if k.startswith("FLOWOPS_")]:
        monkeypatch.delenv(key)


def test_defaults_are_absolute_and_derived(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in ("FLOWOPS_HOME", "FLOWOPS_CONFIG", "FLOWOPS_DASHBOARD_PORT", "FLOWOPS_RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    s = get_settings()
    assert s.home == (tmp_path / ".flowops").resolve()
    assert s.tracking_uri == "http://127.0.0.1:5000"  # the MLflow server `flowops up` starts
    assert s.manages_mlflow and s.mlflow_backend == f"sqlite:///{s.home}/mlflow/mlflow.db"
    assert s.workspace == s.home / "workspace"
    assert s.job_api == "http://127.0.0.1:8265"
    assert s.client_address == "ray://127.0.0.1:10001"
    assert s.serve_url == "http://127.0.0.1:8000"
    assert s.gcs_address == "127.0.0.1:6380"
    assert len(str(s.ray_temp_dir)) < 40  # unix socket paths are limited


def test_env_overrides_and_job_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FLOWOPS_DASHBOARD_PORT", "28265")
    monkeypatch.setenv("FLOWOPS_MODEL_NAME", "cats")
    s = get_settings()
    assert s.job_api == "http://127.0.0.1:28265"
    env = s.job_env()
    assert env["FLOWOPS_HOME"] == str(tmp_path / "h")
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["FLOWOPS_MODEL_NAME"] == "cats"
    # a job started elsewhere with these variables sees the same platform
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert get_settings().tracking_uri == s.tracking_uri


def test_secrets_reach_a_ray_head_never_a_runtime_env(monkeypatch, tmp_path):
    """Ray shows a job's runtime env to anyone who can list jobs: keys, storage credentials and a
    state URL with a password go only into the environment of a head FlowOps starts."""
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path / "h"))
    secrets = {"FLOWOPS_ADMIN_KEY": "adm1n", "FLOWOPS_API_KEY": "ap1", "AWS_ACCESS_KEY_ID": "AKIA1",
               "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t0k3n"}
    for key, value in {**secrets, "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLOWOPS_STATE_URL", "postgresql+psycopg://flowops:pw0rd@db:5432/flowops")
    s = get_settings()
    job = s.job_env()
    assert not set(secrets) & set(job) and "FLOWOPS_STATE_URL" not in job
    assert not any(v in text for v in [*secrets.values(), "pw0rd"] for text in job.values())
    assert job["AWS_REGION"] == "eu-west-1"  # where the bucket is, not a credential
    head = s.head_env()
    assert {k: head[k] for k in secrets} == secrets and head["FLOWOPS_STATE_URL"] == s.state_url
    # Without a password the URL is a plain setting: a job gets it directly.
    monkeypatch.setenv("FLOWOPS_STATE_URL", "postgresql+psycopg://flowops@db:5432/flowops")
    assert get_settings().job_env()["FLOWOPS_STATE_URL"].endswith("@db:5432/flowops")
    monkeypatch.setenv("FLOWOPS_STATE_URL", "postgresql+psycopg://db/flowops?password=x")
    assert "FLOWOPS_STATE_URL" not in get_settings().job_env()


def test_a_job_names_its_model_itself_unless_a_name_was_set(monkeypatch, tmp_path):
    """Unset, the job's training names the model after the task or the dataset."""
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("FLOWOPS_MODEL_NAME", raising=False)
    assert "FLOWOPS_MODEL_NAME" not in get_settings().job_env()
    assert get_settings(model_name="cats").job_env()["FLOWOPS_MODEL_NAME"] == "cats"


def test_config_file_and_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "flowops.yaml"
    cfg.write_text("serve_port: 18000\nmodel_name: from-file\n")
    monkeypatch.setenv("FLOWOPS_CONFIG", str(cfg))
    monkeypatch.setenv("FLOWOPS_MODEL_NAME", "from-env")
    s = get_settings()
    assert s.serve_port == 18000
    assert s.model_name == "from-env"  # environment beats the file


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FLOWOPS_DASHBOARD_PORT": "80"}, "dashboard_port"),
        ({"FLOWOPS_SERVE_PORT": "eighty"}, "serve_port"),
        ({"FLOWOPS_CONFIG": "/nonexistent/flowops.yaml"}, "does not exist"),
    ],
)
def test_bad_settings_are_one_clear_error(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidInput, match=message):
        get_settings()


def test_unknown_override_is_rejected():
    with pytest.raises(InvalidInput, match="bogus"):
        get_settings(bogus=1)


def test_importing_flowops_reads_nothing(monkeypatch):
    """Nothing happens at import time: a broken config does not break `import flowops...`."""
    import importlib

    monkeypatch.setenv("FLOWOPS_CONFIG", str(Path("/nonexistent.yaml")))
    for mod in ("flowops.settings", "flowops.stack", "flowops.data", "flowops.jobs"):
        importlib.reload(importlib.import_module(mod))


def test_serve_fast_path_is_the_default_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path))
    env = get_settings().serve_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    monkeypatch.setenv("FLOWOPS_SERVE_FAST_PATH", "false")
    assert get_settings().serve_env() == {}


def test_ray_writes_the_retry_policy_into_haproxys_defaults_and_haproxy_accepts_it(tmp_path):
    """HAPROXY_RETRY_ON carries a second line (`option http-buffer-request`) through Ray's only
    free-form setting in HAProxy's `defaults`. Rendered here with the installed Ray's own template
    and checked by the bundled HAProxy: a Ray upgrade that escapes or validates the value fails
    here, not as silently dropped requests when a replica dies."""
    import subprocess

    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig, get_haproxy_binary

    from flowops.settings import HAPROXY_RETRY_ON

    cfg = HAProxyConfig(retry_on=HAPROXY_RETRY_ON, socket_path=str(tmp_path / "admin.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
                        metrics_socket_path=str(tmp_path / "metrics.sock"))
    path = tmp_path / "haproxy.cfg"
    HAProxyApi(cfg=cfg, config_file_path=str(path))._generate_config_file_internal()
    defaults = path.read_text().split("\ndefaults\n")[1].split("\nfrontend ")[0].splitlines()
    assert "    retry-on conn-failure empty-response junk-response response-timeout" in defaults
    assert "    option http-buffer-request" in defaults
    check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(path)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_a_remote_cluster_is_reached_at_its_own_address(monkeypatch):
    """FLOWOPS_RAY_ADDRESS alone points every address (GCS, Ray Client, Serve, MLflow) at that host:
    no command falls back to 127.0.0.1."""
    monkeypatch.setenv("FLOWOPS_RAY_ADDRESS", "http://10.20.0.1:8265/")
    s = get_settings()
    assert s.job_api == "http://10.20.0.1:8265"
    assert s.gcs_address == "10.20.0.1:6380"
    assert s.client_address == "ray://10.20.0.1:10001"
    assert s.serve_url == "http://10.20.0.1:8000"
    assert s.tracking_uri == "http://10.20.0.1:5000"


def test_host_settings_and_explicit_urls(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path))
    monkeypatch.setenv("FLOWOPS_RAY_HOST", "192.168.7.2")
    monkeypatch.setenv("FLOWOPS_MLFLOW_PORT", "5055")
    s = get_settings()
    assert (s.job_api, s.gcs_address) == ("http://192.168.7.2:8265", "192.168.7.2:6380")
    assert (s.serve_url, s.tracking_uri) == ("http://192.168.7.2:8000", "http://192.168.7.2:5055")
    # A server listening everywhere is reached at the head's address.
    monkeypatch.setenv("FLOWOPS_MLFLOW_HOST", "0.0.0.0")
    assert get_settings().tracking_uri == "http://192.168.7.2:5055"
    # Given URLs win; jobs get them, so a job on another node sees the same platform.
    monkeypatch.setenv("FLOWOPS_SERVE_URL", "http://classifier-serve-svc.flowops:8000/")
    monkeypatch.setenv("FLOWOPS_MLFLOW_TRACKING_URI", "http://mlflow.flowops:5000")
    s = get_settings()
    assert s.serve_url == "http://classifier-serve-svc.flowops:8000"
    assert s.tracking_uri == "http://mlflow.flowops:5000" and not s.manages_mlflow
    env = s.job_env()
    assert env["FLOWOPS_SERVE_URL"] == s.serve_url and env["MLFLOW_TRACKING_URI"] == s.tracking_uri
    assert env["FLOWOPS_RAY_HOST"] == "192.168.7.2"
    monkeypatch.setenv("FLOWOPS_RAY_HOST", "fd00::5")
    assert get_settings().job_api == "http://[fd00::5]:8265"


@pytest.mark.parametrize("env, message", [
    ({"FLOWOPS_SERVE_URL": "127.0.0.1:8000"}, "serve_url"),
    ({"FLOWOPS_SERVE_URL": "ftp://host"}, "serve_url"),
    ({"FLOWOPS_RAY_HOST": "http://10.0.0.1"}, "not a host name"),
    ({"FLOWOPS_RAY_HOST": "10.0.0.1:6380"}, "not a host name"),
    ({"FLOWOPS_RAY_HOST": "0.0.0.0"}, "cannot be reached"),
    ({"FLOWOPS_MLFLOW_HOST": "host/x"}, "mlflow_host"),
    ({"FLOWOPS_MLFLOW_PORT": "80"}, "mlflow_port"),
    ({"FLOWOPS_MLFLOW_WORKERS": "0"}, "mlflow_workers"),
])
def test_bad_addresses_are_one_clear_error(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidInput, match=message):
        get_settings()
