"""Shared pieces of the observability tests: PromQL metric-name extraction and ONE live scrape of
the real platform (Ray's metrics endpoints + the FlowOps exporter) after real traffic.

Import the fixture explicitly: `from tests.integration.conftest_monitor import monitoring`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "cluster" / "monitoring" / "dashboards"
PROBE_APP = "flowops-metrics-probe"
PROBE_VERSION = "probe-1"
SERVE_METRICS = ("requests_total", "errors_total", "latency_ms_bucket", "score_bucket",
                 "feedback_total", "shadow_total")
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (strings, label matchers, ranges, groupings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def dashboard_metric_names() -> dict[str, list[str]]:
    """metric name -> ['dashboard: panel', ...] for every query of every dashboard."""
    found: dict[str, list[str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                for name in metric_names(target["expr"]):
                    found.setdefault(name, []).append(f"{path.stem}: {panel['title']}")
    return found


def scrape_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _free_port(after: int = 0) -> int:
    """A free port above `after` (and outside Ray's worker range)."""
    for port in range(max(after + 1, 40000 + os.getpid() % 500 * 20), 60000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


PROBE = textwrap.dedent('''
    import sys, ray
    from ray import serve
    from flowops.settings import get_settings
    from flowops.ray_client import apply_ray_auth_env
    s = get_settings(); apply_ray_auth_env(s)
    ray.init(address=s.gcs_address, logging_level="ERROR", log_to_driver=False)
    if sys.argv[1] == "delete":
        serve.delete("{app}")
        raise SystemExit(0)

    @serve.deployment(ray_actor_options={{"num_cpus": 0.05}})
    class Probe:
        """Emits the classifier's metric names (serving_app._Metrics) on every request."""
        def __init__(self):
            from ray.serve import metrics
            t = ("version",)
            self.req = metrics.Counter("flowops_serve_requests_total", "probe", tag_keys=t)
            self.err = metrics.Counter("flowops_serve_errors_total", "probe", tag_keys=t)
            self.lat = metrics.Histogram("flowops_serve_latency_ms", "probe", boundaries=[1, 10, 100],
                                         tag_keys=t)
            self.score = metrics.Histogram("flowops_serve_score", "probe", boundaries=[0.5, 0.9],
                                           tag_keys=t)
            self.fb = metrics.Counter("flowops_serve_feedback_total", "probe",
                                      tag_keys=("version", "correct"))
            self.sh = metrics.Counter("flowops_serve_shadow_total", "probe", tag_keys=("version", "agree"))
        async def __call__(self, request):
            v = {{"version": "{version}"}}
            self.req.inc(1, v); self.lat.observe(3.0, v); self.score.observe(0.95, v)
            self.err.inc(1, v)
            self.fb.inc(1, {{**v, "correct": "true"}})
            self.sh.inc(1, {{**v, "agree": "true"}})
            return "ok"

    serve.run(Probe.bind(), name="{app}", route_prefix="/{app}", blocking=False)
''').format(app=PROBE_APP, version=PROBE_VERSION)


_SHARED: dict = {}  # each test module that imports the fixture gets its own copy: build once


@pytest.fixture(scope="session")
def monitoring(stack, dataset):
    """Prometheus + exporter started by the real CLI, a real pipeline job, labels, real HTTP traffic
    to a Serve app that emits the classifier's metric names; yields the live scrape."""
    if "scrape" in _SHARED:
        yield _SHARED["scrape"]
        return
    import httpx

    from flowops import events, jobs, labels
    from flowops.data_check import DataCheckConfig
    from flowops.observability.prometheus import ray_service_discovery_file
    from tests.conftest import run_cli

    exporter_port = _free_port()
    env = {"FLOWOPS_MONITOR_EXPORTER_PORT": str(exporter_port),
           "FLOWOPS_MONITOR_PROMETHEUS_PORT": str(_free_port(after=exporter_port))}
    os.environ.update(env)
    started = run_cli("monitor", "prometheus", "start", "--json", timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    prom = json.loads(started.stdout[started.stdout.index("{"):])

    probe = subprocess.run([sys.executable, "-c", PROBE, "deploy"], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert probe.returncode == 0, probe.stderr[-2000:]
    for _ in range(25):
        assert httpx.get(f"{stack.serve_url}/{PROBE_APP}", timeout=30).text == "ok"

    pipeline = jobs.run_pipeline(stack, "retrain-probe",
                                 [jobs.Step("check", "data_check", DataCheckConfig(data_version=dataset))])
    labels.record_labels(stack, [labels.Label(f"mon-{i}", f"d{i:05d}", "4") for i in range(3)])
    events.emit(stack, "retrain_triggered", version="probe")

    sd = ray_service_discovery_file(stack)
    wanted = {f"ray_flowops_serve_{m}" for m in SERVE_METRICS}
    deadline = time.monotonic() + 120
    while True:
        texts = {}
        for target in json.loads(sd.read_text())[0]["targets"]:
            try:
                texts[target] = httpx.get(f"http://{target}/metrics", timeout=10).text
            except httpx.HTTPError:
                texts[target] = ""
        ray_text = "\n".join(texts.values())
        if wanted <= scrape_names(ray_text) or time.monotonic() > deadline:
            break
        time.sleep(3)
    exporter_text = httpx.get(prom["exporter"], timeout=60).text
    _SHARED["scrape"] = {"ray": ray_text, "exporter": exporter_text, "prometheus": prom,
                         "pipeline": pipeline, "settings": stack,
                         "names": scrape_names(ray_text) | scrape_names(exporter_text)}
    yield _SHARED["scrape"]
    subprocess.run([sys.executable, "-c", PROBE, "delete"], capture_output=True, timeout=120, cwd=REPO)
    run_cli("monitor", "prometheus", "stop")
