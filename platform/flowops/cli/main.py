"""Entry point of the `flowops` command: builds the app and turns FlowOps errors into one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from flowops.errors import FlowOpsError

app = typer.Typer(
    name="flowops",
    help="FlowOps: label, train, deploy, serve and retrain vision models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    home: Path = typer.Option(
        None, "--home", envvar="FLOWOPS_HOME", help="Folder of the local state (default ./.flowops)."
    ),
) -> None:
    if home is not None:
        os.environ["FLOWOPS_HOME"] = str(home)


def _register() -> None:
    # One module per stage; each adds its commands or command groups to the app.
    from flowops.cli import batch, cluster, data, demo, jobs, loop, monitor, serve, stack, train

    for module in (stack, data, jobs, train, serve, batch, loop, cluster, monitor, demo):
        module.register(app)


def main() -> None:
    _register()
    try:
        # Without standalone mode click *returns* the code of `typer.Exit(n)` instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except FlowOpsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors and unexpected failures: one line, no traceback
        # Usage errors (bad option, missing argument): click's, or the copy Typer vendors.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("FLOWOPS_DEBUG"):
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {exc} (set FLOWOPS_DEBUG=1 for a traceback)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
