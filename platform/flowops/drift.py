"""Drift detection: do live inputs still look like the data the model was trained on?

The **reference** is built from a data version's training images and the model being served:

- image statistics per image (mean intensity, spread, fraction of ink pixels, centre of mass,
  edge energy);
- the model's penultimate-layer features (`model.embed(x)`), reduced to their top principal
  components fitted on the reference (fewer tests, more power than 64 raw ReLU units);
- the distribution of the model's predicted classes on the reference images.

A **window** of live inputs (an array of images, e.g. one minute of traffic) is compared with it:
a two-sample Kolmogorov-Smirnov test per continuous feature, with a Bonferroni (default) or
Benjamini-Hochberg correction over all of them, and a chi-square test (or PSI) of the predicted
classes. The window has drifted when any corrected feature test or the class test rejects. With
the defaults the false-alarm rate is at most `alpha + class_alpha` = 2% per window.

Live inputs: every serving replica keeps a uniform sample (reservoir) of the images it classified
and writes it every `input_window_s` seconds (default 60) to `<home>/drift/windows/` as
`<unix time>-<replica>.npy` (N, S, S) in [0, 1]. Any other window file works too: `.npy` with shape
(N, S, S) or (N, S*S), values in [0, 1] or 0-255, or `.parquet` with a column `pixels` (flattened
S*S values) or `image` (PNG/JPEG bytes).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from flowops import events
from flowops.durable import atomic_write_bytes, wait_until
from flowops.errors import InvalidInput, NotFound, validated
from flowops.refs import ModelRef
from flowops.settings import Settings

IMAGE_STATS = ["mean_intensity", "std_intensity", "ink_fraction", "center_x", "center_y",
               "edge_energy"]
EXPERIMENT = "drift-monitor"


class DriftConfig(BaseModel):
    """Thresholds of the drift tests (env-free: pass them explicitly, e.g. from the job's flags)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.01, gt=0, lt=1, description="Family-wise (Bonferroni) or FDR (BH) level "
                         "of the feature KS tests.")
    correction: Literal["bonferroni", "bh"] = Field("bonferroni", description="Multiple-testing correction.")
    class_test: Literal["chi2", "psi"] = Field("chi2", description="Test of the predicted classes.")
    class_alpha: float = Field(0.01, gt=0, lt=1, description="Level of the chi-square class test.")
    psi_threshold: float = Field(0.25, gt=0, description="PSI above which classes drifted (class_test=psi).")
    embedding_components: int = Field(8, ge=0, le=64, description="Principal components of the "
                                      "penultimate features that are tested (0: none).")
    min_window: int = Field(30, ge=5, description="Fewest images a window must hold.")
    ink_threshold: float = Field(0.5, gt=0, lt=1, description="Pixel value above which a pixel is ink.")
    persist: int = Field(2, ge=1, le=100, description="Consecutive drifted windows of a model before "
                         "the loop is told (drift_detected): one noisy window does not retrain.")


def make_config(**values: Any) -> DriftConfig:
    """A DriftConfig from user input; a bad value is one InvalidInput line."""
    return validated(DriftConfig, "drift setting", **{k: v for k, v in values.items() if v is not None})


# Features -------------------------------------------------------------------------------------------


