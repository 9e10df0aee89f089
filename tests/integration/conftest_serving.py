"""Serving test support (imported explicitly): registered model versions and the deployed app.

There is no training stage to lean on here, so versions are fitted in-process on scikit-learn's
digits (8x8, pixels scaled to 0-255) for a few epochs with the built-in small CNN task and
registered through the real MLflow registry with `flowops.model.log_model_version`.
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


def digits_task(width: int = 8, **options):
    """The built-in small CNN on 8x8 grayscale digits, loaded by name (so its options are recorded
    with the version and serving rebuilds the same network)."""
    from flowops.task import TaskSpec, load_task

    return load_task(TaskSpec(options={"width": width, **options}))


def fit_classifier(epochs: int = 2, seed: int = 0, width: int = 8):
    """(task, network): the small CNN fitted on the digits (untrained when epochs=0)."""
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: extra threads only spin
    torch.manual_seed(seed)
    task = digits_task(width)
    model = task.build_model(DIGITS)
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
    return task, model


def register_version(settings, fitted, alias: str | None = None) -> str:
    """Log and register a (task, network) pair in the real registry; optionally point an alias
    at it."""
    from flowops.model import log_model_version
    from flowops.tracking import configure_mlflow, start_run

    task, model = fitted
    with start_run(settings, "serving-tests", run_name="serving-test-model"):
        version = log_model_version(settings, model, task, DIGITS, registered_name=settings.model_name)
    if alias:
        configure_mlflow(settings).set_registered_model_alias(settings.model_name, alias, version)
    return version


def broken_classifier():
    """A model whose every prediction fails (NaN weights: malformed probabilities; a bad canary)."""
    import torch

    task, model = fit_classifier(epochs=0, seed=5)
    with torch.no_grad():
        model.head[-1].bias.fill_(float("nan"))
    return task, model


def colour_classifier(seed: int = 2):
    """(task, network): an untrained ResNet-style model on 12x12 RGB with ImageNet normalisation,
    for the digits classes: another task than the digits models (a canary of another kind)."""
    import torch

    from flowops.task import TaskSpec, load_task

    torch.manual_seed(seed)
    task = load_task(TaskSpec(path="flowops.tasks:resnet",
                              options={"size": 12, "width": 4, "depth": [1], "augment": False}))
    return task, task.build_model(DIGITS).eval()
