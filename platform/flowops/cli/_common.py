"""Helpers shared by the CLI modules: settings, output, JSON, progress, following a job.

The output contract: with `--json` a command prints ONE JSON object on stdout and nothing else;
notes, logs and progress go to stderr. `json_stdout()` (entered by `main()`) guarantees it whatever
a library prints: while it is active fd 1 points at stderr and only `print_json` writes to the real
stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console

from flowops.errors import InvalidInput
from flowops.settings import Settings, get_settings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
_json_out: IO[str] | None = None  # the real stdout while json_stdout() is active


def settings(**overrides: Any) -> Settings:
    return get_settings(**overrides)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def platform_settings(*, state: bool = False, data: bool = False) -> Settings:
    """Settings of a command that reads the platform's shared state (`state`: labels, the loop) or
    its data versions (`data`). Pointed at a cluster on another host (FLOWOPS_RAY_ADDRESS), a state
    database or data repository left to its default is this machine's, in the home folder, not the
    cluster's: a note on stderr says so, so the local home is never silently shown as the
    platform's."""
    cfg = get_settings()
    host = urlsplit(cfg.ray_address).hostname if cfg.ray_address else None
    if not host or host in LOOPBACK:
        return cfg
    if state and not cfg.state_url:
        err_console.print(f"note: the cluster is at {host}, but the state database is this "
                          f"machine's (in {cfg.home}); set FLOWOPS_STATE_URL to the platform's",
                          soft_wrap=True)
    if data and not cfg.data_repo:
        err_console.print(f"note: the cluster is at {host}, but data versions come from this "
                          f"machine's workspace ({cfg.workspace}); set FLOWOPS_DATA_REPO to the "
                          "platform's data repository", soft_wrap=True)
    return cfg


@contextlib.contextmanager
def json_stdout(active: bool = True) -> Iterator[None]:
    """While active, everything written to stdout (by us, Ray, MLflow, subprocesses) lands on
    stderr; `print_json` writes to the real stdout."""
    global _json_out
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _json_out = os.fdopen(os.dup(saved), "w")
    try:
        yield
    finally:
        sys.stdout.flush()
        _json_out.close()
        _json_out = None
        os.dup2(saved, 1)
        os.close(saved)


def print_json(data: Any) -> None:
    out = _json_out or sys.stdout
    out.write(json.dumps(data, indent=2, default=str) + "\n")
    out.flush()


def notes(as_json: bool) -> Console:
    """Where a command's human-readable lines go: stderr when stdout carries JSON."""
    return err_console if as_json else console


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def log_printer(stream: IO[str] | None = None) -> Callable[[str], None]:
    """A callback that streams a job's log text as it arrives (to stdout unless told)."""

    def write(text: str) -> None:
        out = stream or sys.stdout
        out.write(text)
        out.flush()

    return write


def submit_and_follow(cfg: Settings, workload: str, config: Any, *, no_wait: bool = False,
                      as_json: bool = False, **submit_kwargs: Any) -> dict[str, Any]:
    """Submit a workload with its config (a pydantic model, its JSON, or None for defaults) as a
    Ray job, then follow it (`follow_job`)."""
    from flowops import jobs

    job_id = jobs.submit(cfg, workload, config, **submit_kwargs)
    notes(as_json).print(f"submitted [bold]{job_id}[/bold] to {cfg.job_api}")
    return follow_job(cfg, job_id, no_wait=no_wait, as_json=as_json)


def follow_job(cfg: Settings, job_id: str, *, no_wait: bool = False,
               as_json: bool = False) -> dict[str, Any]:
    """Unless no_wait, stream the job's logs (to stderr with --json) until it ends. With --json
    print one object: job id, workload, status (and the job's result when waited for). A job that
    did not succeed raises JobFailed (exit 7) after that object is printed."""
    from flowops import jobs
    from flowops.errors import JobFailed

    if no_wait:
        report = jobs.outcome(cfg, jobs.info(cfg, job_id))
        if as_json:
            print_json(report)
        return report
    job = jobs.wait(cfg, job_id, on_log=log_printer(sys.stderr if as_json else None))
    report = jobs.outcome(cfg, job, with_result=True)
    if as_json:
        print_json(report)
    if job.status != "SUCCEEDED":
        raise JobFailed(jobs.failure_message(cfg, job))
    notes(as_json).print(f"[green]{job_id} SUCCEEDED[/green] in {job.duration_s}s")
    return report


@contextlib.contextmanager
def epoch_progress(what: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar of training epochs on stderr; one plain line per epoch when stderr is
    not a terminal (a log file). Yields the callback that takes each epoch's metrics (`epoch`,
    `epochs`, `train_loss`, `val_accuracy`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def describe(m: dict[str, Any]) -> str:
        parts = [f"{k.replace('_', ' ')} {m[k]:.4f}" for k in ("train_loss", "val_accuracy") if k in m]
        return f"{what}: {', '.join(parts)}" if parts else what

    if not err_console.is_terminal:
        yield lambda m: err_console.print(f"epoch {int(m['epoch']) + 1}/{m.get('epochs', '?')} "
                                          f"{describe(m)}")
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("epochs"), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task(f"{what}: starting", total=None)
        yield lambda m: progress.update(task, completed=int(m["epoch"]) + 1, total=m.get("epochs"),
                                        description=describe(m))


def parse_resources(pairs: list[str]) -> dict[str, str]:
    """`NAME=AMOUNT` pairs (`--resource worker_host=0.01`) -> {name: amount}: custom Ray
    resources that place replicas, actors or workers on the nodes that have them; the
    workload's config checks the amounts."""
    resources = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        if not sep or not name.strip() or not amount.strip():
            raise InvalidInput(f"resource {pair!r} must be NAME=AMOUNT, e.g. worker_host=0.01")
        resources[name.strip()] = amount.strip()
    return resources