def as_images(array: Any, image_size: int | None = None) -> np.ndarray:
    """(N, S, S) float32 in [0, 1] from (N, S, S) or (N, S*S) arrays in [0, 1] or 0-255."""
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 2 and image_size and arr.shape[1] == image_size * image_size:
        arr = arr.reshape(-1, image_size, image_size)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise InvalidInput(
            f"a window must be an array of square images (N, S, S) or (N, S*S); got shape {list(arr.shape)}"
        )
    if image_size and arr.shape[1] != image_size:
        raise InvalidInput(f"window images are {arr.shape[1]}x{arr.shape[2]}, the model expects "
                           f"{image_size}x{image_size}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise InvalidInput("window pixel values must be finite, in [0, 1] or 0-255")
    return arr / 255.0 if arr.max() > 1.0 else arr


def image_statistics(images: np.ndarray, ink_threshold: float = 0.5) -> np.ndarray:
    """(N, len(IMAGE_STATS)) per-image statistics of (N, S, S) images in [0, 1]."""
    n, size, _ = images.shape
    flat = images.reshape(n, -1)
    mass = images.sum(axis=(1, 2)) + 1e-6
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    center_x = (images.sum(axis=1) * coords).sum(axis=1) / mass
    center_y = (images.sum(axis=2) * coords).sum(axis=1) / mass
    grad = (np.abs(np.diff(images, axis=1)).mean(axis=(1, 2))
            + np.abs(np.diff(images, axis=2)).mean(axis=(1, 2)))
    return np.stack([
        flat.mean(axis=1), flat.std(axis=1), (flat > ink_threshold).mean(axis=1),
        center_x, center_y, grad,
    ], axis=1).astype(np.float64)


def model_outputs(model, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and predicted class indices of a torch ImageClassifier."""
    import torch

    from flowops.model import to_batch

    model.eval()
    feats, preds = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_batch(images[start:start + batch])
            emb = model.embed(x)
            feats.append(emb.numpy())
            preds.append(model.head[-1](emb).argmax(dim=1).numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(preds)


# Reference ------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """What a window is compared with (saved as .npz next to the drift reports)."""

    stats: np.ndarray  # (N, len(IMAGE_STATS))
    embedding: np.ndarray  # (N, k) principal-component scores; k may be 0
    pca_mean: np.ndarray  # (D,)
    pca_components: np.ndarray  # (k, D)
    class_probs: np.ndarray  # (C,) predicted-class (or label) distribution, smoothed
    classes: list[str]
    image_size: int
    data_version: str = ""
    model_version: str = ""

    def feature_names(self) -> list[str]:
        return IMAGE_STATS + [f"embedding_pc{i + 1}" for i in range(self.embedding.shape[1])]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, stats=self.stats, embedding=self.embedding, pca_mean=self.pca_mean,
                 pca_components=self.pca_components, class_probs=self.class_probs,
                 meta=np.array(json.dumps({"classes": self.classes, "image_size": self.image_size,
                                           "data_version": self.data_version,
                                           "model_version": self.model_version})))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path) as npz:
            meta = json.loads(str(npz["meta"]))
            return cls(stats=npz["stats"], embedding=npz["embedding"], pca_mean=npz["pca_mean"],
                       pca_components=npz["pca_components"], class_probs=npz["class_probs"], **meta)


def build_reference(
    images: np.ndarray,
    classes: list[str],
    *,
    model=None,
    labels: np.ndarray | None = None,
    config: DriftConfig | None = None,
    data_version: str = "",
    model_version: str = "",
) -> Reference:
    """A reference from training images; with a model, also its features and predicted classes."""
    config = config or DriftConfig()
    images = as_images(images)
    stats = image_statistics(images, config.ink_threshold)
    n_classes = len(classes)
    if model is not None and config.embedding_components > 0:
        feats, preds = model_outputs(model, images)
        mean = feats.mean(axis=0)
        _, _, vt = np.linalg.svd(feats - mean, full_matrices=False)
        components = vt[: config.embedding_components]
        embedding = (feats - mean) @ components.T
    else:
        preds = model_outputs(model, images)[1] if model is not None else None
        mean, components, embedding = np.zeros(0), np.zeros((0, 0)), np.zeros((len(images), 0))
    source = preds if preds is not None else labels
    if source is None:
        raise InvalidInput("a reference needs a model (predicted classes) or the images' labels")
    counts = np.bincount(np.asarray(source, dtype=int), minlength=n_classes)[:n_classes]
    return Reference(stats=stats, embedding=embedding, pca_mean=mean, pca_components=components,
                     class_probs=_smoothed(counts), classes=list(classes),
                     image_size=int(images.shape[1]), data_version=data_version,
                     model_version=model_version)


def _smoothed(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64) + 0.5
    return counts / counts.sum()


# The test ------------------------------------------------------------------------------------------------


@dataclass
class DriftReport:
    n: int
    drifted: bool
    score: float  # largest KS statistic
    min_p_adjusted: float
    features: list[dict[str, Any]]  # name, statistic, p_value, p_adjusted, drifted
    class_p: float | None
    class_psi: float | None
    class_drifted: bool
    predicted_counts: dict[str, int] = field(default_factory=dict)
    correction: str = "bonferroni"
    data_version: str = ""
    model_version: str = ""
    ts: float = field(default_factory=time.time)

    @property
    def drifted_features(self) -> list[str]:
        return [f["name"] for f in self.features if f["drifted"]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"drifted_features": self.drifted_features}


def adjust_p_values(p_values: np.ndarray, method: str) -> np.ndarray:
    """Bonferroni, or Benjamini-Hochberg step-up adjusted p-values (capped at 1)."""
    from scipy import stats as st

    p = np.asarray(p_values, dtype=np.float64)
    if method == "bonferroni":
        return np.minimum(p * len(p), 1.0)
    return st.false_discovery_control(p, method="bh")


def ks_test_columns(reference: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample two-sided KS statistics and p-values, one per column of (N, F) and (M, F).

    The p-value is the asymptotic one (`kstwo` with the effective sample size n*m/(n+m)): scipy's
    default would compute exact p-values for windows this small, slightly more conservative than
    the asymptotic ones with which the false-alarm rate in docs/observability.md was measured.
    """
    from scipy import stats as st

    result = st.ks_2samp(reference, live, axis=0, method="asymp")
    return np.atleast_1d(result.statistic), np.atleast_1d(result.pvalue)


def population_stability_index(ref_probs: np.ndarray, counts: np.ndarray) -> float:
    live = _smoothed(counts)
    return float(np.sum((live - ref_probs) * np.log(live / ref_probs)))


def check_window(
    reference: Reference,
    images: np.ndarray,
    predicted: np.ndarray | None = None,
    *,
    model=None,
    config: DriftConfig | None = None,
) -> DriftReport:
    """Compare a window of live images (and their predicted class indices) with the reference.

    With `model`, the window's penultimate features are tested too and, when `predicted` is not
    given, the model's predictions are used for the class test.
    """
    from scipy import stats as st

    config = config or DriftConfig()
    images = as_images(images, reference.image_size)
    if len(images) < config.min_window:
        raise InvalidInput(f"a drift window needs at least {config.min_window} images; got {len(images)}")
    ref_cols, live_cols = reference.stats, image_statistics(images, config.ink_threshold)
    if model is not None:
        feats, preds = model_outputs(model, images)
        if predicted is None:
            predicted = preds
        if reference.embedding.shape[1]:
            emb = (feats - reference.pca_mean) @ reference.pca_components.T
            ref_cols = np.hstack([ref_cols, reference.embedding])
            live_cols = np.hstack([live_cols, emb])
    names = reference.feature_names()[: ref_cols.shape[1]]
    statistics, p_raw = ks_test_columns(ref_cols, live_cols)
    p_adj = adjust_p_values(p_raw, config.correction)
    features = [
        {"name": name, "statistic": round(float(d), 5), "p_value": float(p),
         "p_adjusted": float(pa), "drifted": bool(pa < config.alpha)}
        for name, d, p, pa in zip(names, statistics, p_raw, p_adj, strict=True)
    ]
    class_p = class_psi = None
    class_drifted = False
    predicted_counts: dict[str, int] = {}
    if predicted is not None:
        idx = np.asarray(predicted, dtype=int)
        if idx.size != len(images) or idx.min(initial=0) < 0 or idx.max(initial=0) >= len(reference.classes):
            raise InvalidInput(
                f"predicted must hold one class index (0..{len(reference.classes) - 1}) per image"
            )
        counts = np.bincount(idx, minlength=len(reference.classes))
        predicted_counts = {c: int(n) for c, n in zip(reference.classes, counts, strict=True)}
        class_psi = population_stability_index(reference.class_probs, counts)
        class_p = float(st.chisquare(counts, reference.class_probs * counts.sum()).pvalue)
        class_drifted = (class_p < config.class_alpha if config.class_test == "chi2"
                         else class_psi > config.psi_threshold)
        class_psi = round(class_psi, 5)
    drifted = class_drifted or any(f["drifted"] for f in features)
    return DriftReport(
        n=len(images), drifted=bool(drifted),
        score=round(max(f["statistic"] for f in features), 5),
        min_p_adjusted=float(p_adj.min()), features=features, class_p=class_p, class_psi=class_psi,
        class_drifted=bool(class_drifted), predicted_counts=predicted_counts,
        correction=config.correction, data_version=reference.data_version,
        model_version=reference.model_version,
    )


# In the platform --------------------------------------------------------------------------------------------


def drift_dir(settings: Settings) -> Path:
    return settings.home / "drift"


def windows_dir(settings: Settings) -> Path:
    """Where serving replicas write live-input windows."""
    return drift_dir(settings) / "windows"


class InputWindow:
    """A uniform sample of at most `capacity` images out of all images added (reservoir sampling),
    so a window of heavy traffic stays small and is still representative."""

    def __init__(self, capacity: int, seed: int | None = None) -> None:
        self.capacity = capacity
        self.images: list[np.ndarray] = []
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, images: list[np.ndarray]) -> None:
        for image in images:
            self.seen += 1
            if len(self.images) < self.capacity:
                self.images.append(image)
            else:
                j = int(self._rng.integers(self.seen))
                if j < self.capacity:
                    self.images[j] = image

    def take(self) -> np.ndarray | None:
        """The sample as (N, S, S) float32 (None when empty); starts a new window."""
        images, self.images, self.seen = self.images, [], 0
        return np.stack(images).astype(np.float32) if images else None


def write_window(settings: Settings, images: np.ndarray, tag: str, keep: int = 500) -> Path:
    """Write one window atomically (the monitor never reads half a file); keep the newest `keep`."""
    folder = windows_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time():.3f}-{tag}.npy"
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    for old in sorted(folder.glob("*.npy"), key=lambda p: p.name)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def newest_window(settings: Settings) -> Path:
    """The newest live-input window the serving app wrote (NotFound if none yet)."""
    files = sorted(windows_dir(settings).glob("*.npy"), key=lambda p: p.name)
    if not files:
        raise NotFound(f"no live-input window in {windows_dir(settings)} yet: the serving app writes "
                       "one per `input_window_s` (default 60 s) of traffic; or pass --window FILE")
    return files[-1]


