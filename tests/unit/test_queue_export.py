"""The labeling queue of a sharded data version exported to Label Studio, on a real git + DVC
workspace and real shards in a local storage folder: the queued images written as files under the
workspace (names, extensions, written once), the task URLs the ML backend reads back, folder rows
unchanged, and a missing shard named in one line with no tasks file written."""

from __future__ import annotations

import asyncio
import io
import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from flowops import data, labelstudio, shards, storage
from flowops import queue as q
from flowops.settings import get_settings
from flowops.storage import StorageUnavailable
from tests.conftest import run_cli


def _encoded(fmt: str, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, fmt)
    return buf.getvalue()


# Ids a user may give: plain, with a slash, a percent sign, a leading dot, spaces, non-ASCII.
IMAGES = {
    "u1": _encoded("PNG", (200, 10, 10)),
    "cat/001.jpg": _encoded("JPEG", (10, 200, 10)),
    "a%2Fb": _encoded("GIF", (10, 10, 200)),
    "..": _encoded("PNG", (90, 90, 90)),
    "photo 7 é?": _encoded("WEBP", (1, 2, 3)),
}


def _sharded_version(settings, images: dict[str, bytes], per_shard: int = 2) -> tuple[str, list]:
    """A sharded version of unlabeled `images` whose predictions.parquet queues all of them
    (built with the shards functions an import uses). Returns its tag and its shards."""
    store = storage.open_storage(settings)
    items, names = list(images.items()), []
    for start in range(0, len(items), per_shard):
        name, payload = shards.encode_shard([(i, f"src/{i}", b) for i, b in
                                             items[start:start + per_shard]])
        shards.put_shard(store, name, payload)
        names.append((name, [i for i, _ in items[start:start + per_shard]]))
    shards.write_index(store, [{"shard": n, "rows": len(ids), "bytes": store.size(
        shards.shard_path(n))} for n, ids in names])
    shard_of = {i: n for n, ids in names for i in ids}
    ids = list(images)
    manifest = pd.DataFrame({"id": ids, "path": "", "label": "", "split": "unlabeled",
                             "source": "test", "label_source": "", "shard": [shard_of[i] for i in ids]})

    def write(staging):
        for old in staging.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        shards.write_manifest(staging / "manifest.csv", manifest)
        pd.DataFrame({"id": ids, "label": "a"}).to_csv(staging / "answers.csv", index=False)
        (staging / "meta.json").write_text(json.dumps(
            {"classes": ["a", "b"], "image_size": 8, "channels": 3, "layout": shards.LAYOUT}))

    tag = data.cut_version(settings, "sharded", write, base=None).id
    predictions = pd.DataFrame({"id": ids, "path": "", "label": "a", "score": 0.6,
                                "margin": [0.01 * k for k in range(len(ids))], "entropy": 0.5,
                                "model_version": "3", "data_version": tag})

    def add_predictions(staging):
        predictions.to_parquet(staging / "predictions.parquet")

    data.cut_version(settings, "predictions", add_predictions, base=tag)
    return tag, names


@pytest.fixture
def home(tmp_path):
    return get_settings(home=tmp_path / ".flowops")


def _fetch(task: dict, settings) -> bytes:
    """What FlowOps' Label Studio ML backend reads for the task (the workspace as local-files root)."""
    root = settings.workspace.resolve()
    roots = labelstudio.ImageRoots(root, root / "no-uploads", root)
    return asyncio.run(labelstudio.fetch_task_image(task, labelstudio.LabelSchema(), roots))


def test_file_names_are_plain_ids_or_unique_safe_names():
    assert q.label_image_stem("d00539") == "d00539"
    assert q.label_image_stem("img_1.v2-x") == "img_1.v2-x"
    odd = ["a/b", "a?b", "a%2Fb", "a%252Fb", "..", ".hidden", "../../etc/passwd", "photo 7 é?", ""]
    stems = [q.label_image_stem(i) for i in odd]
    assert len(set(stems)) == len(odd)  # unique per id
    for stem in stems:
        assert "~" in stem and not stem.startswith(".") and len(stem) <= 77
        assert set(stem) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-~")
    assert q.label_image_stem("a/b").startswith("a_b~")


