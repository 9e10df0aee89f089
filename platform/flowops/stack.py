"""The embedded stack: a local Ray head node, the MLflow store and the data workspace.

`up` is idempotent and repairs a stale state (a recorded Ray that died); `down` stops exactly the
processes `up` started (every process of the session it recorded) and keeps all data.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flowops import data as data_mod
from flowops import tracking
from flowops.durable import atomic_write_text, file_lock, wait_until
from flowops.errors import ClusterUnavailable, Conflict, FlowOpsError
from flowops.ray_client import (
    RayHead,
    apply_ray_auth_env,
    free_port,
    kill_session,
    port_in_use,
    ray_healthy,
    session_processes,
)
from flowops.settings import Settings


@dataclass
class UpResult:
    started: list[str]
    already_running: list[str]
    repaired: list[str]


# State file ------------------------------------------------------------------------------------


def read_state(settings: Settings) -> dict[str, Any]:
    try:
        return json.loads(settings.state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_state(settings: Settings, state: dict[str, Any]) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.state_file, json.dumps(state, indent=2))


@contextlib.contextmanager
def stack_lock(settings: Settings) -> Iterator[None]:
    """Only one `up`/`down` at a time per home folder; a second one fails at once."""
    try:
        with file_lock(settings.home / "stack.lock", blocking=False):
            yield
    except BlockingIOError:
        raise Conflict(
            f"another `flowops up` or `down` is running for {settings.home}; "
            "wait for it to finish, then try again"
        ) from None


# Token ------------------------------------------------------------------------------------------


def ensure_token(settings: Settings) -> Path:
    """Create the Ray auth token once, readable only by the user (0600)."""
    path = settings.token_path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def serve_healthy(settings: Settings, timeout: float = 2.0) -> bool:
    """Serve's HTTP proxy answers (a 503 'route table not populated' means: no app deployed yet)."""
    try:
        resp = httpx.get(f"{settings.serve_url}/-/healthz", timeout=timeout)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 or "not populated" in resp.text


# Ray head ---------------------------------------------------------------------------------------


def _wait_until(check, timeout_s: float, what: str) -> None:
    wait_until(check, timeout_s, what=f"{what} becoming healthy", error=ClusterUnavailable)


def _ray_state_alive(settings: Settings, state: dict[str, Any]) -> bool:
    ray = state.get("ray")
    return bool(ray) and bool(session_processes(ray["sid"])) and ray_healthy(settings)


def _start_serve(settings: Settings) -> None:
    """Start Serve's controller and HTTP proxy on the configured port (detached, so it persists)."""
    apply_ray_auth_env(settings)
    # Serve's HTTP options hold for the proxy of every node: a head on a machine address lets each
    # node's proxy listen on all of that node's addresses.
    host = "127.0.0.1" if settings.node_ip == "127.0.0.1" else "0.0.0.0"
    code = (
        "from ray import serve; from flowops.ray_client import connect;"
        "from flowops.settings import get_settings; connect(get_settings());"
        f"serve.start(http_options={{'host': '{host}', 'port': {settings.serve_port}}})"
    )
    env = {**os.environ, **settings.job_env(), **settings.ray_auth_env()}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ClusterUnavailable(f"could not start Ray Serve on port {settings.serve_port}: {last}")
    _wait_until(lambda: serve_healthy(settings), 180, f"Ray Serve on {settings.serve_url}")


def init_mlflow_store(settings: Settings) -> None:
    """Create the SQLite schema and the artifact folder (first use runs MLflow's migrations)."""
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    tracking.ensure_experiment(settings, "Default-flowops")


def _serve_env(settings: Settings) -> dict[str, str]:
    """Serve's request path for a head started now. HAProxy's stats and metrics listeners have
    fixed default ports (8404, 9101): free ones are chosen so two clusters fit on one machine."""
    env = settings.serve_env()
    if settings.serve_fast_path:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    return env


