"""The image classifier, its preprocessing, and how a model version is stored in and loaded from
the MLflow registry. Training, batch pseudo-labeling and online serving all go through here, so
an image is preprocessed the same way everywhere.

Images are grayscale, resized to the data version's `image_size` (8 for the digits dataset), with
pixel values 0-255 scaled to [0, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flowops.errors import InvalidInput, NotFound
from flowops.refs import ModelRef
from flowops.settings import Settings

MODEL_ARTIFACT = "model"


class ImageClassifier(nn.Module):
    """A small CNN: two conv blocks (the feature extractor) and a two-layer head."""

    def __init__(self, classes: list[str], image_size: int, width: int = 32):
        super().__init__()
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.width = int(width)
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(8 * width, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, len(self.classes))
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (used by drift detection)."""
        return self.head[:-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Preprocessing -------------------------------------------------------------------------------------


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Image file bytes (PNG, JPEG, ...) -> float32 array (S, S) in [0, 1]. InvalidInput if broken."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"not a decodable image: {exc}") from None
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0


def pixels_to_array(pixels: Any, image_size: int) -> np.ndarray:
    """A 2-D array of grayscale values 0-255 (height x width) -> float32 (S, S) in [0, 1]."""
    try:
        arr = np.asarray(pixels, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput("pixel array must be a 2-D list of numbers (height x width)") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInput(f"pixel array must be 2-D (height x width), got shape {list(arr.shape)}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise InvalidInput("pixel values must be finite numbers between 0 and 255")
    if arr.shape != (image_size, image_size):
        from PIL import Image

        img = Image.fromarray(arr.astype(np.uint8), mode="L").resize(
            (image_size, image_size), Image.Resampling.BILINEAR
        )
        arr = np.asarray(img, dtype=np.float32)
    return arr / 255.0


def to_batch(arrays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(N, S, S) float arrays -> (N, 1, S, S) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).unsqueeze(1)


@torch.no_grad()
def predict_proba(model: ImageClassifier, batch: torch.Tensor) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    return torch.softmax(model(batch.to(device)), dim=1).cpu().numpy()


# Registry ------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: ImageClassifier
    name: str
    version: str
    uri: str

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def image_size(self) -> int:
        return self.model.image_size


def resolve_model_version(settings: Settings, ref: ModelRef | str) -> tuple[str, str]:
    """(name, version number) of a model reference (a ModelRef or its URI); NotFound naming
    what exists."""
    from mlflow.exceptions import MlflowException

    from flowops.tracking import configure_mlflow

    ref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    client = configure_mlflow(settings)
    try:
        if ref.alias:
            return ref.name, str(client.get_model_version_by_alias(ref.name, ref.alias).version)
        return ref.name, str(client.get_model_version(ref.name, ref.version).version)
    except MlflowException:
        raise NotFound(f"model {ref.uri} does not exist; {describe_registered(settings, ref.name)}") from None


def describe_registered(settings: Settings, name: str) -> str:
    """'existing versions: 1, 2; aliases: production=2' (or that the model has none)."""
    from mlflow.exceptions import MlflowException

    from flowops.tracking import configure_mlflow

    client = configure_mlflow(settings)
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        return f"no registered model named {name!r}"
    versions = sorted(
        (int(v.version) for v in client.search_model_versions(f"name='{name}'")), reverse=True
    )
    aliases = ", ".join(f"{a}={v}" for a, v in sorted(registered.aliases.items())) or "none"
    return f"existing versions of {name}: {', '.join(map(str, versions)) or 'none'}; aliases: {aliases}"


def load_model(settings: Settings, ref: ModelRef | str, device: str = "cpu") -> LoadedModel:
    """Load a registered model version (by number or alias) for inference."""
    import mlflow.pytorch

    name, version = resolve_model_version(settings, ref)
    model = mlflow.pytorch.load_model(ModelRef.of(name, version).uri, map_location=device)
    model.eval()
    return LoadedModel(model=model, name=name, version=version, uri=str(ref))


def log_model_version(
    settings: Settings,
    model: ImageClassifier,
    *,
    registered_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log `model` in the active MLflow run (signature + input example) and register it.

    Returns the new version number. The version starts as an *experiment* (tag stage=experiment).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from flowops.tracking import configure_mlflow

    name = registered_name or settings.model_name
    client = configure_mlflow(settings)
    example = np.zeros((1, 1, model.image_size, model.image_size), dtype=np.float32)
    cpu_model = model.to("cpu").eval()
    with torch.no_grad():
        output = cpu_model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        cpu_model,
        name=MODEL_ARTIFACT,
        signature=infer_signature(example, output),
        input_example=example,
        registered_model_name=name,
        metadata={"classes": model.classes, "image_size": model.image_size},
        # pickle keeps the nn.Module (classes, embed()) that serving and drift detection use;
        # MLflow's default, a torch.export program, drops both. flowops must be importable.
        serialization_format="pickle",
        # Explicit requirements: inferring them re-loads the model in a subprocess (slow).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "flowops"],
    )
    version = str(info.registered_model_version)
    for key, value in {"stage": "experiment", **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version