def save_report(settings: Settings, record: dict[str, Any]) -> None:
    """Keep a checked window's report in the state database (the exporter turns the latest one
    into flowops_drift_* gauges; the history decides whether a drift persisted)."""
    from flowops import statedb

    with statedb.transaction(settings) as conn:
        conn.execute(statedb.drift_reports.insert().values(
            ts=float(record.get("ts") or time.time()), model=str(record.get("model", "")),
            drifted=bool(record.get("drifted")), report=record))


def latest_report(settings: Settings) -> dict[str, Any]:
    """The last drift report written by run_drift_check (NotFound if none)."""
    from flowops import statedb

    table = statedb.drift_reports
    with statedb.reading(settings) as conn:
        row = conn.execute(table.select().order_by(table.c.id.desc()).limit(1)).first()
    if row is None:
        raise NotFound("no drift report yet; run `flowops monitor drift --window ...`")
    return row.report


def load_window(path: Path, image_size: int) -> np.ndarray:
    """A window file (.npy, or .parquet with `pixels` or `image` bytes) as (N, S, S) in [0, 1]."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"window file {path} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InvalidInput(f"{path} is not a readable .npy array: {exc}") from None
        return as_images(array, image_size)
    if path.suffix == ".parquet":
        import pandas as pd

        from flowops.model import decode_image

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
            raise InvalidInput(f"{path} is not a readable parquet file: {exc}") from None
        if "pixels" in frame.columns:
            return as_images(np.stack([np.asarray(v, dtype=np.float32) for v in frame["pixels"]]),
                             image_size)
        if "image" in frame.columns:
            return np.stack([decode_image(bytes(b), image_size) for b in frame["image"]])
        raise InvalidInput(f"{path} needs a column `pixels` (flattened values) or `image` (bytes); "
                           f"it has {list(frame.columns)}")
    raise InvalidInput(f"window file {path} must be .npy or .parquet")


def reference_images(version) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training images of an opened data version (N, S, S), their label indices, the classes."""
    from flowops.evaluate import version_split

    if version.rows("train", labeled=True).empty:
        raise InvalidInput(f"data version {version.tag} has no training images to build a reference from")
    train = version_split(version, "train")
    return train.x, train.y, version.classes


