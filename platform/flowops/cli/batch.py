"""`flowops pseudo-label`, `flowops labels queue | accept-pseudo | labelstudio-config`,
`flowops data synth`: batch pseudo-labeling and the labeling queue."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flowops.cli._common import (
    console,
    err_console,
    follow_job,
    notes,
    parse_resources,
    platform_settings,
    print_json,
    settings,
)
from flowops.errors import InvalidInput, validated

labels_app = typer.Typer(help="Labels: the review queue, pseudo-labels, the label inbox.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from flowops.cli.data import data_app

    app.command("pseudo-label")(pseudo_label)
    app.add_typer(labels_app, name="labels")
    data_app.command("synth")(synth)


def pseudo_label(
    model_uri: str = typer.Option(None, help="Registry URI (default models:/<name>@production)."),
    data_version: str = typer.Option("latest", help="Data version to score."),
    pool: str = typer.Option("unlabeled", help="Pool to score: unlabeled, train, holdout, all."),
    batch_size: int = typer.Option(1024, help="Images per model call and per block."),
    actors: int = typer.Option(1, help="Number of model actors (ActorPoolStrategy size)."),
    cpus_per_actor: float = typer.Option(0.5, help="CPUs reserved per actor (fractional ok)."),
    gpus_per_actor: float = typer.Option(0.0, help="GPUs per actor (0: CPU inference)."),
    resource: list[str] = typer.Option([], "--resource", help="NAME=AMOUNT: a custom Ray resource "
                                       "each model actor needs, which places the actors on the "
                                       "nodes that have it (repeatable; node:<ip> names one node)."),
    size_rule: str = typer.Option("resize", help="resize: any size; exact: others are bad files."),
    accept_threshold: float = typer.Option(
        None, help="Also accept predictions with score >= this into pseudo_labels.csv."
    ),
    no_version: bool = typer.Option(False, "--no-version", help="Do not cut a data version."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Submit and print the job id."),
    as_json: bool = typer.Option(False, "--json", help="Print the job id, status and (when waited "
                                 "for) the job's result as JSON; logs go to stderr."),
) -> None:
    """Score a pool with a registered model as a Ray job (Ray Data, stateful model actors).
    Exits 7 when the job fails."""
    from flowops import data, jobs
    from flowops.model import resolve_model_version
    from flowops.pseudo_label import PseudoLabelConfig, default_model_uri
    from flowops.refs import ModelRef

    cfg = settings()
    job_cfg = validated(
        PseudoLabelConfig, "pseudo-label config", model_uri=model_uri, data_version=data_version,
        pool=pool, batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor, resources=parse_resources(resource),
        size_rule=size_rule, accept_threshold=accept_threshold, version_output=not no_version,
    )
    uri = job_cfg.model_uri or default_model_uri(cfg)
    name, version = resolve_model_version(cfg, uri)  # fails here, before any data is read
    tag = data.resolve_version(cfg, job_cfg.data_version)
    # Pinned: the job scores exactly the model version and data version resolved here.
    job_cfg = job_cfg.model_copy(update={"model_uri": ModelRef.of(name, version).uri,
                                         "data_version": tag})
    job_id = jobs.submit(cfg, "pseudo_label", job_cfg, metadata={
        "data_version": tag, "model_version": version, "model_uri": uri})
    notes(as_json).print(f"submitted {job_id} (model {name} v{version}, data {tag}/{pool})")
    follow_job(cfg, job_id, no_wait=no_wait, as_json=as_json)


@labels_app.command("queue")
def queue(
    top: int = typer.Option(20, "--top", help="How many images to list."),
    data_version: str = typer.Option("latest", help="Data version holding the predictions."),
    export: tuple[str, str] | None = typer.Option(
        None, "--export", metavar="FORMAT FILE",
        help="Write the queue as import file: `--export labelstudio tasks.json`.",
    ),
    image_prefix: str = typer.Option(
        None, help="URL prefix of a folder version's data.image in the export (default "
        "/data/local-files/?d=data/). A sharded version's images are written under "
        "<FLOWOPS_HOME>/workspace/label-images/ and named by /data/local-files/?d= URLs."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the queue as JSON."),
) -> None:
    """List pseudo-labels for human review, most uncertain (smallest margin) first."""
    from flowops import queue as queue_lib

    fmt, path = (export[0], Path(export[1])) if export else (None, None)
    if fmt is not None and fmt != "labelstudio":
        raise InvalidInput(f"--export format {fmt!r} is not supported; allowed: labelstudio")
    cfg = platform_settings(state=True, data=True)
    rows = queue_lib.review_queue(cfg, top=top, data_version=data_version)
    exported = None
    if fmt:
        exported = queue_lib.export_labelstudio(
            cfg, rows, path, image_prefix or queue_lib.DEFAULT_IMAGE_PREFIX
        )
    if as_json:
        print_json({"queue": rows[queue_lib.QUEUE_COLUMNS].to_dict(orient="records"),
                    "exported": exported, "export_path": str(path) if fmt else None})
        return
    if rows.empty:
        console.print("the queue is empty: every predicted image has a human label")
    else:
        table = Table("#", "id", "predicted", "score", "margin", "entropy", "model", "path")
        for i, row in enumerate(rows.itertuples(index=False), start=1):
            table.add_row(str(i), row.id, row.label, f"{row.score:.3f}", f"{row.margin:.3f}",
                          f"{row.entropy:.3f}", f"v{row.model_version}", row.path)
        console.print(table)
    if exported is not None:
        console.print(f"wrote {exported} Label Studio task(s) to {path}")


@labels_app.command("accept-pseudo")
def accept_pseudo(
    threshold: float = typer.Option(0.95, help="Accept predictions with score >= this."),
    data_version: str = typer.Option("latest", help="Data version holding the predictions."),
    as_json: bool = typer.Option(False, "--json", help="Print the new version as JSON."),
) -> None:
    """Cut a data version whose pseudo_labels.csv holds the confident predictions."""
    from flowops.pseudo_label import accept_pseudo_labels

    info, accepted = accept_pseudo_labels(platform_settings(data=True), threshold, data_version)
    if as_json:
        print_json({"version": info.id, "accepted": accepted, "threshold": threshold})
        return
    console.print(f"data version [bold]{info.id}[/bold]: {accepted} pseudo-label(s) with "
                  f"score >= {threshold} in pseudo_labels.csv")


@labels_app.command("labelstudio-config")
def labelstudio_config(
    data_version: str = typer.Option("latest", help="Data version whose classes to use."),
) -> None:
    """Print the Label Studio labeling config (XML) that exported tasks match."""
    from flowops import data
    from flowops import queue as queue_lib

    classes = data.open_version(platform_settings(data=True), data_version).classes
    typer.echo(queue_lib.labelstudio_config(classes), nl=False)


def synth(
    count: int = typer.Option(..., "--count", help="Number of augmented images to add."),
    data_version: str = typer.Option("latest", help="Version whose images are augmented."),
    seed: int = typer.Option(0, help="Seed of the augmentations."),
    as_json: bool = typer.Option(False, "--json", help="Print the new version as JSON."),
) -> None:
    """Add augmented copies (shift, rotation, noise) to the unlabeled pool as a new version."""
    from flowops.synth import SynthConfig, synthesize

    cfg = validated(SynthConfig, "synth config", count=count, data_version=data_version, seed=seed)
    with err_console.status(f"writing {count} augmented images…"):
        info = synthesize(platform_settings(data=True), cfg)
    if as_json:
        print_json(info.to_dict())
        return
    console.print(f"data version [bold]{info.id}[/bold]: {info.counts}")
