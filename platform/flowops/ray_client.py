"""How FlowOps reaches Ray: the one `ray.init` (with the token), the job API's health, the cluster's
resources, and the process helpers that start and stop local Ray heads.

Inside a Ray job (`RAY_ADDRESS`/`RAY_JOB_ID` set by Ray) `connect` joins the job's own cluster;
anywhere else it joins the platform's cluster at `settings.gcs_address`, after checking that the job
API answers so a stopped platform gives one clear line instead of Ray's retries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from flowops.errors import ClusterUnavailable, Conflict
from flowops.settings import Settings

RAY_START_TIMEOUT_S = 240  # generous: a loaded 2-core machine can take minutes

# Token ------------------------------------------------------------------------------------------


def apply_ray_auth_env(settings: Settings) -> None:
    """Make this process's Ray clients (JobSubmissionClient, ray.init, serve) send the token."""
    os.environ.update(settings.ray_auth_env())


def auth_headers(settings: Settings) -> dict[str, str]:
    """`Authorization` for Ray's HTTP APIs (the job API, the dashboard)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and settings.token_path.exists():
        token = settings.token_path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# Driver connection -------------------------------------------------------------------------------


def inside_ray_job() -> bool:
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def connect(
    settings: Settings,
    *,
    namespace: str | None = None,
    log_to_driver: bool = False,
    runtime_env: dict[str, Any] | None = None,
):
    """Connect this process to the cluster as a Ray driver (a no-op when already connected).

    Returns the `ray` module. `runtime_env` applies only outside a job (a job has its own).
    """
    apply_ray_auth_env(settings)  # before Ray is imported: it reads RAY_AUTH_MODE once
    import ray

    if ray.is_initialized():
        return ray
    if inside_ray_job():
        where: dict[str, Any] = {}  # the job's own cluster and runtime environment
    else:
        require_cluster(settings)
        where = {"address": settings.gcs_address, "runtime_env": runtime_env, "logging_level": "ERROR"}
    ray.init(namespace=namespace, log_to_driver=log_to_driver, **where)
    return ray


def ray_healthy(settings: Settings, timeout: float = 3.0) -> bool:
    try:
        resp = httpx.get(
            f"{settings.job_api}/api/version", headers=auth_headers(settings), timeout=timeout
        )
        return resp.status_code == 200
    except httpx.HTTPError:
        return False


def require_cluster(settings: Settings) -> None:
    """Raise a clear error when the job API is not reachable."""
    if not ray_healthy(settings):
        hint = (
            "start it with `flowops up`" if not settings.ray_address
            else "check FLOWOPS_RAY_ADDRESS and the token (RAY_AUTH_TOKEN)"
        )
        raise ClusterUnavailable(f"no Ray cluster answers at {settings.job_api}: {hint}")


def cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    """(the cluster's total resources, the largest amount of each resource on one live node)."""
    import ray

    per_node: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for key, value in node.get("Resources", {}).items():
            per_node[key] = max(per_node.get(key, 0.0), float(value))
    return dict(ray.cluster_resources()), per_node


# Ports and processes -----------------------------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of a session (what `ray start` in its own session spawned)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return found


def kill_session(sid: int, grace_s: float = 10.0) -> int:
    """SIGTERM every process of the session, SIGKILL what is left after the grace period."""
    procs = session_processes(sid)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


# Local head nodes --------------------------------------------------------------------------------


@dataclass
class RayHead:
    """What `ray start --head` needs; also used for isolated dev clusters (flowops.devenv)."""

    temp_dir: Path
    token_path: Path
    log_path: Path
    ray_port: int
    dashboard_port: int
    client_port: int
    metrics_port: int
    num_cpus: int | None = None
    num_gpus: int | None = None
    env: dict[str, str] | None = None  # extra environment (e.g. CUDA_VISIBLE_DEVICES, FLOWOPS_*)
    host: str = "127.0.0.1"  # the node's address: its GCS, dashboard and job API listen there

    def command(self) -> list[str]:
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray_bin, "start", "--head",
            f"--node-ip-address={self.host}",
            f"--port={self.ray_port}",
            f"--dashboard-host={self.host}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--metrics-export-port={self.metrics_port}",
            # Fixed defaults would clash between two clusters on one machine: pick free ones.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        return cmd

    def start(self, attempts: int = 2) -> int:
        """Start the head in a new session; return the session id that owns all its processes.

        Ray gives its raylet a fixed 30 s to register; on an overloaded machine that can pass, so a
        start that failed that way is retried.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except ClusterUnavailable as exc:
                if attempt == attempts or "timed out during startup" not in str(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self) -> int:
        busy = [
            f"{name} port {port}"
            for name, port in (
                ("Ray GCS", self.ray_port), ("dashboard/job API", self.dashboard_port),
                ("Ray Client", self.client_port), ("metrics", self.metrics_port),
            )
            if port_in_use(port, self.host)
        ]
        if busy:
            raise Conflict(
                f"{', '.join(busy)} already in use by another process; choose other ports "
                "(flowops up --dashboard-port/--ray-port/--client-port/--metrics-port, "
                "or FLOWOPS_*_PORT)"
            )
        if 10002 <= self.client_port <= 19999:
            raise Conflict(
                f"Ray Client port {self.client_port} falls in Ray's worker port range 10002-19999"
            )
        env = {**os.environ, **(self.env or {})}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)})
        # The Ray Client proxy starts a server process per client with fork+exec while its gRPC
        # threads are busy; gRPC's fork handlers then now and then abort the child before exec
        # ("Starting Ray client server failed", ray-project/ray#63202). A fork that is always
        # followed by exec needs no handlers: gRPC's own advice is to turn them off.
        env["GRPC_ENABLE_FORK_SUPPORT"] = "false"
        env.pop("RAY_AUTH_TOKEN", None)
        # Ray's helpers that look their cluster up by address (Ray Train's placement-group cleaner
        # uses the state API) otherwise scan for GCS processes, and fail when another Ray cluster
        # runs on this machine: every process of this head gets its own cluster's address.
        env["RAY_ADDRESS"] = f"127.0.0.1:{self.ray_port}"
        # Jobs run `python -m flowops.workloads.<name>`: `python` must be this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, stdin=subprocess.DEVNULL,
            )
            try:
                code = proc.wait(timeout=RAY_START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                kill_session(proc.pid)
                raise ClusterUnavailable(
                    f"ray start did not finish in {RAY_START_TIMEOUT_S}s; see {self.log_path}"
                ) from None
        if code != 0:
            kill_session(proc.pid)
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise ClusterUnavailable(
                f"ray start failed (exit {code}): {' '.join(tail)}; see {self.log_path}"
            )
        return proc.pid
