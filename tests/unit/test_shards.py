"""Images as Parquet shards in the storage URI and versions as manifests over them, on a real git +
DVC workspace and a real local storage folder: round trip, checksums, manifest-only label
snapshots, an import killed mid-way and resumed, corrupt files, storage errors, migration."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flowops import data, shard_import, shards, storage
from flowops.ray_client import free_port
from flowops.settings import get_settings
from tests.conftest import FLOWOPS, REPO, run_cli
from tests.image_folders import write_colour_folder


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _tiny_folder(root: Path, per_class: int, classes=("a", "b")) -> dict[str, bytes]:
    """Small PNGs, one sub-folder per class: relative path -> bytes."""
    rng = np.random.default_rng(0)
    written = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(buf, "PNG")
            (root / c / f"{i:04d}.png").write_bytes(buf.getvalue())
            written[f"{c}/{i:04d}.png"] = buf.getvalue()
    return written


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "photos"
    return root, write_colour_folder(root)


@pytest.fixture(scope="module")
def imported(photos, tmp_path_factory):
    """The photo folder imported once (5 images per shard), half the training labels hidden."""
    root, _ = photos
    settings = get_settings(home=tmp_path_factory.mktemp("home"))
    result = shard_import.import_images(settings, str(root), images_per_shard=5,
                                        unlabeled_fraction=0.5)
    return settings, result


def test_images_round_trip_through_shards(photos, imported):
    root, written = photos
    settings, result = imported
    store = storage.open_storage(settings)
    version = shards.open_manifest(settings, result.version)
    manifest = version.manifest
    assert list(manifest.columns) == shards.MANIFEST_COLUMNS and (manifest.path == "").all()
    assert result.images == len(manifest) == len(written["warm"]) + len(written["cool"])
    # Every image's original bytes come back, and the shard remembers where each came from.
    originals = {_sha(p.read_bytes()) for p in written["warm"] + written["cool"]}
    images = dict(shards.iter_images(version, manifest.id, store))
    assert set(images) == set(manifest.id) and {_sha(b) for b in images.values()} == originals
    table = shards.read_shard(store, manifest.shard.iloc[0])
    assert set(table.column_names) == {"id", "source", "bytes", "sha256"}
    assert all(s.split("/")[0] in ("warm", "cool") for s in table["source"].to_pylist())
    assert table["sha256"].to_pylist() == [_sha(b) for b in table["bytes"].to_pylist()]
    # Shards are named by their content and listed in the index with their sizes.
    names = set(manifest.shard)
    assert result.shards == len(names) == -(-result.images // 5)
    for name in names:
        assert _sha(store.read_bytes(shards.shard_path(name))) == name
    index = shards.read_index(store).set_index("shard")
    assert set(index.index) == names
    assert all(index.loc[n, "bytes"] == store.size(shards.shard_path(n)) for n in names)
    assert version.meta["layout"] == "shards" and version.meta["storage"] == settings.storage
    # The DVC-versioned folder holds the manifest and side files, not one image.
    assert sorted(p.name for p in version.root.iterdir()) == [
        "answers.csv", "errors.csv", "manifest.csv", "meta.json"]


def test_corrupt_files_are_reported_with_their_paths(photos, imported):
    root, written = photos
    settings, result = imported
    version = shards.open_manifest(settings, result.version)
    errors = pd.read_csv(version.root / data.ERRORS_FILE)
    assert result.rejected == 3 and sorted(errors.path) == sorted(str(p) for p in written["rejected"])
    reasons = dict(zip(errors.path, errors.reason, strict=True))
    assert reasons[str(root / "warm" / "corrupt.png")].startswith("cannot decode")
    assert "BytesIO" not in reasons[str(root / "warm" / "corrupt.png")]
    assert "truncated" in reasons[str(root / "cool" / "truncated.jpg")]
    assert "not an image file type (.txt)" in reasons[str(root / "cool" / "notes.txt")]


def test_a_label_snapshot_rewrites_only_the_manifest(imported):
    settings, result = imported
    store = storage.open_storage(settings)
    parent = shards.open_manifest(settings, result.version)
    before = {rel: os.stat(store.path(rel)) for rel in store.list("")}
    hidden = parent.rows("unlabeled")
    answers = pd.read_csv(parent.root / "answers.csv", dtype=str)
    chosen = dict(zip(answers.id[:3], answers.label[:3], strict=True))
    info = shards.cut_labels(settings, chosen, "3 human labels", store)
    after = {rel: os.stat(store.path(rel)) for rel in store.list("")}
    assert after.keys() == before.keys()  # no shard written, none removed ...
    assert all((after[r].st_ino, after[r].st_mtime_ns) == (before[r].st_ino, before[r].st_mtime_ns)
               for r in after)  # ... and none rewritten
    child = shards.open_manifest(settings, info.id)
    rows = child.manifest.set_index("id")
    assert all(rows.loc[i, "label"] == label and rows.loc[i, "split"] == "train"
               and rows.loc[i, "label_source"] == "human" for i, label in chosen.items())
    assert len(child.rows("unlabeled")) == len(hidden) - 3
    assert (child.manifest.shard.values == parent.manifest.shard.values).all()
    assert set(pd.read_csv(child.root / "answers.csv", dtype=str).id).isdisjoint(chosen)
    assert dict(shards.iter_images(child, list(chosen), store)).keys() == chosen.keys()


def test_a_shard_that_fails_its_checksum_is_named_and_the_version_refused(photos, tmp_path):
    root, _ = photos
    settings = get_settings(home=tmp_path / "home")
    result = shard_import.import_images(settings, str(root), images_per_shard=10)
    store = storage.open_storage(settings)
    version = shards.open_manifest(settings, result.version)
    bad = version.manifest.shard.iloc[0]
    path = Path(store.path(shards.shard_path(bad)))
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped bit pattern, same size
    path.write_bytes(bytes(damaged))
    with pytest.raises(storage.StorageUnavailable, match=f"shard .*{bad}.parquet fails its checksum"):
        list(shards.iter_images(version, version.manifest.id, store))
    with pytest.raises(storage.StorageUnavailable, match=bad) as caught:
        shards.verify_version(version, store)
    assert caught.value.exit_code == 5 and "\n" not in str(caught.value)
    # A shard gone from storage: a label snapshot over it is refused and nothing is cut.
    path.unlink()
    tags = data.list_versions(settings)
    with pytest.raises(storage.StorageUnavailable, match=f"{bad}.parquet is missing: nothing cut"):
        shards.cut_labels(settings, {}, "labels over a lost shard", store)
    assert data.list_versions(settings) == tags


def test_an_import_killed_mid_way_resumes_where_it_was(tmp_path):
    source = tmp_path / "many"
    _tiny_folder(source, per_class=150)
    home = tmp_path / "home"
    env = {**os.environ, "FLOWOPS_HOME": str(home)}
    args = [*FLOWOPS, "data", "import", str(source), "--images-per-shard", "1", "--json"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journals = home / "imports"
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in journals.glob("*.jsonl")):  # no shard done yet
        assert proc.poll() is None and time.monotonic() < deadline, "the import ended too soon"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    journal = next(journals.glob("*.jsonl"))
    done = len(journal.read_text().splitlines())
    assert 1 <= done < 300, "killed after some shards, before all"
    assert data.latest_version(get_settings(home=home)) is None  # nothing cut yet

    out = run_cli("data", "import", str(source), "--images-per-shard", "1", "--json",
                  env={"FLOWOPS_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)
    assert resumed["shards"] == 300 and resumed["reused"] >= done
    assert resumed["written"] == 300 - resumed["reused"]
    assert not journal.exists()  # done: the journal is gone
    # The same version an uninterrupted import makes.
    fresh = shard_import.import_images(get_settings(home=tmp_path / "fresh"), str(source),
                                       images_per_shard=1)
    a = shards.open_manifest(get_settings(home=home)).manifest
    b = shards.open_manifest(get_settings(home=tmp_path / "fresh")).manifest
    assert fresh.written == 300 and a.equals(b)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_an_unwritable_storage_is_one_line_before_any_work(tmp_path):
    _tiny_folder(tmp_path / "imgs", per_class=5)
    (tmp_path / "a-file").write_text("not a folder")
    env = {"FLOWOPS_HOME": str(tmp_path / "home"),
           "FLOWOPS_STORAGE_URI": str(tmp_path / "a-file" / "storage")}
    out = run_cli("data", "import", str(tmp_path / "imgs"), env=env)
    assert out.returncode == 5
    line = _one_error_line(out)
    assert line.startswith("error: data import: storage ") and "a-file/storage" in line
    assert not (tmp_path / "home" / "workspace").exists()
    assert not (tmp_path / "home" / "imports").exists()


def test_an_unreachable_s3_endpoint_is_one_line_with_credentials_masked(tmp_path):
    _tiny_folder(tmp_path / "imgs", per_class=5)
    env = {"FLOWOPS_HOME": str(tmp_path / "home"),
           "FLOWOPS_STORAGE_URI": "s3://AKIDEXAMPLE:SEKRIT@bucket/prefix",
           "FLOWOPS_STORAGE_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    out = run_cli("data", "import", str(tmp_path / "imgs"), env=env, timeout=120)
    assert out.returncode == 5 and time.monotonic() - started < 60
    line = _one_error_line(out)
    assert "SEKRIT" not in out.stderr + out.stdout
    assert "data import: storage s3://***@bucket/prefix (endpoint http://127.0.0.1:" in line
    assert "unreachable or not writable" in line
    assert not (tmp_path / "home" / "workspace").exists()


def test_bad_import_input_is_one_line(tmp_path):
    env = {"FLOWOPS_HOME": str(tmp_path / "home")}
    out = run_cli("data", "import", str(tmp_path / "nowhere"), env=env)
    assert out.returncode == 2 and "not a folder" in _one_error_line(out)
    _tiny_folder(tmp_path / "one", per_class=5, classes=("only",))
    out = run_cli("data", "import", str(tmp_path / "one"), env=env)
    assert out.returncode == 2 and "at least 2" in _one_error_line(out)
    out = run_cli("data", "import", str(tmp_path / "one"), "--images-per-shard", "0", env=env)
    assert out.returncode == 2 and "--images-per-shard 0" in _one_error_line(out)


def test_a_folder_version_migrates_to_shards(photos, tmp_path):
    root, _ = photos
    settings = get_settings(home=tmp_path / "home")
    folder = data.init_dataset(settings, root, unlabeled_fraction=0.5)
    old = data.open_version(settings, folder.id)
    with pytest.raises(Exception, match="keeps its images as files"):
        shards.open_manifest(settings, folder.id)
    out = run_cli("data", "migrate", folder.id, "--images-per-shard", "4", "--json",
                  env={"FLOWOPS_HOME": str(settings.home)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    new = shards.open_manifest(settings, result["version"])
    cols = ["id", "label", "split", "label_source"]
    assert new.manifest[cols].equals(old.manifest[cols])
    assert result["shards"] == -(-len(old.manifest) // 4)
    store = storage.open_storage(settings)
    images = dict(shards.iter_images(new, new.manifest.id, store))
    assert all(images[r.id] == (old.root / r.path).read_bytes() for r in old.manifest.itertuples())
    assert (new.root / "answers.csv").read_text() == (old.root / "answers.csv").read_text()
    assert new.classes == old.classes and new.meta["layout"] == "shards"
    out = run_cli("data", "migrate", result["version"], env={"FLOWOPS_HOME": str(settings.home)})
    assert out.returncode == 2 and "already stored as shards" in out.stderr


def test_a_storage_uri_nothing_can_open_is_one_line(tmp_path):
    _tiny_folder(tmp_path / "imgs", per_class=5)
    env = {"FLOWOPS_HOME": str(tmp_path / "home"), "FLOWOPS_STORAGE_URI": "nosuch://bucket/x"}
    out = run_cli("data", "import", str(tmp_path / "imgs"), env=env)
    assert out.returncode == 5
    assert _one_error_line(out).startswith(
        "error: data import: storage nosuch://bucket/x (FLOWOPS_STORAGE_URI) is not a usable")
