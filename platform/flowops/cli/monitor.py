"""`flowops monitor drift | rules | metrics | exporter | prometheus`: observability."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from flowops.cli._common import console, err_console, log_printer, notes, print_json, settings
from flowops.errors import GateFailed, InvalidInput, JobFailed

monitor_app = typer.Typer(help="Metrics, alert rules, Prometheus and drift detection.",
                          no_args_is_help=True)
prometheus_app = typer.Typer(help="The loopback Prometheus of the embedded stack.", no_args_is_help=True)
exporter_app = typer.Typer(help="The platform metrics exporter (a detached Ray actor, or in the "
                           "foreground: `run`).",
                           no_args_is_help=True)


def register(app: typer.Typer) -> None:
    monitor_app.add_typer(prometheus_app, name="prometheus")
    monitor_app.add_typer(exporter_app, name="exporter")
    app.add_typer(monitor_app, name="monitor")


@monitor_app.command("drift")
def drift(
    window: str = typer.Option(None, "--window", help="Window of live inputs: .npy (N,S,S) or "
                               ".parquet, a file or a storage URI (default: the newest window the "
                               "serving app wrote)."),
    watch: bool = typer.Option(False, "--watch", help="Start the scheduled monitor: a Ray job that "
                               "checks each new live-input window the serving app writes."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between polls (--watch)."),
    model: str = typer.Option(None, "--model", help="Model URI (default models:/<name>@production)."),
    data_version: str = typer.Option(None, "--data-version", help="Reference data version "
                                     "(default: the model's training data, else the latest)."),
    alpha: float = typer.Option(0.01, help="Family-wise level of the per-feature KS tests."),
    correction: str = typer.Option("bonferroni", help="Multiple-testing correction: bonferroni or bh."),
    class_test: str = typer.Option("chi2", help="Test of the predicted classes: chi2 or psi."),
    no_trigger: bool = typer.Option(False, "--no-trigger", help="Do not emit drift_detected to the loop."),
    persist: int = typer.Option(2, "--persist", help="Consecutive drifted windows before the loop "
                                "is told (drift_detected)."),
    as_job: bool = typer.Option(False, "--as-job", help="Run it as a Ray job (jobs/drift_monitor.py)."),
    fail_on_drift: bool = typer.Option(False, "--fail-on-drift", help="Exit non-zero when drifted."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a window of live inputs for drift against the model's training data."""
    from flowops import drift as drift_mod
    from flowops import jobs
    from flowops.drift_monitor import DriftMonitorConfig, run_drift_check

    cfg = settings()
    config = drift_mod.make_config(alpha=alpha, correction=correction, class_test=class_test,
                                   persist=persist)
    common = {"model_uri": model, "data_version": data_version, "drift": config,
              "trigger": not no_trigger}
    if watch:
        if window is not None:
            raise InvalidInput("--watch checks the serving app's windows; it takes no --window")
        if interval <= 0:
            raise InvalidInput(f"--interval must be > 0 seconds, got {interval}")
        job_config = DriftMonitorConfig(watch=drift_mod.windows_location(cfg), interval_s=interval,
                                        **common)
        job_id = jobs.submit(cfg, "drift_monitor", job_config)
        if as_json:
            print_json(jobs.outcome(cfg, jobs.info(cfg, job_id)))
            return
        console.print(f"drift monitor running as Ray job [bold]{job_id}[/bold] (every {interval:g} s "
                      f"over {drift_mod.windows_location(cfg)}); stop it with `flowops jobs stop {job_id}`")
        return
    window = window or drift_mod.newest_window(cfg)
    if "://" not in window:
        window = str(Path(window).resolve())  # a job may run in another folder
    job = None
    if as_job:
        job_id = jobs.submit(cfg, "drift_monitor", DriftMonitorConfig(window=window, **common))
        notes(as_json).print(f"submitted [bold]{job_id}[/bold]")
        job = jobs.wait(cfg, job_id, on_log=log_printer(sys.stderr if as_json else None))
        if job.status != "SUCCEEDED":
            if as_json:
                print_json(jobs.outcome(cfg, job))
            raise JobFailed(jobs.failure_message(cfg, job))
        report = drift_mod.latest_report(cfg)
    else:
        with err_console.status(f"checking {window.rsplit('/', 1)[-1]} for drift…"):
            report = run_drift_check(cfg, window, model_uri=model, data_version=data_version,
                                     config=config, trigger=not no_trigger).to_dict()
    if as_json:
        # The report, plus which job made it when it ran as one.
        print_json({**jobs.outcome(cfg, job), **report} if job else report)
    else:
        mark = "[red]DRIFT[/red]" if report["drifted"] else "[green]no drift[/green]"
        console.print(f"{mark}  score {report['score']:.3f}  window {report['n']} images  "
                      f"model v{report['model_version']} vs data {report['data_version']}")
        if report["drifted_features"]:
            console.print(f"drifted features: {', '.join(report['drifted_features'])}")
        if report.get("class_p") is not None:
            console.print(f"predicted classes: chi2 p={report['class_p']:.4f} psi={report['class_psi']:.3f}")
    if fail_on_drift and report["drifted"]:
        raise GateFailed(f"window {window} drifted (score {report['score']:.3f})")


