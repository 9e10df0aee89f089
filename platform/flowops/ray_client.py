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
from typing import Any

import httpx
import psutil

from flowops.errors import ClusterUnavailable
from flowops.settings import Settings

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
    import ray

    apply_ray_auth_env(settings)
    if ray.is_initialized():
        return ray
    if inside_ray_job():
        ray.init(namespace=namespace, log_to_driver=log_to_driver)
        return ray
    require_cluster(settings)
    ray.init(
        address=settings.gcs_address, namespace=namespace, runtime_env=runtime_env,
        logging_level="ERROR", log_to_driver=log_to_driver,
    )
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
