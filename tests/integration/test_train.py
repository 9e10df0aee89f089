"""Training on the real cluster: Ray Train with a killed worker, the CLI, `ray job submit`,
fine-tuning from production, bad inputs. Tiny epochs (8x8 digits: a CPU epoch is < 1 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowops.errors import InvalidInput, NotFound
from flowops.train import TrainConfig, train
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.integration


def _run(stack, run_id):
    from flowops.tracking import configure_mlflow

    return configure_mlflow(stack).get_run(run_id)


@pytest.mark.slow
def test_two_workers_register_a_tagged_version_and_survive_a_killed_worker(stack, dataset, tmp_path):
    marker = tmp_path / "killed-once"
    progress: list[dict] = []
    result = train(stack, TrainConfig(data_version=dataset, workers=2, epochs=4, seed=5,
                                      experiment="it-train", fault_marker=str(marker)),
                   on_epoch=progress.append)
    assert [(m["epoch"], m["epochs"]) for m in progress] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert marker.exists(), "the fault hook did not kill rank 1"
    assert result.resumed_at and min(result.resumed_at) > 0, "did not resume from a checkpoint"
    assert result.version is not None and result.mode == "ray"
    run = _run(stack, result.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["data_version"] == dataset and tags["seed"] == "5"
    assert tags["weights_hash"] == result.weights_hash
    for key in ("git_commit", "ray_version", "torch_version", "base_model", "resumed_from_checkpoint"):
        assert tags[key], key
    assert params["workers"] == "2" and params["epochs"] == "4"
    for key in ("holdout_accuracy", "macro_f1", "f1_class_0", "val_accuracy", "train_loss"):
        assert key in metrics, key
    from flowops.tracking import configure_mlflow

    client = configure_mlflow(stack)
    assert len(client.get_metric_history(result.run_id, "val_accuracy")) >= 4
    assert "confusion_matrix.png" in [a.path for a in client.list_artifacts(result.run_id)]
    mv = client.get_model_version(stack.model_name, result.version)
    assert mv.tags["stage"] == "experiment" and mv.tags["data_version"] == dataset


@pytest.mark.slow
def test_training_through_the_real_ray_job_submit_cli(stack, dataset):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(stack.token_path),
           "RAY_API_SERVER_ADDRESS": stack.job_api}
    renv = {"env_vars": stack.job_env(), "excludes": [".git", ".venv", "**/__pycache__", "tests"]}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", ".",
         "--runtime-env-json", json.dumps(renv), "--", "python", "-m", "jobs.train", "--config",
         TrainConfig(data_version=dataset, epochs=2, experiment="it-submit").model_dump_json()],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["mode"] == "ray" and result["version"]
    assert _run(stack, result["run_id"]).data.tags["data_version"] == dataset


def test_train_answers_in_json_as_a_ray_job_and_locally(stack, dataset):
    out = run_cli("train", "--data-version", dataset, "--epochs", "2", "--experiment", "it-json",
                  "--json", timeout=420, check=True)
    report = json.loads(out.stdout)  # one JSON object; the job's log went to stderr
    assert report["job_id"].startswith("train-") and report["status"] == "SUCCEEDED"
    assert report["result"]["mode"] == "ray" and report["result"]["version"]
    assert report["result"]["data_version"] == dataset
    assert "ignored by default when packaging" not in out.stderr  # no warning about .git/.venv

    local = run_cli("train", "--local", "--data-version", dataset, "--epochs", "2",
                    "--experiment", "it-json", "--json", timeout=300, check=True)
    result = json.loads(local.stdout)
    assert result["mode"] == "local" and result["version"]
    assert "epoch 1/2" in local.stderr and "epoch 2/2" in local.stderr  # progress, on stderr


def test_fine_tune_from_production_records_lineage(stack, dataset):
    from flowops import registry

    name = "it-finetune-model"  # own registered model: its production alias is this test's alone
    base = train(stack, TrainConfig(data_version=dataset, epochs=3, local=True, experiment="it-ft",
                                    model_name=name))
    registry.promote(stack, base.version, force=True, name=name)
    tuned = train(stack, TrainConfig(data_version=dataset, epochs=2, local=True, experiment="it-ft",
                                     init_from=f"models:/{name}@production", model_name=name,
                                     freeze_epochs=1))
    assert tuned.base_model_version == f"{name}/{base.version}"
    run = _run(stack, tuned.run_id)
    assert run.data.tags["base_model_version"] == f"{name}/{base.version}"
    assert run.data.params["freeze_epochs"] == "1"


def test_bad_inputs_fail_before_training_with_one_clear_line(stack, dataset):
    proc = run_cli("train", "--data-version", "v99", "--epochs", "1", timeout=120)
    assert proc.returncode != 0
    assert "v99" in proc.stderr and dataset in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--init-from", f"models:/{stack.model_name}/999", timeout=120)
    assert proc.returncode != 0 and "999" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(NotFound, match="existing versions"):
        train(stack, TrainConfig(data_version="v99", local=True))
    with pytest.raises(InvalidInput, match="64 is more than any node has"):
        train(stack, TrainConfig(data_version=dataset, cpus_per_worker=64, epochs=1))
    with pytest.raises(InvalidInput, match="no GPUs"):
        train(stack, TrainConfig(data_version=dataset, gpus_per_worker=1, epochs=1))
