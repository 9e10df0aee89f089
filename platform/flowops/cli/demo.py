"""`flowops demo`: the main job on the embedded stack."""

from __future__ import annotations

import typer

from flowops.cli._common import console, settings


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    threshold: int = typer.Option(60, "--threshold", help="Labels that trigger the retrain."),
    rate: float = typer.Option(40.0, "--rate", help="Generated requests per second (to the Serve URL)."),
) -> None:
    """Run the whole FlowOps story on the embedded stack (what `make demo` runs): train, serve,
    pseudo-label, label, retrain, canary → promote, then a bad model → automatic rollback.
    Exits 6 unless the story was told (v2 promoted, the bad model rolled back, every user request
    answered 200)."""
    from flowops.demo import DemoConfig, run_and_check

    run_and_check(settings(), say=console.print,
                  config=DemoConfig(threshold=threshold, rate_per_s=rate))