def up(settings: Settings, with_serve: bool = True, prometheus_url: str | None = None) -> UpResult:
    """Start (or repair) the embedded stack. A no-op for what already runs.

    `prometheus_url` points the Ray dashboard's graphs at that Prometheus (Ray reads it when the
    head starts, so it applies to a head started now).
    """
    if settings.ray_address:
        raise Conflict(
            f"FLOWOPS_RAY_ADDRESS points at an existing cluster ({settings.ray_address}); "
            "`flowops up` starts the embedded one: unset it to use the embedded stack"
        )
    result = UpResult([], [], [])
    with stack_lock(settings):
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        ensure_token(settings)
        state = read_state(settings)

        if _ray_state_alive(settings, state):
            result.already_running.append("ray")
        else:
            if state.get("ray"):  # recorded, but dead or unhealthy: clean up what is left
                kill_session(state["ray"]["sid"])
                result.repaired.append("ray")
                state.pop("ray")
            head = RayHead(
                temp_dir=settings.ray_temp_dir,
                token_path=settings.token_path,
                log_path=settings.logs_dir / "ray-start.log",
                ray_port=settings.ray_port,
                dashboard_port=settings.dashboard_port,
                client_port=settings.client_port,
                metrics_port=settings.metrics_port,
                node_ip=settings.node_ip,
                num_cpus=settings.num_cpus,
                num_gpus=settings.num_gpus,
                env={**settings.job_env(), **_serve_env(settings),
                     **({"RAY_PROMETHEUS_HOST": prometheus_url} if prometheus_url else {})},
            )
            if port_in_use(settings.serve_port, settings.node_ip):
                raise Conflict(
                    f"Serve HTTP port {settings.serve_port} already in use by another process; "
                    "choose another with --serve-port or FLOWOPS_SERVE_PORT"
                )
            sid = head.start()
            state["ray"] = {
                "sid": sid,
                "temp_dir": str(settings.ray_temp_dir),
                "ports": {
                    "gcs": settings.ray_port, "dashboard": settings.dashboard_port,
                    "client": settings.client_port, "serve": settings.serve_port,
                    "metrics": settings.metrics_port,
                },
                "started_at": time.time(),
            }
            write_state(settings, state)
            try:
                _wait_until(lambda: ray_healthy(settings), 180, f"Ray job API at {settings.job_api}")
            except FlowOpsError:
                kill_session(sid)
                state.pop("ray", None)
                write_state(settings, state)
                raise
            result.started.append("ray")

        if with_serve:
            if serve_healthy(settings):
                result.already_running.append("serve")
            else:
                _start_serve(settings)
                result.started.append("serve")

        mlflow_new = not (settings.mlflow_dir / "mlflow.db").exists()
        init_mlflow_store(settings)
        (result.started if mlflow_new else result.already_running).append("mlflow")

        ws_new = data_mod.init_workspace(settings)
        (result.started if ws_new else result.already_running).append("workspace")
        write_state(settings, state)
    return result


def down(settings: Settings) -> list[str]:
    """Stop what `up` started (by its recorded session id). Data stays."""
    stopped = []
    with stack_lock(settings):
        state = read_state(settings)
        for name in ("ui", "prometheus"):
            entry = state.pop(name, None)
            if entry and kill_session(entry["sid"], grace_s=5):
                stopped.append(name)
        ray = state.pop("ray", None)
        if ray and kill_session(ray["sid"]):
            stopped.append("ray")
        write_state(settings, state)
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    """Health and addresses of every component."""
    state = read_state(settings)
    ray = state.get("ray")
    processes = len(session_processes(ray["sid"])) if ray else 0
    # A managed head is healthy only while its recorded processes live (as `up` judges it);
    # something else answering on the port is not our cluster.
    ray_ok = ray_healthy(settings) and (processes > 0 or not ray)
    report: dict[str, Any] = {
        "home": str(settings.home),
        "ray": {
            "healthy": ray_ok,
            "managed": bool(ray),
            "processes": processes,
            "dashboard": settings.job_api,
            "job_api": settings.job_api,
            "gcs": settings.gcs_address,
            "client": settings.client_address,
            "token_file": str(settings.token_path),
        },
        "serve": {"healthy": serve_healthy(settings), "url": settings.serve_url},
    }
    try:
        client = tracking.configure_mlflow(settings)
        n = len(client.search_experiments())
        report["mlflow"] = {"healthy": True, "tracking_uri": settings.tracking_uri,
                            "experiments": n, "ui": f"http://127.0.0.1:{settings.mlflow_ui_port}"}
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unhealthy
        report["mlflow"] = {"healthy": False, "tracking_uri": settings.tracking_uri,
                            "error": str(exc).splitlines()[0][:200]}
    report["workspace"] = data_mod.workspace_status(settings)
    report["healthy"] = all(
        report[k]["healthy"] for k in ("ray", "mlflow", "workspace")
    )
    return report


def serve_ui(settings: Settings) -> int:
    """Run the MLflow UI against the store, in the foreground."""
    if port_in_use(settings.mlflow_ui_port):
        raise Conflict(
            f"port {settings.mlflow_ui_port} is in use; choose another with --port "
            "or FLOWOPS_MLFLOW_UI_PORT"
        )
    init_mlflow_store(settings)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", settings.tracking_uri,
        "--default-artifact-root", settings.artifact_root.as_uri(),
        "--host", "127.0.0.1", "--port", str(settings.mlflow_ui_port),
    ]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
