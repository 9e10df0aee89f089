"""Training: one plain PyTorch loop, run in one process or on N workers under Ray Train.

`train_loop(config)` is the loop an ML engineer writes for one device (model, data loader,
optimizer, epochs). Run distributed, three things change, all inside `_Session`:
`ray.train.torch.prepare_model(model)`, `ray.train.torch.prepare_data_loader(loader)` and
`ray.train.report(metrics, checkpoint=...)` every epoch (restored through
`ray.train.get_checkpoint()` when a failed worker group restarts).

`train(settings, TrainConfig)` is the driver: it checks the inputs before anything starts (data
version, base model, cluster resources), opens one MLflow run, runs the loop, evaluates the final
weights on the data version's holdout, and registers the model as a new version (stage
`experiment`). Same data version + config + seed on CPU (and the same worker count) gives the same
metrics and the same weights hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from flowops.errors import FlowOpsError, InvalidInput, JobFailed
from flowops.evaluate import Split, split_from_rows
from flowops.settings import Settings

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
FAULT_EPOCH = 2  # the epoch at which the test-only fault hook kills rank 1 (once)


class TrainConfig(BaseModel):
    """Everything that defines a training run (recorded on the run; `reproduce` replays it)."""

    model_config = ConfigDict(extra="forbid")

    data_version: str | None = Field(None, description="Data version id (vN); None = latest.")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(3e-3, gt=0, le=10)
    width: int = Field(32, ge=4, le=512, description="Channels of the first conv block.")
    workers: int = Field(1, ge=1, le=256, description="Ray Train workers.")
    cpus_per_worker: float = Field(1.0, gt=0, le=512)
    gpus_per_worker: float = Field(0.0, ge=0, le=16)
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


@dataclass
class TrainingData:
    classes: list[str]
    image_size: int
    train: Split
    val: Split
    n_pseudo: int = 0


# Data ----------------------------------------------------------------------------------------------


def load_training_data(settings: Settings, version: str, *, include_pseudo: bool, val_fraction: float,
                       seed: int) -> TrainingData:
    """The version's train split (minus a seeded validation slice), plus pseudo-labels if asked."""
    from flowops import data

    root = data.materialize(settings, version)
    meta = data.read_meta(settings, version)
    manifest = data.read_manifest(settings, version)
    classes, size = list(meta["classes"]), int(meta["image_size"])
    train_rows = manifest[(manifest["split"] == "train") & (manifest["label"] != "")]
    if train_rows.empty:
        raise InvalidInput(f"data version {version} has no labeled training images")
    order = np.random.default_rng(seed).permutation(len(train_rows))
    n_val = int(round(len(train_rows) * val_fraction))
    val_rows, fit_rows = train_rows.iloc[order[:n_val]], train_rows.iloc[order[n_val:]]
    n_pseudo = 0
    if include_pseudo:
        pseudo = pseudo_rows(root, manifest, classes)
        n_pseudo = len(pseudo)
        fit_rows = fit_rows._append(pseudo[["id", "path", "label"]], ignore_index=True)
    return TrainingData(
        classes=classes, image_size=size,
        train=split_from_rows(root, fit_rows, classes, size),
        val=split_from_rows(root, val_rows, classes, size),
        n_pseudo=n_pseudo,
    )


def pseudo_rows(root: Path, manifest, classes: list[str]):
    """Rows of `pseudo_labels.csv` (id, label, score, model_version) with the image path from the
    manifest. Ids already labeled by a person, or unknown to the manifest, are skipped."""
    import pandas as pd

    path = root / "pseudo_labels.csv"
    if not path.exists():
        return pd.DataFrame(columns=["id", "path", "label"])
    pseudo = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"id", "label"} - set(pseudo.columns)
    if missing:
        raise InvalidInput(f"pseudo_labels.csv lacks column(s) {sorted(missing)}")
    bad = sorted(set(pseudo["label"]) - set(classes))
    if bad:
        raise InvalidInput(f"pseudo_labels.csv has labels {bad[:5]} outside the classes {classes}")
    unlabeled = manifest[manifest["label"] == ""][["id", "path"]]
    return pseudo[["id", "label"]].merge(unlabeled, on="id", how="inner")


# The training loop ---------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False