@monitor_app.command("rules")
def rules(
    check: bool = typer.Option(False, "--check", help="Only verify the committed PrometheusRule is current."),
) -> None:
    """Regenerate cluster/monitoring/prometheus-rule.flowops.yaml from rules.yaml."""
    from flowops import observability

    if check:
        observability.check_prometheus_rule()
        console.print("PrometheusRule is up to date")
        return
    path = observability.write_prometheus_rule()
    console.print(f"wrote {path}")


@monitor_app.command("metrics")
def show_metrics() -> None:
    """Print the platform metrics as the exporter would serve them now."""
    from flowops import observability

    typer.echo(observability.render_metrics(settings()), nl=False)


@exporter_app.command("start")
def exporter_start(
    port: int = typer.Option(None, help="Exporter port (default FLOWOPS_MONITOR_EXPORTER_PORT or 8091)."),
    host: str = typer.Option(None, help="Interface to listen on (default FLOWOPS_MONITOR_EXPORTER_HOST "
                             "or 127.0.0.1; 0.0.0.0 in a pod)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Start the platform exporter in the cluster (a no-op when it runs)."""
    from flowops import observability

    result = observability.start_exporter(settings(), port, host)
    print_json(result) if as_json else console.print(f"exporter at {result['url']}")


@exporter_app.command("run")
def exporter_run(
    port: int = typer.Option(None, help="Exporter port (default FLOWOPS_MONITOR_EXPORTER_PORT or 8091)."),
    host: str = typer.Option(None, help="Interface to listen on (default FLOWOPS_MONITOR_EXPORTER_HOST "
                             "or 127.0.0.1; 0.0.0.0 in a pod)."),
) -> None:
    """Serve the platform metrics in the foreground until stopped (a container's process on Kubernetes)."""
    from flowops import observability

    observability.run_exporter(settings(), port, host)


@exporter_app.command("stop")
def exporter_stop() -> None:
    """Stop the platform exporter."""
    from flowops import observability

    stopped = observability.stop_exporter(settings())
    console.print("exporter stopped" if stopped else "no exporter was running")


@prometheus_app.command("start")
def prometheus_start(
    port: int = typer.Option(None, help="Prometheus port (default FLOWOPS_MONITOR_PROMETHEUS_PORT or 9090)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Start Prometheus on loopback scraping Ray and the platform (also: flowops up --with-prometheus)."""
    from flowops import observability

    result = observability.start_prometheus(settings(), port)
    if as_json:
        print_json(result)
        return
    state = "already running" if result["already_running"] else "started"
    console.print(f"Prometheus {state} at {result['url']} (exporter {result['exporter']})")


@prometheus_app.command("stop")
def prometheus_stop() -> None:
    """Stop the loopback Prometheus (flowops down does too)."""
    from flowops import observability

    stopped = observability.stop_prometheus(settings())
    console.print("Prometheus stopped" if stopped else "no Prometheus was running")


@prometheus_app.command("query")
def prometheus_query(
    promql: str = typer.Argument(..., help="A PromQL instant query."),
) -> None:
    """Run an instant query against the loopback Prometheus and print the result as JSON."""
    from flowops import observability

    print_json(observability.query_prometheus(settings(), promql))
