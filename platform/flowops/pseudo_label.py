"""Batch pseudo-labeling: run a registered model over a pool of a data version with Ray Data.

    images.dataset(version, pool rows)            (id, label, split, bytes): shards read from the
                                                  storage URI by Ray tasks on any node (a folder
                                                  version's files by the driver, via the object
                                                  store)
      -> map_batches(load_images)                 Ray tasks: decode (the model's own
                                                  preprocessing) + size rule
      -> map_batches(Predictor, ActorPoolStrategy) stateful model actors, each loading the
                                                  version (GPUs if asked)
      -> driver streams the result into predictions.parquet (+ errors.csv for bad files)

No task opens a path on the head's disk, so actors on any node score the same images. Bad files
(corrupt, truncated, not an image, wrongly sized under `size_rule="exact"`) become rows of
`errors.csv`; they never fail the job.

The output is stored in the storage URI (`pseudo-labels/<run>/`) and versioned: a new data
version adds `data/predictions.parquet` and `data/predictions_errors.csv` (and, with
`accept_threshold`, `data/pseudo_labels.csv`). The run is logged to MLflow (experiment
`pseudo-labeling`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from flowops import data, images, ray_client, storage
from flowops.data import DataVersion
from flowops.durable import atomic_write_bytes, atomic_write_text
from flowops.errors import InvalidInput, NotFound
from flowops.image_model import Preprocess
from flowops.refs import ModelRef
from flowops.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENT = "pseudo-labeling"
PREDICTIONS_FILE = "predictions.parquet"
ERRORS_FILE = "predictions_errors.csv"
PSEUDO_LABELS_FILE = "pseudo_labels.csv"
OUTPUT_PREFIX = "pseudo-labels"  # <storage>/pseudo-labels/<run>/: every run's output
PSEUDO_COLUMNS = ["id", "label", "score", "model_version"]
EXIF_ORIENTATION = 0x0112
POOLS = ("unlabeled", "train", "holdout", "all")


class PseudoLabelConfig(BaseModel):
    """What to score with which model, and how much of the cluster to use."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str | None = Field(None, description="Default: models:/<model_name>@production.")
    data_version: str | None = Field(None, description="Data version to score (default: latest).")
    pool: Literal["unlabeled", "train", "holdout", "all"] = "unlabeled"
    batch_size: int = Field(1024, ge=1, le=65536, description="Images per model call.")
    actors: int = Field(1, ge=1, le=256, description="Model actors in the pool.")
    cpus_per_actor: float = Field(0.5, gt=0, le=64, description="CPUs reserved per model actor.")
    gpus_per_actor: float = Field(0.0, ge=0, le=8, description="GPUs per model actor.")
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Custom Ray resources each model actor needs: places "
        "the actors on the nodes that have them (e.g. a GPU type's node label, node:<ip>).")
    size_rule: Literal["resize", "exact"] = Field(
        "resize", description="resize: any size is resized; exact: other sizes are bad files."
    )
    accept_threshold: float | None = Field(
        None, gt=0, le=1, description="Also accept predictions with score >= this as pseudo-labels."
    )
    version_output: bool = Field(True, description="Cut a data version holding the predictions.")
    limit: int | None = Field(None, ge=1, description="Score only the first N images of the pool.")


@dataclass
class PseudoLabelResult:
    model_name: str
    model_version: str
    data_version: str
    pool: str
    images: int
    scored: int
    errors: int
    duration_s: float
    images_per_s: float
    predictions_path: str
    errors_path: str
    output_version: str | None = None
    accepted: int | None = None
    run_id: str | None = None
    class_counts: dict[str, int] = field(default_factory=dict)
    score_histogram: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Resolving inputs ---------------------------------------------------------------------------------


def default_model_uri(settings: Settings) -> str:
    return ModelRef.production(settings.model_name).uri


