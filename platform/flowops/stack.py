"""The embedded stack: the state database (migrated), a local Ray head node (+ Serve), the MLflow
tracking server and the data workspace.

`up` is idempotent and repairs a stale state (a recorded Ray or MLflow that died); `down` stops
exactly the processes `up` started (every process of the sessions it recorded) and keeps all data.
MLflow runs as a server (`mlflow server`, its artifacts proxied through it) so that every process on
every node (CLI, jobs, Ray Train workers, Serve replicas) tracks and loads models over HTTP.
"""

from __future__ import annotations

import contextlib
import ipaddress
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
from flowops.settings import WILDCARD_HOSTS, Settings


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
    """Start Serve's controller and HTTP proxy on the configured port (detached, so it persists).

    The HTTP host applies to the proxy of every node: loopback for a one-machine head, else every
    interface (a proxy on another node cannot bind the head's address)."""
    apply_ray_auth_env(settings)
    host = "127.0.0.1" if settings.head_host in ("127.0.0.1", "localhost") else "0.0.0.0"
    code = (
        "from ray import serve; from flowops.ray_client import connect;"
        "from flowops.settings import get_settings; connect(get_settings());"
        f"serve.start(http_options={{'host': {host!r}, 'port': {settings.serve_port}}})"
    )
    env = {**os.environ, **settings.job_env(), **settings.ray_auth_env()}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ClusterUnavailable(f"could not start Ray Serve on port {settings.serve_port}: {last}")
    _wait_until(lambda: serve_healthy(settings), 180, f"Ray Serve on {settings.serve_url}")


# MLflow tracking server -------------------------------------------------------------------------

MLFLOW_START_TIMEOUT_S = 180
# The Host headers MLflow's server accepts by default: loopback and the private IPv4 ranges.
MLFLOW_DEFAULT_HOSTS = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]",
                        "[[]::1]:*", "10.*", "192.168.*", *[f"172.{i}.*" for i in range(16, 32)]]


def mlflow_healthy(settings: Settings, timeout: float = 2.0) -> bool:
    """The tracking server answers its health route."""
    try:
        return httpx.get(f"{settings.tracking_uri}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _mlflow_allowed_hosts(settings: Settings) -> list[str]:
    """`--allowed-hosts` when clients reach the server at an address MLflow's defaults refuse
    (its DNS-rebinding guard allows loopback and private IPv4 only); empty otherwise."""
    host = httpx.URL(settings.tracking_uri).host
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.is_loopback or any(ip in ipaddress.ip_network(net) for net in
                                 ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")):
            return []
    if host == "localhost":
        return []
    named = f"[{host}]" if ":" in host else host
    return ["--allowed-hosts", ",".join([*MLFLOW_DEFAULT_HOSTS, named, f"{named.replace('[', '[[]', 1)}:*"])]


def _start_mlflow(settings: Settings) -> int:
    """Start `mlflow server` in its own session (not waiting for it); return the session id.

    One uvicorn worker by default (a small machine: FLOWOPS_MLFLOW_WORKERS for more), no access
    log (every metric a training logs would be a line); MLflow's
    server-side job runner (GenAI evaluation jobs, which FlowOps does not use) is off: it would add
    eight processes. The server creates and migrates its database when it starts. The backend URL
    travels in the environment, not the command line, so a password in it is not in `ps`.
    """
    host = settings.mlflow_listen_host
    if port_in_use(settings.mlflow_port, "0.0.0.0" if host in WILDCARD_HOSTS else host):
        raise Conflict(
            f"MLflow port {settings.mlflow_port} already in use by another process; "
            "choose another with --mlflow-port or FLOWOPS_MLFLOW_PORT"
        )
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(settings.mlflow_port),
        "--workers", str(settings.mlflow_workers), "--uvicorn-opts", "--no-access-log",
        "--serve-artifacts", "--artifacts-destination", str(settings.artifact_root),
        *_mlflow_allowed_hosts(settings),
    ]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": settings.mlflow_backend,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(settings.logs_dir / "mlflow.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=settings.home)
    return proc.pid


def _wait_mlflow(settings: Settings, sid: int) -> None:
    """Wait until the server answers; if it exits first or never answers: stop it, one line."""
    def ready_or_exited() -> str | None:
        if not session_processes(sid):
            return "exited"
        return "ready" if mlflow_healthy(settings) else None

    outcome = None
    with contextlib.suppress(TimeoutError):
        outcome = wait_until(ready_or_exited, MLFLOW_START_TIMEOUT_S, what="MLflow server")
    if outcome != "ready":
        kill_session(sid, grace_s=5)
        log = settings.logs_dir / "mlflow.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise ClusterUnavailable(
            f"the MLflow server did not answer at {settings.tracking_uri}: {' '.join(tail)[:300]}; "
            f"see {log}"
        )


