"""The training loop and where it runs: in this process, on Ray Train workers, or as a Ray Tune trial.

`train_loop(config)` builds the task's network and hands a `TaskContext` to the task's own loop or
to FlowOps's `fit`: plain single-device PyTorch. The session behind the context is the only place
distribution plugs in: under Ray Train `ray.train.torch.prepare_model(model)`,
`ray.train.torch.prepare_data_loader(loader)`, the data from `ray.train.get_dataset_shard`
(`flowops.train_data`) and `ray.train.report(metrics, checkpoint=...)` every epoch, to the storage
URI (restored through `ray.train.get_checkpoint()` when a failed worker group restarts).
`run_local` and `run_ray_train` are the driver's two ways to run the loop; both return the state
of the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flowops.durable import append_jsonl
from flowops.errors import JobFailed

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
FAULT_EPOCH = 2  # the epoch at which the test-only fault hook kills rank 1 (once)


def create_session(config: dict[str, Any]) -> Session:
    """The session of `config["mode"]`: local (default), train (Ray Train) or tune (Ray Tune)."""
    mode = config.get("mode", "local")
    return {"local": LocalSession, "train": TrainSession, "tune": TuneSession}[mode](config)


def save_checkpoint(state: dict[str, Any], folder: Path) -> None:
    import torch

    torch.save(state, Path(folder) / CHECKPOINT_FILE)


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    import torch

    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


class Session:
    """Where the loop runs: in this process ('local'), under Ray Train ('train') or Ray Tune ('tune')."""

    rank = 0
    world_size = 1

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

    def datasets(self):
        """(train, val) in one process: TensorDatasets of the arrays the driver decoded."""
        import torch
        from torch.utils.data import TensorDataset

        tensors = {k: torch.from_numpy(self.config[k]) for k in ("x_train", "y_train", "x_val", "y_val")}
        return (TensorDataset(tensors["x_train"], tensors["y_train"]),
                TensorDataset(tensors["x_val"], tensors["y_val"]))

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
                  for k in ("train_loss", "val_accuracy", "epoch_time_s", "images_per_s") if k in metrics]
        self._mlflow.log_batch(self._run_id, metrics=values)

    def restore(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError


class LocalSession(Session):
    """One process; checkpoints go to the run's folder every epoch."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.folder = Path(config["checkpoint_dir"])
        self.folder.mkdir(parents=True, exist_ok=True)

    def report(self, metrics, state) -> None:
        target = self.folder / f"checkpoint_epoch_{metrics['epoch']:04d}"
        if not target.exists():  # a whole checkpoint folder or none: written aside, then renamed
            tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=".tmp-"))
            save_checkpoint(state, tmp)
            os.replace(tmp, target)
        append_jsonl(self.folder / "metrics.jsonl", metrics)
        self.log_metrics(metrics)
        if self.config.get("on_epoch"):  # the driver's progress view (same process)
            self.config["on_epoch"](metrics)
        log.info("epoch %d: loss %.4f val_accuracy %.4f (%.2fs)", metrics["epoch"],
                 metrics["train_loss"], metrics["val_accuracy"], metrics["epoch_time_s"])


