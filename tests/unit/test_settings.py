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
    assert s.tracking_uri == f"sqlite:///{s.home}/mlflow/mlflow.db"
    assert s.workspace == s.home / "workspace"
    assert s.job_api == "http://127.0.0.1:8265"
    assert s.client_address == "ray://127.0.0.1:10001"
    assert s.serve_url == "http://127.0.0.1:8000"
    assert len(str(s.ray_temp_dir)) < 40  # unix socket paths are limited


def test_env_overrides_and_job_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FLOWOPS_DASHBOARD_PORT", "28265")
    monkeypatch.setenv("FLOWOPS_MODEL_NAME", "cats")
    s = get_settings()
    assert s.job_api == "http://127.0.0.1:28265"
    env = s.job_env()
    assert env["FLOWOPS_HOME"] == str(tmp_path / "h")
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:////")
    assert env["FLOWOPS_MODEL_NAME"] == "cats"
    # a job started elsewhere with these variables sees the same platform
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert get_settings().tracking_uri == s.tracking_uri


def test_head_addresses_follow_the_node_ip_and_a_remote_ray_address(monkeypatch):
    """A head on a machine address is reached there; a driver on another node (FLOWOPS_RAY_ADDRESS
    set) reaches every head service on that address's host, never its own loopback."""
    monkeypatch.setenv("FLOWOPS_NODE_IP", "10.213.0.1")
    head = get_settings()
    assert (head.job_api, head.gcs_address, head.client_address, head.serve_url) == (
        "http://10.213.0.1:8265", "10.213.0.1:6380", "ray://10.213.0.1:10001", "http://10.213.0.1:8000")
    monkeypatch.delenv("FLOWOPS_NODE_IP")
    monkeypatch.setenv("FLOWOPS_RAY_ADDRESS", "http://10.213.0.1:8265")
    driver = get_settings()
    assert driver.node_ip == "127.0.0.1"
    assert (driver.gcs_address, driver.serve_url) == ("10.213.0.1:6380", "http://10.213.0.1:8000")


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
        ({"FLOWOPS_NODE_IP": "head.local"}, "node_ip: 'head.local' is not an IPv4 address"),
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
