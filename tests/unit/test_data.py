"""Data versions on a real git + DVC workspace (no Ray needed)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from PIL import Image

from flowops import data, data_check
from flowops.errors import InvalidInput, NotFound
from flowops.settings import get_settings
from flowops.storage import StorageUnavailable


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("datahome")


@pytest.fixture(scope="module")
def settings_v1(home):
    s = get_settings(home=home / ".flowops")
    info = data.init_dataset(s)
    assert info.id == "v1"
    return s


def test_digits_version_counts_and_split(settings_v1):
    info = data.show_version(settings_v1, "v1")
    assert info.counts == {"holdout": 360, "train": 359, "unlabeled": 1078}
    assert sum(info.class_counts["holdout"].values()) == 360
    assert info.classes == [str(i) for i in range(10)]
    assert len(info.commit) == 40
    assert info.name == "digits" and info.rejected == 0


def test_manifest_schema_and_hidden_answers(settings_v1):
    version = data.open_version(settings_v1, "v1")
    manifest = version.manifest
    assert list(manifest.columns[:6]) == data.MANIFEST_COLUMNS
    unlabeled = version.rows("unlabeled")
    assert (unlabeled.label == "").all()
    assert not unlabeled.path.str.contains("/[0-9]/").any()  # the path does not leak the class
    assert version.classes == [str(i) for i in range(10)] and version.image_size == 8
    assert version.channels == 1 and version.name == "digits"
    root = version.root
    answers = (root / "answers.csv").read_text().splitlines()
    assert len(answers) == 1 + len(unlabeled)
    with Image.open(root / manifest.path.iloc[0]) as img:
        assert img.size == (8, 8)


def test_version_read_back_from_the_remote_on_another_machine(settings_v1, tmp_path):
    """Another machine that reaches the git repo and the DVC remote reads exactly that version."""
    import dvc.api

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(settings_v1.workspace), str(clone)], check=True)
    text = dvc.api.read("data/manifest.csv", repo=str(clone), rev="v1")
    local = (data.materialize(settings_v1, "v1") / "manifest.csv").read_text()
    assert text == local


def test_unknown_version_names_existing_ones(settings_v1):
    with pytest.raises(NotFound, match="v1"):
        data.resolve_version(settings_v1, "v42")
    with pytest.raises(NotFound, match="v1"):
        data.open_version(settings_v1, "v42")
    assert data.resolve_version(settings_v1, None) == data.latest_version(settings_v1)
    assert data.open_version(settings_v1, "latest").tag == data.latest_version(settings_v1)


def test_an_opened_version_fetches_its_files_once_and_only_when_asked(settings_v1):
    cache = settings_v1.cache_dir / "data" / "v1"
    shutil.rmtree(cache, ignore_errors=True)
    version = data.open_version(settings_v1, "v1")
    assert len(version.manifest) == 1797 and not cache.exists()  # read through DVC, not fetched
    assert version.root == cache and (cache / "manifest.csv").exists()
    assert version.root is version.root


def test_failed_cut_leaves_previous_version_intact(settings_v1):
    before = data.list_versions(settings_v1)
    manifest_before = (settings_v1.workspace / "data" / "manifest.csv").read_text()

    def broken(staging):
        (staging / "manifest.csv").unlink()
        (staging / "manifest.csv").write_text("half,written\n")
        raise RuntimeError("disk full")

    with pytest.raises(Exception, match="disk full"):
        data.cut_version(settings_v1, "broken", broken)
    assert data.list_versions(settings_v1) == before
    assert (settings_v1.workspace / "data" / "manifest.csv").read_text() == manifest_before


def test_cut_version_edits_a_copy(settings_v1):
    def label_one(staging):
        manifest = data._parse_manifest((staging / "manifest.csv").read_text())
        idx = manifest.index[manifest.split == "unlabeled"][0]
        manifest.loc[idx, ["split", "label", "label_source"]] = ["train", "3", "human"]
        data.write_manifest(staging / "manifest.csv", manifest)

    info = data.cut_version(settings_v1, "one human label", label_one)
    assert info.parent == "v1"
    assert info.counts["train"] == 360 and info.counts["unlabeled"] == 1077
    # v1 is unchanged
    assert data.show_version(settings_v1, "v1").counts["train"] == 359
    assert len(data.open_version(settings_v1, "v1").rows("train")) == 359


def _image_folder(root, classes=("cat", "dog"), per_class=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (12, 10), color=i * 20).save(root / c / f"{i}.png")
    return root


def test_init_from_user_folder(tmp_path):
    s = get_settings(home=tmp_path / "h")
    info = data.init_dataset(s, _image_folder(tmp_path / "imgs"), image_size=16)
    assert info.classes == ["cat", "dog"] and info.name == "imgs"
    assert info.counts == {"holdout": 3, "train": 9}  # a labeled folder stays labeled
    version = data.open_version(s, info.id)
    assert version.image_size == 16 and version.channels == 1 and version.name == "imgs"


def test_bad_folders_fail_clearly_and_keep_the_previous_version(settings_v1, tmp_path):
    versions = [v.id for v in data.list_versions(settings_v1)]
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(InvalidInput, match="one sub-folder per class"):
        data.init_dataset(settings_v1, tmp_path / "flat")
    broken = _image_folder(tmp_path / "broken")
    for i in range(2):  # 4 readable cats left: too few (broken files are skipped, not fatal)
        (broken / "cat" / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match=r"at least 5 readable images; too few in: cat \(4\)"):
        data.init_dataset(settings_v1, broken)
    with pytest.raises(InvalidInput, match="not a folder"):
        data.init_dataset(settings_v1, tmp_path / "missing")
    assert [v.id for v in data.list_versions(settings_v1)] == versions


def test_check_version_reports_undecodable_images(tmp_path):
    s = get_settings(home=tmp_path / "h")
    data.init_dataset(s)

    def corrupt(staging):
        manifest = data._parse_manifest((staging / "manifest.csv").read_text())
        victim = staging / manifest.path.iloc[0]
        victim.unlink()
        victim.write_bytes(b"\x89PNG truncated")

    data.cut_version(s, "corrupt one image", corrupt)
    report = data_check.check_version(s, "v2")
    assert not report["ok"]
    assert "not decodable" in report["problems"][0]
    assert data_check.check_version(s, "v1")["ok"]
    shutil.rmtree(s.cache_dir)
    assert json.dumps(report)  # serialisable for MLflow

    # The same check on the sharded version migrated from it reads the images from the shards.
    from flowops import shard_import, shards, storage

    sharded = shard_import.migrate_version(s, "v2", images_per_shard=500).version
    again = data_check.check_version(s, sharded)
    victim = data.open_version(s, "v2").manifest.iloc[0]  # named by its id: shards have no paths
    assert again["problems"] == [report["problems"][0].replace(victim.path, victim.id)]
    # A shard damaged in storage refuses the version (exit 5), naming the shard.
    store = storage.open_storage(s)
    shard = shards.open_manifest(s, sharded).manifest["shard"].iloc[0]
    store.write_bytes(shards.shard_path(shard), b"damaged")
    with pytest.raises(StorageUnavailable, match=f"{shard}.parquet fails its checksum"):
        data_check.check_version(s, sharded)
