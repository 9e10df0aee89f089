"""The task API: loading tasks by path, preprocessing real images, the built-in networks."""

from __future__ import annotations

import io
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from flowops.errors import InvalidInput
from flowops.image_model import Preprocess, UndecodableImage, image_bytes
from flowops.task import Task, TaskSpec, load_task, parse_options


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_grayscale_alpha_and_odd_sizes_become_the_tasks_shape():
    rgb = Preprocess(size=(6, 10), channels=3)
    gray = Preprocess(size=8, channels=1)
    red = _png(Image.new("RGB", (37, 53), (255, 0, 0)))
    out = rgb.decode(red)
    assert out.shape == (3, 6, 10) and out.dtype == np.float32
    assert np.allclose(out[0], 1) and np.allclose(out[1:], 0)
    assert gray.decode(red).shape == (1, 8, 8)
    transparent = _png(Image.new("RGBA", (9, 9), (255, 255, 255, 0)))
    assert np.allclose(rgb.decode(transparent), 0)  # alpha composited on black
    assert np.allclose(gray.decode(_png(Image.new("L", (8, 8), 51))), 0.2)


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    rotated = Preprocess(size=(40, 20), channels=1, resize="resize").decode(
        _png(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert rotated.shape == (1, 40, 20)
    top, bottom = rotated[0, :20].mean(), rotated[0, 20:].mean()
    assert top > 0.9 and bottom < 0.1  # shown upright: the white half is on top


def test_resize_policies_and_normalisation():
    wide = _png(Image.new("RGB", (40, 10), (255, 255, 255)))
    letterbox = Preprocess(size=10, channels=1, resize="letterbox").decode(wide)
    assert letterbox[0, 0].max() == 0 and letterbox[0, 5].min() == 1  # padded top, image middle
    crop = Preprocess(size=10, channels=1, resize="center_crop").decode(wide)
    assert np.allclose(crop, 1)
    norm = Preprocess(size=4, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).decode(wide)
    assert np.allclose(norm, 1.0)


def test_pixels_in_grayscale_and_colour():
    gray = Preprocess(size=8, channels=1)
    assert np.allclose(gray.pixels(np.full((8, 8), 127.5)), 0.5)  # no rounding at the model size
    assert gray.pixels(np.zeros((5, 7, 3))).shape == (1, 8, 8)
    assert Preprocess(size=4, channels=3).pixels(np.full((4, 4, 3), 255)).min() == 1
    for bad in ([[1, 2], [3]], np.zeros((3,)), np.full((4, 4), 300), np.zeros((4, 4, 2))):
        with pytest.raises(UndecodableImage):
            gray.pixels(bad)


def test_undecodable_bytes_are_one_line_errors():
    with pytest.raises(UndecodableImage, match="not a decodable image"):
        Preprocess(size=8).decode(b"not an image")
    with pytest.raises(UndecodableImage, match="base64"):
        image_bytes("%%%")
    task = load_task("flowops.tasks:small_cnn")
    with pytest.raises(InvalidInput, match="not a decodable image"):
        task.decode(b"\x89PNG broken")


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "size"), ({"size": 8, "channels": 2}, "channels"),
    ({"size": 8, "resize": "squash"}, "resize"), ({"size": 8, "channels": 3, "mean": (0, 0)}, "mean"),
    ({"size": 8, "std": (0,)}, "std"),
])
def test_preprocess_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)


