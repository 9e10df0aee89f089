"""The same image gives the same tensor everywhere a model sees one: training (the Ray Data decode
`train_data.decode_batch`, `Task.decode`), the holdout (`evaluate.decode_image`), Ray Data batch
scoring (`pseudo_label.load_images`), online serving (a base64 instance, and the same image as a
pixel array), the Label Studio backend (`labelstudio.decode`) and the self-contained model
(`image_model.image_bytes` + its preprocessing) -- bit for bit, for colour, grayscale, odd-sized,
EXIF-rotated and transparent images, through a 1-channel and a 3-channel task.
(tests/integration/test_pseudo_label.py runs the Ray Data path in a real pipeline;
tests/integration/test_serving.py sends such images over HTTP.)"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from flowops import evaluate, labelstudio, train_data
from flowops import pseudo_label as pl
from flowops.errors import InvalidInput
from flowops.image_model import image_bytes
from flowops.serving.config import PredictRequest
from flowops.task import TaskSpec, load_task

TASKS = {
    "gray 8x8 (digits)": TaskSpec(),
    "RGB 16x16 ImageNet-normalised": TaskSpec(path="flowops.tasks:resnet", options={"size": 16}),
    "RGB 20x12 letterbox": TaskSpec(path="flowops.tasks:resnet",
                                    options={"size": [20, 12], "resize": "letterbox"}),
    "gray 9x9 centre crop": TaskSpec(options={"size": 9, "resize": "center_crop"}),
}


def _gradient(height: int, width: int, channels: int) -> np.ndarray:
    """An asymmetric picture (uint8): each channel a different ramp, so orientation matters."""
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
              ((x + 2 * y) * 7) % 256, np.full_like(x, 128) + (x > width // 2) * 100]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8).squeeze()


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    """An upright 37x53 picture stored turned a quarter left, with EXIF orientation 6 (turn it
    right to show it): what a phone writes."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(_gradient(53, 37, 3)).rotate(90, expand=True)
    return _encode(stored, "JPEG", exif=exif.tobytes(), quality=95)


IMAGES = {
    "RGB PNG 37x53": _encode(Image.fromarray(_gradient(53, 37, 3)), "PNG"),
    "grayscale PNG 37x53": _encode(Image.fromarray(_gradient(53, 37, 1)), "PNG"),
    "RGB PNG 8x8": _encode(Image.fromarray(_gradient(8, 8, 3)), "PNG"),
    "grayscale PNG 8x8": _encode(Image.fromarray(_gradient(8, 8, 1)), "PNG"),
    "EXIF-rotated JPEG": _exif_rotated_jpeg(),
    "RGBA PNG 37x53": _encode(Image.fromarray(_gradient(53, 37, 4), mode="RGBA"), "PNG"),
}


