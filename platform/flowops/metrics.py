"""Platform metrics for Prometheus, and the loopback Prometheus of the embedded stack.

The CLI is short-lived, so a counter kept in it could never be scraped. The **exporter** instead
computes every platform metric at scrape time from durable state:

- the Ray job API (`flowops.jobs.list_jobs`): jobs submitted / failed / running and their durations
  by workload;
- pipeline records (`flowops.jobs.list_pipelines`): runs by status, step durations, whether the
  latest run of a pipeline failed;
- the label inbox (`flowops.labels.counts`): new and total labels, age of the oldest new label;
- loop events, JSON lines `<home>/loop/events.jsonl`, one object per line
  `{"ts": <unix s>, "event": "retrain_triggered|rolled_back|promoted|drift_detected|...",
  "version": "<model version>", ...}` (written by the loop and by the drift monitor; optional);
- job events that `record_job_event` appends to `<home>/metrics/job_events.jsonl`
  (`{"ts", "event": "submitted|failed|finished", "workload", "duration_s"}`);
- the latest drift report `<home>/drift/latest.json` (written by `flowops.drift`);
- the classifier app's routing (`flowops.serving.routing_status`): canary weight and versions.

Each source that cannot be read is reported by `flowops_exporter_source_up{source} 0` instead of
failing the scrape. The exporter runs as a detached Ray actor (`start_exporter`), so it lives and
dies with the cluster (`flowops down` stops it with Ray), and Prometheus scrapes it beside Ray's own
metrics endpoints (`start_prometheus`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowops.errors import ClusterUnavailable, Conflict, InvalidInput
from flowops.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = PROJECT_ROOT / "cluster" / "monitoring" / "rules.yaml"
EXPORTER_ACTOR = "flowops-metrics-exporter"
EXPORTER_NAMESPACE = "flowops"
LOOP_EVENTS = ("retrain_triggered", "rolled_back", "promoted", "drift_detected")
JOB_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
PROMETHEUS_READY_TIMEOUT_S = 30


class MonitorSettings(BaseSettings):
    """Ports and intervals of the observability stage (env FLOWOPS_EXPORTER_PORT, ...)."""

    model_config = SettingsConfigDict(env_prefix="FLOWOPS_", extra="ignore")

    exporter_port: int = Field(8091, ge=1024, le=65535, description="Port of the platform exporter.")
    exporter_host: str = Field("127.0.0.1", description="Interface the exporter listens on "
                               "(0.0.0.0 in a Kubernetes pod, so Prometheus can reach it).")
    prometheus_port: int = Field(9090, ge=1024, le=65535, description="Port of the loopback Prometheus.")
    scrape_interval_s: int = Field(5, ge=1, le=300, description="Prometheus scrape interval.")


def monitor_settings(**overrides: Any) -> MonitorSettings:
    return MonitorSettings(**{k: v for k, v in overrides.items() if v is not None})


# Durable event files -------------------------------------------------------------------------------


def job_events_path(settings: Settings) -> Path:
    return settings.home / "metrics" / "job_events.jsonl"


def loop_events_path(settings: Settings) -> Path:
    return settings.home / "loop" / "events.jsonl"


def drift_latest_path(settings: Settings) -> Path:
    return settings.home / "drift" / "latest.json"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write (O_APPEND): concurrent writers do not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a torn or malformed line is skipped, a missing file is empty."""
    try:
        with open(path) as fh:
            for line in fh:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        yield record
    except FileNotFoundError:
        return


def record_job_event(event: str, workload: str, duration_s: float | None = None) -> None:
    """Note a job event (called by flowops.jobs). Cheap, and never raises: metrics must not break jobs."""
    try:
        from flowops.settings import get_settings

        append_jsonl(
            job_events_path(get_settings()),
            {"ts": round(time.time(), 3), "event": str(event), "workload": str(workload),
             "duration_s": duration_s},
        )
    except Exception:  # noqa: BLE001 - best effort by contract
        pass


def record_loop_event(event: str, value: float | None = None) -> None:
    """Hook the loop calls (flowops.loop). A no-op on purpose: the loop's own event log
    (<home>/loop/events.jsonl) is durable and already read by the exporter, so counting here too
    would count twice."""


