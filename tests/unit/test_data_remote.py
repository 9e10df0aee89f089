"""Data versions that travel: the DVC remote in the storage URI on S3 (moto's server, reached with
DVC's ordinary S3 client) and the git repository of versions in a shared repository (a bare git
repository, what an operator hosts), so that a version cut in one FLOWOPS_HOME opens, and is cut
further, in another that shares nothing else with it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from flowops import data, data_repo, shards, storage
from flowops.errors import ClusterUnavailable
from flowops.settings import get_settings
from tests.conftest import run_cli
from tests.image_folders import write_colour_folder
from tests.s3_server import s3_endpoint  # noqa: F401 - the fixture

BUCKET = "flowops-data"
STORAGE = f"s3://{BUCKET}/platform"


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _bare_repo(path: Path) -> str:
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    return str(path)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_the_dvc_remote_defaults_to_the_storage_uri_on_s3(tmp_path):
    home = tmp_path / "home"
    assert get_settings(home=home).remote == str(home / "dvc-remote")  # one machine: the home
    s3 = get_settings(home=home, storage_uri="s3://KEY:SECRET@bucket/prefix/")
    assert s3.remote == "s3://bucket/prefix/dvc"  # never the credentials
    assert get_settings(home=home, storage_uri="s3a://bucket/p").remote == "s3://bucket/p/dvc"
    assert get_settings(home=home, storage_uri="s3://b/p", dvc_remote="s3://other/dvc").remote == \
        "s3://other/dvc"
    config = data_repo.remote_config(get_settings(home=home, storage_uri="s3://b/p",
                                                  storage_endpoint_url="http://minio:9000"))
    assert config == {"url": "s3://b/p/dvc", "connect_timeout": "5", "endpointurl": "http://minio:9000"}
    assert get_settings(home=home, storage_uri="s3://b/p").job_env()["FLOWOPS_DVC_REMOTE"] == \
        "s3://b/p/dvc"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "photos"
    return root, write_colour_folder(root)


def test_a_version_cut_in_one_home_opens_and_is_cut_further_in_another(
        s3_endpoint, photos, tmp_path):  # noqa: F811
    s3_endpoint.bucket(BUCKET)
    root, written = photos
    repo = _bare_repo(tmp_path / "data.git")
    shared = {"data_repo": repo, "storage_uri": STORAGE, "storage_endpoint_url": s3_endpoint.url}
    node_a, node_b = tmp_path / "a", tmp_path / "b"

    # Node A imports a folder with the real command line, then cuts a label snapshot.
    env = {**s3_endpoint.env(STORAGE), "FLOWOPS_HOME": str(node_a), "FLOWOPS_DATA_REPO": repo}
    out = run_cli("data", "import", str(root), "--images-per-shard", "5", "--unlabeled-fraction",
                  "0.5", "--json", env=env)
    assert out.returncode == 0, out.stderr
    a = get_settings(home=node_a, **shared)
    store = storage.open_storage(a)
    imported = shards.open_manifest(a, "v1")
    answers = pd.read_csv(imported.root / "answers.csv", dtype=str)
    chosen = dict(zip(answers.id[:3], answers.label[:3], strict=True))
    assert shards.cut_labels(a, chosen, "3 human labels", store).id == "v2"

    # Both versions are in the shared repository, their data in the bucket, nothing in A's home.
    tags = subprocess.run(["git", "--git-dir", repo, "tag"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert sorted(tags) == ["v1", "v2"]
    config = subprocess.run(["git", "--git-dir", repo, "show", "v2:.dvc/config"],
                            capture_output=True, text=True, check=True).stdout
    assert f"url = {STORAGE}/dvc" in config and f"endpointurl = {s3_endpoint.url}" in config
    assert "flowops-test" not in config  # no credentials in the repository
    keys = [o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=BUCKET, Prefix="platform/dvc/")["Contents"]]
    assert keys and not (node_a / "dvc-remote").exists() and not (node_a / "storage").exists()

    # Node B: an empty home with the same settings, while A's home is gone.
    parked = tmp_path / "a-parked"
    node_a.rename(parked)
    b = get_settings(home=node_b, **shared)
    assert [v.id for v in data.list_versions(b)] == ["v1", "v2"]
    version = shards.open_manifest(b, "latest")
    assert version.tag == "v2" and version.manifest.equals(shards.open_manifest(a, "v2").manifest)
    rows = version.manifest.set_index("id")
    assert all(rows.loc[i, "label"] == label and rows.loc[i, "label_source"] == "human"
               for i, label in chosen.items())
    images = dict(shards.iter_images(version, version.manifest.id, storage.open_storage(b)))
    originals = {_sha(p.read_bytes()) for p in written["warm"] + written["cool"]}
    assert {_sha(v) for v in images.values()} == originals
    assert sorted(p.name for p in version.root.iterdir()) == [  # `dvc pull`ed from the bucket
        "answers.csv", "errors.csv", "manifest.csv", "meta.json"]
    assert not (node_b / "dvc-remote").exists()
    # ... and cuts the next version, which A sees and builds on.
    more = dict(zip(answers.id[3:5], answers.label[3:5], strict=True))
    assert shards.cut_labels(b, more, "2 more labels", storage.open_storage(b)).id == "v3"
    parked.rename(node_a)
    assert data.latest_version(a) == "v3"
    last = dict(zip(answers.id[5:6], answers.label[5:6], strict=True))
    assert shards.cut_labels(a, last, "1 more label", store).id == "v4"
    final = shards.open_manifest(b, "v4").manifest.set_index("id")
    assert all(final.loc[i, "label_source"] == "human" for i in {**chosen, **more, **last})
    assert [v.id for v in data.list_versions(b)] == ["v1", "v2", "v3", "v4"]


def test_an_unwritable_dvc_remote_or_unreachable_data_repo_is_one_line_and_nothing_cut(
        s3_endpoint, photos, tmp_path):  # noqa: F811
    bucket = s3_endpoint.bucket("flowops-failures")
    root, _ = photos
    repo = _bare_repo(tmp_path / "data.git")
    uri = f"s3://{bucket}/platform"
    base = {**s3_endpoint.env(uri), "FLOWOPS_HOME": str(tmp_path / "home"),
            "FLOWOPS_DATA_REPO": repo}
    # A DVC remote in a bucket that does not exist: refused before any shard is written.
    env = {**base, "FLOWOPS_DVC_REMOTE": "s3://no-such-bucket/dvc"}
    out = run_cli("data", "import", str(root), env=env, timeout=120)
    assert out.returncode == 5
    assert _one_error_line(out).startswith(
        "error: data import: DVC remote s3://no-such-bucket/dvc (endpoint http://127.0.0.1:")
    # A data repository nobody can reach: the same, naming it.
    env = {**base, "FLOWOPS_DATA_REPO": str(tmp_path / "nowhere.git")}
    out = run_cli("data", "import", str(root), env=env, timeout=120)
    assert out.returncode == 5
    line = _one_error_line(out)
    assert line.startswith(f"error: data repository {tmp_path / 'nowhere.git'} (FLOWOPS_DATA_REPO)")
    assert "Contents" not in s3_endpoint.client().list_objects_v2(Bucket=bucket, Prefix="platform/images")
    assert not subprocess.run(["git", "--git-dir", repo, "tag"], capture_output=True,
                              text=True).stdout.strip()

    # A remote that fails during the cut itself (after the checks): exit 5, nothing cut anywhere.
    out = run_cli("data", "import", str(root), "--images-per-shard", "10", env=base)
    assert out.returncode == 0, out.stderr
    settings = get_settings(home=tmp_path / "home", data_repo=repo, storage_uri=uri,
                            storage_endpoint_url=s3_endpoint.url, dvc_remote="s3://gone/dvc")
    with pytest.raises(storage.StorageUnavailable, match=r"^cut v2: DVC remote s3://gone/dvc "
                       r"\(endpoint http://127.0.0.1:\d+\) is unreachable or not writable") as caught:
        shards.cut_labels(settings, {}, "labels", storage.open_storage(settings))
    assert caught.value.exit_code == 5 and "\n" not in str(caught.value)
    assert [v.id for v in data.list_versions(settings)] == ["v1"]
    assert data_repo.git(settings.workspace, "tag").split() == ["v1"]
    shutil.rmtree(tmp_path / "home" / "workspace")  # a fresh clone sees the same: v1 only
    assert [v.id for v in data.list_versions(settings)] == ["v1"]
    with pytest.raises(ClusterUnavailable, match="nowhere.git"):
        data.list_versions(get_settings(home=tmp_path / "x", data_repo=str(tmp_path / "nowhere.git")))