def pool_rows(version: DataVersion, pool: str) -> pd.DataFrame:
    """The manifest rows of a pool, in manifest order."""
    if pool not in POOLS:
        raise InvalidInput(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
    return images.select(version, None if pool == "all" else [pool]).reset_index(drop=True)


# The Ray Data pipeline ----------------------------------------------------------------------------


def load_images(batch: dict[str, np.ndarray], preprocess: Preprocess, size_rule: str) -> dict:
    """Decode a batch of images (their original bytes) with the model's own preprocessing into
    (N, C, H, W); a bad image gets a zero image and an error message (an error row, never a
    failed job)."""
    import io

    from PIL import Image

    n = len(batch["id"])
    pixels = np.zeros((n, *preprocess.shape), dtype=np.float32)
    errors = []
    height, width = preprocess.size
    for i, raw in enumerate(batch["bytes"]):
        try:
            pixels[i] = preprocess.decode(raw)  # first: an undecodable file says so, clearly
            if size_rule == "exact":
                with Image.open(io.BytesIO(raw)) as img:
                    w, h = img.size
                    if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                        w, h = h, w  # shown rotated by a quarter turn
                if (w, h) != (width, height):
                    pixels[i] = 0
                    errors.append(f"wrong size {w}x{h}, expected {width}x{height}")
                    continue
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes this file a bad file
            errors.append(str(exc).splitlines()[0][:200] or type(exc).__name__)
            continue
        errors.append("")
    return {"id": batch["id"], "pixels": pixels, "error": np.asarray(errors, dtype=object)}


class Predictor:
    """A stateful model actor: loads the registered version itself (its task code comes with it,
    so a user's network class need not be importable where the job was submitted), then scores
    decoded batches."""

    def __init__(self, settings: Settings, model_uri: str, device: str = "cpu"):
        import torch

        from flowops.model import load_model

        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model = load_model(settings, model_uri, device).model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from flowops.model import predict_proba, to_batch

        probs = predict_proba(self.model, to_batch(batch["pixels"]))
        return {"id": batch["id"], "error": batch["error"], "probabilities": probs.astype(np.float32)}


def score_batches(
    settings: Settings, ds: Any, model_uri: str, preprocess: Preprocess, cfg: PseudoLabelConfig,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream scored batches (id, error, probabilities) of a Ray Dataset of images (id, bytes; see
    `images.dataset`) through Ray Data: `preprocess` (the model's) decodes, actors holding
    `model_uri` (a numbered version) score."""
    import ray

    # Ray Data's progress stays on (RAY_DATA_DISABLE_PROGRESS_BARS=1 turns it off): bars in a
    # terminal, a line every 10 s into a job's log (RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL); the
    # submitting command's `--json` sends that log to stderr.
    ray.data.DataContext.get_current().print_on_execution_start = False
    ds = ds.map_batches(
        load_images, batch_size=cfg.batch_size, batch_format="numpy",
        fn_kwargs={"preprocess": preprocess, "size_rule": cfg.size_rule},
        num_cpus=cfg.cpus_per_actor,
    )
    device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    ds = ds.map_batches(
        Predictor, batch_size=cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"settings": settings, "model_uri": model_uri, "device": device},
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        resources=cfg.resources or None,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


# Writing the output -------------------------------------------------------------------------------


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("label", pa.string()),
        ("score", pa.float32()), ("probabilities", pa.list_(pa.float32())),
        ("entropy", pa.float32()), ("margin", pa.float32()),
        ("model_version", pa.string()), ("data_version", pa.string()),
    ])


@dataclass
class _Tally:
    scored: int = 0
    errors: int = 0
    classes: Counter = field(default_factory=Counter)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(10, dtype=np.int64))


def write_predictions(
    batches: Iterator[dict[str, np.ndarray]], classes: list[str], model_version: str,
    data_version: str, out_dir: Path, paths: dict[str, str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> _Tally:
    """Stream scored batches into predictions.parquet and bad files into the errors file; `paths`
    gives each id's manifest path (empty for a sharded version, or when not given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    schema = _schema()
    tally = _Tally()
    class_arr = np.asarray(classes, dtype=object)
    paths = paths or {}
    with pq.ParquetWriter(out_dir / PREDICTIONS_FILE, schema) as writer, \
            open(out_dir / ERRORS_FILE, "w") as err_fh:
        err_fh.write("id,path,error\n")
        for batch in batches:
            ids = np.asarray(batch["id"]).astype(str)
            bad = np.asarray([bool(e) for e in batch["error"]], dtype=bool)
            for i in np.flatnonzero(bad):
                err_fh.write(_csv_row(ids[i], paths.get(ids[i], ""), batch["error"][i]))
            tally.errors += int(bad.sum())
            good = ~bad
            if not good.any():
                continue
            probs = np.asarray(batch["probabilities"])[good]
            top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else None
            score = probs.max(axis=1)
            margin = (top2[:, 1] - top2[:, 0]) if top2 is not None else score
            entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
            labels = class_arr[probs.argmax(axis=1)]
            n = int(good.sum())
            table = pa.table({
                "id": pa.array(ids[good]),
                "path": pa.array([paths.get(i, "") for i in ids[good]], pa.string()),
                "label": pa.array(labels.astype(str)),
                "score": pa.array(score.astype(np.float32)),
                "probabilities": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, (n + 1) * probs.shape[1], probs.shape[1],
                                       dtype=np.int32)),
                    pa.array(probs.reshape(-1).astype(np.float32)),
                ),
                "entropy": pa.array(entropy.astype(np.float32)),
                "margin": pa.array(margin.astype(np.float32)),
                "model_version": pa.array([model_version] * n),
                "data_version": pa.array([data_version] * n),
            }, schema=schema)
            writer.write_table(table)
            tally.scored += n
            tally.classes.update(labels.tolist())
            tally.histogram += np.histogram(score, bins=10, range=(0.0, 1.0))[0]
            if on_batch:
                on_batch(tally.scored + tally.errors)
    return tally


