"""Evaluation: a data version's images as arrays (either layout, read through `flowops.images`),
and a model's metrics on them.

Training (final holdout metrics), the validation gate (candidate vs production on the same
holdout) and `models reproduce` all measure through here, so the numbers are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flowops.data import DataVersion
from flowops.errors import InvalidInput
from flowops.image_model import Preprocess, UndecodableImage


@dataclass
class Split:
    """Preprocessed images (N, C, H, W) float32 and integer labels (indices into `classes`)."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)


def decode_image(image_id: str, payload: bytes, preprocess: Preprocess, tag: str) -> np.ndarray:
    """One image's bytes as the model sees them; an undecodable image is an InvalidInput naming it."""
    try:
        return preprocess.decode(payload)
    except UndecodableImage as exc:
        raise InvalidInput(f"image {image_id} of data version {tag}: {exc}") from None


def read_images(version: DataVersion, ids: list[str], preprocess: Preprocess) -> np.ndarray:
    """The images `ids` of a version, in that order, decoded the way serving does. Read through
    `flowops.images` (a folder version's files or a sharded version's shards), so this works for
    either layout without Ray."""
    from flowops import images

    out = np.empty((len(ids), *preprocess.shape), dtype=np.float32)
    at = {image_id: i for i, image_id in enumerate(ids)}
    found = 0
    for image_id, payload in images.iter_bytes(version.settings, version, ids):
        out[at[image_id]] = decode_image(image_id, payload, preprocess, version.tag)
        found += 1
    if found != len(at):
        raise InvalidInput(f"data version {version.tag}: {len(at) - found} asked image(s) not found")
    return out


def split_from_rows(version: DataVersion, rows: pd.DataFrame, preprocess: Preprocess) -> Split:
    """Rows (id, label) of a version's manifest, labels possibly replaced (pseudo-labels), as arrays."""
    classes = version.classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise InvalidInput(f"labels {unknown} are not among the data version's classes {classes}")
    return Split(
        x=read_images(version, list(rows["id"]), preprocess),
        y=np.array([index[label] for label in rows["label"]], dtype=np.int64),
        ids=list(rows["id"]),
    )


def version_split(version: DataVersion, split: str, preprocess: Preprocess) -> Split:
    """The labeled images of one split of a data version (e.g. `train` for a drift reference)."""
    return split_from_rows(version, version.rows(split, labeled=True), preprocess)


def holdout_split(version: DataVersion, preprocess: Preprocess) -> Split:
    """The holdout images of a data version: what every model of that version is measured on."""
    if version.rows("holdout").empty:
        raise InvalidInput(f"data version {version.tag} has no holdout images to evaluate on")
    return version_split(version, "holdout", preprocess)


def predict(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class indices for preprocessed images (N, C, H, W)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
            out.append(model(batch.to(device)).argmax(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class F1 and the confusion matrix (rows: true, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, f1_score

    labels = list(range(len(classes)))
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": {c: float(f) for c, f in zip(classes, per_class, strict=True)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def evaluate_model(model, split: Split, classes: list[str]) -> dict[str, Any]:
    return classification_metrics(split.y, predict(model, split.x), classes)


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str = "holdout"):
    """A matplotlib figure of the confusion matrix (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(classes), 1.0 + 0.45 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({title})")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    return fig
