"""Drift detection: do live inputs still look like the data the model was trained on?

The **reference** is built from a data version's training images and the model being served:

- image statistics per image (mean intensity, spread, fraction of ink pixels, centre of mass,
  edge energy, and the mean of each colour channel for colour models), computed on the pixels the
  model sees (its own preprocessing: channels, size; normalisation undone);
- the model's features (its task's `features`: `model.embed(x)` by default), reduced to their top
  principal components fitted on the reference (fewer tests, more power than 64 raw ReLU units);
- the distribution of the model's predicted classes on the reference images.

A **window** of live inputs (an array of images, e.g. one minute of traffic) is compared with it:
a two-sample Kolmogorov-Smirnov test per continuous feature, with a Bonferroni (default) or
Benjamini-Hochberg correction over all of them, and a chi-square test (or PSI) of the predicted
classes. The window has drifted when any corrected feature test or the class test rejects. With
the defaults the false-alarm rate is at most `alpha + class_alpha` = 2% per window.

Live inputs: every serving replica keeps a uniform sample (reservoir) of the images it classified
(decoded by the stable model's preprocessing) and writes it every `input_window_s` seconds
(default 60) to `drift/windows/` in the storage URI as `<unix time>-<replica>.npy`: (N, C, H, W) pixel values
in [0, 1] at the model's input size. Any other window file works too: `.npy` of images at the
model's input size, (N, H, W) grayscale, (N, C, H, W) or (N, H, W, C), or flattened (N, C*H*W),
values in [0, 1] or 0-255; or `.parquet` with a column `pixels` (one image per row, nested or
flattened like the .npy) or `image` (image file bytes, decoded by the model's preprocessing).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from flowops.durable import atomic_write_bytes
from flowops.errors import InvalidInput, NotFound, validated
from flowops.image_model import Preprocess, UndecodableImage
from flowops.settings import Settings

if TYPE_CHECKING:
    from flowops.model import LoadedModel

IMAGE_STATS = ["mean_intensity", "std_intensity", "ink_fraction", "center_x", "center_y",
               "edge_energy"]
CHANNEL_STATS = ["mean_red", "mean_green", "mean_blue"]  # colour models only
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


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def as_images(array: Any, preprocess: Preprocess | None = None) -> np.ndarray:
    """(N, C, H, W) float32 pixel values in [0, 1] from a window array: (N, H, W) grayscale,
    (N, C, H, W) or (N, H, W, C) with 1 or 3 channels, or (with `preprocess`) flattened
    (N, C*H*W); values in [0, 1] or 0-255. With `preprocess`, the images must be the model's input
    (its channels and size)."""
    arr = np.asarray(array, dtype=np.float32)
    want = preprocess.shape if preprocess is not None else None
    if want and arr.ndim == 2 and arr.shape[1] == int(np.prod(want)):
        arr = arr.reshape(-1, *want)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and (arr.shape[1:] == (*want[1:], want[0]) if want
                            else arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3)):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise InvalidInput("a window must be an array of images (N, H, W), (N, C, H, W) or "
                           f"(N, H, W, C) with 1 or 3 channels; got shape {list(arr.shape)}")
    if want and arr.shape[1:] != want:
        raise InvalidInput(f"window images are {_shape(arr.shape[1:])}, the model expects "
                           f"{_shape(want)} (channels x height x width)")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise InvalidInput("window pixel values must be finite, in [0, 1] or 0-255")
    return np.ascontiguousarray(arr / 255.0 if arr.max() > 1.0 else arr)


def raw_pixels(inputs: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Model inputs (N, C, H, W) -> the pixel values in [0, 1] they were made from (the
    preprocessing's normalisation undone)."""
    mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(preprocess.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.asarray(inputs, dtype=np.float32) * std + mean, 0.0, 1.0)


def stat_names(channels: int) -> list[str]:
    return IMAGE_STATS + (CHANNEL_STATS if channels == 3 else [])


def image_statistics(images: np.ndarray, ink_threshold: float = 0.5) -> np.ndarray:
    """(N, len(stat_names(C))) per-image statistics of (N, C, H, W) images in [0, 1]: those of
    the intensity (the mean over channels), and each channel's mean for colour images."""
    intensity = images.mean(axis=1)
    n, height, width = intensity.shape
    flat = intensity.reshape(n, -1)
    mass = intensity.sum(axis=(1, 2)) + 1e-6
    center_x = (intensity.sum(axis=1) * ((np.arange(width) + 0.5) / width)).sum(axis=1) / mass
    center_y = (intensity.sum(axis=2) * ((np.arange(height) + 0.5) / height)).sum(axis=1) / mass
    grad = (np.abs(np.diff(intensity, axis=1)).mean(axis=(1, 2)) if height > 1 else 0.0) + (
        np.abs(np.diff(intensity, axis=2)).mean(axis=(1, 2)) if width > 1 else 0.0)
    columns = [flat.mean(axis=1), flat.std(axis=1), (flat > ink_threshold).mean(axis=1),
               center_x, center_y, np.broadcast_to(grad, (n,))]
    if images.shape[1] == 3:
        columns += list(images.mean(axis=(2, 3)).T)
    return np.stack(columns, axis=1).astype(np.float64)


