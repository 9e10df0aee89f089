"""The task API: what FlowOps needs to know about a model to train, serve and pre-label with it.

A task says how to build the network for a list of classes, how an image becomes a tensor
(`Preprocess`, one definition shared by training, Ray Data, serving and drift), optionally how to
augment a training batch, and optionally the engineer's own single-device training loop, which
FlowOps runs under Ray Train through a few context calls (`flowops.train_session.TaskContext`).

Users name a task as `module:object` (`flowops train --task my_project.task:task`). The object is
a `Task`, or a function returning one that takes options (`--task-option size=64`). The path and
options are recorded on the MLflow run and on the model version, so a fine-tune, a reproduce,
serving and pseudo-labeling rebuild the same task without being told again.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from flowops.errors import InvalidInput
from flowops.image_model import Preprocess, UndecodableImage

__all__ = ["Preprocess", "Task", "TaskSpec", "load_task", "DEFAULT_TASK"]

DEFAULT_TASK = "flowops.tasks:small_cnn"


@dataclass
class Task:
    """A model family FlowOps can train, fine-tune, serve and pre-label with.

    build_model: classes -> torch nn.Module mapping (N, C, H, W) float batches to (N, classes) logits.
    preprocess:  how an image becomes the (C, H, W) tensor the network takes.
    name:        registered model name (default: `<dataset name>-classifier`).
    augment:     (N, C, H, W) batch -> batch, applied to training batches only (on their device).
    train_loop:  your own single-device loop, `fit(ctx)`; default: FlowOps's loop.
    head:        name prefix of the parameters trained while the rest is frozen (`--freeze-epochs`);
                 default: the network's last top-level child that has parameters.
    embed:       (model, batch) -> features for drift detection; default: `model.embed` if it
                 exists, else the logits.
    """

    build_model: Callable[[list[str]], Any]
    preprocess: Preprocess
    name: str | None = None
    augment: Callable[[Any], Any] | None = None
    train_loop: Callable[[Any], None] | None = None
    head: str | None = None
    embed: Callable[[Any, Any], Any] | None = None
    spec: TaskSpec | None = field(default=None, repr=False)

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded image -> (C, H, W) float32; InvalidInput when it is not a decodable image."""
        try:
            return self.preprocess.decode(data)
        except UndecodableImage as exc:
            raise InvalidInput(str(exc)) from None

    def pixels(self, values: Any) -> np.ndarray:
        """Pixel values 0-255 ((H, W) or (H, W, C)) -> (C, H, W) float32; InvalidInput if invalid."""
        try:
            return self.preprocess.pixels(values)
        except UndecodableImage as exc:
            raise InvalidInput(str(exc)) from None

    def head_prefix(self, model) -> str:
        if self.head:
            return self.head
        children = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
        return children[-1] if children else ""

    def features(self, model, batch):
        """Drift features of a batch (no grad)."""
        if self.embed is not None:
            return self.embed(model, batch)
        if hasattr(model, "embed"):
            return model.embed(batch)
        return model(batch)


class TaskSpec(BaseModel):
    """A task by name: `module:object` plus the options a factory is called with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(DEFAULT_TASK, description="module:object of a Task or a function returning one.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of a factory.")

    def __str__(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.path}{' ' + opts if opts else ''}"


def load_task(spec: TaskSpec | str, options: dict[str, Any] | None = None,
              code_dir: Path | None = None) -> Task:
    """Import and build the task; one-line InvalidInput naming the path and what is missing.
    `code_dir`: a folder holding the task's package (the copy stored with a model version),
    searched after the installed packages."""
    if isinstance(spec, str):
        spec = TaskSpec(path=spec, options=options or {})
    if code_dir is not None and str(code_dir) not in sys.path:
        sys.path.append(str(code_dir))
    module_name, sep, attr = spec.path.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f"task {spec.path!r} must be written module:object "
                           "(e.g. my_project.task:task)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a project run from its folder, as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of user code is bad input
        raise InvalidInput(f"task {spec.path}: module {module_name!r} does not import: "
                           f"{type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InvalidInput(f"task {spec.path}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Task):
        if not callable(obj):
            raise InvalidInput(f"task {spec.path} is a {type(obj).__name__}, not a flowops Task or a "
                               "function returning one")
        try:
            inspect.signature(obj).bind(**spec.options)
        except TypeError as exc:
            raise InvalidInput(f"task {spec.path}: options {sorted(spec.options)} do not fit: "
                               f"{exc}") from None
        except ValueError:
            pass
        try:
            obj = obj(**spec.options)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"task {spec.path} with options {spec.options}: {exc}") from None
        if not isinstance(obj, Task):
            raise InvalidInput(f"task {spec.path} returned a {type(obj).__name__}, not a flowops Task")
    elif spec.options:
        raise InvalidInput(f"task {spec.path} is a Task object and takes no options "
                           f"(got {sorted(spec.options)})")
    missing = [n for n in ("build_model",) if not callable(getattr(obj, n, None))]
    if missing or not isinstance(obj.preprocess, Preprocess):
        raise InvalidInput(f"task {spec.path} lacks {missing or ['a Preprocess']}")
    obj.spec = spec
    return obj


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (values read as JSON when they parse: 64, 0.5, true, [1,2]) -> dict."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"task option {pair!r} must be key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def package_dir(task: Task) -> Path | None:
    """The folder of the task's top-level package when the task is not FlowOps's own: what Ray
    ships to workers (`py_modules`) and what a model version stores beside its weights."""
    top = (task.spec or TaskSpec()).path.split(":")[0].split(".")[0]
    if top == "flowops":
        return None
    module = importlib.import_module(top)
    paths = list(getattr(module, "__path__", []))
    if not paths:
        raise InvalidInput(f"task module {top!r} is a single file ({getattr(module, '__file__', '?')}): "
                           "put it in a package folder with an __init__.py so Ray can ship it to workers")
    return Path(paths[0])


def pack_package(task: Task) -> bytes | None:
    """The task's package as zip bytes (None for FlowOps's own tasks). It travels inside the
    training loop's config to every Ray Train worker, however the driver was started (a job with
    the package, a fine-tune whose code came with the base model, `models reproduce` in a shell):
    Ray Train only takes packages as URIs in a worker's runtime environment."""
    folder = package_dir(task)
    if folder is None:
        return None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, Path(folder.name, path.relative_to(folder)))
    return buf.getvalue()


def unpack_package(data: bytes) -> Path:
    """Extract packed task code once per content on this node; returns the folder to import from."""
    target = Path(tempfile.gettempdir(), "flowops-task-code", hashlib.sha256(data).hexdigest()[:16])
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        zipfile.ZipFile(io.BytesIO(data)).extractall(staging)
        try:
            staging.rename(target)
        except OSError:  # another worker on this node extracted it first
            shutil.rmtree(staging, ignore_errors=True)
    return target
