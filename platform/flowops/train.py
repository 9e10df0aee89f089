"""Training: one plain PyTorch loop, run in one process or on N workers under Ray Train.

`train_loop(config)` is the loop an ML engineer writes for one device (model, data loader,
optimizer, epochs). Run distributed, three things change, all inside its session
(`flowops.train_session`): the model and the data loader are prepared by Ray Train, and every
epoch reports metrics and a checkpoint.

`train(settings, TrainConfig)` is the driver: it opens the data version once and checks the inputs
before anything starts (data version, base model, cluster resources), opens one MLflow run, runs
the loop, evaluates the final weights on the data version's holdout, and registers the model as a
new version (stage `experiment`). Same data version + config + seed on CPU (and the same worker
count) gives the same metrics and the same weights hash.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from flowops import ray_client
from flowops.data import DataVersion
from flowops.errors import FlowOpsError, InvalidInput, validated_json
from flowops.evaluate import Split, split_from_rows
from flowops.settings import Settings
from flowops.task import DEFAULT_TASK, Task, TaskSpec, load_task, pack_package, package_dir
from flowops.train_session import (
    follow_epochs,
    run_local,
    run_ray_train,
    train_loop,
    unwrap_module,
    weights_hash,
)

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Everything that defines a training run (recorded on the run; `reproduce` replays it)."""

    model_config = ConfigDict(extra="forbid")

    data_version: str | None = Field(None, description="Data version id (vN); None = latest.")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(3e-3, gt=0, le=10)
    task: str | None = Field(None, description="module:object of the task (default: the small CNN "
                             "sized to the data version; a fine-tune: the base model's task).")
    task_options: dict[str, Any] = Field(default_factory=dict, description="Options of a task factory.")
    width: int | None = Field(None, ge=4, le=512, description="Shorthand for the task option width.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 mixed precision on a GPU that supports it, else fp32.")
    workers: int = Field(1, ge=1, le=256, description="Ray Train workers.")
    cpus_per_worker: float = Field(1.0, gt=0, le=512)
    gpus_per_worker: float = Field(0.0, ge=0, le=16)
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Custom Ray resources each worker needs: places the "
        "workers on the nodes that have them (a GPU type's node label, node:<ip>).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: PACK fills few nodes, STRICT_SPREAD puts "
        "each worker on its own node.")
    init_from: str | None = Field(None, description="models:/<name>@<alias> or models:/<name>/<N>.")
    freeze_epochs: int = Field(0, ge=0, description="Epochs with the feature extractor frozen.")
    seed: int = Field(0, ge=0)
    experiment: str = Field("train", min_length=1)
    model_name: str | None = Field(None, description="Registered model name (default: settings).")
    include_pseudo: bool = Field(False, description="Train on the version's pseudo_labels.csv too.")
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="Slice of train kept for validation.")
    max_failures: int = Field(2, ge=0, description="Worker-group failures Ray Train recovers from.")
    local: bool = Field(False, description="Run the loop in this process (no Ray).")
    register_version: bool = Field(True, description="Register the trained model as a new version.")
    run_name: str | None = None
    fault_marker: str | None = Field(
        None, description="Test-only: rank 1 exits hard once at epoch 2, recorded in this file."
    )


@dataclass
class TrainResult:
    run_id: str
    version: str | None
    model_name: str
    data_version: str
    metrics: dict[str, Any]
    weights_hash: str
    base_model_version: str | None = None
    resumed_at: list[int] = field(default_factory=list)
    mode: str = "local"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"run {self.run_id}: holdout accuracy {self.metrics['holdout_accuracy']:.4f}, "
                f"macro F1 {self.metrics['macro_f1']:.4f}, weights {self.weights_hash[:12]}, "
                f"registered {self.model_name} version {self.version}")


@dataclass
class TrainingData:
    """The run's rows (id, label, split) of the data version: images are read only when trained on."""

    classes: list[str]
    train: pd.DataFrame
    val: pd.DataFrame
    n_pseudo: int = 0


