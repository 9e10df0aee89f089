"""`flowops jobs submit | list | status | logs | stop | pipelines`: the job submission layer."""

from __future__ import annotations

import datetime as dt

import typer
from rich.table import Table

from flowops import jobs
from flowops.cli._common import (
    console,
    err_console,
    log_printer,
    print_json,
    settings,
    submit_and_follow,
)
from flowops.errors import JobFailed

jobs_app = typer.Typer(help="Ray jobs: every workload runs as one.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@jobs_app.command(
    "submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def submit(
    ctx: typer.Context,
    workload: str = typer.Argument(..., help="An entrypoint of jobs/ (e.g. data_check, train)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return after submitting."),
    num_cpus: float = typer.Option(0, "--entrypoint-num-cpus", help="CPUs reserved for the driver."),
    as_json: bool = typer.Option(False, "--json", help="Print the job id, status and (when waited "
                                 "for) its result as JSON; logs go to stderr."),
) -> None:
    """Submit WORKLOAD [-- --config '<JSON>' | -- --config @file.json] as a Ray job; waits and
    streams its logs unless --no-wait. Without --config the workload runs with its defaults.
    Exits 7 when the job fails."""
    from flowops.entrypoint import config_arg

    submit_and_follow(settings(), workload, config_arg(list(ctx.args)), no_wait=no_wait,
                      as_json=as_json, entrypoint_num_cpus=num_cpus)


@jobs_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the cluster's jobs."""
    found = jobs.list_jobs(settings())
    if as_json:
        print_json([j.to_dict() for j in found])
        return
    table = Table("id", "workload", "status", "started", "duration s")
    for j in found:
        table.add_row(j.id, j.workload, j.status, _when(j.start_time), str(j.duration_s or "-"))
    console.print(table)


@jobs_app.command("status")
def status(
    job_id: str = typer.Argument(..., help="The job's submission id."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Status of one job."""
    j = jobs.info(settings(), job_id)
    if as_json:
        print_json(j.to_dict())
        return
    console.print(f"{j.id}  {j.workload}  {j.status}  {j.duration_s or '-'}s  {j.message}")


@jobs_app.command("logs")
def logs(
    job_id: str = typer.Argument(..., help="The job's submission id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends and exit "
                                "with its outcome: 0 if it SUCCEEDED, 7 if it FAILED or was STOPPED."),
) -> None:
    """Print a job's logs (--follow streams them until the job ends)."""
    cfg = settings()
    if not follow:
        log_printer()(jobs.logs(cfg, job_id))
        return
    job = jobs.wait(cfg, job_id, on_log=log_printer())
    if job.status != "SUCCEEDED":
        raise JobFailed(jobs.failure_message(cfg, job))
    err_console.print(f"job {job_id} ({job.workload}) SUCCEEDED in {job.duration_s}s")


@jobs_app.command("stop")
def stop(
    job_id: str = typer.Argument(..., help="The job's submission id."),
    as_json: bool = typer.Option(False, "--json", help="Print the job id and status as JSON."),
) -> None:
    """Stop a running job."""
    cfg = settings()
    stopped = jobs.stop(cfg, job_id)
    if as_json:
        print_json({**jobs.outcome(cfg, jobs.info(cfg, job_id)), "stop_requested": stopped})
        return
    console.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@jobs_app.command("pipelines")
def pipelines(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Pipeline runs (ordered jobs) recorded in the home folder."""
    runs = jobs.list_pipelines(settings())
    if as_json:
        print_json([r.to_dict() for r in runs])
        return
    if not runs:
        console.print("no pipeline run yet")
    for r in runs:
        console.print(f"[bold]{r.id}[/bold]  {r.name}  {r.status}  created {_when(r.created)}")
        for s in r.steps:
            took = f"{s.ended - s.started:.1f}s" if s.started and s.ended else "-"
            console.print(f"   {s.name:<14} {s.status:<10} {s.job_id or '-':<48} {took}")
        if r.message:
            console.print(f"   {r.message}")
