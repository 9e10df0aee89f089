"""`flowops data synth` on a real git + DVC workspace (no Ray needed)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flowops import data, data_check, synth
from flowops.settings import get_settings


def _tiny_dataset(settings) -> str:
    """A 30-image dataset (10 train, 15 unlabeled, 5 holdout) written as data version v1."""
    rng = np.random.default_rng(1)

    def write(staging):
        rows, answers = [], []
        for i in range(30):
            split = "train" if i < 10 else "unlabeled" if i < 25 else "holdout"
            label = str(i % 3)
            rel = (f"images/unlabeled/t{i}.png" if split == "unlabeled"
                   else f"images/{split}/{label}/t{i}.png")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(buf, "PNG")
            (staging / rel).write_bytes(buf.getvalue())
            if split == "unlabeled":
                answers.append({"id": f"t{i}", "label": label})
            rows.append({"id": f"t{i}", "path": rel, "label": "" if split == "unlabeled" else label,
                         "split": split, "source": "test",
                         "label_source": "" if split == "unlabeled" else "original"})
        data.write_manifest(staging / "manifest.csv", pd.DataFrame(rows))
        pd.DataFrame(answers).to_csv(staging / "answers.csv", index=False)
        (staging / "meta.json").write_text(json.dumps({"classes": ["0", "1", "2"],
                                                       "image_size": 8, "channels": 1}))

    return data.cut_version(settings, "tiny", write, base=None).id


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    s = get_settings(home=tmp_path_factory.mktemp("synth") / ".flowops")
    assert _tiny_dataset(s) == "v1"
    return s


def test_augment_keeps_shape_and_changes_pixels():
    cfg = synth.SynthConfig(count=1)
    img = np.zeros((8, 8), dtype=np.uint8)
    img[2:6, 3:5] = 255
    out = synth.augment(img, np.random.default_rng(0), cfg)
    assert out.shape == (8, 8) and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    again = synth.augment(img, np.random.default_rng(0), cfg)
    assert np.array_equal(out, again)  # seeded: reproducible


def test_synth_adds_unlabeled_images_with_answers_as_new_version(settings):
    info = synth.synthesize(settings, synth.SynthConfig(count=40, seed=3))
    assert info.id == "v2" and info.parent == "v1"
    assert info.counts == {"holdout": 5, "train": 10, "unlabeled": 55}
    v2 = data.open_version(settings, "v2")
    new = v2.manifest[v2.manifest["source"] == "synth"]
    assert len(new) == 40 and set(new["split"]) == {"unlabeled"} and set(new["label"]) == {""}
    root = v2.root
    answers = pd.read_csv(root / "answers.csv", dtype=str)
    assert set(new["id"]) <= set(answers["id"])
    assert set(answers.set_index("id").loc[list(new["id"]), "label"]) <= {"0", "1", "2"}
    for rel in new["path"].head(5):
        with Image.open(root / rel) as img:
            assert img.size == (8, 8)
    assert data_check.check_version(settings, "v2")["ok"]
    # the first version is untouched
    assert len(data.open_version(settings, "v1").manifest) == 30


def test_synth_cli_rejects_bad_count_in_one_line(settings):
    from tests.conftest import run_cli

    proc = run_cli("data", "synth", "--count", "0", env={"FLOWOPS_HOME": str(settings.home)})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: synth config: count:")
    assert "Traceback" not in proc.stderr
    assert data.latest_version(settings) == "v2"  # nothing was cut


def test_synth_on_a_sharded_version_adds_a_shard_and_leaves_the_others(tmp_path):
    from flowops import images, shard_import, shards, storage

    s = get_settings(home=tmp_path / ".flowops")
    _tiny_dataset(s)
    sharded = shard_import.migrate_version(s, "v1", images_per_shard=8).version
    store = storage.open_storage(s)
    before = {rel: store.read_bytes(rel) for rel in store.list("")}
    info = synth.synthesize(s, synth.SynthConfig(count=12, seed=3))
    assert info.counts == {"holdout": 5, "train": 10, "unlabeled": 27}
    after = {rel: store.read_bytes(rel) for rel in store.list("")}
    assert {rel: after[rel] for rel in before} == before  # the old shards are untouched
    version = shards.open_manifest(s, info.id)
    new = version.manifest[version.manifest["source"] == "synth"]
    assert len(new) == 12 and (new["path"] == "").all()
    assert set(new["shard"]).isdisjoint(shards.open_manifest(s, sharded).manifest["shard"])
    for _, payload in images.iter_bytes(s, version, new["id"]):
        with Image.open(io.BytesIO(payload)) as img:
            assert img.size == (8, 8)
    assert data_check.check_version(s, info.id)["ok"]
