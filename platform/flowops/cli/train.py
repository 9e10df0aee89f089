"""`flowops train`, `flowops tune` and `flowops models validate|promote|list|prune|reproduce`."""

from __future__ import annotations

import datetime as dt
from enum import Enum

import typer
from rich.table import Table

from flowops.cli._common import (
    console,
    epoch_progress,
    err_console,
    parse_resources,
    print_json,
    settings,
    submit_and_follow,
)
from flowops.errors import GateFailed, validated

models_app = typer.Typer(help="Registered model versions and their stages (aliases).",
                         no_args_is_help=True)


class Target(str, Enum):
    local = "local"
    k8s = "k8s"


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("tune")(tune_cmd)
    app.add_typer(models_app, name="models")


def _submit_and_follow(cfg, workload: str, config, no_wait: bool, as_json: bool) -> None:
    submit_and_follow(cfg, workload, config, no_wait=no_wait, as_json=as_json,
                      metadata={"stage": workload})


def train_cmd(
    data_version: str = typer.Option(None, "--data-version", help="Data version (vN); default: latest."),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers."),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", help="CPUs per worker."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="GPUs per worker (0: CPU)."),
    resource: list[str] = typer.Option([], "--resource", help="NAME=AMOUNT: a custom Ray resource "
                                       "each worker needs, which places the workers on the nodes "
                                       "that have it (repeatable; node:<ip> names one node)."),
    placement_strategy: str = typer.Option("PACK", "--placement-strategy", help="PACK, SPREAD, "
                                           "STRICT_PACK or STRICT_SPREAD (one worker per node)."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Batch size per worker."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate."),
    task: str = typer.Option(None, "--task", help="Your task as module:object (a flowops Task or a "
                             "function returning one); default: the small CNN sized to the data, or "
                             "the base model's task when fine-tuning."),
    task_option: list[str] = typer.Option([], "--task-option", help="key=value for a task factory "
                                          "(repeatable), e.g. --task-option size=64."),
    width: int = typer.Option(None, "--width", help="Shorthand for --task-option width=N (channels "
                              "of the built-in networks' first layer)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on a GPU that supports it), "
                                  "fp32 or bf16."),
    init_from: str = typer.Option(None, "--init-from",
                                  help="Fine-tune from models:/<name>@<alias> or models:/<name>/<N>."),
    freeze_epochs: int = typer.Option(0, "--freeze-epochs",
                                      help="Epochs with the feature extractor frozen."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed => same weights on CPU)."),
    experiment: str = typer.Option("train", "--experiment", help="MLflow experiment."),
    model_name: str = typer.Option(None, "--model-name", help="Registered model name."),
    include_pseudo: bool = typer.Option(False, "--include-pseudo",
                                        help="Also train on the data version's pseudo-labels."),
    max_failures: int = typer.Option(2, "--max-failures", help="Worker failures to recover from."),
    local: bool = typer.Option(False, "--local", help="Run in this process instead of as a Ray job."),
    target: Target = typer.Option(Target.local, "--target",
                                  help="local: the embedded/configured Ray cluster; k8s: a KubeRay RayJob."),
    apply: bool = typer.Option(False, "--apply", help="With --target k8s: apply the RayJob (else print it)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return after submitting."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (the Ray job's id, "
                                 "status and result; with --local the result); logs go to stderr."),
) -> None:
    """Train the classifier on a data version (Ray Train job); registers a new model version.
    Exits 7 when the job fails."""
    from flowops import train
    from flowops.task import parse_options

    cfg = settings()
    config = validated(
        train.TrainConfig, "train config", data_version=data_version, workers=workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        resources=parse_resources(resource), placement_strategy=placement_strategy, epochs=epochs,
        batch_size=batch_size, lr=lr, width=width, init_from=init_from, freeze_epochs=freeze_epochs,
        task=task, task_options=parse_options(task_option), precision=precision,
        seed=seed, experiment=experiment, model_name=model_name, include_pseudo=include_pseudo,
        max_failures=max_failures, local=local,
    )
    if target is Target.k8s:  # checked by the RayJob on the Kubernetes cluster, not here
        from flowops.cluster import submit_train_k8s

        # Fields left at their defaults stay out, so the cluster settings fill them (workers).
        config_json = config.model_dump_json(exclude_defaults=True)
        text = submit_train_k8s(cfg, config_json, apply)
        if as_json:
            print_json({"target": "k8s", "applied": apply, "output": text})
        else:
            typer.echo(text)  # raw YAML, no wrapping
        return
    if not local:
        config = train.precheck(cfg, config)
    if local:
        with epoch_progress("training") as on_epoch:
            result = train.train(cfg, config, on_epoch=on_epoch)
        if as_json:
            print_json(result.to_dict())
        else:
            console.print(result.summary())
        return
    submit_and_follow(cfg, "train", config, no_wait=no_wait, as_json=as_json,
                      metadata={"stage": "train"}, py_modules=train.task_packages(config))


