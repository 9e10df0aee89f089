"""`flowops data init | import | migrate | versions | show | check`: versioned datasets."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.table import Table

from flowops import data
from flowops.cli._common import (
    console,
    err_console,
    notes,
    platform_settings,
    print_json,
    submit_and_follow,
)

data_app = typer.Typer(
    help="Versioned datasets (git + DVC). The data repository is this machine's workspace in the "
         "home folder unless FLOWOPS_DATA_REPO names a shared one (a git URL; its DVC remote in "
         "FLOWOPS_DVC_REMOTE, images in FLOWOPS_STORAGE_URI): against a cluster elsewhere, set "
         "them, or these commands read and write local files that the cluster's jobs never see.",
    no_args_is_help=True)


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
    cfg = platform_settings(data=True)
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
    cfg = platform_settings(data=True)
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
    info = data.show_version(platform_settings(data=True), version)
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

    cfg = platform_settings(data=True)
    tag = data.resolve_version(cfg, data_version)
    submit_and_follow(cfg, "data_check", DataCheckConfig(data_version=tag), no_wait=no_wait,
                      as_json=as_json, metadata={"data_version": tag})


@contextlib.contextmanager
def _image_progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of images on stderr; a line per tenth when stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not err_console.is_terminal:
        shown = {"tenth": -1}

        def line(done: int, total: int) -> None:
            tenth = done * 10 // max(total, 1)
            if tenth != shown["tenth"]:
                shown["tenth"] = tenth
                err_console.print(f"{what}: {done}/{total} images")

        yield line
        return
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeElapsedColumn())
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task(what, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _print_import(result, as_json: bool) -> None:
    out = notes(as_json)
    out.print(f"{result.shards} shard(s) in {result.storage}/images: {result.written} written, "
              f"{result.reused} already there", soft_wrap=True)
    if result.rejected:
        out.print(f"{result.rejected} file(s) rejected, see {data.ERRORS_FILE} of "
                  f"{result.version}", soft_wrap=True)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"data version [bold]{result.version}[/bold]: {result.images} images as shards, "
                  f"{result.counts}")


@data_app.command("import")
def import_(
    source: str = typer.Argument(
        ..., metavar="DIR|URI",
        help="An image folder (one sub-folder per class) or a bucket prefix (s3://bucket/prefix).",
    ),
    unlabeled: str = typer.Option(
        None, "--unlabeled", metavar="DIR|URI", help="Images without labels: the unlabeled pool.",
    ),
    name: str = typer.Option(None, "--name", help="The dataset's name (default: the source's "
                                                  "last folder); models default to <name>-classifier."),
    holdout_fraction: float = typer.Option(0.2, help="Share of each class kept as the holdout."),
    unlabeled_fraction: float = typer.Option(
        0.0, help="Share of the labeled training images whose labels are hidden (simulated labeling)."),
    image_size: int = typer.Option(
        None, help="Default model input side (default: the median short side, clipped to 8-224)."),
    seed: int = typer.Option(0, help="Seed of the split and of the ids."),
    images_per_shard: int = typer.Option(2000, help="Images per Parquet shard (at most 128 MiB)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Import images into Parquet shards in the storage URI (FLOWOPS_STORAGE_URI) as a new data
    version. Resumable: run it again after an interrupt and the shards already stored are
    skipped. Files that do not decode are listed in the version's errors.csv."""
    from flowops import shard_import

    cfg = platform_settings(data=True)
    with _image_progress("importing") as progress:
        result = shard_import.import_images(
            cfg, source, unlabeled=unlabeled, name=name, holdout_fraction=holdout_fraction,
            unlabeled_fraction=unlabeled_fraction, seed=seed, image_size=image_size,
            images_per_shard=images_per_shard, progress=progress)
    _print_import(result, as_json)


@data_app.command("migrate")
def migrate(
    version: str = typer.Argument("latest", help="A data version whose images are files."),
    images_per_shard: int = typer.Option(2000, help="Images per Parquet shard (at most 128 MiB)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a data version's image files into shards in the storage URI, as a new version
    with the same ids, labels and splits."""
    from flowops import shard_import

    cfg = platform_settings(data=True)
    with _image_progress("migrating") as progress:
        result = shard_import.migrate_version(cfg, version, images_per_shard=images_per_shard,
                                              progress=progress)
    _print_import(result, as_json)