def _as_pixels(data: bytes) -> np.ndarray:
    """The image as a client would send it as a pixel array: upright, in its own colour mode
    ((H, W) gray, (H, W, 3) RGB, (H, W, 4) RGBA)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img))


def _every_path(task, data: bytes, tmp_path) -> dict[str, np.ndarray]:
    """The tensor each consumer makes of `data` (one image file's bytes)."""
    (tmp_path / "img.bin").write_bytes(data)
    pre = task.preprocess
    b64 = base64.b64encode(data).decode()
    batch = {"id": np.asarray(["a"], dtype=object), "bytes": np.asarray([data], dtype=object)}
    scored = pl.load_images(batch, pre, "resize")
    assert scored["error"][0] == ""
    (served,) = PredictRequest(instances=[{"b64": b64}]).images(max_instances=1).arrays(pre)
    (pixels,) = PredictRequest(instances=[_as_pixels(data).tolist()]).images(max_instances=1).arrays(pre)
    return {
        "training (train_data.decode_batch)": train_data.decode_batch(
            {"id": np.asarray(["a"], dtype=object), "label": np.asarray(["c"], dtype=object),
             "bytes": np.asarray([data], dtype=object)}, pre, ["c"], "v1")["x"][0],
        "holdout (evaluate.decode_image)": evaluate.decode_image("a", data, pre, "v1"),
        "Task.decode": task.decode(data),
        "Ray Data (pseudo_label.load_images)": scored["pixels"][0],
        "serving, base64 instance": served,
        "serving, pixel array": pixels,
        "Label Studio backend": labelstudio.decode(data, pre),
        "the self-contained model": pre.decode(image_bytes(b64)),
    }


@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("image_name", list(IMAGES))
def test_the_same_image_gives_the_same_tensor_everywhere(task_name, image_name, tmp_path):
    task = load_task(TASKS[task_name])
    tensors = _every_path(task, IMAGES[image_name], tmp_path)
    reference = tensors.pop("training (train_data.decode_batch)")
    assert reference.shape == task.preprocess.shape and reference.dtype == np.float32
    for path, tensor in tensors.items():
        assert tensor.dtype == np.float32 and np.array_equal(tensor, reference), path


def test_exif_orientation_is_honoured_and_alpha_is_composited_on_black():
    task = load_task(TaskSpec(path="flowops.tasks:small_cnn", options={"channels": 3, "size": [53, 37]}))
    upright = task.decode(_encode(Image.fromarray(_gradient(53, 37, 3)), "PNG"))
    rotated = task.decode(IMAGES["EXIF-rotated JPEG"])
    error = np.abs(rotated - upright).mean()  # JPEG noise only: the picture stands upright
    assert error < 0.04 and error * 5 < np.abs(rotated - upright[:, ::-1, ::-1]).mean()
    rgba = _gradient(53, 37, 4)
    rgba[..., 3] = 0  # fully transparent: black, whatever the colour underneath
    gray = load_task(TaskSpec(options={"size": [53, 37]}))
    assert gray.decode(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG")).max() == 0.0


def test_an_image_no_task_can_read_is_one_clear_error_everywhere():
    task = load_task(TaskSpec())
    junk = b"GIF89a but not really"
    with pytest.raises(InvalidInput, match="not a decodable image"):
        task.decode(junk)
    with pytest.raises(InvalidInput, match="not a decodable image"):
        labelstudio.decode(junk, task.preprocess)
    batch = {"id": np.asarray(["img-7"], dtype=object), "label": np.asarray(["3"], dtype=object),
             "bytes": np.asarray([junk], dtype=object)}
    with pytest.raises(InvalidInput, match="image img-7 of data version v2: not a decodable image"):
        train_data.decode_batch(batch, task.preprocess, [str(i) for i in range(10)], "v2")
    body = PredictRequest(instances=[{"b64": base64.b64encode(junk).decode()}])
    with pytest.raises(InvalidInput, match=r"instances\[0\]: not a decodable image"):
        body.images(max_instances=1).arrays(task.preprocess)
    batch = {"id": np.asarray(["j"], dtype=object), "bytes": np.asarray([junk], dtype=object)}
    out = pl.load_images(batch, task.preprocess, "resize")
    assert "not a decodable image" in out["error"][0] and out["pixels"].shape == (1, 1, 8, 8)


def test_the_exact_size_rule_compares_the_upright_size_with_the_model_input():
    batch = {"id": np.asarray(["r", "p"], dtype=object),  # stored 53x37, shown 37x53; 37x53
             "bytes": np.asarray([IMAGES["EXIF-rotated JPEG"], IMAGES["RGB PNG 37x53"]],
                                 dtype=object)}
    fits = load_task(TaskSpec(path="flowops.tasks:resnet", options={"size": [53, 37]})).preprocess
    assert list(pl.load_images(batch, fits, "exact")["error"]) == ["", ""]
    other = load_task(TaskSpec(path="flowops.tasks:resnet", options={"size": 37})).preprocess
    errors = pl.load_images(batch, other, "exact")["error"]
    assert list(errors) == ["wrong size 37x53, expected 37x37"] * 2
