"""A bare Ray head for the benchmarks that drive Ray directly: token auth on, free ports outside
Ray's worker range, this process connected as a driver. Imported by the benchmark scripts (their
folder is on sys.path when run as `python tests/benchmarks/<name>.py`)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def start_ray(work: Path, cpus: int, prefix: str = "fo-bench") -> int:
    """Start the head under `work` (token, log) and connect; returns its session id to kill."""
    from flowops.ray_client import RayHead, free_port

    token = work / "ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text(secrets.token_hex(32))
    os.chmod(token, 0o600)
    ports = [free_port() for _ in range(4)]
    while any(10002 <= p <= 19999 for p in ports):
        ports = [free_port() for _ in range(4)]
    head = RayHead(temp_dir=Path(f"/tmp/{prefix}-{secrets.token_hex(3)}"), token_path=token,
                   log_path=work / "ray-start.log", ray_port=ports[0], dashboard_port=ports[1],
                   client_port=ports[2], metrics_port=ports[3], num_cpus=cpus)
    sid = head.start()
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    os.environ.pop("RAY_ADDRESS", None)
    import ray  # after the auth settings: Ray reads them when first imported

    ray.init(address=f"127.0.0.1:{ports[0]}", log_to_driver=False, logging_level="ERROR")
    return sid
