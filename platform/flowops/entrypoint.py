"""What every `jobs/` entrypoint shares: one config argument, logging, errors as one line.

A job takes exactly one argument, the JSON of the same pydantic model the client serialised:

    python -m flowops.workloads.<name> --config '<JSON>'       the config inline
    python -m flowops.workloads.<name> --config @path/to.json  the config in a file (relative to the
                                                              job's working directory)
    python -m flowops.workloads.<name>                         every field at its default

(`flowops.workloads` is the checkout's `jobs/` folder, so `python -m jobs.<name>` works there too.)

A config that does not parse ends the job with one line and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from flowops.errors import FlowOpsError, InvalidInput, validated_json
from flowops.settings import Settings, get_settings

M = TypeVar("M", bound=BaseModel)
USAGE = "usage: python -m flowops.workloads.<name> [--config '<JSON>' | --config @file.json]"
RESULT_PREFIX = "RESULT "  # a job's result line; `flowops.jobs.result_from_logs` reads it back


def print_result(value: object) -> None:
    """Print a job's result as its one `RESULT <JSON>` log line: what the submitting command's
    `--json` returns as `result`."""
    print(RESULT_PREFIX + json.dumps(value, default=str), flush=True)


def config_text(value: str) -> str:
    """The JSON text of a `--config` value: inline, or read from the file after `@`."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(f"--config {value}: cannot read {path}: {exc.strerror or exc}") from None


def config_arg(argv: list[str]) -> str | None:
    """The JSON text given by `argv` (`--config X` or `--config=X`), None when argv is empty."""
    if not argv:
        return None
    if len(argv) == 2 and argv[0] == "--config":
        return config_text(argv[1])
    if len(argv) == 1 and argv[0].startswith("--config="):
        return config_text(argv[0].removeprefix("--config="))
    raise InvalidInput(f"unexpected arguments {' '.join(argv)!r}; {USAGE}")


def parse_job_config(model: type[M], argv: list[str]) -> M:
    """The job's config: `model` validated from `--config` (all defaults without it)."""
    text = config_arg(argv)
    return model() if text is None else validated_json(model, text, f"--config ({model.__name__})")


def _help(model: type[BaseModel]) -> str:
    lines = [USAGE, "", f"{model.__name__} fields:"]
    for name, field in model.model_fields.items():
        default = ("required" if field.is_required()
                   else f"default {field.get_default(call_default_factory=True)!r}")
        lines.append(f"  {name} ({default}){': ' + field.description if field.description else ''}")
    return "\n".join(lines)


def run_entrypoint(fn: Callable[[], object]) -> None:
    """Run a job's main function; a FlowOps error ends it with one line and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fn()
    except FlowOpsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def run_job(model: type[M], fn: Callable[[Settings, M], object], argv: list[str] | None = None) -> None:
    """A job's whole entrypoint: parse `--config` into `model`, call `fn(settings, config)`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_help(model))
        return

    def main() -> None:
        fn(get_settings(), parse_job_config(model, argv))

    run_entrypoint(main)