def tune_cmd(
    data_version: str = typer.Option(None, "--data-version", help="Data version (vN); default: latest."),
    trials: int = typer.Option(4, "--trials", help="Number of trials."),
    epochs: int = typer.Option(4, "--epochs", help="Maximum epochs per trial (ASHA stops early)."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="CPUs per trial (Ray places "
                                         "each trial on a node with that many free)."),
    experiment: str = typer.Option("tune", "--experiment", help="MLflow experiment (parent run)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the search and the trials."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return after submitting."),
    as_json: bool = typer.Option(False, "--json", help="Print the job id, status and (when waited "
                                 "for) the best trial as JSON; logs go to stderr."),
) -> None:
    """A small Ray Tune search (learning rate, width) with ASHA; registers the best trial's model.
    Exits 7 when the job fails."""
    from flowops import data
    from flowops.tune import TuneConfig

    cfg = settings()
    if cfg.data_repo is None:  # pinned: the job reads the workspace as a remote repo
        data_version = data.resolve_version(cfg, data_version)
    config = validated(TuneConfig, "tune config", data_version=data_version, trials=trials,
                       epochs=epochs, cpus_per_trial=cpus_per_trial, experiment=experiment, seed=seed)
    _submit_and_follow(cfg, "tune", config, no_wait, as_json)


# models ----------------------------------------------------------------------------------------


@models_app.command("validate")
def validate_cmd(
    version: str = typer.Argument(..., help="Model version number."),
    min_accuracy: float = typer.Option(
        None, "--min-accuracy", help="Holdout accuracy floor (default FLOWOPS_GATE_MIN_ACCURACY or 0.80)."
    ),
    max_regression: float = typer.Option(
        None, "--max-regression",
        help="Allowed drop vs production (default FLOWOPS_GATE_MAX_REGRESSION or 0.02).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the gate's report as JSON (also when "
                                 "it fails: passed false and the reasons)."),
) -> None:
    """Run the validation gate; on pass the version gets alias `staging`, else exit 6."""
    from flowops import registry

    try:
        with err_console.status(f"evaluating version {version} on the holdout…"):
            report = registry.validate_version(settings(), version, min_accuracy, max_regression)
    except GateFailed as exc:
        if as_json and exc.report is not None:
            print_json(exc.report)
        raise
    if as_json:
        print_json(report)
        return
    prod = (f"; production v{report['production_version']}: {report['production_accuracy']}"
            if report["production_version"] else "; no production version")
    console.print(f"[green]version {report['version']} passed[/green]: holdout accuracy "
                  f"{report['accuracy']} >= {report['min_accuracy']}{prod}; alias staging set")


@models_app.command("promote")
def promote_cmd(
    version: str = typer.Argument(..., help="Model version number."),
    force: bool = typer.Option(False, "--force", help="Promote even without passed validation."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Move alias `production` to VERSION (refused unless it passed validation)."""
    from flowops import registry

    result = registry.promote(settings(), version, force=force)
    if as_json:
        print_json(result)
        return
    was = f" (was {result['previous_production']})" if result["previous_production"] else ""
    console.print(f"[green]production -> version {result['version']}[/green]{was}")


@models_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Versions with aliases, stage, validation, key metrics, data version and lineage."""
    from flowops import registry

    rows = registry.list_versions(settings())
    if as_json:
        print_json(rows)
        return
    table = Table("version", "aliases", "stage", "validation", "holdout acc", "macro F1", "data",
                  "base", "created")
    for r in rows:
        created = dt.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M") if r["created"] else "-"
        table.add_row(r["version"], ",".join(r["aliases"]) or "-", r["stage"], r["validation"] or "-",
                      r["holdout_accuracy"] or "-", r["macro_f1"] or "-", r["data_version"] or "-",
                      r["base_model_version"] or "-", created)
    console.print(table if rows else "no registered versions yet: run `flowops train`")


@models_app.command("prune")
def prune_cmd(
    older_than: str = typer.Option(..., "--older-than", help="Age, e.g. 30d, 12h, 2w."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be deleted."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Delete versions older than the age; aliased versions are never touched."""
    from flowops import registry

    result = registry.prune(settings(), older_than, dry_run=dry_run)
    if as_json:
        print_json(result)
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb}: {', '.join(result['deleted']) or 'nothing'}; kept: "
                  f"{', '.join(result['kept']) or 'nothing'}")


@models_app.command("reproduce")
def reproduce_cmd(
    version: str = typer.Argument(..., help="Model version number."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Re-run the training recorded on VERSION; exit 6 if metrics or weights differ."""
    from flowops import registry

    with epoch_progress(f"reproducing version {version}") as on_epoch:
        report = registry.reproduce(settings(), version, on_epoch=on_epoch)
    if as_json:
        print_json(report)
    else:
        word = "[green]match[/green]" if report["match"] else "[red]MISMATCH[/red]"
        console.print(
            f"version {report['version']}: {word} (weights {report['weights_hash'][:12]} vs "
            f"{report['reproduced_weights_hash'][:12]}, holdout accuracy {report['holdout_accuracy']} "
            f"vs {report['reproduced_holdout_accuracy']}; run {report['run_id']})"
        )
    if not report["match"]:
        raise GateFailed(f"version {report['version']} did not reproduce: weights match "
                         f"{report['weights_match']}, metrics match {report['metrics_match']}",
                         report=report)
