"""Colour matters: a folder whose two classes differ only by colour (the same brightness in
grayscale) trains to high holdout accuracy with the built-in ResNet task on RGB, and stays near
chance with the grayscale small CNN on the very same data version. Local training (no Ray) on a
real data version in a temporary home."""

from __future__ import annotations

import pytest

from flowops.settings import get_settings
from flowops.train import TrainConfig, train
from tests.conftest import run_cli
from tests.image_folders import write_colour_folder


@pytest.fixture(scope="module")
def colour_home(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("colour")
    write_colour_folder(tmp / "photos", per_class=30)
    home = tmp / ".flowops"
    out = run_cli("data", "init", "--from", str(tmp / "photos"), "--name", "colours",
                  env={"FLOWOPS_HOME": str(home)}, timeout=300)
    assert out.returncode == 0, out.stderr
    # Tracked to an MLflow store of its own (no server runs in a unit-test session).
    return get_settings(home=home, mlflow_tracking_uri=f"sqlite:///{home}/mlflow.db")


def _holdout_accuracy(settings, task: str, **options) -> float:
    config = TrainConfig(local=True, register_version=False, task=task, task_options=options,
                         epochs=6, batch_size=16, lr=3e-3, experiment="colour")
    return train(settings, config).metrics["holdout_accuracy"]


def test_colour_classes_need_a_colour_pipeline(colour_home):
    rgb = _holdout_accuracy(colour_home, "flowops.tasks:resnet", size=32, width=8, depth=[1, 1])
    gray = _holdout_accuracy(colour_home, "flowops.tasks:small_cnn", channels=1, size=32)
    assert rgb >= 0.9, rgb
    assert gray <= 0.75, gray
