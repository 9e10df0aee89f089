"""Shared fixtures: ONE real local Ray cluster (started with the real `flowops up`) per test session.

Every integration test uses `stack` (the running platform) and, where it needs data, `dataset`.
The session gets its own home folder and free ports, so it never touches a user's `.flowops` or a
cluster already running on the default ports.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOWOPS = [sys.executable, "-m", "flowops.cli.main"]


def _free_port(used: set[int]) -> int:
    """A free port outside Ray's worker port range (10002-19999)."""
    for port in range(21000 + (os.getpid() % 200) * 40, 60000):
        if port in used:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise RuntimeError("no free port")


def run_cli(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None,
            input: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the real `flowops` command line in a subprocess (from the repository, or `cwd`)."""
    proc = subprocess.run(
        [*FLOWOPS, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})}, input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"flowops {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


_SESSION_ENV: dict[str, str] = {}
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "flowops-test", "AWS_SECRET_ACCESS_KEY": "flowops-test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def pytest_configure(config):
    """Choose the test platform's home and ports, and turn on Ray's token auth for this process,
    before any test module is imported: Ray reads RAY_AUTH_MODE once per process."""
    home = Path(tempfile.mkdtemp(prefix="fo-test-", dir="/tmp"))
    used: set[int] = set()
    _SESSION_ENV.update({
        "FLOWOPS_HOME": str(home),
        "FLOWOPS_RAY_PORT": str(_free_port(used)),
        "FLOWOPS_DASHBOARD_PORT": str(_free_port(used)),
        "FLOWOPS_CLIENT_PORT": str(_free_port(used)),
        "FLOWOPS_SERVE_PORT": str(_free_port(used)),
        "FLOWOPS_METRICS_PORT": str(_free_port(used)),
        "FLOWOPS_MLFLOW_PORT": str(_free_port(used)),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(home / "ray" / "auth_token"),
        # The S3 test endpoints' credentials (tests/s3_server.py), in the environment `flowops up`
        # starts the cluster with, as a cluster holds its own: jobs never carry secrets.
        **S3_CREDENTIALS,
    })
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("FLOWOPS_RAY_ADDRESS", None)
    os.environ.update(_SESSION_ENV)


def pytest_unconfigure(config):
    if _SESSION_ENV:
        shutil.rmtree(_SESSION_ENV["FLOWOPS_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def platform_env():
    """FLOWOPS_* variables of the test platform (own home, free ports), set for the session."""
    return dict(_SESSION_ENV)


@pytest.fixture(scope="session")
def stack(platform_env):
    """The running platform (real `flowops up`); stopped with `flowops down` at the end."""
    from flowops.ray_client import apply_ray_auth_env
    from flowops.settings import get_settings

    run_cli("up", "--num-cpus", "4", check=True)
    settings = get_settings()
    apply_ray_auth_env(settings)
    yield settings
    # Tests may have connected this process to the cluster as a Ray driver (serving, metrics).
    # Disconnect before the GCS goes away: a driver left connected aborts the process 60 s later.
    import ray

    if ray.is_initialized():
        ray.shutdown()
    run_cli("down", check=True)


@pytest.fixture(scope="session")
def dataset(stack) -> str:
    """The default dataset written once (`flowops data init`); returns its data version id."""
    from flowops import data

    run_cli("data", "init", check=True)
    return data.latest_version(stack)


# The state database on both backends ----------------------------------------------------------


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for the session (tests/pg.py). Skipped with one line when
    PostgreSQL is not installed, unless CI is set: then missing it is a failure."""
    from tests.pg import pg_bin, start_postgres

    if pg_bin() is None:
        message = ("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin): "
                   "`make tools` installs Debian's postgresql")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_backend(request, tmp_path, monkeypatch):
    """A fresh home whose state database is SQLite in the home or a new PostgreSQL database
    (FLOWOPS_STATE_URL set for this process and its children); returns its Settings."""
    from flowops.settings import get_settings

    monkeypatch.setenv("FLOWOPS_HOME", str(tmp_path))
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        monkeypatch.setenv("FLOWOPS_STATE_URL", server.create_database())
    else:
        monkeypatch.delenv("FLOWOPS_STATE_URL", raising=False)
    return get_settings()
