"""Batch pseudo-labeling on the real Ray cluster of the test session (real job, Ray Data, MLflow,
git + DVC), the labeling queue and its Label Studio export, and the pseudo-label set.

The tests use the session's cluster (`stack`) but a home folder of their own, so the few corrupt
files and the model they register never reach the data versions or registry other tests read.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flowops import data, labels
from flowops import queue as queue_lib
from flowops.errors import NotFound
from flowops.settings import get_settings
from tests.conftest import run_cli
from tests.s3_server import s3_endpoint  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAD = {  # id -> file content; each must end up in the errors file, never fail the job
    "bad-corrupt": b"\x89PNG\r\n\x1a\n" + b"\x00not really a png" * 4,
    "bad-text": b"hello, I am a text file named like an image",
    "bad-truncated": None,  # the first 40 bytes of a real PNG
    "bad-size": None,  # a valid 16x16 PNG; rejected under --size-rule exact
}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def write_digits_version(settings, n_train=300, n_unlabeled=120, bad=True) -> str:
    """A small digits dataset (plus corrupt files in the unlabeled pool) as a new data version."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255 / 16)), 0, 255)

    def write(staging):
        for old in staging.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        rows, answers = [], []
        for i in range(n_train + n_unlabeled):
            label = str(digits.target[i])
            if i < n_train:
                rel, split, lab, src = f"images/train/{label}/d{i}.png", "train", label, "original"
            else:
                rel, split, lab, src = f"images/unlabeled/d{i}.png", "unlabeled", "", ""
                answers.append({"id": f"d{i}", "label": label})
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(_png(pixels[i]))
            rows.append({"id": f"d{i}", "path": rel, "label": lab, "split": split,
                         "source": "sklearn-digits", "label_source": src})
        if bad:
            contents = dict(BAD)
            contents["bad-truncated"] = _png(pixels[0])[:40]
            contents["bad-size"] = _png(np.full((16, 16), 200))
            for image_id, raw in contents.items():
                rel = f"images/unlabeled/{image_id}.png"
                (staging / rel).write_bytes(raw)
                rows.append({"id": image_id, "path": rel, "label": "", "split": "unlabeled",
                             "source": "test", "label_source": ""})
        data.write_manifest(staging / "manifest.csv", pd.DataFrame(rows))
        pd.DataFrame(answers).to_csv(staging / "answers.csv", index=False)
        (staging / "meta.json").write_text(json.dumps(
            {"classes": [str(c) for c in range(10)], "image_size": 8, "channels": 1}))

    return data.cut_version(settings, "batch test dataset", write, base=None).id


def register_digits_model(settings, versions_tag: str, epochs: int = 30, alias="production"):
    """Fit the digits task's small CNN briefly on the version's train split; register it."""
    import torch
    from mlflow.tracking import MlflowClient

    from flowops import model as model_lib
    from flowops import tracking
    from flowops.evaluate import read_images
    from flowops.task import TaskSpec, load_task

    root = data.materialize(settings, versions_tag)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    train = manifest[manifest["split"] == "train"]
    task = load_task(TaskSpec(options={"width": 16}))
    x = model_lib.to_batch(read_images(data.open_version(settings, versions_tag), list(train["id"]),
                                       task.preprocess))
    y = torch.tensor([int(v) for v in train["label"]])
    torch.manual_seed(0)
    classes = [str(c) for c in range(10)]
    net = task.build_model(classes)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    with tracking.start_run(settings, "batch-tests", run_name="fit-for-batch-tests"):
        version = model_lib.log_model_version(settings, net, task, classes,
                                              registered_name=settings.model_name)
    if alias:
        MlflowClient(settings.tracking_uri).set_registered_model_alias(
            settings.model_name, alias, version)
    return version


@pytest.fixture(scope="module")
def batch_env(stack, tmp_path_factory):
    """Own home on the session's cluster: token copied, tiny dataset v1, a registered model."""
    home = tmp_path_factory.mktemp("batch") / ".flowops"
    settings = get_settings(home=home)
    settings.token_path.parent.mkdir(parents=True)
    shutil.copy(stack.token_path, settings.token_path)
    tag = write_digits_version(settings)
    version = register_digits_model(settings, tag)
    return {"settings": settings, "env": {"FLOWOPS_HOME": str(home)}, "data": tag,
            "model": version}


@pytest.fixture(scope="module")
def job_result(batch_env):
    """One real `flowops pseudo-label` job over the pool (with bad files), waited for."""
    proc = run_cli("pseudo-label", "--data-version", batch_env["data"], "--actors", "2",
                   "--batch-size", "32", "--size-rule", "exact", "--accept-threshold", "0.9",
                   "--json", env=batch_env["env"], timeout=420)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)  # the one JSON object on stdout: the job and its result
    assert out["status"] == "SUCCEEDED" and out["job_id"].startswith("pseudo-label-")
    return out["result"]