# Data ----------------------------------------------------------------------------------------------


def training_rows(version: DataVersion, *, include_pseudo: bool, val_fraction: float,
                  seed: int) -> TrainingData:
    """The version's train split (minus a seeded validation slice), plus pseudo-labels if asked
    (their label in place of the empty one)."""
    train_rows = version.rows("train", labeled=True)[["id", "label", "split"]]
    if train_rows.empty:
        raise InvalidInput(f"data version {version.tag} has no labeled training images")
    order = np.random.default_rng(seed).permutation(len(train_rows))
    n_val = int(round(len(train_rows) * val_fraction))
    val_rows, fit_rows = train_rows.iloc[order[:n_val]], train_rows.iloc[order[n_val:]]
    n_pseudo = 0
    if include_pseudo:
        pseudo = pseudo_rows(version.root, version.manifest, version.classes)
        n_pseudo = len(pseudo)
        fit_rows = pd.concat([fit_rows, pseudo], ignore_index=True)
    return TrainingData(version.classes, fit_rows.reset_index(drop=True),
                        val_rows.reset_index(drop=True), n_pseudo)


def training_arrays(p: TrainPlan) -> dict[str, np.ndarray]:
    """The run's images decoded in this process (`--local`, Tune trials): x/y of train and val."""
    train = split_from_rows(p.data_version, p.data.train, p.task.preprocess)
    val = split_from_rows(p.data_version, p.data.val, p.task.preprocess)
    return {"x_train": train.x, "y_train": train.y, "x_val": val.x, "y_val": val.y}


def pseudo_rows(root: Path, manifest, classes: list[str]) -> pd.DataFrame:
    """Rows (id, label, split) of `pseudo_labels.csv` (id, label, score, model_version) over the
    manifest's unlabeled images. Ids already labeled by a person, or unknown to the manifest, are
    skipped."""
    path = root / "pseudo_labels.csv"
    if not path.exists():
        return pd.DataFrame(columns=["id", "label", "split"])
    pseudo = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"id", "label"} - set(pseudo.columns)
    if missing:
        raise InvalidInput(f"pseudo_labels.csv lacks column(s) {sorted(missing)}")
    bad = sorted(set(pseudo["label"]) - set(classes))
    if bad:
        raise InvalidInput(f"pseudo_labels.csv has labels {bad[:5]} outside the classes {classes}")
    unlabeled = manifest[manifest["label"] == ""][["id", "split"]]
    return pseudo[["id", "label"]].merge(unlabeled, on="id", how="inner")


# The training loop ---------------------------------------------------------------------------------


# Input checks --------------------------------------------------------------------------------------


def check_resources(config: TrainConfig, total: dict[str, float], per_node_max: dict[str, float]) -> None:
    """Refuse, before anything starts, a request the cluster can never satisfy."""
    for key, flag, per_worker in (("CPU", "--cpus-per-worker", config.cpus_per_worker),
                                  ("GPU", "--gpus-per-worker", config.gpus_per_worker)):
        if per_worker <= 0:
            continue
        have, biggest = float(total.get(key, 0)), float(per_node_max.get(key, 0))
        if have <= 0:
            raise InvalidInput(f"{flag} {per_worker:g} asked, but the Ray cluster has no {key}s")
        if per_worker > biggest:
            raise InvalidInput(
                f"{flag} {per_worker:g} is more than any node has (largest node: {biggest:g} {key}s; "
                f"cluster total {have:g})"
            )
        need = per_worker * config.workers
        if need > have:
            raise InvalidInput(
                f"{config.workers} workers x {per_worker:g} {key}s = {need:g} {key}s asked, the "
                f"cluster has {have:g}: use fewer --workers or a smaller {flag}"
            )


# The driver ----------------------------------------------------------------------------------------


