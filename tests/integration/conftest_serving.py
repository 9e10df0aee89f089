"""Serving test support (imported explicitly): registered model versions and the deployed app.

There is no training stage to lean on here, so versions are fitted in-process on scikit-learn's
digits (8x8, pixels scaled to 0-255) for a few epochs and registered through the real MLflow
registry with `flowops.model.log_model_version`.
"""

from __future__ import annotations

import base64
import io

import numpy as np

DIGITS = [str(i) for i in range(10)]


def digits_pixels(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) pixel arrays 0-255 and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(d.images), size=min(n, len(d.images)), replace=False)
    return (d.images[idx] * 255.0 / 16.0).round(), d.target[idx]


def png_b64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def fit_classifier(epochs: int = 2, seed: int = 0, width: int = 8):
    """A small ImageClassifier fitted on the digits (untrained when epochs=0)."""
    import torch

    from flowops.model import ImageClassifier

    torch.set_num_threads(1)  # a shared 2-core machine: extra threads only spin
    torch.manual_seed(seed)
    model = ImageClassifier(DIGITS, 8, width=width)
    if epochs:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 128):
                b = perm[i:i + 128]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
    model.eval()
    return model


def register_version(settings, model, alias: str | None = None) -> str:
    """Log and register `model` in the real registry; optionally point an alias at it."""
    from flowops.model import log_model_version
    from flowops.tracking import configure_mlflow, start_run

    with start_run(settings, "serving-tests", run_name="serving-test-model"):
        version = log_model_version(settings, model)
    if alias:
        configure_mlflow(settings).set_registered_model_alias(settings.model_name, alias, version)
    return version


def broken_classifier():
    """A model whose head disagrees with its class list: every prediction fails (a bad canary)."""
    model = fit_classifier(epochs=0, seed=5)
    model.classes = DIGITS[:3]
    return model
