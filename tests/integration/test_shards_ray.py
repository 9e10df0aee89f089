"""A sharded data version read through a real Ray Data pipeline on the session's cluster, from the
local storage folder and from an S3 endpoint (moto's server mode, reached with pyarrow's ordinary
S3 client by the driver and by every Ray worker)."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest

from flowops import ray_client, shard_import, shards, storage
from flowops.settings import get_settings
from tests.conftest import run_cli
from tests.image_folders import write_colour_folder
from tests.s3_server import CREDENTIALS, s3_endpoint  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "photos"
    write_colour_folder(root)
    return root


@pytest.fixture(scope="module")
def ray(stack, s3_endpoint):  # noqa: F811
    """This process as a driver of the session's cluster; its tasks carry the S3 credentials (a
    job inherits them from the head, which has them from `flowops up`'s environment)."""
    return ray_client.connect(stack, runtime_env={"env_vars": CREDENTIALS})


def _sizes(batch):
    """A pipeline stage after the read: decode every image (as training or pseudo-labeling do)."""
    from PIL import Image

    sizes = []
    for payload in batch["bytes"]:
        with Image.open(io.BytesIO(payload)) as img:
            sizes.append(min(img.size))
    return {"id": batch["id"], "label": batch["label"], "split": batch["split"], "side": sizes}


def _read_and_compare(settings, version_id: str) -> list[dict]:
    store = storage.check(settings, "test read")
    version = shards.open_manifest(settings, version_id)
    rows = shards.read_version(version, store).map_batches(_sizes, batch_format="numpy").take_all()
    manifest = version.manifest.set_index("id")
    assert sorted(r["id"] for r in rows) == sorted(manifest.index)
    assert all(r["label"] == manifest.loc[r["id"], "label"]
               and r["split"] == manifest.loc[r["id"], "split"] for r in rows)
    assert all(48 <= r["side"] <= 200 for r in rows)
    train = shards.read_version(version, store, splits=["train"], labeled=True).take_all()
    assert Counter(r["label"] for r in train) == Counter(version.rows("train", labeled=True).label)
    expected = dict(shards.iter_images(version, [r["id"] for r in train], store))
    assert all(r["bytes"] == expected[r["id"]] for r in train)
    return rows


def test_a_version_streams_through_ray_data_from_local_storage(ray, photos, tmp_path):
    settings = get_settings(home=tmp_path / "home")
    result = shard_import.import_images(settings, str(photos), images_per_shard=4)
    rows = _read_and_compare(settings, result.version)
    assert len(rows) == result.images == 26


def test_a_version_streams_through_ray_data_from_s3(ray, photos, s3_endpoint, tmp_path):  # noqa: F811
    bucket = s3_endpoint.bucket("flowops-data")
    s3_endpoint.upload_folder(photos, bucket, "raw/photos")
    env = {**s3_endpoint.env(f"s3://{bucket}/platform"), "FLOWOPS_HOME": str(tmp_path / "home")}
    # Imported from a bucket prefix into the bucket's storage, by the real command line.
    out = run_cli("data", "import", f"s3://{bucket}/raw/photos", "--images-per-shard", "4",
                  "--json", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["images"] == 26 and result["rejected"] == 3
    assert result["storage"] == f"s3://{bucket}/platform"
    assert not (tmp_path / "home" / "storage").exists()  # nothing went to a local folder
    keys = [o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=bucket, Prefix="platform/images/")["Contents"]]
    assert sum(k.endswith(".parquet") for k in keys) == result["shards"] == 7
    settings = get_settings(home=tmp_path / "home", storage_uri=f"s3://{bucket}/platform",
                            storage_endpoint_url=s3_endpoint.url)
    rows = _read_and_compare(settings, result["version"])
    assert len(rows) == 26

    # A shard damaged in the bucket: the read fails naming it, on whichever worker read it. (On one
    # CI machine moto then answered the worker's HeadObject with ACCESS_DENIED instead of the
    # bytes: the shard is named and the version refused either way.)
    version = shards.open_manifest(settings, result["version"])
    bad = version.manifest.shard.iloc[0]
    s3_endpoint.client().put_object(Bucket=bucket, Key=f"platform/images/{bad}.parquet",
                                    Body=b"not the shard any more")
    store = storage.open_storage(settings)
    with pytest.raises(Exception, match=f"{bad}.parquet (fails its checksum|cannot be read)"):
        shards.read_version(version, store).take_all()


def test_a_missing_bucket_is_one_line_exit_5(s3_endpoint, photos, tmp_path):  # noqa: F811
    env = {**s3_endpoint.env("s3://no-such-bucket/x"), "FLOWOPS_HOME": str(tmp_path / "home")}
    out = run_cli("data", "import", str(photos), env=env)
    assert out.returncode == 5, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: data import: storage s3://no-such-bucket/x (endpoint http://127.0.0.1:")


def test_both_layouts_read_the_same_images_through_images_dataset(ray, photos, tmp_path):
    """A folder version and the sharded version migrated from it: the same (id, label, split,
    bytes) through `images.dataset`, and through `images.iter_bytes` without Ray."""
    from flowops import data, images

    settings = get_settings(home=tmp_path / "home")
    folder = data.init_dataset(settings, photos).id
    migrated = shard_import.migrate_version(settings, folder, images_per_shard=4).version
    read = {}
    for tag in (folder, migrated):
        version = data.open_version(settings, tag)
        rows = images.select(version, ["train"], labeled=True)
        got = images.dataset(settings, version, rows).take_all()
        assert sorted(r["id"] for r in got) == sorted(rows["id"])
        read[tag] = {r["id"]: (r["label"], r["split"], r["bytes"]) for r in got}
        assert dict(images.iter_bytes(settings, version, rows["id"])) == {
            i: v[2] for i, v in read[tag].items()}
    assert read[folder] == read[migrated]