def test_the_extension_comes_from_the_bytes():
    assert [q.image_extension(IMAGES[i]) for i in IMAGES] == [".png", ".jpg", ".gif", ".png", ".webp"]
    assert q.image_extension(b"not an image") == ".bin"


def test_a_sharded_queue_exports_files_the_backend_reads_written_once(home, tmp_path):
    tag, names = _sharded_version(home, IMAGES)
    queue = q.review_queue(home, top=10)
    assert (queue["path"] == "").all() and len(queue) == len(IMAGES)
    out = tmp_path / "tasks.json"
    assert q.export_labelstudio(home, queue, out) == len(IMAGES)
    tasks = json.loads(out.read_text())
    folder = home.workspace / q.LABEL_IMAGES / tag
    for task in tasks:
        image_id, url = task["data"]["id"], task["data"]["image"]
        name = q.label_image_stem(image_id) + q.image_extension(IMAGES[image_id])
        assert url == f"/data/local-files/?d=label-images/{tag}/{name}"
        assert (folder / name).read_bytes() == IMAGES[image_id]
        assert _fetch(task, home) == IMAGES[image_id]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        q.label_image_stem(i) + q.image_extension(b) for i, b in IMAGES.items())
    # The workspace's git (a version cut runs `git add -A`) never picks the files up.
    status = data.data_repo.git(home.workspace, "status", "--porcelain", "--untracked-files=all")
    assert "label-images" not in status

    # A second export writes nothing: it reads no shard (all gone now) and keeps the files.
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    store = storage.open_storage(home)
    for name, _ in names:
        store.delete(shards.shard_path(name))
    assert q.export_labelstudio(home, queue, tmp_path / "again.json") == len(IMAGES)
    assert json.loads((tmp_path / "again.json").read_text()) == tasks
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_folder_rows_keep_their_urls_byte_for_byte(home, tmp_path):
    queue = pd.DataFrame({"id": ["d1"], "path": ["images/unlabeled/d1.png"], "label": ["3"],
                          "score": [0.5], "margin": [0.1], "entropy": [1.0],
                          "model_version": ["2"], "data_version": ["v9"]})
    out = tmp_path / "tasks.json"
    assert q.export_labelstudio(home, queue, out) == 1
    assert json.loads(out.read_text()) == q.to_labelstudio_tasks(queue)
    assert json.loads(out.read_text())[0]["data"]["image"] == \
        "/data/local-files/?d=data/images/unlabeled/d1.png"
    assert not (home.workspace / q.LABEL_IMAGES).exists()  # nothing to write, no version opened


def test_a_missing_shard_is_named_in_one_line_and_no_tasks_file_is_written(home, tmp_path):
    tag, names = _sharded_version(home, IMAGES)
    store = storage.open_storage(home)
    missing = names[-1][0]
    store.delete(shards.shard_path(missing))
    out = tmp_path / "tasks.json"
    with pytest.raises(StorageUnavailable, match=missing):
        q.export_labelstudio(home, q.review_queue(home, top=10), out)
    assert not out.exists()

    env = {"FLOWOPS_HOME": str(home.home)}
    proc = run_cli("labels", "queue", "--export", "labelstudio", str(out), env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == StorageUnavailable.exit_code == 5, proc.stderr
    assert len(lines) == 1 and missing in lines[0] and "missing" in lines[0], proc.stderr
    assert not out.exists()
    written = {p.name for p in (home.workspace / q.LABEL_IMAGES / tag).iterdir()}
    assert all(not n.startswith(".") for n in written)  # whole files only, no temporary left