def load_reference(settings: Settings, model_uri: str, data_version: str | None = None,
                   config: DriftConfig | None = None):
    """(reference, loaded model): the reference is cached per (data version, model version)."""
    from flowops import data
    from flowops.model import load_model

    config = config or DriftConfig()
    loaded = load_model(settings, model_uri)
    if data_version is None:
        data_version = _training_data_version(settings, loaded.name, loaded.version)
    data_version = data.resolve_version(settings, data_version)
    path = (drift_dir(settings) / "reference" /
            f"{data_version}-{loaded.name}-{loaded.version}-pc{config.embedding_components}.npz")
    if path.exists():
        return Reference.load(path), loaded
    images, labels, classes = reference_images(data.open_version(settings, data_version))
    ref = build_reference(images, classes, model=loaded.model, labels=labels, config=config,
                          data_version=data_version, model_version=loaded.version)
    ref.save(path)
    return ref, loaded


def _training_data_version(settings: Settings, name: str, version: str) -> str | None:
    """The data version a model version was trained on (its run's `data_version` param/tag), if known."""
    from flowops.tracking import configure_mlflow

    client = configure_mlflow(settings)
    try:
        mv = client.get_model_version(name, version)
        found = mv.tags.get("data_version")
        if not found and mv.run_id:
            run = client.get_run(mv.run_id)
            found = run.data.params.get("data_version") or run.data.tags.get("data_version")
        return found or None
    except Exception:  # noqa: BLE001 - unknown lineage: fall back to the latest version
        return None


