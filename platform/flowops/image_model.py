"""Image preprocessing and the self-contained MLflow model, in one file that imports nothing of FlowOps.

One definition of how an image becomes a tensor, used by training, Ray Data batch scoring, online
serving, the Label Studio backend and drift features, and shipped, as this very file, inside every
registered model version (MLflow `code_paths`, loaded as the pyfunc `loader_module`). So a version
loads with `mlflow.pyfunc.load_model` (and answers `mlflow models serve`) in an environment that has
mlflow and torch but not FlowOps, and it preprocesses exactly as it did in training.

Only numpy and Pillow at import time; torch, pandas and mlflow inside the functions that need them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_POLICIES = ("resize", "center_crop", "letterbox")
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
PROGRAM_FILE = "program.pt2"


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can read, or the pixels are not a valid image."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a float32 array (channels, height, width).

    EXIF orientation is applied, the image is converted to `channels` (1: grayscale, 3: RGB; alpha
    is composited on black), brought to `size` (height, width) by `resize` (`resize` stretches,
    `center_crop` scales the short side then crops, `letterbox` scales the long side then pads
    with black), scaled to [0, 1] and normalised per channel: (x - mean) / std.
    """

    size: tuple[int, int]
    channels: int = 3
    resize: str = "resize"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(size) != 2 or not all(1 <= s <= 4096 for s in size):
            raise ValueError(f"size must be (height, width) between 1 and 4096, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image bytes (anything Pillow reads) -> (C, H, W) float32."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return self.image(img)
        except UnidentifiedImageError:
            raise UndecodableImage(f"not a decodable image: no image format recognised in "
                                   f"{len(data)} bytes") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UndecodableImage(f"not a decodable image: {exc}") from None

    def pixels(self, values: Any) -> np.ndarray:
        """Pixel values 0-255, (H, W) grayscale or (H, W, 3|4) colour, -> (C, H, W) float32."""
        try:
            arr = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            raise UndecodableImage("pixels must be a 2-D (height x width) or 3-D (height x width x "
                                   "channels) array of numbers") from None
        if arr.ndim not in (2, 3) or min(arr.shape[:2], default=0) < 1 or (
                arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise UndecodableImage(f"pixels must be height x width (x 1, 3 or 4 channels), got shape "
                                   f"{list(arr.shape)}")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise UndecodableImage("pixel values must be finite numbers between 0 and 255")
        if arr.ndim == 2 and self.channels == 1 and arr.shape == self.size:
            return self.normalise(arr[None] / 255.0)  # already the model's size: no rounding
        arr = arr.astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return self.image(Image.fromarray(arr))

    def image(self, img: Image.Image) -> np.ndarray:
        """A Pillow image -> (C, H, W) float32."""
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        if img.size != (width, height):
            if self.resize == "center_crop":
                img = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR)
            elif self.resize == "letterbox":
                img = ImageOps.pad(img, (width, height), Image.Resampling.BILINEAR, color=0)
            else:
                img = img.resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return self.normalise(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))

    def normalise(self, arr: np.ndarray) -> np.ndarray:
        """(C, H, W) values in [0, 1] -> (x - mean) / std, float32."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def image_bytes(value: Any) -> bytes:
    """An `image` cell of a pyfunc request: raw bytes, or base64 text (what JSON carries)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise UndecodableImage("an image must be base64-encoded bytes") from None
    raise UndecodableImage(f"an image must be bytes or base64 text, got {type(value).__name__}")


# The self-contained MLflow model --------------------------------------------------------------------


class ImagePredictor:
    """What `mlflow.pyfunc.load_model` returns the inside of: the exported network + preprocessing.

    Input: a DataFrame with an `image` column (encoded image bytes, or base64 text). Output: a
    DataFrame with `label`, `score` and one probability column per class. An image it cannot
    decode raises MlflowException(INVALID_PARAMETER_VALUE): `mlflow models serve` answers 400.
    """

    def __init__(self, folder: str | Path):
        import torch

        folder = Path(folder)
        spec = json.loads((folder / SPEC_FILE).read_text())
        self.classes = list(spec["classes"])
        self.preprocess = Preprocess.from_dict(spec["preprocess"])
        self.network = torch.export.load(str(folder / PROGRAM_FILE)).module()

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd
        import torch

        try:
            if isinstance(model_input, pd.DataFrame):
                if "image" not in model_input.columns:
                    raise UndecodableImage("the input needs an 'image' column of encoded images")
                cells = list(model_input["image"])
            else:
                cells = list(model_input)
            batch = np.stack([self.preprocess.decode(image_bytes(c)) for c in cells]) if cells else \
                np.zeros((0, *self.preprocess.shape), dtype=np.float32)
        except UndecodableImage as exc:
            # MLflow's scoring server answers this exception as a 400 carrying our message; any
            # other one as a generic "unexpected error" with the message buried in a traceback.
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            probs = torch.softmax(self.network(torch.from_numpy(batch)), dim=1).numpy()
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        out = pd.DataFrame({"label": [self.classes[i] for i in best],
                            "score": probs.max(axis=1) if len(probs) else np.zeros(0)})
        for i, name in enumerate(self.classes):
            out[f"p_{name}"] = probs[:, i] if len(probs) else np.zeros(0)
        return out


def _load_pyfunc(data_path: str) -> ImagePredictor:
    """MLflow's pyfunc entry point (this file is the model's `loader_module`)."""
    return ImagePredictor(data_path)
