"""Data, checkpoints and predictions in object storage, read on any node (issue 13's proof), on the
two-host cluster (tests/multihost.py): the storage URI is an S3 bucket on the head host (moto's
server mode, reached with the product's ordinary S3 clients), the state in PostgreSQL there; the
worker host has its own empty FLOWOPS_HOME and cannot see the head's files at all.

- a sharded data version in the bucket trains with DDP, one Ray Train worker on each host, its
  checkpoints in the bucket; the worker on the worker host is killed (SIGKILL) mid-training and
  the group resumes from the bucket's checkpoint;
- pseudo-labeling with its model actor on the worker host writes the same predictions as with
  it on the head, with zero error rows.
- a Tune search with one trial on each host checkpoints both trials to the bucket, and the driver
  on the head registers the best trial's model from there.

The tests run in file order and build on each other.
"""

from __future__ import annotations

import json
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.multihost import FLOWOPS, STORAGE_URI

pytestmark = pytest.mark.integration

MODEL = "digits-classifier"


def cli(host, *args: str, timeout: float = 600) -> dict:
    """`flowops <args> --json` on `host`; its JSON answer (the last JSON line of stdout)."""
    done = host.run([*FLOWOPS, *args, "--json"], env={"FLOWOPS_MODEL_NAME": MODEL}, timeout=timeout)
    return json.loads(done.stdout[done.stdout.index("{"):])


def s3_keys(two_hosts, prefix: str) -> list[str]:
    """Keys under `prefix` of the platform's bucket (listed from the head host)."""
    out = two_hosts.head.python(textwrap.dedent(f"""
        import json, boto3
        s3 = boto3.client("s3", endpoint_url={two_hosts.s3_url!r})
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="flowops", Prefix={prefix!r})
        print(json.dumps([o["Key"] for page in pages for o in page.get("Contents", [])]))
    """))
    return json.loads(out.strip().splitlines()[-1])


def checkpoints(two_hosts, n: int, timeout_s: float) -> None:
    """Return as soon as `n` Ray Train checkpoints are in the bucket (polled on the head host)."""
    two_hosts.head.python(textwrap.dedent(f"""
        import time, boto3
        s3 = boto3.client("s3", endpoint_url={two_hosts.s3_url!r})
        deadline = time.time() + {timeout_s}
        while len({{o["Key"].split("checkpoint_")[1].split("/")[0] for o in s3.list_objects_v2(
                Bucket="flowops", Prefix="platform/checkpoints/").get("Contents", [])
                if "checkpoint_" in o["Key"]}}) < {n}:
            assert time.time() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.1)
    """), timeout=timeout_s + 60)


def s3_predictions(two_hosts, uri: str) -> list[list]:
    """[id, label, score to 4 places] of a predictions.parquet in the bucket, sorted by id."""
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    out = two_hosts.head.python(textwrap.dedent(f"""
        import io, json, boto3, pandas as pd
        s3 = boto3.client("s3", endpoint_url={two_hosts.s3_url!r})
        frame = pd.read_parquet(io.BytesIO(s3.get_object(Bucket={bucket!r}, Key={key!r})["Body"].read()))
        print(json.dumps(sorted([r.id, r.label, round(float(r.score), 4)] for r in frame.itertuples())))
    """))
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sharded(two_hosts, head_postgres):
    """The digits as a sharded data version in the bucket: `data init` on the head, then `data
    migrate` (images into Parquet shards in the storage URI, a manifest version over them)."""
    head = two_hosts.head
    head.run([*FLOWOPS, "data", "init"], timeout=300)
    migrated = cli(head, "data", "migrate", "latest", "--images-per-shard", "300")
    shards = [k for k in s3_keys(two_hosts, "platform/images/") if k.endswith(".parquet")]
    assert migrated["storage"] == STORAGE_URI and len(shards) == migrated["shards"] >= 6
    return migrated["version"]