@dataclass
class TrainPlan:
    """Checked inputs of a run: the config, the opened data version, its rows, the decoded holdout,
    the task, the base."""

    config: TrainConfig
    data_version: DataVersion
    data: TrainingData
    holdout: Split
    task: Task
    model_name: str
    init_state: dict | None
    base: str | None  # "name/version" of the base model


def task_spec(config: TrainConfig, version: DataVersion, base_spec: TaskSpec | None) -> TaskSpec:
    """The run's task: named on the command line, else the base model's, else the small CNN
    sized to the data version (options given with --task-option/--width go on top)."""
    options = dict(config.task_options)
    if config.width is not None:
        options["width"] = config.width
    if config.task:
        return TaskSpec(path=config.task, options=options)
    if base_spec is not None:
        return TaskSpec(path=base_spec.path, options={**base_spec.options, **options})
    sized = {"channels": version.channels, "size": version.image_size}
    return TaskSpec(path=DEFAULT_TASK, options={**sized, **options})


def model_name_for(settings: Settings, config: TrainConfig, task: Task, version: DataVersion) -> str:
    """--model-name, else FLOWOPS_MODEL_NAME (or flowops.yaml) when set, else the task's name,
    else `<dataset name>-classifier`."""
    if config.model_name:
        return config.model_name
    if "model_name" in settings.model_fields_set:
        return settings.model_name
    return task.name or f"{version.name}-classifier"


def with_project_task(settings: Settings, config: TrainConfig) -> TrainConfig:
    """A fresh training (no --task, no --init-from) takes the project's task from the settings."""
    if config.task or config.init_from or not settings.task:
        return config
    return config.model_copy(update={"task": settings.task})


def plan(settings: Settings, config: TrainConfig) -> TrainPlan:
    """Check every input and select the rows; nothing has started yet when this raises."""
    from flowops import data
    from flowops.evaluate import holdout_split

    config = with_project_task(settings, config)
    version = data.open_version(settings, config.data_version)
    if config.freeze_epochs > config.epochs:
        raise InvalidInput(f"--freeze-epochs {config.freeze_epochs} exceeds --epochs {config.epochs}")
    init_state, base, loaded = None, None, None
    if config.init_from:
        from flowops.model import load_model

        loaded = load_model(settings, config.init_from)
        if list(loaded.classes) != version.classes:
            raise InvalidInput(
                f"base model {loaded.name}/{loaded.version} has classes {loaded.classes}; data "
                f"version {version.tag} has {version.classes}"
            )
        base = f"{loaded.name}/{loaded.version}"
    task = load_task(task_spec(config, version, loaded.task.spec if loaded else None))
    if loaded is not None:
        init_state = {k: v.cpu() for k, v in loaded.model.state_dict().items()}
        fresh = task.build_model(version.classes).state_dict()
        if fresh.keys() != init_state.keys() or any(fresh[k].shape != v.shape for k, v in init_state.items()):
            raise InvalidInput(f"base model {base} was trained as task {loaded.task.spec}; its weights "
                               f"do not fit task {task.spec}")
    if config.local and config.gpus_per_worker > 0:
        import torch

        if not torch.cuda.is_available():
            raise InvalidInput(f"--gpus-per-worker {config.gpus_per_worker:g} asked, but torch sees no GPU")
    training = training_rows(version, include_pseudo=config.include_pseudo,
                             val_fraction=config.val_fraction, seed=config.seed)
    return TrainPlan(config, version, training, holdout_split(version, task.preprocess), task,
                     model_name_for(settings, config, task, version), init_state, base)


def loop_config(p: TrainPlan, mode: str, mlflow_info: dict | None,
                checkpoint_dir: Path | None) -> dict[str, Any]:
    """The plain dict `train_loop` runs on (hyperparameters, where to report). No images: under
    Ray Train they come through `datasets=`, in one process the caller adds `training_arrays`.
    `checkpoint_dir` is only for a local run (Ray Train and Tune checkpoint to the storage URI)."""
    c = p.config
    return {
        "mode": mode, "seed": c.seed, "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr,
        "freeze_epochs": c.freeze_epochs, "classes": p.data.classes, "precision": c.precision,
        "task": p.task.spec.model_dump(mode="json"), "task_code": pack_package(p.task),
        "init_state": p.init_state,
        "train_samples": len(p.data.train), "val_samples": len(p.data.val),
        "threads": max(1, int(c.cpus_per_worker)), "fault_marker": c.fault_marker,
        "mlflow": mlflow_info, "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
    }


