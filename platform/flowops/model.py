"""How a model version is stored in and loaded from the MLflow registry, and how a batch is scored.

A registered version is a self-contained MLflow pyfunc model: the network exported with
`torch.export` (`program.pt2`), its weights (`weights.pt`), a spec (classes, preprocessing, task)
and `flowops/image_model.py` as the loader module, so it loads with `mlflow.pyfunc.load_model`
where FlowOps is not installed. FlowOps itself rebuilds the task's network from the weights, so
training, fine-tuning, drift features (`embed`) and serving use the engineer's own module.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowops import image_model
from flowops.errors import FlowOpsError, NotFound
from flowops.refs import ModelRef
from flowops.settings import Settings
from flowops.task import Preprocess, Task, TaskSpec, load_task, package_dir

MODEL_ARTIFACT = "model"
LOADER_MODULE = "flowops_image_model"  # the name image_model.py has inside a model version


def to_batch(arrays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(N, C, H, W) float arrays -> a tensor."""
    if isinstance(arrays, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays), dtype=np.float32))


@torch.no_grad()
def predict_proba(model, batch: torch.Tensor) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    return torch.softmax(model(batch.to(device)).float(), dim=1).cpu().numpy()


# Registry ------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A registered version ready for inference: the task's network with its weights."""

    model: torch.nn.Module
    task: Task
    classes: list[str]
    name: str
    version: str
    uri: str

    @property
    def preprocess(self) -> Preprocess:
        return self.task.preprocess


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
    """Load a registered version (by number or alias): its task's network with its weights."""
    import mlflow

    from flowops.tracking import configure_mlflow

    name, version = resolve_model_version(settings, ref)
    configure_mlflow(settings)
    with tempfile.TemporaryDirectory(prefix="flowops-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{ModelRef.of(name, version).uri}", dst_path=tmp))
        data = local / pyfunc_data_path(local)
        if not (data / image_model.SPEC_FILE).exists():
            raise FlowOpsError(f"model {name}/{version} was not registered by this FlowOps "
                               f"(no {image_model.SPEC_FILE}); retrain it")
        spec = json.loads((data / image_model.SPEC_FILE).read_text())
        weights = torch.load(data / image_model.WEIGHTS_FILE, map_location=device, weights_only=True)
        code = keep_task_code(settings, local / "code", f"{name}-{version}")
    task = load_task(TaskSpec.model_validate(spec["task"]), code_dir=code)
    model = task.build_model(list(spec["classes"]))
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedModel(model=model, task=task, classes=list(spec["classes"]), name=name,
                       version=version, uri=str(ref))


def keep_task_code(settings: Settings, code: Path, key: str) -> Path | None:
    """Copy the task package a version carries (if any) to this node's cache, for import."""
    packages = [p for p in code.iterdir() if p.is_dir()] if code.is_dir() else []
    if not packages:
        return None
    target = settings.cache_dir / "task-code" / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        for package in packages:
            shutil.copytree(package, tmp / package.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        try:
            tmp.rename(target)
        except OSError:  # another process kept it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def pyfunc_data_path(folder: Path) -> str:
    """The data folder of a pyfunc model (relative), as its MLmodel file records it."""
    from mlflow.models import Model

    return Model.load(str(folder)).flavors.get("python_function", {}).get("data", "data")


def export_network(model: torch.nn.Module, preprocess: Preprocess) -> torch.export.ExportedProgram:
    """The network as a torch.export program with a dynamic batch size (loads with torch alone)."""
    example = torch.zeros((2, *preprocess.shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def save_version_files(folder: Path, model: torch.nn.Module, task: Task, classes: list[str]) -> None:
    """What a registered version carries: spec, weights, exported network."""
    spec = {"classes": list(classes), "preprocess": task.preprocess.to_dict(),
            "task": (task.spec or TaskSpec()).model_dump(mode="json")}
    (folder / image_model.SPEC_FILE).write_text(json.dumps(spec, indent=2))
    torch.save(model.state_dict(), folder / image_model.WEIGHTS_FILE)
    torch.export.save(export_network(model, task.preprocess), str(folder / image_model.PROGRAM_FILE))


def log_model_version(
    settings: Settings,
    model: torch.nn.Module,
    task: Task,
    classes: list[str],
    *,
    registered_name: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Log `model` as a self-contained pyfunc model in the active MLflow run and register it.

    Returns the new version number. The version starts as an *experiment* (tag stage=experiment).
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from flowops.tracking import configure_mlflow

    client = configure_mlflow(settings)
    model = model.to("cpu").eval()
    outputs = [ColSpec("string", "label"), ColSpec("double", "score"),
               *(ColSpec("float", f"p_{c}") for c in classes)]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs))
    with tempfile.TemporaryDirectory(prefix="flowops-version-") as tmp:
        data, code = Path(tmp, "data"), Path(tmp, "code")
        data.mkdir()
        code.mkdir()
        save_version_files(data, model, task, classes)
        shutil.copyfile(image_model.__file__, code / f"{LOADER_MODULE}.py")
        shipped = [str(code / f"{LOADER_MODULE}.py")]
        package = package_dir(task)
        if package is not None:  # the engineer's task package: FlowOps rebuilds the network from it
            shutil.copytree(package, code / package.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            shipped.append(str(code / package.name))
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            loader_module=LOADER_MODULE,
            data_path=str(data),
            code_paths=shipped,
            signature=signature,
            registered_model_name=registered_name,
            metadata={"classes": list(classes), "task": str(task.spec or TaskSpec()),
                      "preprocess": task.preprocess.to_dict()},
            # Explicit requirements: inferring them re-loads the model in a subprocess (slow).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pillow", "numpy", "pandas"],
        )
    version = str(info.registered_model_version)
    spec = task.spec or TaskSpec()
    for key, value in {"stage": "experiment", "task": spec.path,
                       "task_options": json.dumps(spec.options, sort_keys=True), **(tags or {})}.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version
