"""Clusters for the benchmarks, each in its own place with free ports outside Ray's worker range:
`start_ray`, a bare Ray head (token auth on, this process connected as a driver) for benchmarks
that drive Ray directly; `start_platform`, the embedded stack of `flowops up` (Ray head, MLflow
server, state database) for benchmarks that also track to MLflow, which the platform reaches only
through the server `flowops up` starts. Imported by the benchmark scripts (their folder is on
sys.path when run as `python tests/benchmarks/<name>.py`)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports outside Ray's worker port range (10002-19999)."""
    from flowops.ray_client import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if not 10002 <= port <= 19999 and port not in ports:
            ports.append(port)
    return ports


def start_ray(work: Path, cpus: int, prefix: str = "fo-bench") -> int:
    """Start the head under `work` (token, log) and connect; returns its session id to kill."""
    from flowops.ray_client import RayHead

    token = work / "ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text(secrets.token_hex(32))
    os.chmod(token, 0o600)
    ports = free_ports(4)
    head = RayHead(temp_dir=Path(f"/tmp/{prefix}-{secrets.token_hex(3)}"), token_path=token,
                   log_path=work / "ray-start.log", ray_port=ports[0], dashboard_port=ports[1],
                   client_port=ports[2], metrics_port=ports[3], num_cpus=cpus)
    sid = head.start()
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    os.environ.pop("RAY_ADDRESS", None)
    import ray  # after the auth settings: Ray reads them when first imported

    ray.init(address=f"127.0.0.1:{ports[0]}", log_to_driver=False, logging_level="ERROR")
    return sid


def start_platform(work: Path, cpus: int):
    """`flowops up` without Serve in the home `work/home` (Ray head with `cpus` CPUs, MLflow
    server, state database, workspace), this process connected as a driver; returns its Settings.
    Stop it with `stop_platform`."""
    from flowops import ray_client, stack
    from flowops.settings import get_settings

    names = ("ray_port", "dashboard_port", "client_port", "serve_port", "metrics_port", "mlflow_port")
    settings = get_settings(home=work / "home", num_cpus=cpus, **dict(zip(names, free_ports(6), strict=True)))
    try:
        stack.up(settings, with_serve=False)
        ray_client.connect(settings)
    except BaseException:
        stop_platform(settings)  # nothing left half-started
        raise
    return settings


def stop_platform(settings) -> None:
    """Disconnect this driver (before the GCS goes away) and stop the stack `start_platform` began."""
    import ray

    from flowops import stack

    if ray.is_initialized():
        ray.shutdown()
    stack.down(settings)