def run_tags(p: TrainPlan, mode: str) -> dict[str, str]:
    import ray
    import torch

    from flowops.tracking import project_commit

    return {
        "data_version": p.data_version.tag,
        "base_model": p.config.init_from or "none",
        "base_model_version": p.base or "none",
        "git_commit": os.environ.get("FLOWOPS_GIT_COMMIT") or project_commit(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "seed": str(p.config.seed),
        "include_pseudo": str(p.config.include_pseudo).lower(),
        "mode": mode,
        # the resolved task pinned, so `models reproduce` rebuilds exactly this network
        "flowops.train_config": p.config.model_copy(update={
            "task": p.task.spec.path, "task_options": p.task.spec.options, "width": None,
        }).model_dump_json(),
        "flowops.task": str(p.task.spec),
    }


def finish_run(settings: Settings, p: TrainPlan, model, *, tags: dict[str, str], register: bool,
               model_name: str) -> tuple[dict[str, Any], str, str | None]:
    """In the active MLflow run: holdout metrics, confusion matrix, weights hash, registration."""
    import mlflow

    from flowops.evaluate import confusion_figure, evaluate_model
    from flowops.model import log_model_version

    model = unwrap_module(model).to("cpu").eval()
    digest = weights_hash(model)
    scores = evaluate_model(model, p.holdout, p.data.classes)
    metrics = {"holdout_accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    mlflow.log_metrics({**metrics, **{f"f1_class_{c}": f for c, f in scores["per_class_f1"].items()}})
    mlflow.log_dict(scores, "holdout_metrics.json")
    fig = confusion_figure(scores["confusion"], p.data.classes, f"holdout of {p.data_version.tag}")
    mlflow.log_figure(fig, "confusion_matrix.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    mlflow.set_tag("weights_hash", digest)
    version = None
    if register:
        version = log_model_version(settings, model, p.task, p.data.classes,
                                    registered_name=model_name, tags={
            "data_version": p.data_version.tag, "base_model_version": p.base or "none",
            "weights_hash": digest, "holdout_accuracy": f"{scores['accuracy']:.4f}",
            "macro_f1": f"{scores['macro_f1']:.4f}", "run_id": mlflow.active_run().info.run_id,
            "include_pseudo": tags.get("include_pseudo", "false"), "seed": tags.get("seed", ""),
        })
        mlflow.set_tag("model_version", version)
    return {**metrics, "per_class_f1": scores["per_class_f1"]}, digest, version


def train(settings: Settings, config: TrainConfig,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train per `config`, tracked in one MLflow run; registers a new model version. `on_epoch`
    gets each epoch's metrics (epoch, epochs, train_loss, val_accuracy) as it ends: progress."""
    import mlflow

    from flowops import storage as storage_lib
    from flowops.tracking import configure_mlflow, start_run
    from flowops.train_data import training_datasets

    p = plan(settings, config)
    mode = "local" if config.local else "ray"
    if config.local:
        arrays = training_arrays(p)
    else:
        store = storage_lib.check(settings, "training")  # checkpoints go there
        ray_client.connect(settings, log_to_driver=True, runtime_env={"env_vars": settings.job_env()})
        check_resources(config, *ray_client.cluster_resources())
        datasets = training_datasets(settings, p.data_version, {"train": p.data.train, "val": p.data.val},
                                     p.task.preprocess)
    model_name = p.model_name
    configure_mlflow(settings)
    run_name = config.run_name or f"train-{p.data_version.tag}-s{config.seed}"
    with start_run(settings, config.experiment, run_name) as run:
        run_id = run.info.run_id
        tags = run_tags(p, mode)
        mlflow.set_tags(tags)
        params = config.model_dump(exclude={"fault_marker", "run_name"})
        params.update(data_version=p.data_version.tag, task=str(p.task.spec), mode=mode,
                      train_samples=len(p.data.train), val_samples=len(p.data.val),
                      holdout_samples=len(p.holdout), pseudo_samples=p.data.n_pseudo)
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        mlflow_info = {"tracking_uri": settings.tracking_uri, "run_id": run_id}
        name = f"{run_name}-{run_id[:8]}"
        looped = loop_config(p, "local" if config.local else "train", mlflow_info,
                             settings.home / "train-runs" / name if config.local else None)
        started = time.perf_counter()
        progress = None if on_epoch is None else (lambda m: on_epoch({**m, "epochs": config.epochs}))
        if config.local:
            state = run_local(train_loop, {**looped, **arrays, "on_epoch": progress})
        else:
            with follow_epochs(settings.tracking_uri, run_id, progress):
                state = run_ray_train(
                    train_loop, looped, datasets=datasets, workers=config.workers,
                    cpus_per_worker=config.cpus_per_worker, gpus_per_worker=config.gpus_per_worker,
                    resources=config.resources, placement_strategy=config.placement_strategy,
                    max_failures=config.max_failures, storage=store, name=name)
        mlflow.log_metric("train_wall_s", time.perf_counter() - started)
        resumed = list(state.get("resumed_at", []))
        if resumed:
            mlflow.set_tag("resumed_from_checkpoint", ",".join(map(str, resumed)))
        model = p.task.build_model(p.data.classes)
        model.load_state_dict(state["model"])
        metrics, digest, version = finish_run(settings, p, model, tags=tags,
                                              register=config.register_version, model_name=model_name)
    log.info("run %s: holdout accuracy %.4f, weights %s, version %s", run_id,
             metrics["holdout_accuracy"], digest[:12], version)
    return TrainResult(run_id=run_id, version=version, model_name=model_name, data_version=p.data_version.tag,
                       metrics=metrics, weights_hash=digest, base_model_version=p.base,
                       resumed_at=resumed, mode=mode)


def recorded_config(settings: Settings, run_id: str) -> TrainConfig:
    """The TrainConfig a run was started with (its `flowops.train_config` tag)."""
    from flowops.tracking import configure_mlflow

    run = configure_mlflow(settings).get_run(run_id)
    raw = run.data.tags.get("flowops.train_config")
    if not raw:
        raise FlowOpsError(f"run {run_id} has no recorded training config (not trained by flowops)")
    return validated_json(TrainConfig, raw, f"training config of run {run_id}")


def precheck(settings: Settings, config: TrainConfig) -> TrainConfig:
    """Cheap checks a client makes before submitting (data version, base model); returns the config
    with the data version pinned (a job reads the workspace as a remote repo and needs an id)."""
    from flowops import data

    config = with_project_task(settings, config)
    if settings.data_repo is None:
        pinned = data.resolve_version(settings, config.data_version)
        config = config.model_copy(update={"data_version": pinned})
    if config.init_from:
        from flowops.model import resolve_model_version

        resolve_model_version(settings, config.init_from)
    if config.freeze_epochs > config.epochs:
        raise InvalidInput(f"--freeze-epochs {config.freeze_epochs} exceeds --epochs {config.epochs}")
    task_packages(config)  # a task that does not import or lacks what it needs: before any job starts
    return config


def task_packages(config: TrainConfig) -> list[str]:
    """The folder of the task's package when it is the engineer's (Ray ships it with the job)."""
    if not config.task:
        return []
    options = {**config.task_options, **({"width": config.width} if config.width else {})}
    folder = package_dir(load_task(TaskSpec(path=config.task, options=options)))
    return [str(folder)] if folder else []
