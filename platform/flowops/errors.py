"""One error tree. The CLI turns each into one clear line and a non-zero exit (`exit_code`); the HTTP
app turns each into a JSON error with `http_status` (one exception handler, no per-route mapping).

Foreign errors are translated once, here: `invalid_input()` turns a pydantic `ValidationError` into
`InvalidInput` with one readable line (httpx's `map_exceptions` idea).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class FlowOpsError(Exception):
    """Base of every error FlowOps raises on purpose. The message says what was asked and what exists."""

    exit_code = 1
    http_status = 500


class InvalidInput(FlowOpsError):
    """The caller asked for something malformed or out of range."""

    exit_code = 2
    http_status = 400  # what the serving API (KServe v1) has always answered for a bad request


class NotFound(FlowOpsError):
    """A named thing (data version, model version, job, workload) does not exist."""

    exit_code = 3
    http_status = 404


class Conflict(FlowOpsError):
    """The request clashes with current state: a port in use, another `up` running, a duplicate."""

    exit_code = 4
    http_status = 409


class ClusterUnavailable(FlowOpsError):
    """The Ray cluster (or another platform service) cannot be reached."""

    exit_code = 5
    http_status = 503


class GateFailed(FlowOpsError):
    """A model did not pass a validation gate or a canary analysis."""

    exit_code = 6
    http_status = 409

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report  # the gate's findings, for callers that print them (`--json`)


class JobFailed(FlowOpsError):
    """A submitted Ray job (or a pipeline step) ended in failure."""

    exit_code = 7
    http_status = 500


INTERRUPTED_EXIT_CODE = 130  # Ctrl-C, as shells report SIGINT


def exit_codes() -> list[tuple[int, str, str, str]]:
    """(exit code, meaning, error class, when) for success, every error of this module and an
    interruption: the table of `flowops --help` and the README, generated here so it cannot drift.
    The meaning is the class name in words (`GateFailed` -> "gate failed")."""
    rows = [(0, "success", "", "the command did what it was asked")]
    for cls in (FlowOpsError, *FlowOpsError.__subclasses__()):
        if cls.__module__ != __name__:
            continue
        when = (cls.__doc__ or "").strip().split(". ")[0].rstrip(".")
        if cls is FlowOpsError:
            rows.append((cls.exit_code, "unexpected", cls.__name__, "any other failure"))
        else:
            rows.append((cls.exit_code, re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower(),
                         cls.__name__, when))
    rows.append((INTERRUPTED_EXIT_CODE, "interrupted", "", "Ctrl-C (SIGINT)"))
    return sorted(rows)


def describe_validation_error(exc, what: str = "") -> str:
    """One line for a pydantic ValidationError: where, what was wrong (first error, count of others)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    text = f"{where}: {msg}" if where else msg
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{what}{': ' if what else ''}{text}{more}"


@contextlib.contextmanager
def invalid_input(what: str = "") -> Iterator[None]:
    """Turn a pydantic ValidationError raised inside into InvalidInput with one readable line.

    The only place FlowOps catches ValidationError:

        with invalid_input("train config"):
            config = TrainConfig(**values)
    """
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, what)) from None


def validated(model, what: str = "", /, **values):
    """`model(**values)`, with a ValidationError turned into InvalidInput."""
    with invalid_input(what):
        return model(**values)


def validated_json(model, text: str | bytes, what: str = ""):
    """`model.model_validate_json(text)`, with a ValidationError turned into InvalidInput."""
    with invalid_input(what):
        return model.model_validate_json(text)