def test_ddp_across_hosts_checkpoints_to_the_bucket_and_survives_a_killed_worker(two_hosts, sharded):
    head, worker = two_hosts.head, two_hosts.worker
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(cli, head, "train", "--data-version", sharded, "--workers", "2",
                               "--cpus-per-worker", "1", "--placement-strategy", "STRICT_SPREAD",
                               "--epochs", "20", timeout=900)
        # Once two checkpoints are in the bucket (Train V2's controller registers a reported one
        # when it next polls the workers, about a second later: the first surely is by then),
        # kill the Ray Train worker on the worker host.
        checkpoints(two_hosts, 2, timeout_s=300)
        time.sleep(3)
        assert not training.done(), "the training ended before a worker could be killed"
        found = worker.run(["pgrep", "-af", "RayTrainWorker"], check=False).stdout
        killed = worker.run(["pkill", "-9", "-f", "RayTrainWorker"], check=False)
        assert killed.returncode == 0, "no Ray Train worker ran on the worker host"
        result = training.result()["result"]
    assert result["resumed_at"], (found, result)  # resumed from the bucket's checkpoint
    # 20 epochs on the few hundred labeled digits: well above chance (0.1), not a finished model
    assert result["mode"] == "ray" and result["metrics"]["holdout_accuracy"] > 0.3
    TRAINED.append(f"models:/{result['model_name']}/{result['version']}")


TRAINED: list[str] = []  # the model the DDP test registered


def test_pseudo_labels_from_an_actor_on_the_worker_host_match_the_head(two_hosts, sharded):
    """The same model scores the same sharded pool with its actor on either host: same predictions,
    no error row (the worker host reads the shards from the bucket, never the head's disk)."""
    assert TRAINED, "needs the DDP test's model"
    model = TRAINED[0]
    head, worker = two_hosts.head, two_hosts.worker
    predictions = {}
    for host in (worker, head):
        result = cli(head, "pseudo-label", "--model-uri", model, "--data-version", sharded,
                     "--pool", "all", "--resource", f"node:{host.addr}=0.01", "--no-version")
        assert result["result"]["errors"] == 0, result
        assert result["result"]["predictions_path"].startswith(f"{STORAGE_URI}/pseudo-labels/")
        predictions[host.role] = s3_predictions(two_hosts, result["result"]["predictions_path"])
    assert len(predictions["head"]) > 1000
    assert predictions["worker"] == predictions["head"]


def test_tune_trials_on_both_hosts_checkpoint_to_the_bucket(two_hosts, sharded):
    """1.5 CPUs a trial on two 2-CPU hosts: one trial fits per host, so the two run at once, one on
    each. Both checkpoint to `<storage URI>/tune-runs/`; the best is loaded from there and registered."""
    head, worker = two_hosts.head, two_hosts.worker
    report = cli(head, "tune", "--data-version", sharded, "--trials", "2", "--epochs", "2",
                 "--cpus-per-trial", "1.5", "--experiment", "mh-tune", timeout=900)
    result = report["result"]
    assert report["status"] == "SUCCEEDED" and result["trials"] == 2 and result["failed"] == 0, report
    assert result["version"], report
    run = f"platform/tune-runs/tune-{result['parent_run_id'][:8]}/"
    keys = s3_keys(two_hosts, run)
    trials = {k.removeprefix(run).split("/")[0] for k in keys if "/checkpoint_" in k}
    assert len(trials) == 2, keys  # both trials' checkpoints are in the bucket
    # Tune records the node of every reported result (node_ip) in the trial's result.json
    out = head.python(textwrap.dedent(f"""
        import json, boto3
        s3 = boto3.client("s3", endpoint_url={two_hosts.s3_url!r})
        keys = {[k for k in keys if k.endswith("/result.json")]!r}
        print(json.dumps(sorted({{json.loads(line)["node_ip"] for k in keys for line in
              s3.get_object(Bucket="flowops", Key=k)["Body"].read().decode().splitlines()}})))
    """))
    assert json.loads(out.strip().splitlines()[-1]) == sorted([head.addr, worker.addr]), keys