def run_drift_check(
    settings: Settings,
    window: Path,
    *,
    model_uri: str | None = None,
    data_version: str | None = None,
    config: DriftConfig | None = None,
    trigger: bool = True,
    log_to_mlflow: bool = True,
    mlflow_step: int | None = None,
) -> DriftReport:
    """Check one window file against the served model's training data.

    Keeps the report in the state database (`save_report`), logs it to MLflow (experiment
    drift-monitor: into the active run as step `mlflow_step` when one is open, as the watch does,
    else in a run of its own), and when the last `config.persist` windows of the model all
    drifted and `trigger` is set, appends a `drift_detected` event to the loop's event log.
    """
    config = config or DriftConfig()
    model_uri = model_uri or ModelRef.production(settings.model_name).uri
    reference, loaded = load_reference(settings, model_uri, data_version, config)
    images = load_window(Path(window), reference.image_size)
    report = check_window(reference, images, model=loaded.model, config=config)
    record = report.to_dict() | {"window": str(window), "model_uri": model_uri, "model": loaded.name}
    save_report(settings, record)
    if log_to_mlflow:
        _log_report(settings, report, record, mlflow_step)
    if report.drifted and trigger and persisted(settings, loaded.name, config.persist):
        _emit_drift_event(settings, report, loaded.name, config.persist)
    return report