def weights_hash(model) -> str:
    """sha256 over the state_dict tensors (names, dtypes, shapes, bytes) in name order."""
    digest = hashlib.sha256()
    state = unwrap(model).state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def train_loop(config: dict[str, Any]) -> None:
    """The training loop: plain single-device PyTorch. `_Session` is where distribution plugs in."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from flowops.model import ImageClassifier

    session = _Session.create(config)
    seed = int(config["seed"])
    seed_everything(seed + session.rank)  # same init everywhere (DDP broadcasts rank 0's anyway)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = session.device()

    model = ImageClassifier(config["classes"], config["image_size"], width=config["width"])
    if config.get("init_state") is not None:
        model.load_state_dict(config["init_state"])
    x, y = config["x_train"], config["y_train"]
    train_set = TensorDataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=config["batch_size"], shuffle=True, generator=generator)

    start_epoch, resumed_at, state = 0, [], session.restore()
    if state is not None:  # a restarted worker group: continue after the last checkpoint
        model.load_state_dict(state["model"])
        start_epoch = state["epoch"] + 1
        resumed_at = [*state.get("resumed_at", []), start_epoch]

    model = session.prepare_model(model.to(device))  # distributed: ray.train.torch.prepare_model
    loader = session.prepare_data_loader(loader)  # distributed: ray.train.torch.prepare_data_loader
    features = [p for n, p in unwrap(model).named_parameters() if n.startswith("features.")]
    head = [p for n, p in unwrap(model).named_parameters() if not n.startswith("features.")]
    optimizer = torch.optim.Adam([{"params": features}, {"params": head}], lr=config["lr"])
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    loss_fn = nn.CrossEntropyLoss()
    x_val = torch.from_numpy(config["x_val"]).unsqueeze(1).to(device)
    y_val = torch.from_numpy(config["y_val"]).to(device)

    for epoch in range(start_epoch, config["epochs"]):
        session.maybe_fail(epoch)
        generator.manual_seed(seed + epoch)  # the same shuffle for an epoch, resumed or not
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        # Freezing = learning rate 0 for the feature extractor (DDP-safe: no requires_grad flips).
        optimizer.param_groups[0]["lr"] = 0.0 if epoch < config["freeze_epochs"] else config["lr"]
        started = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            seen += len(yb)
        model.eval()
        with torch.no_grad():
            val_acc = float((model(x_val).argmax(1) == y_val).float().mean()) if len(y_val) else 0.0
        metrics = {
            "epoch": epoch, "train_loss": total / max(seen, 1), "val_accuracy": val_acc,
            "epoch_time_s": time.perf_counter() - started, "samples": seen, "resumed_at": resumed_at,
            "reported_at": time.time(),
        }
        session.report(metrics, {
            "epoch": epoch, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "resumed_at": metrics["resumed_at"], "weights_hash": weights_hash(model),
        })


class _Session:
    """Where the loop runs: in this process ('local'), under Ray Train ('train') or Ray Tune ('tune')."""

    rank = 0

    @staticmethod
    def create(config: dict[str, Any]) -> _Session:
        mode = config.get("mode", "local")
        return {"local": _LocalSession, "train": _TrainSession, "tune": _TuneSession}[mode](config)

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self._mlflow = None
        self._run_id = (config.get("mlflow") or {}).get("run_id")

    def device(self):
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_model(self, model):
        return model

    def prepare_data_loader(self, loader):
        return loader

    def maybe_fail(self, epoch: int) -> None:
        """Test-only fault hook: rank 1 exits hard once at FAULT_EPOCH (a real worker failure)."""
        marker = self.config.get("fault_marker")
        if marker and self.rank == 1 and epoch == FAULT_EPOCH and not Path(marker).exists():
            Path(marker).write_text(f"rank 1 killed at epoch {epoch} pid {os.getpid()}\n")
            # Train V2's controller registers reported checkpoints when it polls the workers
            # (about every second); a crash a few seconds after the last report, as real epochs
            # take, finds that checkpoint registered. Crashing within milliseconds would not.
            time.sleep(5)
            os._exit(1)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics to the MLflow run (rank 0 only)."""
        if self.rank != 0 or not self.config.get("mlflow"):
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        info = self.config["mlflow"]
        if self._mlflow is None:
            self._mlflow = MlflowClient(tracking_uri=info["tracking_uri"])
        if self._run_id is None:  # a Tune trial: its own child run under the parent
            run = self._mlflow.create_run(
                info["experiment_id"], run_name=info.get("run_name"),
                tags={"mlflow.parentRunId": info["parent_run_id"], **info.get("tags", {})},
            )
            self._run_id = run.info.run_id
            for key, value in info.get("params", {}).items():
                self._mlflow.log_param(self._run_id, key, value)
        now = int(time.time() * 1000)
        step = int(metrics["epoch"])
        values = [Metric(k, float(metrics[k]), now, step)
                  for k in ("train_loss", "val_accuracy", "epoch_time_s")]
        self._mlflow.log_batch(self._run_id, metrics=values)

    def restore(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _save(state: dict[str, Any], folder: Path) -> None:
        import torch

        torch.save(state, folder / CHECKPOINT_FILE)

    @staticmethod
    def _load(folder: str | Path) -> dict[str, Any]:
        import torch

        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


class _LocalSession(_Session):
    """One process; checkpoints go to the run's folder every epoch."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.folder = Path(config["checkpoint_dir"])
        self.folder.mkdir(parents=True, exist_ok=True)

    def report(self, metrics, state) -> None:
        target = self.folder / f"checkpoint_epoch_{metrics['epoch']:04d}"
        tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=".tmp-"))
        self._save(state, tmp)
        os.replace(tmp, target) if not target.exists() else None
        with open(self.folder / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        self.log_metrics(metrics)
        log.info("epoch %d: loss %.4f val_accuracy %.4f (%.2fs)", metrics["epoch"],
                 metrics["train_loss"], metrics["val_accuracy"], metrics["epoch_time_s"])


class _TrainSession(_Session):
    """A Ray Train worker: prepared model and loader, checkpoint reported by rank 0 every epoch."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        super().__init__(config)
        self.rank = ray.train.get_context().get_world_rank()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_data_loader(self, loader):
        import ray.train.torch

        # move_to_device=False: the loop moves batches itself, exactly as on one device.
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = self._load(folder)
        log.info("rank %d resumes from the checkpoint of epoch %d", self.rank, state["epoch"])
        return state

    def report(self, metrics, state) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if k != "resumed_at"}
        clean["resumed_at"] = ",".join(map(str, metrics["resumed_at"]))
        if self.rank != 0:
            ray.train.report(clean, checkpoint=None)
            return
        self.log_metrics(metrics)
        # Upload in the background: on short epochs a synchronous upload costs more than the
        # epoch. Ray deletes the local folder once it is uploaded.
        tmp = tempfile.mkdtemp(prefix="flowops-ckpt-")
        self._save(state, Path(tmp))
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