def _csv_row(*values: Any) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([str(v) for v in values])
    return buf.getvalue()


# Accepting confident predictions ------------------------------------------------------------------


def human_labeled_ids(settings: Settings, manifest: pd.DataFrame) -> set[str]:
    """Images a person has labeled: in the label inbox, or labeled rows of the manifest."""
    from flowops import labels as inbox

    return set(manifest.loc[manifest["label"] != "", "id"]) | inbox.labeled_image_ids(settings)


def select_confident(
    predictions: pd.DataFrame, threshold: float, exclude: set[str]
) -> pd.DataFrame:
    """Predictions with score >= threshold on images no human has labeled, as pseudo-label rows."""
    if not 0 < threshold <= 1:
        raise InvalidInput(f"confidence threshold {threshold} is outside (0, 1]")
    picked = predictions[(predictions["score"] >= threshold) & ~predictions["id"].isin(exclude)]
    picked = picked.drop_duplicates("id", keep="last")
    return picked[PSEUDO_COLUMNS].reset_index(drop=True)


def _replace_file(src: Path, dest: Path) -> None:
    """Copy src to dest as a new file (dest may be a hard link into the cache)."""
    atomic_write_bytes(dest, src.read_bytes())


def _write_pseudo(settings: Settings, staging: Path, predictions: pd.DataFrame,
                  threshold: float) -> int:
    manifest = pd.read_csv(staging / "manifest.csv", dtype=str, keep_default_na=False)
    picked = select_confident(predictions, threshold, human_labeled_ids(settings, manifest))
    picked = picked[picked["id"].isin(set(manifest["id"]))]
    atomic_write_text(staging / PSEUDO_LABELS_FILE, picked.to_csv(index=False, float_format="%.6f"))
    return len(picked)


def accept_pseudo_labels(
    settings: Settings, threshold: float, data_version: str | None = None
) -> tuple[data.VersionInfo, int]:
    """Cut a data version whose `pseudo_labels.csv` holds the confident predictions of a version.

    Reads `predictions.parquet` of `data_version` (default latest); images labeled by people (the
    inbox, labeled manifest rows) are left out. The manifest is never changed.
    """
    version = data.open_version(settings, data_version)
    predictions = read_predictions(version)
    accepted: dict[str, int] = {}

    def apply(staging: Path) -> None:
        accepted["n"] = _write_pseudo(settings, staging, predictions, threshold)

    model_versions = ",".join(sorted(set(predictions["model_version"]))) or "-"
    info = data.cut_version(
        settings, f"pseudo-labels: score >= {threshold} from model v{model_versions} "
        f"(predictions of {version.tag})", apply,
    )
    return info, accepted.get("n", 0)


def read_predictions(version: DataVersion) -> pd.DataFrame:
    """`predictions.parquet` of a data version; NotFound when no pseudo-label run wrote one."""
    path = version.root / PREDICTIONS_FILE
    if not path.exists():
        raise NotFound(
            f"data version {version.tag} holds no predictions; run `flowops pseudo-label` first"
        )
    return pd.read_parquet(path)


# The workload -------------------------------------------------------------------------------------