def model_outputs(model: LoadedModel, inputs: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Features (the task's `features`, flattened) and predicted class indices of model inputs
    (N, C, H, W)."""
    import torch

    from flowops.model import to_batch

    net = model.model.eval()
    device = next(net.parameters()).device
    feats, preds = [], []
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            x = to_batch(inputs[start:start + batch]).to(device)
            feats.append(model.task.features(net, x).float().reshape(len(x), -1).cpu().numpy())
            preds.append(net(x).argmax(dim=1).cpu().numpy())
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
    preprocess: Preprocess  # the model's: what a window's images must match
    data_version: str = ""
    model_version: str = ""

    def feature_names(self) -> list[str]:
        return (stat_names(self.preprocess.channels)
                + [f"embedding_pc{i + 1}" for i in range(self.embedding.shape[1])])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, stats=self.stats, embedding=self.embedding, pca_mean=self.pca_mean,
                 pca_components=self.pca_components, class_probs=self.class_probs,
                 meta=np.array(json.dumps({"classes": self.classes,
                                           "preprocess": self.preprocess.to_dict(),
                                           "data_version": self.data_version,
                                           "model_version": self.model_version})))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path) as npz:
            meta = json.loads(str(npz["meta"]))
            meta["preprocess"] = Preprocess.from_dict(meta["preprocess"])
            return cls(stats=npz["stats"], embedding=npz["embedding"], pca_mean=npz["pca_mean"],
                       pca_components=npz["pca_components"], class_probs=npz["class_probs"], **meta)


def build_reference(
    images: np.ndarray,
    classes: list[str],
    *,
    model: LoadedModel | None = None,
    preprocess: Preprocess | None = None,
    labels: np.ndarray | None = None,
    config: DriftConfig | None = None,
    data_version: str = "",
    model_version: str = "",
) -> Reference:
    """A reference from training images (pixel values, see `as_images`); with a model, also its
    features and predicted classes. The preprocessing is the model's (else `preprocess`, else the
    images' own shape, unnormalised)."""
    config = config or DriftConfig()
    preprocess = model.preprocess if model is not None else preprocess
    images = as_images(images, preprocess)
    if preprocess is None:
        preprocess = Preprocess(size=images.shape[2:], channels=images.shape[1])
    stats = image_statistics(images, config.ink_threshold)
    n_classes = len(classes)
    if model is not None and config.embedding_components > 0:
        feats, preds = model_outputs(model, preprocess.normalise(images))
        mean = feats.mean(axis=0)
        _, _, vt = np.linalg.svd(feats - mean, full_matrices=False)
        components = vt[: config.embedding_components]
        embedding = (feats - mean) @ components.T
    else:
        preds = model_outputs(model, preprocess.normalise(images))[1] if model is not None else None
        mean, components, embedding = np.zeros(0), np.zeros((0, 0)), np.zeros((len(images), 0))
    source = preds if preds is not None else labels
    if source is None:
        raise InvalidInput("a reference needs a model (predicted classes) or the images' labels")
    counts = np.bincount(np.asarray(source, dtype=int), minlength=n_classes)[:n_classes]
    return Reference(stats=stats, embedding=embedding, pca_mean=mean, pca_components=components,
                     class_probs=_smoothed(counts), classes=list(classes),
                     preprocess=preprocess, data_version=data_version,
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
    model: LoadedModel | None = None,
    config: DriftConfig | None = None,
) -> DriftReport:
    """Compare a window of live images (and their predicted class indices) with the reference.

    With `model` (the reference's), the window's features are tested too and, when `predicted` is
    not given, the model's predictions are used for the class test.
    """
    from scipy import stats as st

    config = config or DriftConfig()
    images = as_images(images, reference.preprocess)
    if len(images) < config.min_window:
        raise InvalidInput(f"a drift window needs at least {config.min_window} images; got {len(images)}")
    ref_cols, live_cols = reference.stats, image_statistics(images, config.ink_threshold)
    if model is not None:
        feats, preds = model_outputs(model, reference.preprocess.normalise(images))
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


WINDOWS = "drift/windows"  # under the storage URI: replicas on any node write there


def windows_location(settings: Settings) -> str:
    """Where serving replicas write live-input windows: `drift/windows` in the storage URI, which
    every node reaches (a folder of the home on the embedded stack, `s3://…` on a cluster)."""
    if "://" in settings.storage:
        return f"{settings.storage.rstrip('/')}/{WINDOWS}"
    return str(Path(settings.storage).expanduser().resolve() / WINDOWS)


class InputWindow:
    """A uniform sample of at most `capacity` images out of all images added (reservoir sampling),
    so a window of heavy traffic stays small and is still representative. The images are model
    inputs (C, H, W) of one preprocessing; a new one (another stable model) starts a new window."""

    def __init__(self, capacity: int, seed: int | None = None) -> None:
        self.capacity = capacity
        self.images: list[np.ndarray] = []
        self.seen = 0
        self.preprocess: Preprocess | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, images: list[np.ndarray], preprocess: Preprocess) -> None:
        if preprocess != self.preprocess:
            self.images, self.seen, self.preprocess = [], 0, preprocess
        for image in images:
            self.seen += 1
            if len(self.images) < self.capacity:
                self.images.append(image)
            else:
                j = int(self._rng.integers(self.seen))
                if j < self.capacity:
                    self.images[j] = image

    def take(self) -> np.ndarray | None:
        """The sample as (N, C, H, W) pixel values in [0, 1] (None when empty); starts a new window."""
        images, self.images, self.seen = self.images, [], 0
        return raw_pixels(np.stack(images), self.preprocess) if images else None


def write_window(settings: Settings, images: np.ndarray, tag: str, keep: int = 500) -> str:
    """Write one window whole (the monitor never reads half a file) into the storage URI; keep
    the newest `keep`. Returns where it is (a path or URI that `load_window` reads)."""
    from flowops.storage import open_storage

    store = open_storage(settings, "write a drift window")
    name = f"{WINDOWS}/{time.time():.3f}-{tag}.npy"
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    store.write_bytes(name, buf.getvalue())
    for old in [p for p in store.list(WINDOWS) if p.endswith(".npy")][:-keep]:
        store.delete(old)
    return f"{windows_location(settings)}/{name.rsplit('/', 1)[1]}"


def list_windows(settings: Settings, location: str) -> list[tuple[str, float]]:
    """(window, modification time) of the .npy/.parquet files in a folder or storage prefix."""
    from pyarrow import fs

    from flowops.storage import filesystem_for

    filesystem, root = filesystem_for(location, settings.storage_endpoint_url)
    found = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    base = location.rstrip("/")
    return [(f"{base}/{info.base_name}", info.mtime.timestamp() if info.mtime else 0.0)
            for info in found if info.type == fs.FileType.File
            and info.extension in ("npy", "parquet")]


def newest_window(settings: Settings) -> str:
    """The newest live-input window the serving app wrote (NotFound if none yet)."""
    location = windows_location(settings)
    files = sorted(w for w, _ in list_windows(settings, location) if w.endswith(".npy"))
    if not files:
        raise NotFound(f"no live-input window in {location} yet: the serving app writes "
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


def load_window(location: str | Path, preprocess: Preprocess, settings: Settings | None = None
                ) -> np.ndarray:
    """A window (.npy, or .parquet with `pixels` or `image` bytes: a file, or a URI in the storage)
    as (N, C, H, W) pixel values in [0, 1] at the model's input (`preprocess`)."""
    name = str(location)
    suffix = Path(name).suffix
    if suffix not in (".npy", ".parquet"):
        raise InvalidInput(f"window file {name} must be .npy or .parquet")
    payload = _read_window(name, settings)
    if suffix == ".npy":
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InvalidInput(f"{name} is not a readable .npy array: {exc}") from None
        return as_images(array, preprocess)
    import pandas as pd

    try:
        frame = pd.read_parquet(io.BytesIO(payload))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
        raise InvalidInput(f"{name} is not a readable parquet file: {exc}") from None
    if "pixels" in frame.columns:
        try:
            cells = np.stack([_nested(v) for v in frame["pixels"]])
        except ValueError:
            raise InvalidInput(f"{name}: the `pixels` rows must be images of one shape") from None
        return as_images(cells, preprocess)
    if "image" in frame.columns:
        try:
            inputs = np.stack([preprocess.decode(bytes(b)) for b in frame["image"]])
        except UndecodableImage as exc:
            raise InvalidInput(f"{name}: {exc}") from None
        return raw_pixels(inputs, preprocess)
    raise InvalidInput(f"{name} needs a column `pixels` (flattened values) or `image` (bytes); "
                       f"it has {list(frame.columns)}")


def _read_window(location: str, settings: Settings | None) -> bytes:
    """The bytes of a window file or storage object (S3 through the storage endpoint setting)."""
    from flowops.storage import filesystem_for

    endpoint = settings.storage_endpoint_url if settings is not None else None
    try:
        filesystem, path = filesystem_for(location, endpoint)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise InvalidInput(f"window file {location} does not exist") from None
    except (OSError, ValueError) as exc:
        if "://" not in location and not Path(location).exists():
            raise InvalidInput(f"window file {location} does not exist") from None
        raise InvalidInput(f"window {location} cannot be read: {str(exc).splitlines()[0]}") from None


def _nested(value: Any) -> np.ndarray:
    """A parquet cell (a flat list, or lists of lists as pyarrow reads them) as an array."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.stack([_nested(v) for v in value])
    return np.asarray(value, dtype=np.float32)