def test_unknown_model_fails_before_any_data_is_read(batch_env):
    settings = batch_env["settings"]
    cache = settings.cache_dir / "data"
    shutil.rmtree(cache, ignore_errors=True)  # the model fixture materialized v1
    proc = run_cli("pseudo-label", "--model-uri", f"models:/{settings.model_name}@nope",
                   env=batch_env["env"], timeout=120)
    assert proc.returncode == NotFound.exit_code
    assert proc.stderr.startswith("error: model models:/digits-classifier@nope does not exist")
    assert "aliases: production=" in proc.stderr and "Traceback" not in proc.stderr
    from flowops.pseudo_label import PseudoLabelConfig, run_pseudo_label

    with pytest.raises(NotFound):
        run_pseudo_label(settings, PseudoLabelConfig(model_uri="models:/no-such-model/1"))
    assert not cache.exists()  # nothing was materialized


def test_job_scores_good_files_and_lists_bad_ones(batch_env, job_result):
    settings = batch_env["settings"]
    assert job_result["images"] == 124 and job_result["scored"] == 120
    assert job_result["errors"] == 4
    assert job_result["model_version"] == batch_env["model"]
    assert job_result["data_version"] == batch_env["data"]
    out = job_result["output_version"]
    assert out == "v2" and data.latest_version(settings) == "v2"
    root = data.materialize(settings, out)
    preds = pd.read_parquet(root / "predictions.parquet")
    assert len(preds) == 120 and preds["id"].is_unique
    assert not preds["id"].str.startswith("bad-").any()
    assert {"id", "path", "label", "score", "probabilities", "entropy", "margin",
            "model_version", "data_version"} <= set(preds.columns)
    probs = np.stack(preds["probabilities"].to_numpy())
    assert probs.shape == (120, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert np.allclose(preds["score"], probs.max(axis=1))
    top2 = np.sort(probs, axis=1)[:, -2:]
    assert np.allclose(preds["margin"], top2[:, 1] - top2[:, 0], atol=1e-5)
    answers = pd.read_csv(root / "answers.csv", dtype=str).set_index("id")["label"]
    accuracy = (preds.set_index("id")["label"] == answers.reindex(preds["id"])).mean()
    assert accuracy > 0.6  # a real model made these
    errors = pd.read_csv(root / "predictions_errors.csv")
    assert sorted(errors["id"]) == sorted(BAD)
    reasons = errors.set_index("id")["error"]
    assert reasons["bad-size"] == "wrong size 16x16, expected 8x8"
    assert all(reasons[i].startswith("not a decodable image") for i in BAD if i != "bad-size")
    # the manifest is not touched by a pseudo-label run
    before = data.open_version(settings, batch_env["data"]).manifest
    assert data.open_version(settings, out).manifest.equals(before)
    # the run's output is stored in the storage URI (here the default, home/storage)
    stored = settings.home / "storage" / "pseudo-labels"
    assert job_result["predictions_path"].startswith(f"{stored}/pseudo-label-{batch_env['data']}-")
    assert pd.read_parquet(job_result["predictions_path"]).equals(preds)


def test_run_is_logged_to_mlflow(batch_env, job_result):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(batch_env["settings"].tracking_uri).get_run(job_result["run_id"])
    assert run.data.metrics["scored"] == 120 and run.data.metrics["errors"] == 4
    assert run.data.metrics["images_per_s"] > 0
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("class_")) == 120
    assert run.data.params["model_version"] == batch_env["model"]
    assert sum(job_result["score_histogram"].values()) == 120


