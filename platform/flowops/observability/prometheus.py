"""The loopback Prometheus of the embedded stack (`flowops up --with-prometheus`,
`flowops monitor prometheus start|stop|query`).

It scrapes Ray's metrics endpoints (found through Ray's service-discovery file, so every node's
endpoint is found and the file follows the cluster) and the platform exporter, and evaluates
`cluster/monitoring/rules.yaml`. It runs in its own session; the session id is kept in the stack's
state file under "prometheus", so `flowops down` stops it with the rest.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from flowops import stack
from flowops.durable import atomic_write_text, wait_until
from flowops.errors import ClusterUnavailable, Conflict, InvalidInput
from flowops.observability.exporter import start_exporter
from flowops.observability.rules import RULES_FILE
from flowops.ray_client import kill_session, port_in_use, session_processes
from flowops.settings import Settings

READY_TIMEOUT_S = 30
MISSING_BINARY = ("the `prometheus` binary is not installed; install it (Debian/Ubuntu: "
                  "`apt-get install prometheus`, or `make tools`) or leave out --with-prometheus")


def ray_service_discovery_file(settings: Settings) -> Path:
    """Ray keeps its metrics endpoints (per node) in this file; Prometheus' file_sd reads it."""
    return settings.ray_temp_dir / "prom_metrics_service_discovery.json"


def prometheus_config(settings: Settings, exporter_port: int, interval_s: int = 5,
                      rules_file: Path | None = RULES_FILE) -> dict[str, Any]:
    """Scrape Ray's metrics endpoints (file_sd) and the platform exporter; load the alert rules."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "scrape_configs": [
            {"job_name": "ray",
             "file_sd_configs": [{"files": [str(ray_service_discovery_file(settings))]}]},
            {"job_name": "flowops",
             "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]},
        ],
    }
    if rules_file is not None and rules_file.exists():
        config["rule_files"] = [str(rules_file)]
    return config


def prometheus_binary() -> str:
    """The `prometheus` executable; one clear InvalidInput line when it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise InvalidInput(MISSING_BINARY)
    return binary


def local_url(settings: Settings, port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or settings.monitor.prometheus_port}"


def prometheus_status(settings: Settings) -> dict[str, Any] | None:
    """The Prometheus recorded for this home (sid, url, port, config), or None."""
    return stack.read_state(settings).get("prometheus")


def up_with_prometheus(settings: Settings) -> stack.UpResult:
    """`flowops up --with-prometheus`: the stack, then the exporter and Prometheus.

    The binary is checked before anything starts, and the Ray head is told Prometheus' URL
    (RAY_PROMETHEUS_HOST: the dashboard reads it once, when the head starts).
    """
    prometheus_binary()
    result = stack.up(settings, prometheus_url=local_url(settings))
    start_prometheus(settings)
    result.started.append("prometheus")
    return result


def start_prometheus(settings: Settings, port: int | None = None) -> dict[str, Any]:
    """Start the exporter and a Prometheus on loopback that scrapes Ray and the platform.

    Idempotent. The session id goes to the state file under "prometheus" so `flowops down` stops it.
    """
    binary = prometheus_binary()
    monitor = settings.monitor
    port = port or monitor.prometheus_port
    exporter = start_exporter(settings, monitor.exporter_port)
    entry = prometheus_status(settings)
    if entry and session_processes(entry["sid"]):
        return {**entry, "exporter": exporter["url"], "already_running": True}
    if port_in_use(port):
        raise Conflict(f"Prometheus port {port} is already in use; set FLOWOPS_MONITOR_PROMETHEUS_PORT")
    folder = settings.home / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "prometheus.yml"
    config = prometheus_config(settings, monitor.exporter_port, monitor.scrape_interval_s)
    atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
    url = local_url(settings, port)
    cmd = [
        binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=7d",
    ]
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.logs_dir / "prometheus.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    entry = {"sid": proc.pid, "url": url, "port": port, "config": str(config_path),
             "started_at": time.time()}
    _record(settings, entry)

    def ready_or_exited() -> str | None:
        if proc.poll() is not None:
            return "exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return "ready"
        return None

    outcome = None
    with contextlib.suppress(TimeoutError):
        outcome = wait_until(ready_or_exited, READY_TIMEOUT_S, what="Prometheus becoming ready")
    if outcome == "ready":
        return {**entry, "exporter": exporter["url"], "already_running": False}
    kill_session(proc.pid, grace_s=2)
    _record(settings, None)
    raise ClusterUnavailable(
        f"Prometheus did not become ready on {url}; see {settings.logs_dir / 'prometheus.log'}"
    )


def stop_prometheus(settings: Settings) -> bool:
    """Stop the Prometheus that start_prometheus started; False when none was recorded."""
    entry = prometheus_status(settings)
    if not entry:
        return False
    kill_session(entry["sid"], grace_s=5)
    _record(settings, None)
    return True


def _record(settings: Settings, entry: dict[str, Any] | None) -> None:
    """Set (or, with None, remove) the "prometheus" entry of the stack's state file."""
    state = stack.read_state(settings)
    if entry is None:
        state.pop("prometheus", None)
    else:
        state["prometheus"] = entry
    stack.write_state(settings, state)


def query_prometheus(settings: Settings, promql: str) -> list[dict[str, Any]]:
    """Run an instant query against the loopback Prometheus; the result vector."""
    entry = prometheus_status(settings)
    if not entry:
        raise ClusterUnavailable(
            "no Prometheus recorded for this home; run `flowops monitor prometheus start`"
        )
    url = entry["url"]
    try:
        resp = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    except httpx.HTTPError as exc:
        raise ClusterUnavailable(f"Prometheus at {url} does not answer: {exc}") from None
    body = resp.json()
    if body.get("status") != "success":
        raise InvalidInput(f"query {promql!r} failed: {body.get('error')}")
    return body["data"]["result"]
