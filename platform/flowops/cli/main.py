"""Entry point of the `flowops` command: builds the app and turns FlowOps errors into one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from flowops.cli._common import json_stdout
from flowops.errors import INTERRUPTED_EXIT_CODE, FlowOpsError, exit_codes

DISTRIBUTION = "flowops"  # the name pip knows; version() also finds a renamed distribution


def exit_code_help() -> str:
    """The exit-code table of `flowops --help`, generated from flowops.errors."""
    rows = "\n".join(f"  {code:<4} {meaning:<20} {name}".rstrip()
                     for code, meaning, name, _ in exit_codes())
    # \b keeps click (and Typer's rich help) from re-wrapping the rows into one paragraph.
    return f"Exit codes (scripts can rely on them):\n\n\b\n{rows}"


app = typer.Typer(
    name="flowops",
    help="FlowOps: label, train, deploy, serve and retrain vision models on Ray. Commands that a "
    "script reads take --json: stdout is then one JSON object; progress and logs go to stderr.",
    epilog=exit_code_help(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def version() -> str:
    """The installed package's version (importlib.metadata), whatever the distribution is named;
    the source tree's `flowops.__version__` when it is not installed."""
    from importlib import metadata

    names = [DISTRIBUTION, *metadata.packages_distributions().get("flowops", [])]
    for name in dict.fromkeys(names):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import flowops

    return flowops.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flowops {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    home: Path = typer.Option(
        None, "--home", envvar="FLOWOPS_HOME", help="Folder of the local state (default ./.flowops)."
    ),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the FlowOps version and exit."),
) -> None:
    if home is not None:
        os.environ["FLOWOPS_HOME"] = str(home)


_registered = False


def build_app() -> typer.Typer:
    """The app with every stage's commands (one module per stage adds its commands or groups)."""
    global _registered
    if not _registered:
        from flowops.cli import batch, cluster, data, demo, jobs, loop, monitor, serve, stack, train

        for module in (stack, data, jobs, train, serve, batch, loop, cluster, monitor, demo):
            module.register(app)
        _registered = True
    return app


def _wants_json(argv: list[str]) -> bool:
    """`--json` among the command's own options (what follows `--` belongs to a workload)."""
    own = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in own


def main() -> None:
    build_app()
    with json_stdout(_wants_json(sys.argv[1:])):
        code = _run()
    sys.exit(code)


def _run() -> int:
    """Run the app; every way it can end becomes an exit code (errors: one line on stderr)."""
    try:
        # Without standalone mode click *returns* the code of `typer.Exit(n)` instead of exiting.
        code = app(standalone_mode=False, prog_name="flowops")
        return code if isinstance(code, int) else 0
    except FlowOpsError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        if isinstance(code, str):  # sys.exit("message")
            typer.echo(code, err=True)
        return code if isinstance(code, int) else (0 if code is None else 1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return INTERRUPTED_EXIT_CODE
    except Exception as exc:  # click usage errors and unexpected failures: one line, no traceback
        # Usage errors (bad option, missing argument): click's, or the copy Typer vendors.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if os.environ.get("FLOWOPS_DEBUG"):
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {exc} (set FLOWOPS_DEBUG=1 for a traceback)",
            err=True,
        )
        return 1


if __name__ == "__main__":
    main()
