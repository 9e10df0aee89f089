"""Hyperparameter search: a small Ray Tune search (learning rate, width) over the training loop.

Each trial runs `flowops.train_session.train_loop` in one process and reports every epoch to Tune; ASHA
stops weak trials early. Trials are MLflow child runs of one parent run; the best trial's final
weights are evaluated on the holdout and registered as a new model version (in its child run).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flowops import ray_client
from flowops.errors import JobFailed
from flowops.settings import Settings

log = logging.getLogger(__name__)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_version: str | None = None
    trials: int = Field(4, ge=1, le=256)
    epochs: int = Field(4, ge=1, le=1000, description="Most epochs a trial runs (ASHA's max_t).")
    lrs: list[float] = Field(default_factory=lambda: [1e-3, 3e-3, 1e-2], min_length=1)
    widths: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    batch_size: int = Field(32, ge=1)
    seed: int = Field(0, ge=0)
    experiment: str = Field("tune", min_length=1)
    model_name: str | None = None
    cpus_per_trial: float = Field(1.0, gt=0)
    max_concurrent: int = Field(2, ge=1)
    register_version: bool = True


def _trial(config: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """One Tune trial: the training loop with this trial's learning rate and width."""
    from flowops.train_session import train_loop

    assert base is not None
    name = f"trial-lr{config['lr']:g}-w{config['width']}"
    mlflow_info = {**base["mlflow"], "run_name": name,
                   "params": {"lr": config["lr"], "width": config["width"], "epochs": base["epochs"]}}
    task = {**base["task"], "options": {**base["task"]["options"], "width": int(config["width"])}}
    train_loop({**base, "lr": float(config["lr"]), "task": task, "mlflow": mlflow_info})


def run_tune(settings: Settings, config: TuneConfig) -> dict[str, Any]:
    """Run the search; returns the best trial's parameters, metrics and registered version."""
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from flowops import storage as storage_lib
    from flowops.task import TaskSpec, load_task
    from flowops.tracking import ensure_experiment, start_run
    from flowops.train import (
        TrainConfig,
        check_resources,
        finish_run,
        loop_config,
        plan,
        run_tags,
        training_arrays,
    )
    from flowops.train_session import load_checkpoint

    train_config = TrainConfig(data_version=config.data_version, epochs=config.epochs,
                               batch_size=config.batch_size, seed=config.seed,
                               experiment=config.experiment, cpus_per_worker=config.cpus_per_trial,
                               model_name=config.model_name)
    p = plan(settings, train_config)
    store = storage_lib.check(settings, "tune")  # trials on any node checkpoint there
    ray_client.connect(settings, log_to_driver=True, runtime_env={"env_vars": settings.job_env()})
    check_resources(train_config, *ray_client.cluster_resources())
    data_version = p.data_version.tag
    experiment_id = ensure_experiment(settings, config.experiment)
    with start_run(settings, config.experiment, f"tune-{data_version}") as parent:
        tags = run_tags(p, "tune")
        mlflow.set_tags(tags)
        mlflow.log_params({"trials": config.trials, "epochs": config.epochs, "lrs": str(config.lrs),
                           "widths": str(config.widths), "scheduler": "ASHA", "seed": config.seed,
                           "data_version": data_version})
        mlflow_info = {"tracking_uri": settings.tracking_uri, "experiment_id": experiment_id,
                       "parent_run_id": parent.info.run_id, "run_id": None,
                       "tags": {"data_version": data_version, "seed": str(config.seed)}}
        # each trial gets the decoded images through the object store (tune.with_parameters);
        # no local folder: a trial reports its checkpoints to Tune, which writes them to storage
        base = {**loop_config(p, "tune", mlflow_info, None), **training_arrays(p)}
        base["threads"] = max(1, int(config.cpus_per_trial))
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base),
                                        {"cpu": config.cpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"lr": tune.choice(config.lrs), "width": tune.choice(config.widths)},
            tune_config=tune.TuneConfig(
                metric="val_accuracy", mode="max", num_samples=config.trials,
                max_concurrent_trials=config.max_concurrent,
                scheduler=ASHAScheduler(max_t=config.epochs, grace_period=1, reduction_factor=2),
                search_alg=BasicVariantGenerator(random_state=config.seed),
            ),
            # Tune's trial table (verbose 1): redrawn in a terminal, printed now and then into a
            # job's log; `--json` of the submitting command sends the log to stderr. The
            # experiment (trials' checkpoints, results) under `<storage URI>/tune-runs/<name>`,
            # which a trial on any node and this driver both reach.
            run_config=tune.RunConfig(name=f"tune-{parent.info.run_id[:8]}",
                                      storage_path=store.path("tune-runs"),
                                      storage_filesystem=store.filesystem, verbose=1),
        )
        started = time.perf_counter()
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error]
        if len(errors) == len(grid):
            raise JobFailed(f"every Tune trial failed; first error: {str(errors[0]).splitlines()[0]}")
        best = grid.get_best_result(metric="val_accuracy", mode="max", scope="last")
        mlflow.log_metric("tune_wall_s", time.perf_counter() - started)
        mlflow.log_params({"best_lr": best.config["lr"], "best_width": best.config["width"]})
        mlflow.log_metric("best_val_accuracy", best.metrics["val_accuracy"])
        with best.checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        spec = p.task.spec
        best_width = int(best.config["width"])
        p.task = load_task(TaskSpec(path=spec.path, options={**spec.options, "width": best_width}))
        model = p.task.build_model(p.data.classes)
        model.load_state_dict(state["model"])
        child = best.metrics.get("mlflow_run_id")
        with mlflow.start_run(run_id=child, nested=True) if child else mlflow.start_run(nested=True):
            mlflow.set_tags({**tags, "best_trial": "true"})
            metrics, digest, version = finish_run(
                settings, p, model, tags=tags, register=config.register_version,
                model_name=p.model_name,
            )
        mlflow.set_tag("best_model_version", version or "none")
    return {
        "parent_run_id": parent.info.run_id, "best_run_id": child, "best_config": dict(best.config),
        "best_val_accuracy": best.metrics["val_accuracy"], "trials": len(grid), "failed": len(errors),
        "stopped_early": sum(1 for r in grid if r.metrics and r.metrics.get("epoch", 0) + 1 < config.epochs),
        "holdout_accuracy": metrics["holdout_accuracy"], "weights_hash": digest, "version": version,
    }
