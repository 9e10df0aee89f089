"""`flowops data init | versions | show | check`: versioned datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flowops import data
from flowops.cli._common import (
    console,
    err_console,
    notes,
    print_json,
    settings,
    submit_and_follow,
)

data_app = typer.Typer(help="Versioned datasets (git + DVC).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("init")
def init(
    from_dir: Path = typer.Option(
        None, "--from", metavar="DIR",
        help="Your image folder, one sub-folder per class (any format Pillow reads; files are "
             "kept as they are), instead of the scikit-learn digits.",
    ),
    unlabeled_dir: Path = typer.Option(
        None, "--unlabeled", metavar="DIR",
        help="A folder of images without labels: the unlabeled pool (with --from).",
    ),
    name: str = typer.Option(
        None, "--name", help="The dataset's name; models default to <name>-classifier "
                             "(default: the --from folder's name; 'digits' without --from).",
    ),
    holdout_fraction: float = typer.Option(
        0.2, help="Share of each class kept as the fixed holdout test set."
    ),
    unlabeled_fraction: float = typer.Option(
        None, help="Share of the labeled training images whose labels are hidden in the "
                   "unlabeled pool, for simulated labeling (default: 0.75 for digits, 0 with --from).",
    ),
    image_size: int = typer.Option(
        None, help="Default model input side in pixels (default: 8 for digits; with --from the "
                   "median short side of the images, clipped to 8-224).",
    ),
    seed: int = typer.Option(0, help="Seed of the split."),
    as_json: bool = typer.Option(False, "--json", help="Print the new version as JSON."),
) -> None:
    """Write the default dataset (scikit-learn digits) or your folder as a new data version.

    A folder's files that do not decode are skipped and listed in the version's errors.csv."""
    cfg = settings()
    with err_console.status("reading the images, writing the dataset and pushing it to the DVC "
                            "remote…"):
        info = data.init_dataset(
            cfg, from_dir, unlabeled_dir=unlabeled_dir, name=name,
            unlabeled_fraction=unlabeled_fraction, holdout_fraction=holdout_fraction,
            image_size=image_size, seed=seed,
        )
    out = notes(as_json)
    if info.rejected:
        report = cfg.workspace / data.DATA_DIR / data.ERRORS_FILE
        out.print(f"{info.rejected} file(s) rejected, see {data.ERRORS_FILE} of {info.id} "
                  f"({report})", soft_wrap=True)
    if as_json:
        print_json(info.to_dict())
        return
    console.print(f"data version [bold]{info.id}[/bold] ({info.commit[:8]}) '{info.name}': "
                  f"{info.counts}")


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
    console.print(f"version {info.id}  dataset {info.name}  commit {info.commit or '-'}  "
                  f"parent {info.parent or '-'}")
    console.print(f"message {info.message}")
    for split, per_class in info.class_counts.items():
        if split == "unlabeled":
            continue
        console.print(f"  {split:<10} {info.counts.get(split, 0):>6}  {per_class}")
    if "unlabeled" in info.counts:
        console.print(f"  {'unlabeled':<10} {info.counts['unlabeled']:>6}  (the pool to label)")
    if info.rejected:
        console.print(f"  {info.rejected} file(s) rejected at import: see {data.ERRORS_FILE}")


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