# The collector ---------------------------------------------------------------------------------------


class PlatformCollector:
    """A prometheus_client collector that reads the platform's durable state on every scrape."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "flowops_exporter_source_up", "Whether a platform state source was readable (1) or not (0).",
            labels=["source"],
        )
        for source, fn in (
            ("jobs", self._jobs), ("pipelines", self._pipelines), ("labels", self._labels),
            ("loop_events", self._loop_events), ("job_events", self._job_events),
            ("drift", self._drift), ("serving", self._serving),
        ):
            try:
                families = list(fn())
            except Exception:  # noqa: BLE001 - one broken source must not hide the others
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    # Each source yields metric families -------------------------------------------------------

    def _jobs(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from flowops import jobs

        submitted, failed = Counter(), Counter()
        by_status: Counter = Counter()
        durations: dict[str, list[float]] = defaultdict(list)
        for job in jobs.list_jobs(self.settings):
            submitted[job.workload] += 1
            by_status[(job.workload, job.status)] += 1
            if job.status == "FAILED":
                failed[job.workload] += 1
            if job.status in jobs.TERMINAL and job.start_time and job.end_time:
                durations[job.workload].append(job.end_time - job.start_time)
        sub = CounterMetricFamily(
            "flowops_jobs_submitted", "Ray jobs submitted, by workload.", labels=["workload"]
        )
        fail = CounterMetricFamily(
            "flowops_jobs_failed", "Ray jobs that failed, by workload.", labels=["workload"]
        )
        for workload in sorted(submitted):
            sub.add_metric([workload], submitted[workload])
            fail.add_metric([workload], failed[workload])
        status = GaugeMetricFamily(
            "flowops_jobs", "Ray jobs known to the job API, by workload and status.",
            labels=["workload", "status"],
        )
        for (workload, state), n in sorted(by_status.items()):
            status.add_metric([workload, state], n)
        hist = HistogramMetricFamily(
            "flowops_job_duration_seconds", "Run time of finished Ray jobs, by workload.",
            labels=["workload"],
        )
        for workload, values in sorted(durations.items()):
            buckets, total = _buckets(values, JOB_BUCKETS)
            hist.add_metric([workload], buckets, total)
        yield from (sub, fail, status, hist)

    def _pipelines(self):
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        from flowops import jobs

        runs: Counter = Counter()
        latest: dict[str, Any] = {}
        steps: dict[tuple[str, str], list[float]] = defaultdict(list)
        last_failure: dict[str, float] = {}
        for run in jobs.list_pipelines(self.settings):
            runs[(run.name, run.status)] += 1
            latest[run.name] = run  # sorted by creation: the last one wins
            if run.status == "FAILED":
                last_failure[run.name] = max(last_failure.get(run.name, 0), run.ended or run.created)
            for step in run.steps:
                if step.started and step.ended:
                    steps[(run.name, step.name)].append(step.ended - step.started)
        count = GaugeMetricFamily(
            "flowops_pipeline_runs", "Pipeline runs by pipeline name and status.",
            labels=["pipeline", "status"],
        )
        for (name, state), n in sorted(runs.items()):
            count.add_metric([name, state], n)
        failed = GaugeMetricFamily(
            "flowops_pipeline_last_run_failed",
            "1 when the most recent run of a pipeline failed, else 0.", labels=["pipeline"],
        )
        running = GaugeMetricFamily(
            "flowops_pipeline_running", "1 while the most recent run of a pipeline runs.",
            labels=["pipeline"],
        )
        for name, run in sorted(latest.items()):
            failed.add_metric([name], 1 if run.status == "FAILED" else 0)
            running.add_metric([name], 1 if run.status == "RUNNING" else 0)
        failure_ts = GaugeMetricFamily(
            "flowops_pipeline_last_failure_timestamp_seconds",
            "When a pipeline last failed (unix seconds).", labels=["pipeline"],
        )
        for name, ts in sorted(last_failure.items()):
            failure_ts.add_metric([name], ts)
        hist = HistogramMetricFamily(
            "flowops_pipeline_step_duration_seconds", "Run time of pipeline steps.",
            labels=["pipeline", "step"],
        )
        for (name, step), values in sorted(steps.items()):
            buckets, total = _buckets(values, JOB_BUCKETS)
            hist.add_metric([name, step], buckets, total)
        yield from (count, failed, running, failure_ts, hist)

    def _labels(self):
        from prometheus_client.core import GaugeMetricFamily

        from flowops import labels

        counts = labels.counts(self.settings)
        inbox = GaugeMetricFamily(
            "flowops_label_inbox", "Labels in the inbox: new (not yet in a data version) and total.",
            labels=["state"],
        )
        inbox.add_metric(["new"], counts["new"])
        inbox.add_metric(["total"], counts["total"])
        age = GaugeMetricFamily(
            "flowops_label_inbox_oldest_new_age_seconds", "Age of the oldest new label (0 if none)."
        )
        age.add_metric([], counts["oldest_new_age_s"] or 0)
        yield from (inbox, age)

    def _loop_events(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts: Counter = Counter({event: 0 for event in LOOP_EVENTS})
        last: dict[str, float] = {}
        for record in read_jsonl(loop_events_path(self.settings)):
            event = str(record.get("event", ""))
            if not event:
                continue
            counts[event] += 1
            with contextlib.suppress(TypeError, ValueError):
                last[event] = max(last.get(event, 0.0), float(record.get("ts", 0)))
        total = CounterMetricFamily(
            "flowops_loop_events", "Loop events: retrain triggers, promotions, rollbacks, drift.",
            labels=["event"],
        )
        for event, n in sorted(counts.items()):
            total.add_metric([event], n)
        ts = GaugeMetricFamily(
            "flowops_loop_last_event_timestamp_seconds", "When each loop event last happened.",
            labels=["event"],
        )
        for event, value in sorted(last.items()):
            ts.add_metric([event], value)
        yield from (total, ts)

    def _job_events(self):
        from prometheus_client.core import CounterMetricFamily

        counts: Counter = Counter()
        for record in read_jsonl(job_events_path(self.settings)):
            counts[(str(record.get("event", "")), str(record.get("workload", "")))] += 1
        fam = CounterMetricFamily(
            "flowops_job_events", "Job events seen by FlowOps clients (submitted, finished, failed).",
            labels=["event", "workload"],
        )
        for (event, workload), n in sorted(counts.items()):
            fam.add_metric([event, workload], n)
        yield fam

    def _drift(self):
        from prometheus_client.core import GaugeMetricFamily

        path = drift_latest_path(self.settings)
        if not path.exists():
            return
        report = json.loads(path.read_text())
        version = str(report.get("model_version") or "")
        labels = ["model_version"]
        simple = {
            "flowops_drift_score": ("Largest KS statistic over the monitored features.", "score"),
            "flowops_drift_detected": ("1 when the latest window drifted, else 0.", "drifted"),
            "flowops_drift_min_adjusted_p_value": (
                "Smallest multiple-testing-adjusted p-value of the feature tests.", "min_p_adjusted"),
            "flowops_drift_class_psi": ("PSI of the predicted-class distribution.", "class_psi"),
            "flowops_drift_class_p_value": ("Chi-square p-value of the predicted classes.", "class_p"),
            "flowops_drift_window_size": ("Images in the latest window.", "n"),
            "flowops_drift_last_check_timestamp_seconds": ("When the latest window was checked.", "ts"),
        }
        for name, (doc, key) in simple.items():
            fam = GaugeMetricFamily(name, doc, labels=labels)
            value = report.get(key)
            if value is not None:
                fam.add_metric([version], float(value))
            yield fam
        feat = GaugeMetricFamily(
            "flowops_drift_feature_statistic", "KS statistic per monitored feature.",
            labels=["model_version", "feature"],
        )
        for item in report.get("features", []):
            feat.add_metric([version, str(item["name"])], float(item["statistic"]))
        yield feat

    def _serving(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            from flowops import serving
        except ImportError:
            return
        status = serving.routing_status(self.settings)
        weight = GaugeMetricFamily(
            "flowops_canary_weight_percent", "Percent of live traffic sent to the canary version."
        )
        canary = status.get("canary_version") or status.get("canary")
        weight.add_metric([], float(status.get("weight") or 0) if canary else 0.0)
        info = GaugeMetricFamily(
            "flowops_serving_version_info", "Model versions the classifier app serves, by role.",
            labels=["role", "version"],
        )
        stable = status.get("stable_version") or status.get("stable")
        for role, version in (("stable", stable), ("canary", canary)):
            if version:
                info.add_metric([role, str(version)], 1)
        yield from (weight, info)


def _buckets(values: list[float], bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative histogram buckets (prometheus_client's HistogramMetricFamily format) and the sum."""
    out = [(str(float(b)), float(sum(1 for v in values if v <= b))) for b in bounds]
    out.append(("+Inf", float(len(values))))
    return out, float(sum(values))