def persisted(settings: Settings, model_name: str, windows: int) -> bool:
    """Whether the last `windows` checked windows of the model all drifted (drift history)."""
    from flowops import statedb

    table = statedb.drift_reports
    with statedb.reading(settings) as conn:
        last = conn.execute(table.select().where(table.c.model == model_name)
                            .order_by(table.c.id.desc()).limit(windows)).all()
    return len(last) >= windows and all(r.drifted for r in last)


def _log_report(settings: Settings, report: DriftReport, record: dict[str, Any],
                step: int | None) -> None:
    import mlflow

    from flowops.tracking import start_run

    metrics = {"drift_score": report.score, "drifted": float(report.drifted),
               "min_p_adjusted": report.min_p_adjusted,
               "drifted_features": float(len(report.drifted_features))}
    if report.class_p is not None:
        metrics |= {"class_p": report.class_p, "class_psi": report.class_psi}
    metrics |= {f"ks_{f['name']}": f["statistic"] for f in report.features}
    if step is not None and mlflow.active_run() is not None:  # a window of a monitoring session
        mlflow.log_metrics(metrics, step=step)
        mlflow.log_dict(record, f"windows/{step:05d}.json")
        return
    with start_run(settings, EXPERIMENT, run_name=f"drift-v{report.model_version}-{int(report.ts)}"):
        mlflow.log_params({"model_version": report.model_version, "data_version": report.data_version,
                           "window": record["window"], "n": report.n, "correction": report.correction})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"drifted": str(report.drifted).lower(), "stage": "drift-monitor"})
        mlflow.log_dict(record, "drift_report.json")


def _emit_drift_event(settings: Settings, report: DriftReport, model_name: str, windows: int) -> None:
    """Tell the loop: a `drift_detected` event in the loop's event log."""
    fields = {"model": model_name, "score": report.score, "data_version": report.data_version,
              "drifted_features": report.drifted_features, "class_drifted": report.class_drifted,
              "windows": windows}
    events.emit(settings, "drift_detected", version=report.model_version, **fields)


def watch(settings: Settings, window_dir: Path, *, interval_s: float, max_checks: int | None = None,
          stop_after_s: float | None = None, **kwargs: Any) -> list[DriftReport]:
    """Periodically check the newest unchecked window file in `window_dir` (the scheduled monitor).

    Stops after `max_checks` reports or `stop_after_s` seconds, whichever comes first (never, if
    neither is given). The session is one MLflow run, each window a step of it.
    """
    import mlflow

    from flowops.tracking import start_run

    with start_run(settings, EXPERIMENT, run_name=f"drift-watch-{int(time.time())}"):
        mlflow.set_tags({"stage": "drift-monitor", "window_dir": str(window_dir)})
        return _watch(settings, window_dir, interval_s=interval_s, max_checks=max_checks,
                      stop_after_s=stop_after_s, **kwargs)


def _watch(settings: Settings, window_dir: Path, *, interval_s: float, max_checks: int | None,
           stop_after_s: float | None, **kwargs: Any) -> list[DriftReport]:
    seen: set[str] = set()
    reports: list[DriftReport] = []
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s

    def newest_unseen() -> Path | None:
        """The newest window not seen yet; the older unseen ones are skipped (marked seen)."""
        pending = sorted((p for p in Path(window_dir).glob("*") if p.suffix in (".npy", ".parquet")
                          and p.name not in seen), key=lambda p: p.stat().st_mtime)
        seen.update(p.name for p in pending)
        return pending[-1] if pending else None

    while max_checks is None or len(reports) < max_checks:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            window = wait_until(newest_unseen, left, interval_s=interval_s, what="a new window")
        except TimeoutError:
            break
        reports.append(run_drift_check(settings, window, mlflow_step=len(reports), **kwargs))
    return reports