class _TuneSession(_Session):
    """A Ray Tune trial: one process, metrics to the scheduler, a child run in MLflow."""

    def restore(self):
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return self._load(folder)

    def report(self, metrics, state) -> None:
        import ray.tune

        self.log_metrics(metrics)
        clean = {k: v for k, v in metrics.items() if k != "resumed_at"}
        if self._run_id:
            clean["mlflow_run_id"] = self._run_id
        with tempfile.TemporaryDirectory() as tmp:
            self._save(state, Path(tmp))
            ray.tune.report(clean, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


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


def connect_ray(settings: Settings) -> None:
    """Connect this driver to the cluster (inside a Ray job: the job's cluster)."""
    from flowops.ray_client import apply_ray_auth_env

    apply_ray_auth_env(settings)
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)
        return
    from flowops.ray_client import require_cluster

    require_cluster(settings)
    ray.init(address=settings.gcs_address, runtime_env={"env_vars": settings.job_env()},
             log_to_driver=True)


def cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    per_node: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for key, value in node.get("Resources", {}).items():
            per_node[key] = max(per_node.get(key, 0.0), float(value))
    return dict(ray.cluster_resources()), per_node


# The driver ----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    config: TrainConfig
    data_version: str
    data: TrainingData
    holdout: Split
    init_state: dict | None
    width: int
    base: str | None  # "name/version" of the base model


def plan(settings: Settings, config: TrainConfig) -> _Plan:
    """Check every input and load the data; nothing has started yet when this raises."""
    from flowops import data
    from flowops.evaluate import holdout_split

    version = data.resolve_version(settings, config.data_version)
    if config.freeze_epochs > config.epochs:
        raise InvalidInput(f"--freeze-epochs {config.freeze_epochs} exceeds --epochs {config.epochs}")
    init_state, width, base = None, config.width, None
    meta = data.read_meta(settings, version)
    if config.init_from:
        from flowops.model import load_model

        loaded = load_model(settings, config.init_from)
        if list(loaded.classes) != list(meta["classes"]) or loaded.image_size != int(meta["image_size"]):
            raise InvalidInput(
                f"base model {loaded.name}/{loaded.version} has classes {loaded.classes} and image size "
                f"{loaded.image_size}; data version {version} has {meta['classes']} and "
                f"{meta['image_size']}"
            )
        init_state = {k: v.cpu() for k, v in loaded.model.state_dict().items()}
        width = int(getattr(loaded.model, "width", width))
        base = f"{loaded.name}/{loaded.version}"
    if config.local and config.gpus_per_worker > 0:
        import torch

        if not torch.cuda.is_available():
            raise InvalidInput(f"--gpus-per-worker {config.gpus_per_worker:g} asked, but torch sees no GPU")
    training = load_training_data(settings, version, include_pseudo=config.include_pseudo,
                                  val_fraction=config.val_fraction, seed=config.seed)
    holdout, _, _ = holdout_split(settings, version)
    return _Plan(config, version, training, holdout, init_state, width, base)


