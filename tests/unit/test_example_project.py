"""The example project (examples/shapes): the engineer's script runs on its own, its package is a
FlowOps task, and the task's preprocessing computes what the script's own image loading does (the
same tensor in training, serving and batch scoring as in the engineer's notebook)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowops.task import load_task, pack_package, package_dir, unpack_package
from tests.conftest import REPO

EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def on_path(monkeypatch):
    """As when the engineer works in examples/: `shapes` imports as a package."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.fixture
def demo(tmp_path):
    from shapes import make_images

    make_images.main([str(tmp_path / "demo"), "--per-class", "8", "--unlabeled", "4"])
    return tmp_path / "demo"


def test_the_demo_folder_has_two_colour_classes_and_a_pool(demo):
    assert sorted(p.name for p in (demo / "labeled").iterdir()) == ["blue", "orange"]
    assert len(list((demo / "labeled" / "blue").iterdir())) == 8
    assert len(list((demo / "unlabeled").iterdir())) == 4


def test_the_script_trains_on_its_own(demo, tmp_path, capsys):
    from shapes import train

    train.main([str(demo / "labeled"), "--epochs", "1", "--out", str(tmp_path / "model.pt")])
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["classes"] == ["blue", "orange"]
    assert "epoch 1/1" in capsys.readouterr().out


def test_the_package_is_a_task_with_the_scripts_preprocessing(demo):
    from shapes import train

    task = load_task("shapes.task:task")
    assert package_dir(task) == EXAMPLES / "shapes"
    assert task.preprocess.shape == (3, train.SIZE, train.SIZE) and task.train_loop is not None
    for path in sorted((demo / "labeled" / "orange").iterdir())[:3]:  # JPEG, PNG, WebP
        np.testing.assert_allclose(task.decode(path.read_bytes()), train.load_image(path), atol=1e-6)
    model = task.build_model(["blue", "orange"])
    assert model(torch.zeros(2, *task.preprocess.shape)).shape == (2, 2)


def test_the_package_travels_to_workers_as_bytes():
    """What a Ray Train worker gets in its config: the package, extracted once per content."""
    task = load_task("shapes.task:task")
    packed = pack_package(task)
    folder = unpack_package(packed)
    assert folder == unpack_package(packed)  # the second worker on a node reuses it
    assert (folder / "shapes" / "task.py").read_bytes() == (EXAMPLES / "shapes" / "task.py").read_bytes()
    assert not list(folder.rglob("__pycache__"))
    assert pack_package(load_task("flowops.tasks:resnet")) is None
