"""`flowops cluster render | generate | validate` (KubeRay manifests) and
`flowops devenv create | list | delete` (dev environments)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from flowops import cluster, devenv, manifests
from flowops.cli._common import console, err_console, print_json, settings
from flowops.durable import atomic_write_text
from flowops.errors import InvalidInput

cluster_app = typer.Typer(help="KubeRay manifests of the platform (cluster/).", no_args_is_help=True)
devenv_app = typer.Typer(help="Isolated per-engineer Ray dev environments.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(devenv_app, name="devenv")


@cluster_app.command("render")
def render(
    overlay: str = typer.Option("dev", "--overlay", help="Overlay of cluster/overlays (dev, gpu, prod)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the YAML here instead of stdout."),
) -> None:
    """Print the manifests of an overlay, rendered by `kubectl kustomize` (or `kustomize build`)."""
    text = cluster.render_text(settings(), overlay)
    if output:
        atomic_write_text(output, text)
        console.print(f"wrote {output}")
    else:
        typer.echo(text, nl=False)


@cluster_app.command("generate")
def generate(
    check: bool = typer.Option(False, "--check", help="Only verify the committed file is current."),
) -> None:
    """Regenerate cluster/base/ray-cluster.platform.yaml from the typed builders (flowops.manifests)."""
    path = cluster.generate_platform_cluster(settings(), check=check)
    console.print(f"{path} is up to date" if check else f"wrote {path}")


@cluster_app.command("validate")
def validate(
    overlay: str = typer.Option(None, "--overlay", help="One overlay (default: all)."),
    crd_dir: Path = typer.Option(
        None, help="Folder of KubeRay CRD files (default: FLOWOPS_CLUSTER_CRD_DIR, else the schemas "
        "packaged with FlowOps)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (also when "
                                 "objects are invalid: exit 2)."),
) -> None:
    """Validate rendered objects against KubeRay's CRD schemas and Kubernetes' schemas."""
    report = cluster.validate(settings(), [overlay] if overlay else None, crd_dir)
    if as_json:
        print_json({"valid": not report.problems, **asdict(report)})
    for line in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")
    for line in report.problems:
        console.print(f"[red]invalid[/red] {line}")
    if report.problems:
        raise InvalidInput(f"{len(report.problems)} of {report.checked} objects are invalid")
    if not as_json:
        console.print(f"{report.checked} objects valid")


@cluster_app.command("run-job")
def run_job(
    template: str = typer.Argument(..., help="A RayJob template of the overlay (flowops-train, "
                                   "flowops-pseudo-label)."),
    overlay: str = typer.Option("dev", "--overlay", help="Overlay of cluster/overlays (dev, gpu, prod)."),
    name: str = typer.Option(None, "--name", help="Name of the new RayJob (default: TEMPLATE-<UTC time>)."),
    apply: bool = typer.Option(False, "--apply", help="Server-side apply it with kubectl (default: "
                               "print the YAML)."),
) -> None:
    """Run a suspended RayJob template: a copy with its own name and `suspend` removed."""
    typer.echo(cluster.run_job_template(settings(), template, overlay, name, apply), nl=apply)


@devenv_app.command("create")
def create(
    name: str = typer.Argument(..., help="Environment name; also its Kubernetes namespace."),
    gpus: int = typer.Option(..., "--gpus", help="GPUs to reserve (at least 1)."),
    gpu_type: str = typer.Option(..., "--gpu-type", help="A configured GPU type (t4, l4, a100, h100, ...)."),
    cpus: int = typer.Option(4, "--cpus", help="CPUs of the environment's worker."),
    memory: str = typer.Option(
        None, "--memory", help="Memory of the worker, e.g. 16Gi (k8s default 16Gi; local: no cap)."
    ),
    backend: str = typer.Option("k8s", "--backend", help="k8s (a namespace with a RayCluster) or local."),
    owner: str = typer.Option(None, "--owner", help="Kubernetes user bound to the namespace (k8s)."),
    apply: bool = typer.Option(False, "--apply", help="k8s: server-side apply it with kubectl."),
    output: Path = typer.Option(None, "--output", "-o", help="k8s: write the YAML to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a dev environment and print how to connect to it from an IDE."""
    if backend not in ("k8s", "local"):
        raise InvalidInput(f"--backend {backend!r}: choose k8s or local")
    cfg = settings()
    request = devenv.make_request(cfg, name=name, gpus=gpus, gpu_type=gpu_type, cpus=cpus, memory=memory,
                                  backend=backend, owner=owner)
    if backend == "local":
        with err_console.status(f"starting the local Ray cluster of {name}…"):
            record = devenv.create(cfg, request)
        if as_json:
            print_json(record)
            return
        console.print(f"dev environment [bold]{name}[/bold] (local) runs: {record['cpus']} CPUs, "
                      f"{record['gpus']} GPUs ({record['gpu_type']})")
        if record["physical_gpus"] < record["gpus"]:
            console.print(
                f"note: this machine has {record['physical_gpus']} GPUs; Ray advertises "
                f"{record['gpus']} logical GPUs, so scheduling works but CUDA code will not find them"
            )
        console.print(f"dashboard: {record['dashboard']}")
        console.print(devenv.ide_text(record["address"], record["token_path"]), soft_wrap=True)
        return
    result = devenv.create(cfg, request, apply=apply)
    text = manifests.dump(result["objects"])
    if output and not apply:
        atomic_write_text(output, text)
    if as_json:  # applied: what was created; else the manifests (and where they were written)
        print_json({k: v for k, v in result.items() if not (apply and k == "objects")}
                   | ({"output": str(output)} if output and not apply else {}))
        return
    if apply:
        console.print(f"applied in namespace {name}: {', '.join(result['created'])}")
    elif output:
        console.print(f"wrote {output}: apply with `kubectl apply -f {output}`")
    else:
        typer.echo(text, nl=False)
        return  # stdout is the YAML (pipe it to kubectl apply -f -)
    console.print(devenv.k8s_connect_text(request), soft_wrap=True)


@devenv_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Dev environments recorded in this home folder, with their health."""
    found = devenv.list_devenvs(settings())
    if as_json:
        print_json(found)
        return
    if not found:
        console.print("no dev environment: `flowops devenv create NAME --gpus N --gpu-type T`")
        return
    table = Table("name", "backend", "healthy", "address", "cpus", "gpus", "gpu type")
    for r in found:
        healthy = {True: "yes", False: "no", None: "-"}[r.get("healthy")]
        table.add_row(r["name"], r["backend"], healthy, r.get("address", "-"), str(r.get("cpus", "-")),
                      str(r.get("gpus", "-")), r.get("gpu_type", "-"))
    console.print(table)


@devenv_app.command("delete")
def delete(
    name: str = typer.Argument(..., help="Environment name."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Stop a dev environment (a local one leaves no process behind) and forget it."""
    result = devenv.delete(settings(), name)
    if as_json:
        print_json(result)
        return
    console.print(f"deleted dev environment {name} ({result['backend']})")