def _loop_config(p: _Plan, mode: str, mlflow_info: dict | None, checkpoint_dir: Path) -> dict[str, Any]:
    c = p.config
    return {
        "mode": mode, "seed": c.seed, "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr,
        "width": p.width, "freeze_epochs": c.freeze_epochs, "classes": p.data.classes,
        "image_size": p.data.image_size, "init_state": p.init_state,
        "x_train": p.data.train.x, "y_train": p.data.train.y,
        "x_val": p.data.val.x, "y_val": p.data.val.y,
        "threads": max(1, int(c.cpus_per_worker)), "fault_marker": c.fault_marker,
        "mlflow": mlflow_info, "checkpoint_dir": str(checkpoint_dir),
    }


def run_loop_local(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Run the loop in this process; returns the last checkpoint's state."""
    train_loop(loop_config)
    folder = Path(loop_config["checkpoint_dir"])
    last = sorted(folder.glob("checkpoint_epoch_*"))[-1]
    return _Session._load(last)


def run_loop_ray(settings: Settings, p: _Plan, loop_config: dict[str, Any], storage: Path,
                 name: str) -> dict[str, Any]:
    """Run the loop on `workers` Ray Train workers; returns the last checkpoint's state."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = p.config
    resources = {"CPU": c.cpus_per_worker}
    if c.gpus_per_worker > 0:
        resources["GPU"] = c.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=c.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends
        first = str(exc).strip().splitlines()
        raise JobFailed(f"training failed on Ray Train: {first[0] if first else type(exc).__name__}") from exc
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return _Session._load(folder)


def run_tags(settings: Settings, p: _Plan, mode: str) -> dict[str, str]:
    import ray
    import torch

    from flowops.tracking import project_commit

    return {
        "data_version": p.data_version,
        "base_model": p.config.init_from or "none",
        "base_model_version": p.base or "none",
        "git_commit": os.environ.get("FLOWOPS_GIT_COMMIT") or project_commit(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "seed": str(p.config.seed),
        "include_pseudo": str(p.config.include_pseudo).lower(),
        "mode": mode,
        "flowops.train_config": p.config.model_dump_json(),
    }


def finish_run(settings: Settings, p: _Plan, model, *, tags: dict[str, str], register: bool,
               model_name: str) -> tuple[dict[str, Any], str, str | None]:
    """In the active MLflow run: holdout metrics, confusion matrix, weights hash, registration."""
    import mlflow

    from flowops.evaluate import confusion_figure, evaluate_model
    from flowops.model import log_model_version

    model = unwrap(model).to("cpu").eval()
    digest = weights_hash(model)
    scores = evaluate_model(model, p.holdout, p.data.classes)
    metrics = {"holdout_accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    mlflow.log_metrics({**metrics, **{f"f1_class_{c}": f for c, f in scores["per_class_f1"].items()}})
    mlflow.log_dict(scores, "holdout_metrics.json")
    fig = confusion_figure(scores["confusion"], p.data.classes, f"holdout of {p.data_version}")
    mlflow.log_figure(fig, "confusion_matrix.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    mlflow.set_tag("weights_hash", digest)
    version = None
    if register:
        version = log_model_version(settings, model, registered_name=model_name, tags={
            "data_version": p.data_version, "base_model_version": p.base or "none",
            "weights_hash": digest, "holdout_accuracy": f"{scores['accuracy']:.4f}",
            "macro_f1": f"{scores['macro_f1']:.4f}", "run_id": mlflow.active_run().info.run_id,
            "include_pseudo": tags.get("include_pseudo", "false"), "seed": tags.get("seed", ""),
        })
        mlflow.set_tag("model_version", version)
    return {**metrics, "per_class_f1": scores["per_class_f1"]}, digest, version


def train(settings: Settings, config: TrainConfig) -> TrainResult:
    """Train per `config`, tracked in one MLflow run; registers a new model version."""
    import mlflow

    from flowops.model import ImageClassifier
    from flowops.tracking import configure_mlflow, start_run

    p = plan(settings, config)
    mode = "local" if config.local else "ray"
    if not config.local:
        connect_ray(settings)
        check_resources(config, *cluster_resources())
    model_name = config.model_name or settings.model_name
    configure_mlflow(settings)
    run_name = config.run_name or f"train-{p.data_version}-s{config.seed}"
    with start_run(settings, config.experiment, run_name) as run:
        run_id = run.info.run_id
        tags = run_tags(settings, p, mode)
        mlflow.set_tags(tags)
        params = config.model_dump(exclude={"fault_marker", "run_name"})
        params.update(data_version=p.data_version, width=p.width, mode=mode,
                      train_samples=len(p.data.train), val_samples=len(p.data.val),
                      holdout_samples=len(p.holdout), pseudo_samples=p.data.n_pseudo)
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        mlflow_info = {"tracking_uri": settings.tracking_uri, "run_id": run_id}
        storage = settings.home / "train-runs"
        name = f"{run_name}-{run_id[:8]}"
        loop_config = _loop_config(p, "local" if config.local else "train", mlflow_info, storage / name)
        started = time.perf_counter()
        if config.local:
            state = run_loop_local(loop_config)
        else:
            state = run_loop_ray(settings, p, loop_config, storage, name)
        mlflow.log_metric("train_wall_s", time.perf_counter() - started)
        resumed = list(state.get("resumed_at", []))
        if resumed:
            mlflow.set_tag("resumed_from_checkpoint", ",".join(map(str, resumed)))
        model = ImageClassifier(p.data.classes, p.data.image_size, width=p.width)
        model.load_state_dict(state["model"])
        metrics, digest, version = finish_run(settings, p, model, tags=tags,
                                              register=config.register_version, model_name=model_name)
    log.info("run %s: holdout accuracy %.4f, weights %s, version %s", run_id,
             metrics["holdout_accuracy"], digest[:12], version)
    return TrainResult(run_id=run_id, version=version, model_name=model_name, data_version=p.data_version,
                       metrics=metrics, weights_hash=digest, base_model_version=p.base,
                       resumed_at=resumed, mode=mode)


def recorded_config(settings: Settings, run_id: str) -> TrainConfig:
    """The TrainConfig a run was started with (its `flowops.train_config` tag)."""
    from flowops.tracking import configure_mlflow

    run = configure_mlflow(settings).get_run(run_id)
    raw = run.data.tags.get("flowops.train_config")
    if not raw:
        raise FlowOpsError(f"run {run_id} has no recorded training config (not trained by flowops)")
    return TrainConfig(**json.loads(raw))


def job_args(config: TrainConfig) -> list[str]:
    """The `python -m jobs.train` arguments that reproduce `config` (for Ray jobs and RayJobs)."""
    args: list[str] = []
    defaults = TrainConfig()
    flags = {
        "data_version": "--data-version", "workers": "--workers", "cpus_per_worker": "--cpus-per-worker",
        "gpus_per_worker": "--gpus-per-worker", "epochs": "--epochs", "batch_size": "--batch-size",
        "lr": "--lr", "width": "--width", "init_from": "--init-from", "freeze_epochs": "--freeze-epochs",
        "seed": "--seed", "experiment": "--experiment", "model_name": "--model-name",
        "max_failures": "--max-failures", "run_name": "--run-name", "fault_marker": "--fault-marker",
    }
    for key, flag in flags.items():
        value = getattr(config, key)
        if value is not None and value != getattr(defaults, key):
            args += [flag, str(value)]
    if config.include_pseudo:
        args.append("--include-pseudo")
    if not config.register_version:
        args.append("--no-register")
    if config.local:
        args.append("--local")
    return args


def precheck(settings: Settings, config: TrainConfig) -> TrainConfig:
    """Cheap checks a client makes before submitting (data version, base model); returns the config
    with the data version pinned (a job reads the workspace as a remote repo and needs an id)."""
    from flowops import data

    if settings.data_repo is None:
        pinned = data.resolve_version(settings, config.data_version)
        config = config.model_copy(update={"data_version": pinned})
    if config.init_from:
        from flowops.model import resolve_model_version

        resolve_model_version(settings, config.init_from)
    if config.freeze_epochs > config.epochs:
        raise InvalidInput(f"--freeze-epochs {config.freeze_epochs} exceeds --epochs {config.epochs}")
    return config
