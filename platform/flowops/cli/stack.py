"""`flowops up | status | down`: the embedded stack."""

from __future__ import annotations

import typer

from flowops import stack
from flowops.cli._common import console, err_console, print_json, settings
from flowops.errors import ClusterUnavailable


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("status")(status)
    app.command("down")(down)


def up(
    num_cpus: int = typer.Option(None, "--num-cpus", min=1, help="CPUs to offer Ray."),
    num_gpus: int = typer.Option(None, "--num-gpus", min=0, help="GPUs to offer Ray."),
    dashboard_port: int = typer.Option(None, help="Dashboard / job API port (default 8265)."),
    ray_port: int = typer.Option(None, help="Ray GCS port (default 6380)."),
    client_port: int = typer.Option(None, help="Ray Client port (default 10001)."),
    serve_port: int = typer.Option(None, help="Serve HTTP port (default 8000)."),
    metrics_port: int = typer.Option(None, help="Ray metrics export port (default 8090)."),
    mlflow_port: int = typer.Option(None, help="MLflow server (tracking API and UI) port (default 5000)."),
    with_prometheus: bool = typer.Option(
        False, "--with-prometheus", help="Also start a Prometheus on loopback (needs `prometheus`)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Start the embedded stack: Ray head (+ Serve), MLflow server, data workspace. Idempotent."""
    cfg = settings(
        num_cpus=num_cpus, num_gpus=num_gpus, dashboard_port=dashboard_port, ray_port=ray_port,
        client_port=client_port, serve_port=serve_port, metrics_port=metrics_port,
        mlflow_port=mlflow_port,
    )
    with err_console.status("starting the FlowOps stack…"):
        if with_prometheus:
            from flowops import observability

            result = observability.up_with_prometheus(cfg)
        else:
            result = stack.up(cfg)
    if as_json:
        print_json(result.__dict__ | {"status": stack.status(cfg)})
        return
    for name in result.repaired:
        console.print(f"[yellow]repaired[/yellow] {name} (its recorded processes had died)")
    for name in result.started:
        console.print(f"[green]started[/green] {name}")
    for name in result.already_running:
        console.print(f"[dim]already running[/dim] {name}")
    _print_addresses(cfg)


def _print_addresses(cfg) -> None:
    from flowops import statedb

    console.print(f"Ray dashboard / job API : {cfg.job_api}")
    console.print(f"Ray Client              : {cfg.client_address}")
    console.print(f"Serve HTTP              : {cfg.serve_url}")
    console.print(f"MLflow (tracking + UI)  : {cfg.tracking_uri}")
    console.print(f"State database          : {statedb.masked(statedb.state_url(cfg))}")
    console.print(f"Data workspace          : {cfg.workspace}  (remote {cfg.remote})")
    console.print(f"Ray token               : {cfg.token_path}")


def status(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Health and addresses of each component. Exit 5 when something is unhealthy."""
    cfg = settings()
    report = stack.status(cfg)
    if as_json:
        print_json(report)
    else:
        for name in ("ray", "serve", "mlflow", "workspace"):
            part = report[name]
            mark = "[green]healthy[/green]" if part["healthy"] else "[red]down[/red]"
            where = (part.get("dashboard") or part.get("url") or part.get("ui")
                     or part.get("tracking_uri") or part.get("path"))
            if name == "mlflow" and part.get("ui"):
                where = f"{where}  (UI and tracking API)"
            console.print(f"{name:<10} {mark:<28} {where}")
        ws = report["workspace"]
        if ws.get("healthy"):
            console.print(f"{'':<10} data versions: {ws.get('versions', 0)}, latest {ws.get('latest')}")
    if not report["healthy"]:
        down = [name for name, part in report.items() if isinstance(part, dict)
                and part.get("healthy") is False]
        raise ClusterUnavailable(f"unhealthy: {', '.join(down) or 'the stack'} (start it with "
                                 f"`flowops up`)")


def down(as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Stop what `up` started. All data (MLflow, workspace, DVC remote) is kept."""
    cfg = settings()
    stopped = stack.down(cfg)
    if as_json:
        print_json({"stopped": stopped})
    elif stopped:
        console.print(f"stopped: {', '.join(stopped)} (data kept in {cfg.home})")
    else:
        console.print("nothing was running")
