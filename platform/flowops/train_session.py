"""Where the training loop runs: in this process, on Ray Train workers, or as a Ray Tune trial.

`flowops.train.train_loop` is plain single-device PyTorch; the session it gets is the only place
distribution plugs in: under Ray Train `ray.train.torch.prepare_model(model)`,
`ray.train.torch.prepare_data_loader(loader)` and `ray.train.report(metrics, checkpoint=...)`
every epoch (restored through `ray.train.get_checkpoint()` when a failed worker group restarts).
`run_local` and `run_ray_train` are the driver's two ways to run the loop; both return the state
of the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
                  workers: int, cpus_per_worker: float, gpus_per_worker: float, max_failures: int,
                  storage: Path, name: str) -> dict[str, Any]:
    """Run the loop on `workers` Ray Train workers; returns the last checkpoint's state."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
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
        return load_checkpoint(folder)
