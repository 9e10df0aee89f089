"""Training on a sharded data version kept in S3 (moto's server mode): the real `flowops train`
submits a Ray job whose Ray Train worker streams the images from the bucket through Ray Data
(`datasets=` + `get_dataset_shard`), checkpoints into the bucket, and the holdout is read from
the bucket too. The loop's config carries no image."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from flowops.settings import get_settings
from tests.conftest import run_cli
from tests.image_folders import write_colour_folder
from tests.s3_server import s3_endpoint  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration]


def test_training_streams_a_sharded_version_from_s3_and_checkpoints_there(
        stack, s3_endpoint, tmp_path):  # noqa: F811
    bucket = s3_endpoint.bucket("flowops-train")
    home = tmp_path / "home"
    settings = get_settings(home=home, storage_uri=f"s3://{bucket}/platform",
                            storage_endpoint_url=s3_endpoint.url)
    settings.token_path.parent.mkdir(parents=True)
    shutil.copy(stack.token_path, settings.token_path)  # the session's cluster, this home's data
    env = {**s3_endpoint.env(f"s3://{bucket}/platform"), "FLOWOPS_HOME": str(home)}
    write_colour_folder(tmp_path / "photos", per_class=16)
    out = run_cli("data", "import", str(tmp_path / "photos"), "--images-per-shard", "8",
                  "--json", env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    version = json.loads(out.stdout)["version"]

    # What the driver hands Ray Train as train_loop_config: hyperparameters, no image arrays.
    from flowops.train import TrainConfig, loop_config, plan

    p = plan(settings, TrainConfig(data_version=version, epochs=2))
    looped = loop_config(p, "train", None, home / "unused")
    assert not any(isinstance(v, np.ndarray) for v in looped.values())
    assert len(pickle.dumps(looped)) < 20_000, len(pickle.dumps(looped))
    assert looped["train_samples"] == len(p.data.train) > 0

    out = run_cli("train", "--data-version", version, "--epochs", "2", "--workers", "1",
                  "--experiment", "it-train-s3", "--json", env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["status"] == "SUCCEEDED", report
    result = report["result"]
    assert result["mode"] == "ray" and result["data_version"] == version and result["version"]
    assert 0.0 <= result["metrics"]["holdout_accuracy"] <= 1.0
    keys = [o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=bucket, Prefix="platform/checkpoints/")["Contents"]]
    assert any(k.endswith("/state.pt") for k in keys), keys  # Ray Train's checkpoints, in the bucket
    assert not (home / "storage").exists()  # nothing went to a local storage folder
