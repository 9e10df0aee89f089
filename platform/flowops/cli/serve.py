"""CLI adapter for online serving: `flowops serve deploy|canary|set-weight|shadow|promote|rollback|status`."""

from __future__ import annotations

import typer

from flowops.cli._common import console, err_console, parse_resources, print_json, settings

serve_app = typer.Typer(help="Serve the classifier: deploy, canary, shadow, promote, rollback.",
                        no_args_is_help=True)


def _show(status: dict, as_json: bool) -> None:
    if as_json:
        print_json(status)
        return
    canary = status.get("canary")
    line = f"stable [bold]{status.get('stable')}[/bold]"
    if canary:
        line += f" ({100 - status.get('weight', 0)}%)  canary [bold]{canary}[/bold] " \
                f"({status.get('weight', 0)}%)"
    else:
        line += " (100%)  no canary"
    if status.get("shadow_pct"):
        line += f"  shadow {status['shadow_pct']}% of stable traffic"
    if status.get("sticky_images"):
        line += "  sticky by image"
    console.print(line)
    replicas = status.get("replicas") or {}
    ready = "ready" if status.get("ready") else "[yellow]loading[/yellow]"
    console.print(f"model {status.get('model_name')}  replicas {len(replicas)}  {ready}  "
                  f"epoch {status.get('epoch')}")


@serve_app.command("deploy")
def deploy_cmd(
    stable: str = typer.Option("production", "--stable", help="Stable version number or alias."),
    canary: str = typer.Option(None, "--canary", help="Canary version number or alias."),
    weight: int = typer.Option(None, "--weight", min=0, max=100, help="Percent of traffic to the canary."),
    shadow: int = typer.Option(None, "--shadow", min=0, max=100,
                               help="Percent of stable traffic mirrored to the canary."),
    sticky_images: bool = typer.Option(None, "--sticky-images/--no-sticky-images",
                                       help="Route by image hash when no X-Routing-Key is sent."),
    replicas: int = typer.Option(None, "--replicas", min=1, help="Replicas (default 1)."),
    num_cpus: float = typer.Option(None, "--num-cpus", help="CPUs per replica (default 0.2)."),
    num_gpus: float = typer.Option(None, "--num-gpus", help="GPUs per replica (default 0)."),
    resource: list[str] = typer.Option([], "--resource", help="NAME=AMOUNT: a custom Ray resource "
                                       "each replica needs, which places the replicas on the nodes "
                                       "that have it (repeatable; node:<ip> names one node)."),
    max_replicas_per_node: int = typer.Option(None, "--max-replicas-per-node", min=1,
                                              help="Most replicas on one node (1 spreads them "
                                              "over the nodes)."),
    require_api_key: bool = typer.Option(None, "--require-api-key/--no-require-api-key",
                                         help="Prediction routes need FLOWOPS_API_KEY."),
    redeploy: bool = typer.Option(False, "--redeploy", help="Redeploy even if only routing changed."),
    as_json: bool = typer.Option(False, "--json", help="Print the routing status as JSON."),
) -> None:
    """Deploy the classifier app (or change its routing at runtime when it already runs)."""
    from flowops import serving

    s = settings()
    with err_console.status("deploying the classifier app..."):
        status = serving.deploy(
            s, stable=stable, canary=canary, weight=weight, redeploy=redeploy, shadow_pct=shadow,
            sticky_images=sticky_images, num_replicas=replicas, num_cpus=num_cpus,
            num_gpus=num_gpus, require_api_key=require_api_key,
            resources=parse_resources(resource) or None,
            max_replicas_per_node=max_replicas_per_node,
        )
    if not as_json:
        console.print(f"serving at {s.serve_url}/predict (docs {s.serve_url}/docs)")
    _show(status, as_json)


@serve_app.command("canary")
def canary_cmd(
    version: str = typer.Argument(..., help="Model version number or alias to canary."),
    weight: int = typer.Option(10, "--weight", min=0, max=100, help="Percent of traffic to it."),
    as_json: bool = typer.Option(False, "--json", help="Print the routing status as JSON."),
) -> None:
    """Start a canary beside stable (loaded at runtime; stable keeps running)."""
    from flowops import serving

    _show(serving.set_canary(settings(), version, weight), as_json)


@serve_app.command("set-weight")
def set_weight_cmd(
    weight: int = typer.Argument(..., min=0, max=100, help="Percent of traffic to the canary."),
    as_json: bool = typer.Option(False, "--json", help="Print the routing status as JSON."),
) -> None:
    """Change the canary's share of traffic."""
    from flowops import serving

    _show(serving.set_weight(settings(), weight), as_json)


@serve_app.command("shadow")
def shadow_cmd(
    pct: int = typer.Argument(..., min=0, max=100, help="Percent of stable traffic to mirror."),
    as_json: bool = typer.Option(False, "--json", help="Print the routing status as JSON."),
) -> None:
    """Mirror a share of stable traffic to the canary; its answers are compared, not returned."""
    from flowops import serving

    _show(serving.set_shadow(settings(), pct), as_json)


@serve_app.command("promote")
def promote_cmd(
    alias: bool = typer.Option(True, "--alias/--no-alias", help="Also move the `production` alias."),
    as_json: bool = typer.Option(False, "--json", help="Print the routing status as JSON."),
) -> None:
    """Make the canary the stable version (100% of traffic)."""
    from flowops import serving

    _show(serving.promote_canary(settings(), set_alias=alias), as_json)


@serve_app.command("rollback")
def rollback_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the routing status as JSON."),
) -> None:
    """Send 100% of traffic to stable now and drop the canary."""
    from flowops import serving

    _show(serving.rollback(settings()), as_json)


@serve_app.command("status")
def status_cmd(
    ledger: bool = typer.Option(False, "--ledger", help="Also show per-version counters."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Routing (stable, canary, weight, shadow), replicas, and optionally the per-version ledger."""
    from flowops import serving

    s = settings()
    status = serving.routing_status(s)
    if ledger:
        versions = serving.ledger_snapshot(s)
        status["ledger"] = {v: {k: x for k, x in e.items() if k not in ("latencies_ms", "latency_hist",
                                                                       "latency_buckets_ms")}
                            for v, e in versions.items()}
    _show(status, as_json)
    if ledger and not as_json:
        for version, e in sorted(status["ledger"].items()):
            acc = (f"{e['feedback_correct'] / e['feedback_total']:.1%}" if e["feedback_total"]
                   else "n/a")
            agree = (f"{e['shadow_agree'] / e['shadow_total']:.1%}" if e["shadow_total"] else "n/a")
            console.print(f"  version {version}: requests {e['requests']}  errors {e['errors']}  "
                          f"feedback accuracy {acc}  shadow agreement {agree}")


def register(app: typer.Typer) -> None:
    """Add the `serve` group to the app."""
    app.add_typer(serve_app, name="serve")