def test_confident_pseudo_labels_are_kept_apart_from_human_labels(batch_env, job_result):
    settings = batch_env["settings"]
    out = job_result["output_version"]
    root = data.materialize(settings, out)
    pseudo = pd.read_csv(root / "pseudo_labels.csv", dtype={"id": str, "label": str})
    assert list(pseudo.columns) == ["id", "label", "score", "model_version"]
    assert len(pseudo) == job_result["accepted"] > 0
    assert (pseudo["score"] >= 0.9).all()
    manifest = data.open_version(settings, out).manifest
    human = set(manifest.loc[manifest["label"] != "", "id"])
    assert not human & set(pseudo["id"])
    assert "pseudo" not in set(manifest["label_source"])

    # A person labels one confident image; accepting again leaves it out of the pseudo set.
    chosen = pseudo["id"].iloc[0]
    labels.record_labels(settings, [labels.Label("t-accept", chosen, "3", "api")])
    proc = run_cli("labels", "accept-pseudo", "--threshold", "0.9", "--json",
                   env=batch_env["env"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    again = pd.read_csv(data.materialize(settings, res["version"]) / "pseudo_labels.csv",
                        dtype={"id": str})
    assert chosen not in set(again["id"]) and res["accepted"] == len(pseudo) - 1
    assert data.open_version(settings, res["version"]).manifest.equals(manifest)


def test_queue_is_most_uncertain_first_and_skips_labeled(batch_env, job_result, tmp_path):
    settings = batch_env["settings"]
    preds = pd.read_parquet(data.materialize(settings, job_result["output_version"])
                            / "predictions.parquet")
    most_uncertain = preds.sort_values("margin")["id"].iloc[0]
    labels.record_labels(settings, [labels.Label("t-queue", most_uncertain, "1", "api")])
    queue = queue_lib.review_queue(settings, top=10)
    assert len(queue) == 10 and most_uncertain not in set(queue["id"])
    assert queue["margin"].is_monotonic_increasing
    labeled = {r["image_id"] for r in labels.new_labels(settings)}
    expected = preds[~preds["id"].isin(labeled)].sort_values("margin")["margin"].head(10)
    assert np.allclose(queue["margin"], expected)

    export = tmp_path / "tasks.json"
    proc = run_cli("labels", "queue", "--top", "5", "--export", "labelstudio", str(export),
                   "--json", env=batch_env["env"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)["queue"]
    assert [r["id"] for r in listed] == list(queue["id"].head(5))
    tasks = json.loads(export.read_text())
    assert len(tasks) == 5
    for task, row in zip(tasks, listed, strict=True):
        assert task["data"]["id"] == row["id"]
        assert task["data"]["image"] == f"/data/local-files/?d=data/{row['path']}"
        [pred] = task["predictions"]
        assert pred["model_version"] == batch_env["model"]
        assert pred["result"][0]["value"]["choices"] == [row["label"]]
        assert pred["result"][0]["from_name"] == "choice"

    bad = run_cli("labels", "queue", "--export", "csv", str(export), env=batch_env["env"])
    assert bad.returncode == 2 and "allowed: labelstudio" in bad.stderr


def test_ray_data_decodes_every_image_as_training_and_serving_do(stack, tmp_path):
    """The Ray Data path of `flowops pseudo-label`, in a real pipeline on the cluster, gives the
    tensors training and serving give (bit for bit) for colour, grayscale, odd-sized,
    EXIF-rotated and transparent images, through 1- and 3-channel tasks."""
    from flowops import evaluate, ray_client
    from flowops import pseudo_label as pl
    from flowops.image_model import Preprocess
    from flowops.serving.config import PredictRequest
    from flowops.task import load_task
    from tests.unit.test_same_tensor import IMAGES, TASKS

    ray = ray_client.connect(stack)
    paths = [f"img{i}" for i in range(len(IMAGES))]
    rows = pd.DataFrame({"id": [*paths, "junk"], "bytes": [*IMAGES.values(), b"not an image"]})
    for i, raw in enumerate(IMAGES.values()):
        (tmp_path / f"img{i}").write_bytes(raw)
    for spec in TASKS.values():
        pre: Preprocess = load_task(spec).preprocess
        ds = ray.data.from_pandas(rows).map_batches(
            pl.load_images, batch_size=3, batch_format="numpy", num_cpus=0.25,
            fn_kwargs={"preprocess": pre, "size_rule": "resize"})
        out = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            out.update({i: (x, e) for i, x, e in zip(batch["id"], batch["pixels"], batch["error"],
                                                      strict=True)})
        assert "not a decodable image" in out["junk"][1]  # an error row, the others scored
        trained = [evaluate.decode_image(rel, (tmp_path / rel).read_bytes(), pre, "test") for rel in paths]
        for rel, want in zip(paths, trained, strict=True):
            pixels, error = out[rel]
            assert error == "" and np.array_equal(pixels, want), (spec, rel)
            b64 = base64.b64encode((tmp_path / rel).read_bytes()).decode()
            (served,) = PredictRequest(instances=[{"b64": b64}]).images(1).arrays(pre)
            assert np.array_equal(served, want)


@pytest.fixture(scope="module")
def sharded_job(batch_env, job_result, s3_endpoint):  # noqa: F811
    """The folder version migrated to shards in an S3 bucket (moto's server) and scored by a
    real job whose Ray tasks read the shards from the bucket."""
    from flowops import shard_import

    settings = batch_env["settings"]
    # Read while this home's storage is local: a home's storage (and DVC remote) is chosen once.
    folder_root = data.materialize(settings, job_result["output_version"])
    bucket = s3_endpoint.bucket("flowops-pseudo-label")
    env = {**batch_env["env"], **s3_endpoint.env(f"s3://{bucket}/platform")}
    s3 = get_settings(home=settings.home, storage_uri=env["FLOWOPS_STORAGE_URI"],
                      storage_endpoint_url=s3_endpoint.url)
    migrated = shard_import.migrate_version(s3, batch_env["data"], images_per_shard=50).version
    assert not (settings.home / "storage" / "images").exists()  # the shards are in the bucket
    proc = run_cli("pseudo-label", "--data-version", migrated, "--model-uri",
                   f"models:/{settings.model_name}/{batch_env['model']}", "--actors", "2",
                   "--batch-size", "32", "--size-rule", "exact", "--json", env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"settings": s3, "env": env, "bucket": bucket, "migrated": migrated,
            "folder_root": folder_root, "result": json.loads(proc.stdout)["result"]}


def test_a_sharded_version_in_s3_gets_the_predictions_of_its_folder_version(
        batch_env, job_result, sharded_job, s3_endpoint):  # noqa: F811
    """The sharded job: the same predictions as the folder version's run, the same bad files and
    no other error row; the output is stored in the bucket and versioned."""
    from flowops import shards

    settings, s3, result = batch_env["settings"], sharded_job["settings"], sharded_job["result"]
    bucket, migrated = sharded_job["bucket"], sharded_job["migrated"]
    folder_root = sharded_job["folder_root"]
    assert (result["images"], result["scored"], result["errors"]) == (124, 120, 4)
    print(f"pseudo-label wall time: folder {job_result['duration_s']} s, "
          f"S3 shards {result['duration_s']} s (124 images)")
    assert result["predictions_path"].startswith(f"s3://{bucket}/platform/pseudo-labels/")

    want = pd.read_parquet(folder_root / "predictions.parquet").set_index("id").sort_index()
    sharded_root = data.materialize(s3, result["output_version"])  # its DVC remote is the bucket
    got = pd.read_parquet(sharded_root / "predictions.parquet").set_index("id").sort_index()
    key = result["predictions_path"].removeprefix(f"s3://{bucket}/")
    in_bucket = s3_endpoint.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert pd.read_parquet(io.BytesIO(in_bucket)).set_index("id").sort_index().equals(got)
    assert list(got.index) == list(want.index)
    assert (got["label"] == want["label"]).all() and (got["path"] == "").all()
    assert np.allclose(np.stack(got["probabilities"]), np.stack(want["probabilities"]), atol=1e-6)
    assert set(got["data_version"]) == {migrated}
    errors = pd.read_csv(sharded_root / "predictions_errors.csv").set_index("id").sort_index()
    folder_errors = pd.read_csv(folder_root / "predictions_errors.csv").set_index("id").sort_index()
    assert errors["error"].equals(folder_errors["error"])  # only the deliberately bad files
    assert shards.is_sharded(data.open_version(settings, result["output_version"]))


def test_a_sharded_queue_exports_images_the_label_studio_backend_predicts_on(
        stack, batch_env, sharded_job, tmp_path):
    """`labels queue --export labelstudio` of the sharded version writes the queued images from
    the bucket's shards under the workspace; the served app's Label Studio ML backend (real
    `/labelstudio/predict`, the local-files root being this home's workspace) reads each task's
    image and predicts what the batch job predicted."""
    import httpx

    from flowops import serving

    s3, result = sharded_job["settings"], sharded_job["result"]
    export = tmp_path / "tasks.json"
    proc = run_cli("labels", "queue", "--top", "4", "--data-version", result["output_version"],
                   "--export", "labelstudio", str(export), "--json", env=sharded_job["env"],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads(export.read_text())
    assert len(tasks) == 4
    prefix = f"/data/local-files/?d=label-images/{sharded_job['migrated']}/"
    for task in tasks:
        assert task["data"]["image"] == f"{prefix}{task['data']['id']}.png"
        assert (s3.workspace / "label-images" / sharded_job["migrated"]
                / f"{task['data']['id']}.png").is_file()

    serving.deploy(stack, stable=batch_env["model"], labelstudio_root=str(s3.workspace))
    classes = data.open_version(s3, result["output_version"]).classes
    resp = httpx.post(f"{stack.serve_url}/labelstudio/predict", timeout=60, json={
        "tasks": [{"id": i, "data": t["data"], "annotations": [], "predictions": [], "project": 1}
                  for i, t in enumerate(tasks, start=1)],
        "label_config": queue_lib.labelstudio_config(classes), "project": "1.1700000000"})
    assert resp.status_code == 200, resp.text
    answers = resp.json()["results"]
    assert len(answers) == 4
    for task, answer in zip(tasks, answers, strict=True):
        assert "error" not in answer, answer
        assert answer["model_version"] == batch_env["model"]
        [pre] = task["predictions"]
        assert answer["result"][0]["value"]["choices"] == pre["result"][0]["value"]["choices"]
        assert answer["score"] == pytest.approx(pre["score"], abs=1e-4)