class TrainSession(Session):
    """A Ray Train worker: prepared model and loader, checkpoint reported by rank 0 every epoch."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        super().__init__(config)
        self.rank = ray.train.get_context().get_world_rank()
        self.world_size = ray.train.get_context().get_world_size()

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

    def datasets(self):
        """(this worker's shard of "train", all of "val" or None): Ray Data iterators."""
        import ray.train

        val = ray.train.get_dataset_shard("val") if self.config.get("val_samples") else None
        return ray.train.get_dataset_shard("train"), val

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
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
        save_checkpoint(state, Path(tmp))
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


class TuneSession(Session):
    """A Ray Tune trial: one process, metrics to the scheduler, a child run in MLflow."""

    def restore(self):
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(folder)

    def report(self, metrics, state) -> None:
        import ray.tune

        self.log_metrics(metrics)
        clean = {k: v for k, v in metrics.items() if k != "resumed_at"}
        if self._run_id:
            clean["mlflow_run_id"] = self._run_id
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(state, Path(tmp))
            ray.tune.report(clean, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def run_local(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any]) -> dict[str, Any]:
    """Run the loop in this process; returns the last checkpoint's state."""
    loop(loop_config)
    last = sorted(Path(loop_config["checkpoint_dir"]).glob("checkpoint_epoch_*"))[-1]
    return load_checkpoint(last)


@contextlib.contextmanager
def follow_epochs(tracking_uri: str, run_id: str,
                  on_epoch: Callable[[dict[str, Any]], None] | None,
                  poll_s: float = 2.0) -> Iterator[None]:
    """While Ray Train runs the loop elsewhere, pass each epoch rank 0 logged to the MLflow run to
    `on_epoch` (the driver's progress view); a no-op without a callback."""
    if on_epoch is None:
        yield
        return
    import threading

    from mlflow.tracking import MlflowClient

    stop = threading.Event()

    def follow() -> None:
        client, seen, stopped = MlflowClient(tracking_uri=tracking_uri), -1, False
        while not stopped:
            stopped = stop.wait(poll_s)  # after the stop, one last look: the final epochs
            try:
                history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
                           for k in ("train_loss", "val_accuracy")}
            except Exception:  # noqa: BLE001 - progress is best effort, training goes on
                continue
            for step in sorted(s for s in history["val_accuracy"] if s > seen):
                seen = step
                on_epoch({"epoch": step, **{k: v[step] for k, v in history.items() if step in v}})

    thread = threading.Thread(target=follow, name="flowops-epochs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def run_ray_train(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *,
                  datasets: dict[str, Any], workers: int, cpus_per_worker: float,
                  gpus_per_worker: float, resources: dict[str, float], placement_strategy: str,
                  max_failures: int, storage, name: str) -> dict[str, Any]:
    """Run the loop on `workers` Ray Train workers, "train" of `datasets` split among them, "val"
    whole to each; checkpoints under `<storage URI>/checkpoints/<name>` (a `flowops.storage.Storage`),
    where a worker group restarted on any node finds them. Returns the last checkpoint's state."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flowops.train_data import input_error

    resources = {**resources, "CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        # "train" split among the workers; the same order every epoch (a seeded shuffle on top)
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage.path("checkpoints"), storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends
        bad_input = input_error(exc)  # an undecodable image, met while streaming
        if bad_input is not None:
            raise bad_input from None
        first = str(exc).strip().splitlines()
        raise JobFailed(f"training failed on Ray Train: {first[0] if first else type(exc).__name__}") from exc
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return load_checkpoint(folder)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # speed: the same-weights promise holds on CPU
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Same kernels, same weights, without the debugging aid that fills every new tensor
        # with NaN: ~450 fills per step cost ResNet training ~5% (tests/benchmarks/task_bench.py).
        torch.utils.deterministic.fill_uninitialized_memory = False


def train_loop(config: dict[str, Any]) -> None:
    """What runs on each worker (or in this process): build the task's model and hand a
    `TaskContext` to the task's own loop, or to FlowOps's `fit`."""
    import torch

    from flowops.task import TaskSpec, load_task, unpack_package

    session = create_session(config)
    seed_everything(int(config["seed"]) + session.rank)  # DDP broadcasts rank 0's weights anyway
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    code = config.get("task_code")  # the engineer's task package, packed by the driver
    task = load_task(TaskSpec.model_validate(config["task"]),
                     code_dir=unpack_package(code) if code else None)
    model = task.build_model(list(config["classes"]))
    if config.get("init_state") is not None:
        model.load_state_dict(config["init_state"])
    ctx = TaskContext(session, task, model, config)
    (task.train_loop or fit)(ctx)


def fit(ctx: TaskContext) -> None:
    """FlowOps's training loop, written as any task's loop is: plain single-device PyTorch plus
    the context's calls. Adam; cross-entropy; the backbone frozen (learning rate 0, DDP-safe) for
    the first `freeze_epochs`; mixed precision and channels-last on GPU."""
    import torch
    from torch import nn

    model = ctx.prepare_model(ctx.model)
    loader = ctx.data_loader()
    head = ctx.task.head_prefix(unwrap_module(model))
    named = list(unwrap_module(model).named_parameters())
    in_head = [n == head or n.startswith(f"{head}.") for n, _ in named]
    backbone = [p for (_, p), h in zip(named, in_head, strict=True) if not h]
    head_params = [p for (_, p), h in zip(named, in_head, strict=True) if h]
    groups = [g for g in ({"params": backbone}, {"params": head_params}) if g["params"]]
    optimizer = torch.optim.Adam(groups, lr=ctx.lr)
    start = ctx.restore(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in ctx.epochs_from(start, loader):
        if backbone and head_params:
            optimizer.param_groups[0]["lr"] = 0.0 if epoch < ctx.freeze_epochs else ctx.lr
        model.train()
        total, seen = 0.0, 0
        for xb, yb in loader:
            xb, yb = ctx.to_device(xb, yb)
            optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                loss = loss_fn(model(ctx.augment(xb)), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            seen += len(yb)
        ctx.report(epoch, model, optimizer, train_loss=total / max(seen, 1), samples=seen)


class TaskContext:
    """What a training loop gets: the model, the data, and the few calls distribution plugs into.

    An engineer's single-device loop becomes a FlowOps task loop by taking `ctx` and calling
    `ctx.prepare_model(model)`, `ctx.data_loader()` (or `ctx.prepare_data_loader(own_loader)`),
    `start = ctx.restore(model, optimizer)`, `for epoch in ctx.epochs_from(start, loader):` and
    `ctx.report(epoch, model, optimizer, train_loss=...)` once per epoch. Under Ray Train these
    wrap the model in DDP, shard the loader, and checkpoint so a restarted worker group resumes.
    """

    def __init__(self, session: Session, task, model, config: dict[str, Any]):
        import torch

        self.session, self.task, self.model, self.config = session, task, model, config
        self.classes: list[str] = list(config["classes"])
        self.epochs: int = int(config["epochs"])
        self.batch_size: int = int(config["batch_size"])
        self.lr: float = float(config["lr"])
        self.seed: int = int(config["seed"])
        self.freeze_epochs: int = int(config.get("freeze_epochs", 0))
        self.rank = session.rank
        self.device = session.device()
        # TensorDatasets in one process; under Ray Train this worker's Ray Data iterators
        self.train_set, self.val_set = session.datasets()
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.amp_dtype = amp_dtype(config.get("precision", "auto"), self.device)
        self.channels_last = self.device.type == "cuda"
        self.resumed_at: list[int] = []
        self._started = time.perf_counter()
        self._seen = 0

    # Model and data ----------------------------------------------------------------------------

    def prepare_model(self, model):
        """Move to the device (channels-last on GPU) and, distributed, wrap in DDP."""
        import torch

        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return self.session.prepare_model(model)

    def prepare_data_loader(self, loader):
        """Distributed: each worker gets its shard (a DistributedSampler); else the loader as is."""
        return self.session.prepare_data_loader(loader)

    def data_loader(self, dataset=None, shuffle: bool = True):
        """Batches (x, y) of the training set (or `dataset`, a TensorDataset): this worker's shard
        when distributed, a seeded shuffle (the same order for an epoch, resumed or not).

        Under Ray Train the training set is this worker's shard of a Ray Dataset: its batches
        stream through a local shuffle buffer seeded with seed + epoch (`train_data.ShardBatches`).
        Otherwise a batch is one indexed gather, not a stack of single samples, and on a GPU a
        training set that fits in a fifth of the free memory is moved there once: the GPU is not
        left waiting for the loader (measured in tests/benchmarks/train_gpu_bench.py)."""
        import torch
        from torch.utils.data import (
            BatchSampler,
            DataLoader,
            DistributedSampler,
            RandomSampler,
            SequentialSampler,
            TensorDataset,
        )

        dataset = dataset or self.train_set
        if not isinstance(dataset, torch.utils.data.Dataset):  # a Ray Data iterator
            from flowops.train_data import ShardBatches, shuffle_buffer_rows

            return ShardBatches(dataset, batch_size=self.batch_size,
                                buffer_rows=shuffle_buffer_rows(self.task.preprocess, self.batch_size)
                                if shuffle else None,
                                seed=lambda: self.seed + self.epoch, device=self.device)
        if self.device.type == "cuda" and isinstance(dataset, TensorDataset):
            free, _ = torch.cuda.mem_get_info(self.device)
            if sum(t.nbytes for t in dataset.tensors) < free / 5:
                dataset = TensorDataset(*(t.to(self.device) for t in dataset.tensors))
        if self.session.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=self.session.world_size,
                                         rank=self.rank, shuffle=shuffle, seed=0)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=self.generator)
        else:
            sampler = SequentialSampler(dataset)
        on_cpu = dataset.tensors[0].device.type == "cpu" if isinstance(dataset, TensorDataset) else True
        return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, self.batch_size, False),
                          generator=self.generator, pin_memory=self.device.type == "cuda" and on_cpu)

    def to_device(self, xb, yb=None):
        """A batch on the device (channels-last on GPU), augmented while the model trains."""
        import torch

        xb = xb.to(self.device, non_blocking=True)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb if yb is None else (xb, yb.to(self.device, non_blocking=True))

    def augment(self, xb):
        return self.task.augment(xb) if self.task.augment is not None else xb

    def autocast(self):
        """Mixed precision (bf16) where asked and supported; a no-op otherwise."""
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # Epochs, checkpoints, metrics --------------------------------------------------------------

    def restore(self, model, optimizer=None) -> int:
        """Load the last checkpoint of a restarted worker group; returns the epoch to start at."""
        state = self.session.restore()
        if state is None:
            return 0
        unwrap_module(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        self.resumed_at = [*state.get("resumed_at", []), state["epoch"] + 1]
        return state["epoch"] + 1

    def epochs_from(self, start: int, loader=None) -> Iterator[int]:
        """The epochs to run; each one reseeds the shuffle and, distributed, the sampler."""
        for epoch in range(start, self.epochs):
            self.session.maybe_fail(epoch)
            self.epoch = epoch
            self.generator.manual_seed(self.seed + epoch)
            sampler = getattr(loader, "sampler", None)
            sampler = getattr(sampler, "sampler", sampler)  # inside a BatchSampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            self._started, self._seen = time.perf_counter(), 0
            yield epoch

    def count(self, n: int) -> None:
        """Images trained on this epoch (for images/s); `report` takes `samples=` too."""
        self._seen += int(n)

    def evaluate(self, model) -> float:
        """Accuracy on the validation slice (0 when it is empty)."""
        import torch

        if self.val_set is None or (isinstance(self.val_set, torch.utils.data.Dataset)
                                    and len(self.val_set) == 0):
            return 0.0
        model.eval()
        if not isinstance(self.val_set, torch.utils.data.Dataset):  # a Ray Data iterator
            from flowops.train_data import count_correct

            correct, seen = count_correct(model, self.val_set, self.to_device, self.autocast)
            return correct / max(seen, 1)
        correct = 0
        with torch.no_grad(), self.autocast():
            for start in range(0, len(self.val_set), 512):
                xb, yb = self.val_set[start:start + 512]
                xb, yb = self.to_device(xb, yb)
                correct += int((model(xb).argmax(1) == yb).sum())
        return correct / len(self.val_set)

    def report(self, epoch: int, model, optimizer=None, *, train_loss: float, **extra) -> dict[str, Any]:
        """End of an epoch: validation accuracy, metrics to MLflow, a checkpoint to resume from."""
        elapsed = time.perf_counter() - self._started
        samples = int(extra.pop("samples", self._seen))
        metrics = {
            "epoch": epoch, "train_loss": float(train_loss), "val_accuracy": self.evaluate(model),
            "epoch_time_s": elapsed, "samples": samples, "images_per_s": samples / max(elapsed, 1e-9),
            "resumed_at": self.resumed_at, "reported_at": time.time(), **extra,
        }
        module = unwrap_module(model)
        self.session.report(metrics, {
            "epoch": epoch, "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "resumed_at": self.resumed_at, "weights_hash": weights_hash(module),
        })
        return metrics


def weights_hash(model) -> str:
    """sha256 over the state_dict tensors (names, dtypes, shapes, bytes) in name order."""
    import hashlib

    digest = hashlib.sha256()
    state = unwrap_module(model).state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def unwrap_module(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def amp_dtype(precision: str, device):
    """bf16 for `bf16`, or for `auto` on a GPU that supports it; None (fp32) otherwise."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
