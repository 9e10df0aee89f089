"""Pseudo-labeling pieces that need no cluster: decoding with bad files, the output's columns,
confident selection, the Label Studio export, and synthetic pools."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowops import pseudo_label as pl
from flowops import queue as q
from flowops.errors import InvalidInput
from flowops.image_model import Preprocess

DIGITS = Preprocess(size=8, channels=1)


def _png(size: int = 8, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def pool():
    """A batch as `images.dataset` hands it over: ids and the images' original bytes."""
    files = {
        "good1": _png(8, 255), "good2": _png(8, 0),
        "big": _png(16), "corrupt": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10,
        "truncated": _png(8, 77)[:40], "text": b"just some text, not an image", "empty": b"",
    }
    return {"id": np.asarray(list(files), dtype=object),
            "bytes": np.asarray(list(files.values()), dtype=object)}


def test_load_images_flags_each_bad_file_and_keeps_good_pixels(pool):
    out = pl.load_images(pool, DIGITS, "exact")
    errors = dict(zip(out["id"], out["error"], strict=True))
    assert errors["good1"] == "" and errors["good2"] == ""
    assert errors["big"] == "wrong size 16x16, expected 8x8"
    for bad in ("corrupt", "truncated", "text", "empty"):
        assert errors[bad].startswith("not a decodable image"), bad
    assert out["pixels"].shape == (7, 1, 8, 8) and out["pixels"][2].max() == 0.0
    assert out["pixels"][0].max() == pytest.approx(1.0) and out["pixels"][1].max() == 0.0


def test_resize_rule_accepts_other_sizes(pool):
    out = pl.load_images(pool, DIGITS, "resize")
    assert dict(zip(out["id"], out["error"], strict=True))["big"] == ""


def test_write_predictions_columns_margin_entropy_and_errors(tmp_path):
    probs = np.asarray([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [1 / 3] * 3], dtype=np.float32)
    batch = {"id": np.asarray(["a", "b", "c"], dtype=object),
             "error": np.asarray(["", "", "broken"], dtype=object), "probabilities": probs}
    paths = {"a": "p/a", "b": "p/b", "c": "p/c"}
    tally = pl.write_predictions(iter([batch]), ["x", "y", "z"], "7", "v3", tmp_path, paths)
    assert (tally.scored, tally.errors) == (2, 1)
    table = pq.read_table(tmp_path / pl.PREDICTIONS_FILE).to_pandas()
    assert list(table.columns) == ["id", "path", "label", "score", "probabilities", "entropy",
                                   "margin", "model_version", "data_version"]
    assert list(table["id"]) == ["a", "b"] and list(table["label"]) == ["x", "x"]
    assert list(table["path"]) == ["p/a", "p/b"]
    assert table["margin"].tolist() == pytest.approx([0.5, 0.05], abs=1e-6)
    expected_entropy = -(probs[0] * np.log(probs[0])).sum()
    assert table["entropy"][0] == pytest.approx(expected_entropy, rel=1e-5)
    assert list(table["probabilities"][1]) == pytest.approx([0.4, 0.35, 0.25])
    assert set(table["model_version"]) == {"7"} and set(table["data_version"]) == {"v3"}
    errors = pd.read_csv(tmp_path / pl.ERRORS_FILE)
    assert errors.to_dict(orient="records") == [{"id": "c", "path": "p/c", "error": "broken"}]


def test_select_confident_skips_human_labeled_and_low_scores():
    preds = pd.DataFrame({"id": ["a", "b", "c"], "label": ["1", "2", "3"],
                          "score": [0.99, 0.5, 0.97], "model_version": ["4"] * 3})
    picked = pl.select_confident(preds, 0.95, exclude={"c"})
    assert picked.to_dict(orient="records") == [
        {"id": "a", "label": "1", "score": 0.99, "model_version": "4"}]
    with pytest.raises(InvalidInput):
        pl.select_confident(preds, 1.5, set())


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError):
        pl.PseudoLabelConfig(actor=3)
    with pytest.raises(ValueError):
        pl.PseudoLabelConfig(pool="everything")
    with pytest.raises(ValueError):
        pl.PseudoLabelConfig(batch_size=0)


def test_labelstudio_tasks_shape_and_config_match():
    queue = pd.DataFrame({"id": ["u1"], "path": ["images/unlabeled/u1.png"], "label": ["3"],
                          "score": [0.51], "margin": [0.02], "entropy": [1.2],
                          "model_version": ["5"], "data_version": ["v2"]})
    [task] = q.to_labelstudio_tasks(queue)
    assert task["data"]["image"] == "/data/local-files/?d=data/images/unlabeled/u1.png"
    assert task["data"]["id"] == "u1"
    [pred] = task["predictions"]
    assert pred["model_version"] == "5" and pred["score"] == pytest.approx(0.51)
    assert pred["result"] == [{"from_name": "choice", "to_name": "image", "type": "choices",
                               "value": {"choices": ["3"]}}]
    json.dumps(task)  # serialisable
    view = ET.fromstring(q.labelstudio_config(["0", "1", "3"]))
    choices = view.find("Choices")
    assert view.find("Image").get("name") == pred["result"][0]["to_name"]
    assert choices.get("name") == pred["result"][0]["from_name"]
    assert choices.get("toName") == "image"
    assert [c.get("value") for c in choices.findall("Choice")] == ["0", "1", "3"]


def test_queue_cli_rejects_bad_top_and_missing_predictions(tmp_path):
    from tests.conftest import run_cli

    env = {"FLOWOPS_HOME": str(tmp_path / ".flowops")}
    proc = run_cli("labels", "queue", "--top", "0", env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --top must be at least 1, got 0"
    proc = run_cli("labels", "queue", env=env)
    assert proc.returncode == 3 and "no data version exists yet" in proc.stderr


def test_model_actors_take_custom_resources_that_must_be_positive():
    """`--resource worker_host=0.01` places the model actors; a non-positive amount is refused."""
    from flowops.cli._common import parse_resources
    from flowops.errors import InvalidInput, validated
    from flowops.pseudo_label import PseudoLabelConfig

    cfg = validated(PseudoLabelConfig, "pseudo-label config",
                    resources=parse_resources(["worker_host=0.01", "node:10.0.0.2=1"]))
    assert cfg.resources == {"worker_host": 0.01, "node:10.0.0.2": 1.0}
    with pytest.raises(InvalidInput, match="resources"):
        validated(PseudoLabelConfig, "pseudo-label config", resources=parse_resources(["gpu_a100=0"]))
