"""Helpers shared by the CLI modules: settings, output, JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from flowops.settings import Settings, get_settings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def settings(**overrides: Any) -> Settings:
    return get_settings(**overrides)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def submit_and_follow(cfg: Settings, workload: str, config: Any, *, no_wait: bool = False,
                      **submit_kwargs: Any) -> str:
    """Submit a workload with its config (a pydantic model, its JSON, or None for defaults) as a
    Ray job; unless no_wait, stream its logs and fail if it failed."""
    from flowops import jobs
    from flowops.errors import JobFailed

    job_id = jobs.submit(cfg, workload, config, **submit_kwargs)
    console.print(f"submitted [bold]{job_id}[/bold] to {cfg.job_api}")
    if no_wait:
        return job_id
    result = jobs.wait(cfg, job_id, on_log=log_printer)
    if result.status != "SUCCEEDED":
        raise JobFailed(jobs.failure_message(cfg, result))
    console.print(f"[green]{job_id} SUCCEEDED[/green] in {result.duration_s}s")
    return job_id


def log_printer(text: str) -> None:
    """Stream a job's log text as it arrives."""
    sys.stdout.write(text)
    sys.stdout.flush()