def run_pseudo_label(
    settings: Settings, cfg: PseudoLabelConfig, on_progress: Callable[[str], None] | None = None
) -> PseudoLabelResult:
    """Score a pool with a registered model; store, version and log the predictions."""
    from flowops import model as model_lib

    say = on_progress or (lambda msg: print(msg, flush=True))
    # 1. The model first: an unknown URI fails before any data is read.
    uri = cfg.model_uri or default_model_uri(settings)
    name, version = model_lib.resolve_model_version(settings, uri)
    source = data.open_version(settings, cfg.data_version)
    tag = source.tag
    loaded = model_lib.load_model(settings, ModelRef.of(name, version))
    say(f"model {name} v{version} ({uri}); data version {tag}, pool {cfg.pool}")

    if source.classes != [str(c) for c in loaded.classes]:
        raise InvalidInput(
            f"model {name} v{version} predicts classes {loaded.classes}, but data version {tag} "
            f"has classes {source.classes}"
        )
    rows = pool_rows(source, cfg.pool)
    if cfg.limit:
        rows = rows.iloc[: cfg.limit]
    if rows.empty:
        raise InvalidInput(f"pool {cfg.pool!r} of data version {tag} is empty; nothing to score")
    store = storage.check(settings, "pseudo-label")  # where the output goes, before any work

    run_name = f"pseudo-label-{tag}-m{version}-{time.strftime('%Y%m%d-%H%M%S')}"
    ray_client.connect(settings)
    say(f"scoring {len(rows)} images with {cfg.actors} actor(s), batch size {cfg.batch_size}")
    started = time.perf_counter()
    next_report = [0]

    def progress(done: int) -> None:
        if done >= next_report[0]:
            say(f"  {done}/{len(rows)} images")
            next_report[0] = done + max(len(rows) // 5, 1)

    with tempfile.TemporaryDirectory(prefix="flowops-pseudo-label-") as scratch:
        out_dir = Path(scratch)
        batches = score_batches(settings, images.dataset(settings, source, rows),
                                ModelRef.of(name, version).uri, loaded.preprocess, cfg)
        tally = write_predictions(batches, loaded.classes, version, tag, out_dir,
                                  paths=dict(zip(rows["id"], rows["path"], strict=True)),
                                  on_batch=progress)
        duration = time.perf_counter() - started
        rate = (tally.scored + tally.errors) / duration if duration > 0 else 0.0
        hist = {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": int(n) for i, n in enumerate(tally.histogram)}
        stored = f"{OUTPUT_PREFIX}/{run_name}"
        for file_name in (PREDICTIONS_FILE, ERRORS_FILE):
            store.write_bytes(f"{stored}/{file_name}", (out_dir / file_name).read_bytes())
        result = PseudoLabelResult(
            model_name=name, model_version=version, data_version=tag, pool=cfg.pool,
            images=len(rows), scored=tally.scored, errors=tally.errors,
            duration_s=round(duration, 3), images_per_s=round(rate, 1),
            predictions_path=store.url(f"{stored}/{PREDICTIONS_FILE}"),
            errors_path=store.url(f"{stored}/{ERRORS_FILE}"),
            class_counts={c: int(tally.classes.get(c, 0)) for c in loaded.classes},
            score_histogram=hist,
        )
        say(f"scored {tally.scored} images, {tally.errors} bad file(s), {rate:.0f} images/s; "
            f"stored in {store.url(stored)}")
        if cfg.version_output:
            _version_output(settings, cfg, result, out_dir)
            say(f"predictions versioned as data version {result.output_version}")
        _log_run(settings, cfg, result, run_name, uri, out_dir / ERRORS_FILE)
    return result


def _version_output(settings: Settings, cfg: PseudoLabelConfig, result: PseudoLabelResult,
                    out_dir: Path) -> None:
    """Cut a data version (on top of the latest) holding the predictions and errors files."""
    predictions = pd.read_parquet(out_dir / PREDICTIONS_FILE)

    def apply(staging: Path) -> None:
        _replace_file(out_dir / PREDICTIONS_FILE, staging / PREDICTIONS_FILE)
        _replace_file(out_dir / ERRORS_FILE, staging / ERRORS_FILE)
        if cfg.accept_threshold is not None:
            result.accepted = _write_pseudo(settings, staging, predictions, cfg.accept_threshold)

    info = data.cut_version(
        settings, f"predictions of {result.model_name} v{result.model_version} on "
        f"{result.data_version}/{cfg.pool}: {result.scored} scored, {result.errors} bad", apply,
    )
    result.output_version = info.id


def _log_run(settings: Settings, cfg: PseudoLabelConfig, result: PseudoLabelResult,
             run_name: str, uri: str, errors_file: Path) -> None:
    import mlflow

    from flowops import tracking

    with tracking.start_run(settings, EXPERIMENT, run_name=run_name) as run:
        mlflow.set_tags({"workload": "pseudo_label", "data_version": result.data_version,
                         "model_version": result.model_version, "model_name": result.model_name,
                         "output_version": result.output_version or "",
                         "predictions": result.predictions_path})
        mlflow.log_params({"model_uri": uri, "model_version": result.model_version,
                           "data_version": result.data_version,
                           "pool": cfg.pool, "batch_size": cfg.batch_size, "actors": cfg.actors,
                           "cpus_per_actor": cfg.cpus_per_actor,
                           "gpus_per_actor": cfg.gpus_per_actor, "size_rule": cfg.size_rule,
                           "accept_threshold": cfg.accept_threshold})
        mlflow.log_metrics({"images": result.images, "scored": result.scored,
                            "errors": result.errors, "duration_s": result.duration_s,
                            "images_per_s": result.images_per_s})
        if result.accepted is not None:
            mlflow.log_metric("accepted_pseudo_labels", result.accepted)
        mlflow.log_metrics({f"class_{c}": n for c, n in result.class_counts.items()})
        mlflow.log_dict({"score_histogram": result.score_histogram,
                         "class_counts": result.class_counts}, "pseudo_label_summary.json")
        mlflow.log_artifact(str(errors_file))
        result.run_id = run.info.run_id
