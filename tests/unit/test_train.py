"""Training without a cluster: config across the job boundary, input checks, the loop's
determinism and freezing."""

from __future__ import annotations

import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from flowops import jobs
from flowops.entrypoint import parse_job_config
from flowops.errors import InvalidInput
from flowops.evaluate import classification_metrics
from flowops.tasks import SmallCNN
from flowops.train import TrainConfig, check_resources, pseudo_rows
from flowops.train_session import load_checkpoint, train_loop, weights_hash
from tests.conftest import REPO


def _loop_config(tmp_path, **over):
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > 0.5).astype(np.int64)
    task = {"path": "flowops.tasks:small_cnn", "options": {"channels": 1, "size": 8, "width": 4}}
    cfg = {
        "mode": "local", "seed": 3, "epochs": 2, "batch_size": 8, "lr": 1e-2, "task": task,
        "freeze_epochs": 0, "classes": ["a", "b"], "init_state": None,
        "x_train": x[:32], "y_train": y[:32], "x_val": x[32:], "y_val": y[32:], "threads": 1,
        "fault_marker": None, "mlflow": None, "checkpoint_dir": str(tmp_path),
    }
    return {**cfg, **over}


def _final_state(folder):
    last = sorted(folder.glob("checkpoint_epoch_*"))[-1]
    return load_checkpoint(last)


def test_config_rejects_unknown_and_out_of_range_fields():
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(epoch=3)
    with pytest.raises(ValueError):
        TrainConfig(workers=0)


def test_same_seed_same_weights_and_a_checkpoint_per_epoch(tmp_path):
    train_loop(_loop_config(tmp_path / "a"))
    train_loop(_loop_config(tmp_path / "b"))
    train_loop(_loop_config(tmp_path / "c", seed=4))
    assert len(list((tmp_path / "a").glob("checkpoint_epoch_*"))) == 2
    a, b, c = (_final_state(tmp_path / n) for n in "abc")
    assert a["weights_hash"] == b["weights_hash"] != c["weights_hash"]


def test_freeze_epochs_keep_the_feature_extractor_fixed(tmp_path):
    init = SmallCNN(2, channels=1, width=4).state_dict()
    train_loop(_loop_config(tmp_path, init_state=init, freeze_epochs=2))
    state = _final_state(tmp_path)["model"]
    for name, tensor in init.items():
        same = torch.equal(state[name], tensor)
        assert same if name.startswith("features.") else True
    assert any(not torch.equal(state[n], init[n]) for n in init if n.startswith("head."))


def test_weights_hash_changes_with_any_weight():
    model = SmallCNN(2, channels=1, width=4)
    before = weights_hash(model)
    with torch.no_grad():
        model.head[-1].bias[0] += 1e-6
    assert weights_hash(model) != before


def test_resources_beyond_the_cluster_are_refused_with_what_exists():
    total, node = {"CPU": 4.0}, {"CPU": 4.0}
    check_resources(TrainConfig(workers=2, cpus_per_worker=2), total, node)
    with pytest.raises(InvalidInput, match="more than any node has.*4 CPUs"):
        check_resources(TrainConfig(cpus_per_worker=8), total, node)
    with pytest.raises(InvalidInput, match="3 workers x 2 CPUs = 6 CPUs asked, the cluster has 4"):
        check_resources(TrainConfig(workers=3, cpus_per_worker=2), total, node)
    with pytest.raises(InvalidInput, match="no GPUs"):
        check_resources(TrainConfig(gpus_per_worker=1), total, node)


def test_the_config_crosses_the_job_boundary_unchanged(tmp_path):
    config = TrainConfig(data_version="v3", workers=2, epochs=4, lr=0.01, init_from="models:/m@production",
                         freeze_epochs=1, include_pseudo=True, seed=7, register_version=False,
                         run_name="it's \"quoted\" $HOME")
    command = shlex.split(jobs.entrypoint("train", config))  # what the job's shell runs
    assert command[:4] == ["python", "-m", "flowops.workloads.train", "--config"]
    assert parse_job_config(TrainConfig, command[3:]) == config
    (tmp_path / "train.json").write_text(config.model_dump_json())
    assert parse_job_config(TrainConfig, [f"--config=@{tmp_path / 'train.json'}"]) == config
    assert parse_job_config(TrainConfig, []) == TrainConfig()
    assert jobs.entrypoint("data_check") == "python -m flowops.workloads.data_check"


@pytest.mark.parametrize("argv, message", [
    (["--config", '{"epoch": 3}'], "epoch: Extra inputs are not permitted"),
    (["--config", '{"workers": 0}'], "workers: Input should be greater than or equal to 1"),
    (["--config", "{not json"], "Invalid JSON"),
    (["--config", "@/no/such/file.json"], "cannot read"),
    (["--epochs", "3"], "unexpected arguments '--epochs 3'"),
])
def test_a_bad_job_config_is_one_line(argv, message):
    with pytest.raises(InvalidInput, match=message) as caught:
        parse_job_config(TrainConfig, argv)
    assert "\n" not in str(caught.value)


def test_a_job_exits_2_with_one_line_on_a_bad_config():
    proc = subprocess.run([sys.executable, "-m", "jobs.data_check", "--config", '{"version": "v1"}'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --config (DataCheckConfig): version: Extra inputs are not permitted"]


def test_pseudo_rows_take_unlabeled_manifest_rows_and_skip_labeled_ids(tmp_path):
    manifest = pd.DataFrame({
        "id": ["u1", "u2", "t1"], "path": ["images/unlabeled/u1.png", "images/unlabeled/u2.png", "x.png"],
        "label": ["", "", "3"], "split": ["unlabeled", "unlabeled", "train"],
    })
    (tmp_path / "pseudo_labels.csv").write_text("id,label,score,model_version\nu1,4,0.99,2\nt1,3,0.9,2\n")
    rows = pseudo_rows(tmp_path, manifest, [str(i) for i in range(10)])
    assert rows[["id", "label", "split"]].values.tolist() == [["u1", "4", "unlabeled"]]
    (tmp_path / "pseudo_labels.csv").write_text("id,label,score,model_version\nu1,cat,0.99,2\n")
    with pytest.raises(InvalidInput, match="outside the classes"):
        pseudo_rows(tmp_path, manifest, [str(i) for i in range(10)])


def test_classification_metrics():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["confusion"] == [[1, 1], [0, 2]]
    assert m["per_class_f1"]["b"] == pytest.approx(0.8)


def test_workers_take_custom_resources_and_a_placement_strategy():
    """`--resource NAME=AMOUNT` and `--placement-strategy` reach the TrainConfig checked; a wrong
    strategy or amount is one line naming it."""
    from flowops.cli._common import parse_resources
    from flowops.errors import InvalidInput, validated
    from flowops.train import TrainConfig

    cfg = validated(TrainConfig, "train config", resources=parse_resources(["worker_host=0.5"]),
                    placement_strategy="STRICT_SPREAD")
    assert (cfg.resources, cfg.placement_strategy) == ({"worker_host": 0.5}, "STRICT_SPREAD")
    with pytest.raises(InvalidInput, match="placement_strategy"):
        validated(TrainConfig, "train config", placement_strategy="EVERYWHERE")
    with pytest.raises(InvalidInput, match="resources"):
        validated(TrainConfig, "train config", resources={"worker_host": -1})