def _mlflow_state_alive(settings: Settings, state: dict[str, Any]) -> bool:
    entry = state.get("mlflow")
    return bool(entry) and bool(session_processes(entry["sid"])) and mlflow_healthy(settings)


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
    from flowops import statedb

    result = UpResult([], [], [])
    with stack_lock(settings):
        # First: a state database that is unreachable or fails to migrate stops `up` before
        # anything is started.
        migrated = statedb.migrate(settings)
        (result.started if migrated["before"] != migrated["revision"]
         else result.already_running).append("state database")
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        ensure_token(settings)
        state = read_state(settings)
        # MLflow starts first and comes up while Ray does; it is waited for at the end, and
        # stopped again when anything after its start fails (nothing is left half-started).
        mlflow_sid = _up_mlflow(settings, state, result)
        try:
            _up_ray(settings, state, result, prometheus_url)
            if with_serve:
                if serve_healthy(settings):
                    result.already_running.append("serve")
                else:
                    _start_serve(settings)
                    result.started.append("serve")
            ws_new = data_mod.init_workspace(settings)
            (result.started if ws_new else result.already_running).append("workspace")
            if mlflow_sid is not None:
                _wait_mlflow(settings, mlflow_sid)
                result.started.append("mlflow")
        except BaseException:
            if mlflow_sid is not None:
                # Stopped once it answers: stopped while creating its database, it would leave
                # the schema half-made for the next start.
                with contextlib.suppress(FlowOpsError):
                    _wait_mlflow(settings, mlflow_sid)
                kill_session(mlflow_sid, grace_s=5)
                state.pop("mlflow", None)
                write_state(settings, state)
            raise
        write_state(settings, state)
    return result


def _up_mlflow(settings: Settings, state: dict[str, Any], result: UpResult) -> int | None:
    """Start the MLflow server unless it runs (or an MLflow URI was given); its new session id."""
    if not settings.manages_mlflow:
        return None
    if _mlflow_state_alive(settings, state):
        result.already_running.append("mlflow")
        return None
    if state.get("mlflow"):  # recorded, but dead or unhealthy: clean up what is left
        kill_session(state.pop("mlflow")["sid"], grace_s=5)
        result.repaired.append("mlflow")
    sid = _start_mlflow(settings)
    state["mlflow"] = {"sid": sid, "url": settings.tracking_uri, "started_at": time.time()}
    write_state(settings, state)
    return sid


def _up_ray(settings: Settings, state: dict[str, Any], result: UpResult,
            prometheus_url: str | None) -> None:
    """Start the Ray head unless it runs (repairing a recorded one that died)."""
    if _ray_state_alive(settings, state):
        result.already_running.append("ray")
        return
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
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
        host=settings.head_host,
        env={**settings.head_env(), **_serve_env(settings),
             **({"RAY_PROMETHEUS_HOST": prometheus_url} if prometheus_url else {})},
    )
    if port_in_use(settings.serve_port, settings.head_host):
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


def down(settings: Settings) -> list[str]:
    """Stop what `up` started (by its recorded session id). Data stays."""
    stopped = []
    with stack_lock(settings):
        state = read_state(settings)
        for name in ("prometheus", "mlflow"):
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
    report["mlflow"] = mlflow_status(settings, state)
    report["workspace"] = data_mod.workspace_status(settings)
    report["healthy"] = all(
        report[k]["healthy"] for k in ("ray", "mlflow", "workspace")
    )
    return report


def mlflow_status(settings: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """The tracking server's health, and its UI (the server's own address)."""
    entry = state.get("mlflow")
    processes = len(session_processes(entry["sid"])) if entry else 0
    report: dict[str, Any] = {"managed": bool(entry), "processes": processes,
                              "tracking_uri": settings.tracking_uri}
    if settings.tracking_uri.startswith(("http://", "https://")):
        # Like Ray: a managed server is healthy only while its recorded processes live.
        report["healthy"] = mlflow_healthy(settings) and (processes > 0 or not entry)
        report["ui"] = settings.tracking_uri
        return report
    try:  # a store given as a URI (sqlite:///..., databricks): ask it directly
        tracking.configure_mlflow(settings).search_experiments(max_results=1)
        report["healthy"] = True
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unhealthy
        report.update(healthy=False, error=str(exc).splitlines()[0][:200])
    return report
