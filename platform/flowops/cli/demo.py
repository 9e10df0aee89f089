"""`flowops demo`: the main job on the embedded stack."""

from __future__ import annotations

import typer

from flowops.cli._common import console, settings


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    threshold: int = typer.Option(60, "--threshold", help="Labels that trigger the retrain."),
    rate: float = typer.Option(25.0, "--rate", help="Generated requests per second (127.0.0.1)."),
) -> None:
    """Run the whole FlowOps story on the embedded stack (what `make demo` runs): train, serve,
    pseudo-label, label, retrain, canary → promote, then a bad model → automatic rollback."""
    from flowops.demo import DemoConfig, run_demo

    run_demo(settings(), say=console.print,
             config=DemoConfig(threshold=threshold, rate_per_s=rate))
