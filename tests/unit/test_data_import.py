"""`flowops data init --from DIR` on a folder a user would bring: colour images of mixed formats
and sizes, a few broken files. Runs the real command line on a real git + DVC workspace."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flowops import data, data_check
from flowops.settings import get_settings
from tests.conftest import run_cli
from tests.image_folders import write_colour_folder, write_unlabeled_folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _init(home: Path, *args: str):
    return run_cli("data", "init", *args, env={"FLOWOPS_HOME": str(home)}, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "Holiday Photos"
    return root, write_colour_folder(root)


@pytest.fixture(scope="module")
def imported(photos, tmp_path_factory):
    root, written = photos
    home = tmp_path_factory.mktemp("home")
    out = _init(home, "--from", str(root), "--json")
    return home, out


def test_the_folder_is_imported_as_it_is(photos, imported):
    root, written = photos
    home, out = imported
    assert out.returncode == 0, out.stderr
    assert "3 file(s) rejected, see errors.csv of v1" in out.stderr
    info = json.loads(out.stdout)
    assert info["name"] == "holiday-photos" and info["rejected"] == 3
    version = data.open_version(get_settings(home=home), "v1")
    labeled = written["warm"] + written["cool"]
    # Every readable image is kept with its label: nothing hidden in an unlabeled pool.
    assert info["counts"] == {"holdout": 6, "train": 20}
    assert len(version.rows("unlabeled")) == 0 and sum(info["counts"].values()) == len(labeled)
    assert info["class_counts"]["holdout"] == {"cool": 3, "warm": 3}
    # The original bytes, extensions included (no re-encoding, grayscale or resize).
    stored = {_sha(version.root / p) for p in version.manifest.path}
    assert stored == {_sha(p) for p in labeled}
    suffixes = {Path(p).suffix for p in version.manifest.path}
    assert suffixes == {".jpg", ".png", ".webp"}
    for rel in version.manifest.path:
        with Image.open(version.root / rel) as img:
            assert img.mode in ("RGB", "RGBA") and 48 <= min(img.size) <= 200
    # Facts a task takes as defaults.
    meta = version.meta
    assert version.name == "holiday-photos" and version.channels == 3
    assert meta["classes"] == ["cool", "warm"] and meta["rejected"] == 3
    assert 48 <= version.image_size <= 200
    assert 48 <= meta["median_height"] <= 200 and 48 <= meta["median_width"] <= 200


def test_broken_files_are_listed_with_their_reason(photos, imported):
    root, written = photos
    home, _ = imported
    version = data.open_version(get_settings(home=home), "v1")
    errors = pd.read_csv(version.root / data.ERRORS_FILE)
    assert sorted(errors.path) == sorted(str(p) for p in written["rejected"])
    reasons = dict(zip(errors.path, errors.reason, strict=True))
    assert reasons[str(root / "warm" / "corrupt.png")].startswith("cannot decode")
    assert "truncated" in reasons[str(root / "cool" / "truncated.jpg")]
    assert "not an image file type (.txt)" in reasons[str(root / "cool" / "notes.txt")]
    assert not any(".hidden" in p for p in errors.path)  # hidden files are ignored, not rejected
    assert data_check.check_version(get_settings(home=home), "v1")["ok"]


def test_an_unlabeled_folder_fills_the_pool_and_labels_stay(photos, tmp_path):
    root, written = photos
    pool = write_unlabeled_folder(tmp_path / "new-photos")
    out = _init(tmp_path / "home", "--from", str(root), "--unlabeled", str(tmp_path / "new-photos"),
                "--name", "scenes", "--holdout-fraction", "0.25", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["counts"] == {"holdout": 7, "train": 19, "unlabeled": len(pool)}
    version = data.open_version(get_settings(home=tmp_path / "home"))
    unlabeled = version.rows("unlabeled")
    assert (unlabeled.label == "").all()
    assert {_sha(version.root / p) for p in unlabeled.path} == {_sha(p) for p in pool}
    assert (version.root / "answers.csv").read_text().strip() == "id,label"  # nothing to reveal
    assert version.name == "scenes" and version.meta["unlabeled_source"].endswith("new-photos")


def test_hiding_labels_is_asked_for_explicitly(photos, tmp_path):
    root, _ = photos
    out = _init(tmp_path / "home", "--from", str(root), "--unlabeled-fraction", "0.5")
    assert out.returncode == 0, out.stderr
    assert "'holiday-photos'" in out.stdout and "3 file(s) rejected" in out.stdout
    version = data.open_version(get_settings(home=tmp_path / "home"))
    hidden = version.rows("unlabeled")
    assert len(hidden) == 10 and (hidden.label == "").all()
    answers = pd.read_csv(version.root / "answers.csv", dtype=str)
    assert sorted(answers.id) == sorted(hidden.id)


def test_a_grayscale_folder_has_one_channel(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "gray" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (30 + i, 40), color=40 * i).save(tmp_path / "gray" / c / f"{i}.PNG")
        Image.new("P", (20, 20)).save(tmp_path / "gray" / c / "palette.gif")  # a gray palette
    s = get_settings(home=tmp_path / "home")
    info = data.init_dataset(s, tmp_path / "gray")
    version = data.open_version(s, info.id)
    assert version.channels == 1 and len(version.manifest) == 12 and info.rejected == 0
    assert version.image_size == 31 and version.meta["median_width"] == 31  # median short side
    assert (version.root / data.ERRORS_FILE).read_text().strip() == "path,reason"


@pytest.mark.parametrize("args, text", [
    (["--holdout-fraction", "1.5"], "--holdout-fraction 1.5 is outside (0, 0.9)"),
    (["--unlabeled-fraction", "0.99"], "--unlabeled-fraction 0.99 is outside [0, 0.95)"),
    (["--image-size", "2"], "--image-size 2 is outside 4-512"),
    (["--from", "{photos}", "--name", "my photos"], "--name 'my photos': use letters, digits"),
    (["--unlabeled", "{tmp}"], "--unlabeled and --name need --from"),
    (["--from", "{tmp}/missing"], "not a folder"),
    (["--from", "{tmp}/unreadable"], "no readable image (2 file(s) rejected, e.g."),
    (["--from", "{photos}", "--unlabeled", "{tmp}/unreadable/a"], "--unlabeled"),
])
def test_bad_input_is_one_line_and_exit_2(photos, tmp_path, args, text):
    for c in ("a", "b"):
        (tmp_path / "unreadable" / c).mkdir(parents=True)
        (tmp_path / "unreadable" / c / "x.jpg").write_bytes(b"nope")
    args = [a.format(tmp=tmp_path, photos=photos[0]) for a in args]
    out = _init(tmp_path / "home", *args)
    assert out.returncode == 2, out.stderr
    assert text in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "home" / "workspace").exists() or not data.list_versions(
        get_settings(home=tmp_path / "home"))
