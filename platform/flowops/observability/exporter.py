"""The platform exporter: every `flowops_*` metric, computed at scrape time from durable state.

The CLI is short-lived, so a counter kept in it could never be scraped. The exporter instead reads,
on every scrape:

- the Ray job API (`flowops.jobs.list_jobs`): jobs submitted / failed / running and their durations
  by workload;
- pipeline records (`flowops.jobs.list_pipelines`): runs by status, step durations, whether the
  latest run of a pipeline failed;
- the label inbox (`flowops.labels.counts`): new and total labels, age of the oldest new label;
- the event log (`flowops.events`): retrain triggers, promotions, rollbacks, drift;
- the job event log (`flowops.job_events`);
- the latest drift report (`flowops.drift.latest_report`);
- the classifier app's routing (`flowops.serving.routing_status`): canary weight and versions.

Each source that cannot be read is reported by `flowops_exporter_source_up{source} 0` instead of
failing the scrape. The exporter runs as a detached Ray actor (`start_exporter`), so it lives and
dies with the cluster (`flowops down` stops it with Ray).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import Counter, defaultdict
from typing import Any

from flowops import drift, events, jobs, labels, serving
from flowops.errors import ClusterUnavailable, Conflict, NotFound
from flowops.job_events import read_job_events
from flowops.ray_client import connect, port_in_use
from flowops.settings import WILDCARD_HOSTS, Settings, url_host

EXPORTER_ACTOR = "flowops-metrics-exporter"
EXPORTER_NAMESPACE = "flowops"
LOOP_EVENTS = ("retrain_triggered", "rolled_back", "promoted", "drift_detected")
JOB_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
PORT_HINT = "set FLOWOPS_MONITOR_EXPORTER_PORT"
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node


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
        for record in events.read_events(self.settings):
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
        for record in read_job_events(self.settings):
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

        try:
            report = drift.latest_report(self.settings)
        except NotFound:
            return
        version = str(report.get("model_version") or "")
        label_names = ["model_version"]
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
            fam = GaugeMetricFamily(name, doc, labels=label_names)
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


def _registry(settings: Settings):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(PlatformCollector(settings))
    return registry


def render_metrics(settings: Settings) -> str:
    """The exporter's exposition text now (what a scrape returns)."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(settings)).decode()


def serve_exporter(settings: Settings, port: int, host: str = "127.0.0.1"):
    """Serve the platform metrics over HTTP in a background thread of this process."""
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=host, registry=_registry(settings))
    except OSError as exc:
        raise Conflict(f"exporter port {port} is not free ({exc}); {PORT_HINT}") from None


def run_exporter(settings: Settings, port: int | None = None, host: str | None = None) -> None:
    """Serve the platform metrics in the foreground until SIGTERM or Ctrl-C: the exporter as a
    container's own process (cluster/base/deployment.exporter.yaml), needing no Ray driver."""
    server, thread = serve_exporter(settings, port or settings.monitor.exporter_port,
                                    host or settings.monitor.exporter_host)
    # shutdown() waits for the serving thread's loop to end, so it runs in a thread of its own.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


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


def start_exporter(settings: Settings, port: int | None = None, host: str | None = None) -> dict:
    """Start the platform exporter as a detached Ray actor (a no-op when it already runs).

    Port and interface default to `settings.monitor` (0.0.0.0 in a pod, so Prometheus reaches it).
    It runs on the head node, where the URL (and Prometheus' scrape target) says it is, whichever
    node the starting driver is on.
    """
    port = port or settings.monitor.exporter_port
    host = host or settings.monitor.exporter_host
    ray = connect(settings, namespace=EXPORTER_NAMESPACE)
    try:
        actor = ray.get_actor(EXPORTER_ACTOR, namespace=EXPORTER_NAMESPACE)
    except ValueError:
        if port_in_use(port, host):
            raise Conflict(f"exporter port {port} is already in use; {PORT_HINT}") from None
        actor = _exporter_actor_class().options(
            name=EXPORTER_ACTOR, namespace=EXPORTER_NAMESPACE, lifetime="detached",
            get_if_exists=True, resources={HEAD_NODE: 0.001},
        ).remote(settings.model_dump_json(), port, host)
    try:
        address = ray.get(actor.address.remote(), timeout=60)
    except Exception as exc:  # noqa: BLE001 - the actor's constructor error, as one line
        with contextlib.suppress(Exception):
            ray.kill(actor)
        raise ClusterUnavailable(f"the metrics exporter did not start: {str(exc).splitlines()[-1]}") from None
    shown = settings.head_host if host in WILDCARD_HOSTS else host
    return {"url": f"http://{url_host(shown)}:{address['port']}/metrics", **address}


def stop_exporter(settings: Settings) -> bool:
    """Kill the exporter actor; False when none ran."""
    ray = connect(settings, namespace=EXPORTER_NAMESPACE)
    try:
        actor = ray.get_actor(EXPORTER_ACTOR, namespace=EXPORTER_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True