def render_metrics(settings: Settings) -> str:
    """The exporter's exposition text now (what a scrape returns)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(PlatformCollector(settings))
    return generate_latest(registry).decode()


def serve_exporter(settings: Settings, port: int, host: str = "127.0.0.1"):
    """Serve the platform metrics over HTTP in a background thread of this process."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(PlatformCollector(settings))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise Conflict(f"exporter port {port} is not free ({exc}); set FLOWOPS_EXPORTER_PORT") from None


def _exporter_actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class MetricsExporter:
        """Holds the exporter's HTTP server; detached, so it lives as long as the cluster."""

        def __init__(self, settings_json: str, port: int, host: str):
            settings = Settings.model_validate_json(settings_json)
            self.port = port
            self.server = serve_exporter(settings, port, host)

        def address(self) -> dict[str, Any]:
            return {"port": self.port, "pid": os.getpid()}

    return MetricsExporter


def _exporter_driver(settings: Settings):
    """This process connected (with the token) to the cluster that hosts the exporter actor."""
    from flowops.ray_client import apply_ray_auth_env, require_cluster

    require_cluster(settings)
    apply_ray_auth_env(settings)
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.gcs_address, namespace=EXPORTER_NAMESPACE,
                 logging_level="ERROR", log_to_driver=False)
    return ray


