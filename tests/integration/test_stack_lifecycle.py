"""`flowops up | status | down` on a second, private embedded stack: idempotence, races, ports,
repair of a stale state, and `down` leaving no process behind."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flowops import ray_client, stack
from flowops.settings import get_settings
from tests.conftest import FLOWOPS, REPO, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def private_env():
    home = Path(tempfile.mkdtemp(prefix="fo-life-", dir="/tmp"))
    used = {int(v) for k, v in os.environ.items() if k.startswith("FLOWOPS_") and k.endswith("_PORT")}
    env = {**os.environ, "FLOWOPS_HOME": str(home)}
    for key in ("RAY", "DASHBOARD", "CLIENT", "SERVE", "METRICS", "MLFLOW"):
        env[f"FLOWOPS_{key}_PORT"] = str(_free_port(used))
    yield env
    subprocess.run([*FLOWOPS, "down"], env=env, cwd=REPO, capture_output=True, timeout=120)


def _lock_held(lock: Path) -> bool:
    """True while another process holds the stack lock."""
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _cli(env, *args, timeout=300):
    return subprocess.run([*FLOWOPS, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_lifecycle(private_env):
    env = private_env
    settings = get_settings(home=env["FLOWOPS_HOME"], dashboard_port=int(env["FLOWOPS_DASHBOARD_PORT"]))

    # A port in use is refused with one line, before anything starts.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(env["FLOWOPS_DASHBOARD_PORT"])))
        blocker.listen()
        out = _cli(env, "up", "--num-cpus", "1")
        assert out.returncode == 4, out.stderr
        assert f"dashboard/job API port {env['FLOWOPS_DASHBOARD_PORT']}" in out.stderr
        assert "in use" in out.stderr and "Traceback" not in out.stderr

    # Two racing `up`s: one starts the stack, the other fails at once with one line.
    first = subprocess.Popen([*FLOWOPS, "up", "--num-cpus", "1"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    racer = None
    lock = Path(env["FLOWOPS_HOME"]) / "stack.lock"
    for _ in range(600):
        if _lock_held(lock):
            racer = _cli(env, "up", "--num-cpus", "1")
            break
        time.sleep(0.05)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert racer is not None and racer.returncode == 4
    assert "another `flowops up` or `down` is running" in racer.stderr

    # Up again: a no-op. Status: healthy.
    again = json.loads(_cli(env, "up", "--json").stdout)
    assert again["started"] == []
    report = json.loads(_cli(env, "status", "--json").stdout)
    assert report["healthy"], report

    # Ray and the MLflow server die: status says so, `up` repairs both.
    mlflow_sid = stack.read_state(settings)["mlflow"]["sid"]
    ray_client.kill_session(mlflow_sid, grace_s=0)
    sid = stack.read_state(settings)["ray"]["sid"]
    gcs = [p for p in ray_client.session_processes(sid) if "gcs_server" in " ".join(p.cmdline())]
    assert gcs
    deadline = time.monotonic() + 30
    while ray_client.session_processes(sid) and time.monotonic() < deadline:  # also late-spawned ones
        for p in ray_client.session_processes(sid):
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.5)
    assert ray_client.session_processes(sid) == []
    dead = _cli(env, "status", "--json")
    assert dead.returncode == 5, dead.stdout  # ClusterUnavailable
    assert json.loads(dead.stdout)["ray"]["healthy"] is False
    assert json.loads(dead.stdout)["mlflow"]["healthy"] is False
    repaired = json.loads(_cli(env, "up", "--json").stdout)
    assert {"ray", "mlflow"} <= set(repaired["repaired"]) & set(repaired["started"])
    assert json.loads(_cli(env, "status", "--json").stdout)["healthy"]

    # Down stops every process it started and keeps the data.
    new_sid = stack.read_state(settings)["ray"]["sid"]
    mlflow_sid = stack.read_state(settings)["mlflow"]["sid"]
    assert ray_client.session_processes(new_sid) and ray_client.session_processes(mlflow_sid)
    out = _cli(env, "down")
    assert out.returncode == 0 and "ray" in out.stdout and "mlflow" in out.stdout
    assert ray_client.session_processes(new_sid) == []
    assert ray_client.session_processes(mlflow_sid) == []  # the server and its workers
    assert (Path(env["FLOWOPS_HOME"]) / "mlflow" / "mlflow.db").exists()
    assert (Path(env["FLOWOPS_HOME"]) / "workspace" / ".dvc").is_dir()
    assert _cli(env, "status").returncode == 5
    assert sys.executable  # the same interpreter ran everything