def test_a_preprocess_round_trips_through_its_dict():
    p = Preprocess(size=(32, 48), channels=3, resize="letterbox", mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    assert Preprocess.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("path, message", [
    ("no_colon", "module:object"),
    ("flowops_no_such_module:task", "does not import"),
    ("flowops.tasks:nothing", "has no attribute"),
    ("flowops.tasks:IMAGENET_MEAN", "not a flowops Task"),
])
def test_a_bad_task_path_is_one_line_naming_it(path, message):
    with pytest.raises(InvalidInput, match=message) as err:
        load_task(path)
    assert path.split(":")[0] in str(err.value) and "\n" not in str(err.value)


def test_task_options_are_checked_against_the_factory():
    with pytest.raises(InvalidInput, match="do not fit"):
        load_task("flowops.tasks:resnet", {"colour": True})
    task = load_task("flowops.tasks:resnet", {"size": 32, "channels": 1})
    assert task.preprocess.shape == (1, 32, 32) and task.spec == TaskSpec(
        path="flowops.tasks:resnet", options={"size": 32, "channels": 1})
    assert parse_options(["size=64", "resize=letterbox", "depth=[1,1]"]) == {
        "size": 64, "resize": "letterbox", "depth": [1, 1]}
    with pytest.raises(InvalidInput, match="key=value"):
        parse_options(["size"])


def test_a_users_task_object_from_a_module_on_the_path(tmp_path, monkeypatch):
    pkg = tmp_path / "my_project"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(textwrap.dedent("""
        from torch import nn
        from flowops.task import Preprocess, Task
        task = Task(name="mine", build_model=lambda classes: nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 4 * 4, len(classes))), preprocess=Preprocess(size=4))
        not_a_task = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my_project.task:task")
    assert isinstance(task, Task) and task.name == "mine"
    assert task.head_prefix(task.build_model(["a", "b"])) == "1"  # last child with parameters
    with pytest.raises(InvalidInput, match="takes no options"):
        load_task("my_project.task:task", {"size": 3})
    from flowops.task import package_dir

    assert package_dir(task) == pkg and package_dir(load_task("flowops.tasks:resnet")) is None
    sys.modules.pop("my_project.task", None)
    sys.modules.pop("my_project", None)


@pytest.mark.parametrize("factory, options, shape", [
    ("small_cnn", {"channels": 1, "size": 8}, (2, 1, 8, 8)),
    ("small_cnn", {"channels": 3, "size": 30}, (2, 3, 30, 30)),
    ("resnet", {"channels": 3, "size": 64}, (2, 3, 64, 64)),
    ("resnet", {"channels": 1, "size": 20, "width": 8, "depth": [1, 1, 1, 1]}, (2, 1, 20, 20)),
])
def test_builtin_networks_take_their_preprocessed_shape(factory, options, shape):
    task = load_task(f"flowops.tasks:{factory}", options)
    assert task.preprocess.shape == shape[1:]
    model = task.build_model(["a", "b", "c"]).eval()
    x = torch.rand(shape)
    assert model(x).shape == (2, 3)
    assert task.features(model, x).ndim == 2


def test_weights_file_warm_starts_matching_layers_and_leaves_a_new_head(tmp_path):
    source = load_task("flowops.tasks:resnet", {"size": 16, "width": 8}).build_model(["a", "b"])
    torch.save(source.state_dict(), tmp_path / "w.pt")
    task = load_task("flowops.tasks:resnet", {"size": 16, "width": 8, "weights": str(tmp_path / "w.pt")})
    model = task.build_model(["a", "b", "c"])  # three classes: the head cannot be copied
    state, saved = model.state_dict(), source.state_dict()
    assert torch.equal(state["features.0.weight"], saved["features.0.weight"])
    assert state["head.weight"].shape == (3, 32) != saved["head.weight"].shape


def test_the_projects_task_from_the_settings_is_the_default_of_a_fresh_training(monkeypatch):
    from flowops.settings import get_settings
    from flowops.train import TrainConfig, with_project_task

    monkeypatch.setenv("FLOWOPS_TASK", "flowops.tasks:resnet")
    s = get_settings()
    assert with_project_task(s, TrainConfig()).task == "flowops.tasks:resnet"
    assert with_project_task(s, TrainConfig(task="flowops.tasks:small_cnn")).task == "flowops.tasks:small_cnn"
    assert with_project_task(s, TrainConfig(init_from="models:/m/1")).task is None  # the base's task