def start_exporter(settings: Settings, port: int | None = None, host: str | None = None) -> dict:
    """Start the platform exporter as a detached Ray actor (a no-op when it already runs)."""
    mon = monitor_settings()
    port, host = port or mon.exporter_port, host or mon.exporter_host
    ray = _exporter_driver(settings)
    try:
        actor = ray.get_actor(EXPORTER_ACTOR, namespace=EXPORTER_NAMESPACE)
    except ValueError:
        from flowops.ray_client import port_in_use

        if port_in_use(port, host):
            raise Conflict(f"exporter port {port} is already in use; set FLOWOPS_EXPORTER_PORT") from None
        actor = _exporter_actor_class().options(
            name=EXPORTER_ACTOR, namespace=EXPORTER_NAMESPACE, lifetime="detached",
            get_if_exists=True,
        ).remote(settings.model_dump_json(), port, host)
    try:
        address = ray.get(actor.address.remote(), timeout=60)
    except Exception as exc:  # noqa: BLE001 - the actor's constructor error, as one line
        with contextlib.suppress(Exception):
            ray.kill(actor)
        raise ClusterUnavailable(f"the metrics exporter did not start: {str(exc).splitlines()[-1]}") from None
    return {"url": f"http://{host}:{address['port']}/metrics", **address}


