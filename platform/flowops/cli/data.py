"""`flowops data init | versions | show | check`: versioned datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flowops import data
from flowops.cli._common import console, err_console, print_json, settings, submit_and_follow

data_app = typer.Typer(help="Versioned datasets (git + DVC).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("init")
def init(
    from_dir: Path = typer.Option(
        None, "--from", help="Your own image folder (one sub-folder per class) instead of digits."
    ),
    unlabeled_fraction: float = typer.Option(0.75, help="Share of non-holdout images left unlabeled."),
    holdout_fraction: float = typer.Option(0.2, help="Share kept as the fixed holdout test set."),
    image_size: int = typer.Option(28, help="Side in pixels models use for --from images."),
    seed: int = typer.Option(0, help="Seed of the split."),
    as_json: bool = typer.Option(False, "--json", help="Print the new version as JSON."),
) -> None:
    """Write the default dataset (scikit-learn digits) or your folder as a new data version."""
    cfg = settings()
    with err_console.status("writing the dataset and pushing it to the DVC remote…"):
        info = data.init_dataset(
            cfg, from_dir, unlabeled_fraction=unlabeled_fraction,
            holdout_fraction=holdout_fraction, image_size=image_size, seed=seed,
        )
    if as_json:
        print_json(info.to_dict())
        return
    console.print(f"data version [bold]{info.id}[/bold] ({info.commit[:8]}): {info.counts}")


@data_app.command("versions")
def versions(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List data versions with counts per pool and class."""
    cfg = settings()
    found = data.list_versions(cfg)
    if as_json:
        print_json([v.to_dict() for v in found])
        return
    if not found:
        console.print("no data version yet: run `flowops data init`")
        return
    table = Table("version", "parent", "train", "unlabeled", "holdout", "classes", "message")
    for v in found:
        train = v.class_counts.get("train", {})
        table.add_row(
            v.id, v.parent or "-", str(v.counts.get("train", 0)), str(v.counts.get("unlabeled", 0)),
            str(v.counts.get("holdout", 0)),
            " ".join(f"{c}:{n}" for c, n in train.items()), v.message,
        )
    console.print(table)


@data_app.command("show")
def show(
    version: str = typer.Argument("latest", help="Data version id (vN) or 'latest'."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show one data version: commit, counts per pool and class."""
    info = data.show_version(settings(), version)
    if as_json:
        print_json(info.to_dict())
        return
    console.print(f"version {info.id}  commit {info.commit or '-'}  parent {info.parent or '-'}")
    console.print(f"message {info.message}")
    for split, per_class in info.class_counts.items():
        console.print(f"  {split:<10} {info.counts.get(split, 0):>6}  {per_class}")
    if "unlabeled" in info.counts:
        console.print(f"  {'unlabeled':<10} {info.counts['unlabeled']:>6}  (labels kept aside)")


@data_app.command("check")
def check(
    data_version: str = typer.Option("latest", "--data-version", help="Data version to validate."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Submit and return the job id."),
    as_json: bool = typer.Option(False, "--json", help="Print the job id, status and (when waited "
                                 "for) the check's summary as JSON; logs go to stderr."),
) -> None:
    """Validate a data version as a Ray job (jobs/data_check.py); the summary goes to MLflow.
    Exits 7 when the version is invalid (the job fails)."""
    from flowops.data_check import DataCheckConfig

    cfg = settings()
    tag = data.resolve_version(cfg, data_version)
    submit_and_follow(cfg, "data_check", DataCheckConfig(data_version=tag), no_wait=no_wait,
                      as_json=as_json, metadata={"data_version": tag})