def stop_exporter(settings: Settings) -> bool:
    """Kill the exporter actor; False when none ran."""
    ray = _exporter_driver(settings)
    try:
        actor = ray.get_actor(EXPORTER_ACTOR, namespace=EXPORTER_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


# The loopback Prometheus -------------------------------------------------------------------------------


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


def prometheus_url(settings: Settings) -> str | None:
    from flowops.stack import read_state

    entry = read_state(settings).get("prometheus")
    return entry.get("url") if entry else None


def start_prometheus(settings: Settings, port: int | None = None) -> dict[str, Any]:
    """Start the exporter and a Prometheus on loopback that scrapes Ray and the platform.

    Idempotent. The session id goes to the state file under "prometheus" so `flowops down` stops it.
    """
    import httpx

    from flowops.ray_client import kill_session, port_in_use, session_processes
    from flowops.stack import read_state, write_state

    binary = shutil.which("prometheus")
    if binary is None:
        raise InvalidInput(
            "the `prometheus` binary is not installed; install it (Debian/Ubuntu: "
            "`apt-get install prometheus`, or `make tools`) or leave out --with-prometheus"
        )
    mon = monitor_settings(prometheus_port=port)
    exporter = start_exporter(settings, mon.exporter_port)
    state = read_state(settings)
    entry = state.get("prometheus")
    if entry and session_processes(entry["sid"]):
        return {**entry, "exporter": exporter["url"], "already_running": True}
    if port_in_use(mon.prometheus_port):
        raise Conflict(
            f"Prometheus port {mon.prometheus_port} is already in use; set FLOWOPS_PROMETHEUS_PORT"
        )
    folder = settings.home / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "prometheus.yml"
    config = prometheus_config(settings, mon.exporter_port, mon.scrape_interval_s)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    url = f"http://127.0.0.1:{mon.prometheus_port}"
    cmd = [
        binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{mon.prometheus_port}", "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=7d",
    ]
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.logs_dir / "prometheus.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    entry = {"sid": proc.pid, "url": url, "port": mon.prometheus_port, "config": str(config_path),
             "started_at": time.time()}
    state = read_state(settings)
    state["prometheus"] = entry
    write_state(settings, state)
    deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return {**entry, "exporter": exporter["url"], "already_running": False}
        time.sleep(0.5)
    kill_session(proc.pid, grace_s=2)
    state = read_state(settings)
    state.pop("prometheus", None)
    write_state(settings, state)
    raise ClusterUnavailable(
        f"Prometheus did not become ready on {url}; see {settings.logs_dir / 'prometheus.log'}"
    )


def stop_prometheus(settings: Settings) -> bool:
    """Stop the Prometheus that start_prometheus started; False when none was recorded."""
    from flowops.ray_client import kill_session
    from flowops.stack import read_state, write_state

    state = read_state(settings)
    entry = state.pop("prometheus", None)
    if not entry:
        return False
    kill_session(entry["sid"], grace_s=5)
    write_state(settings, state)
    return True


def query_prometheus(settings: Settings, promql: str) -> list[dict[str, Any]]:
    """Run an instant query against the loopback Prometheus; the result vector."""
    import httpx

    url = prometheus_url(settings)
    if not url:
        raise ClusterUnavailable(
            "no Prometheus recorded for this home; run `flowops monitor prometheus start`"
        )
    try:
        resp = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    except httpx.HTTPError as exc:
        raise ClusterUnavailable(f"Prometheus at {url} does not answer: {exc}") from None
    body = resp.json()
    if body.get("status") != "success":
        raise InvalidInput(f"query {promql!r} failed: {body.get('error')}")
    return body["data"]["result"]


# Alert rules as a PrometheusRule ------------------------------------------------------------------------


PROMETHEUS_RULE_FILE = PROJECT_ROOT / "cluster" / "monitoring" / "prometheus-rule.flowops.yaml"


def render_prometheus_rule(rules_file: Path = RULES_FILE) -> str:
    """The PrometheusRule (prometheus-operator) that carries exactly the groups of rules.yaml."""
    try:
        groups = yaml.safe_load(rules_file.read_text())["groups"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"{rules_file} is not a Prometheus rules file with `groups`: {exc}") from None
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "flowops-alerts", "labels": {"release": "prometheus"}},
        "spec": {"groups": groups},
    }
    header = (
        "# GENERATED from cluster/monitoring/rules.yaml by `flowops monitor rules`; do not edit.\n"
        "# The same rules run on the embedded stack's Prometheus and are unit-tested with\n"
        "# `promtool test rules cluster/monitoring/rules_test.yaml`.\n"
    )
    return header + yaml.dump(resource, Dumper=_BlockDumper, sort_keys=False, width=1000)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as `|` blocks, as they are written in rules.yaml."""


def _str_block(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_block)


def write_prometheus_rule(path: Path = PROMETHEUS_RULE_FILE, rules_file: Path = RULES_FILE) -> Path:
    from flowops.durable import atomic_write_text

    atomic_write_text(path, render_prometheus_rule(rules_file))
    return path
