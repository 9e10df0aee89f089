"""The continuous training loop across two hosts (issue 13's last proof), on the two-host cluster
(tests/multihost.py): the storage URI is an S3 bucket on the head host, the state in PostgreSQL
there; the worker host has its own empty FLOWOPS_HOME and cannot see the head's files at all.

A sharded data version in the bucket, a production model, the app with one replica on each host.
Then, with the real CLI: the loop controller (a Ray job on the head) cuts a version from the new
human labels (only the manifest is rewritten; the shards stay), fine-tunes with one Ray Train
worker on each host (checkpoints in the bucket), canaries the new version under traffic with
feedback from a driver on the worker host and promotes it; every user request got a 200. Nothing
on the worker host wrote into or needed the head's home: the worker host's own home holds only
its token, and the head's home as the worker host sees it stays empty.

Small on purpose (threshold 20, 3 epochs, two canary steps, a wide accuracy margin, as
tests/integration/test_loop.py has it), so that the file takes a few minutes.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from tests.integration.test_multihost_data import s3_keys
from tests.integration.test_multihost_platform import replica_hosts
from tests.multihost import FLOWOPS, STORAGE_URI

pytestmark = pytest.mark.integration

MODEL = "digits-classifier"
LABELS = 20
LOOP_ARGS = ["--threshold", str(LABELS), "--epochs", "3", "--workers", "2",
             "--placement-strategy", "STRICT_SPREAD", "--steps", "50,100",
             "--accuracy-margin", "0.1", "--no-pseudo-label", "--no-retrain-on-drift"]


def cli(host, *args: str, timeout: float = 600) -> dict:
    """`flowops <args> --json` on `host`; its JSON answer (from the first `{` of stdout)."""
    done = host.run([*FLOWOPS, *args, "--json"], env={"FLOWOPS_MODEL_NAME": MODEL}, timeout=timeout)
    return json.loads(done.stdout[done.stdout.index("{"):])


def on_head(two_hosts, code: str, timeout: float = 300):
    """Run `code` (which prints one JSON line last) in a driver on the head host; that JSON."""
    out = two_hosts.head.python(textwrap.dedent(code), env={"FLOWOPS_MODEL_NAME": MODEL},
                                timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


# A driver on the worker host: users that predict holdout images through the worker host's Serve
# proxy and give the true label as feedback, until `stop` appears; `summary.json` says how it went.
# The images come with it (users hold images, not data versions: the worker host has none).
TRAFFIC = textwrap.dedent("""
    import json, os, pathlib, sys, time
    from flowops.demo import TrafficGenerator
    from flowops.settings import get_settings

    folder = pathlib.Path(sys.argv[1])
    holdout = json.loads((folder / "holdout.json").read_text())
    users = TrafficGenerator(get_settings(), rate_per_s=30, feedback_share=0.6,
                             holdout=(holdout["images"], holdout["truth"])).start()

    def write(summary):
        (folder / "summary.tmp").write_text(json.dumps(summary))
        os.replace(folder / "summary.tmp", folder / "summary.json")

    while not (folder / "stop").exists():
        write(users.summary())
        time.sleep(1)
    write(users.stop())
""")


class Traffic:
    """The worker host's traffic driver (started by `start`, read by `summary`, ended by `stop`)."""

    def __init__(self, two_hosts):
        self.folder = two_hosts.worker.home.parent / "traffic"  # the worker host's, not its home
        self.folder.mkdir()
        self.two_hosts = two_hosts

    def start(self, holdout: dict) -> Traffic:
        (self.folder / "holdout.json").write_text(json.dumps(holdout))
        worker = self.two_hosts.worker
        self.proc = worker.popen([sys.executable, "-c", TRAFFIC, str(self.folder)],
                                 self.folder / "driver.log",
                                 env={"FLOWOPS_SERVE_URL": f"http://{worker.addr}:8000"})
        return self

    def summary(self) -> dict:
        path = self.folder / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> dict:
        (self.folder / "stop").touch()
        self.proc.wait(timeout=60)
        return self.summary()


@pytest.fixture(scope="module")
def served(two_hosts, head_postgres):
    """A sharded data version in the bucket (`data init` + `data migrate` on the head), a
    production model trained on it, the app with two replicas spread over the hosts, and traffic
    with feedback from a driver on the worker host."""
    head, worker = two_hosts.head, two_hosts.worker
    timings, start = {}, time.monotonic()
    head.run([*FLOWOPS, "data", "init"], timeout=300)
    migrated = cli(head, "data", "migrate", "latest", "--images-per-shard", "300")
    assert migrated["storage"] == STORAGE_URI
    timings["data"] = time.monotonic() - start

    trained = cli(head, "train", "--local", "--epochs", "12", "--lr", "0.01")
    version = str(trained["version"])
    cli(head, "models", "validate", version, "--min-accuracy", "0.5")
    cli(head, "models", "promote", version)
    timings["model"] = time.monotonic() - start

    status = cli(head, "serve", "deploy", "--stable", version, "--replicas", "2",
                 "--max-replicas-per-node", "1")
    assert status["ready"] and str(status["stable"]) == version
    assert replica_hosts(two_hosts) == sorted([head.addr, worker.addr])
    timings["deploy"] = time.monotonic() - start

    holdout = on_head(two_hosts, """
        import json
        from flowops.demo import holdout_images
        from flowops.settings import get_settings

        images, truth = holdout_images(get_settings())
        print(json.dumps({"images": images, "truth": truth}))
    """)
    traffic = Traffic(two_hosts).start(holdout)
    yield {"version": version, "data_version": migrated["version"], "traffic": traffic,
           "timings": timings}
    traffic.stop()
    head.run([*FLOWOPS, "loop", "stop"], check=False, timeout=120)


def test_the_loop_promotes_a_fine_tuned_version_with_replicas_on_both_hosts(two_hosts, served):
    head, worker = two_hosts.head, two_hosts.worker
    start = time.monotonic()
    shards = sorted(k for k in s3_keys(two_hosts, "platform/images/") if k.endswith(".parquet"))
    checkpoints = set(s3_keys(two_hosts, "platform/checkpoints/"))

    head.run([*FLOWOPS, "loop", "start", *LOOP_ARGS], env={"FLOWOPS_MODEL_NAME": MODEL})
    assert cli(head, "labels", "simulate", "--count", str(LABELS))["recorded"] == LABELS

    record = on_head(two_hosts, """
        import json
        from flowops import loop
        from flowops.durable import wait_until
        from flowops.settings import get_settings

        store = loop.RolloutStore(get_settings())
        record = wait_until(lambda: (r := store.read().rollouts.get("r001")) and r.done and r,
                            600, what="rollout r001 to finish", interval_s=2)
        print(record.model_dump_json())
    """, timeout=700)
    took = time.monotonic() - start
    summary = served["traffic"].summary()

    if record["status"] != "promoted":
        pytest.fail(f"rollout {record['status']}: {record['reasons']}\n{failed_job_logs(two_hosts)}",
                    pytrace=False)
    new = str(record["model_version"])
    # the cut version: the 20 human labels in its manifest, the shards untouched
    cut = on_head(two_hosts, f"""
        import json
        from flowops import data, registry, serving, shards
        from flowops.settings import get_settings

        s = get_settings()
        version = data.open_version(s, {record["data_version"]!r})
        routing = serving.routing_status(s)
        print(json.dumps({{"human": int((version.manifest["label_source"] == "human").sum()),
                           "sharded": shards.is_sharded(version),
                           "production": registry.production_version(s),
                           "stable": str(routing["stable"]), "canary": routing.get("canary")}}))
    """)
    assert record["data_version"] != served["data_version"]
    assert cut["sharded"] and cut["human"] == LABELS
    assert sorted(k for k in s3_keys(two_hosts, "platform/images/") if k.endswith(".parquet")) == shards
    # production moved; serving sends 100% to the new version, from replicas on both hosts
    assert cut["production"] == new and cut["stable"] == new and not cut["canary"]
    assert replica_hosts(two_hosts) == sorted([head.addr, worker.addr])
    # the fine-tuning had one worker on each host; its checkpoints went to the bucket
    assert set(train_worker_hosts(two_hosts)) == {head.addr, worker.addr}  # earlier files ran workers too
    assert set(s3_keys(two_hosts, "platform/checkpoints/")) - checkpoints
    # every user request got a 200 with a prediction, the new version's among them
    assert summary["sent"] > 0 and summary["failed"] == 0, summary
    assert sum(summary["by_version"].values()) >= summary["sent"] - 4, summary  # 4 users in flight
    assert summary["by_version"].get(new), summary
    print(f"\nmulti-host loop: harness {two_hosts.timings}, fixture "
          f"{ {k: round(v) for k, v in served['timings'].items()} } s, rollout {took:.0f} s, "
          f"traffic {summary['sent']} requests {summary['by_version']}")


def failed_job_logs(two_hosts) -> str:
    """The ends of the logs of the cluster's failed Ray jobs (what a failed rollout shows)."""
    return on_head(two_hosts, """
        import json
        from flowops import jobs
        from flowops.settings import get_settings

        s = get_settings()
        print(json.dumps("\\n".join(f"--- {j.id}\\n" + jobs.logs(s, j.id)[-6000:]
                                     for j in jobs.list_jobs(s) if j.status == "FAILED")))
    """)


def train_worker_hosts(two_hosts) -> list[str]:
    """The addresses of the hosts Ray Train workers ran on (Ray's state API keeps dead actors)."""
    return on_head(two_hosts, """
        import json
        from ray.util.state import list_actors
        from flowops.ray_client import connect
        from flowops.settings import get_settings

        ray = connect(get_settings())
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
        print(json.dumps(sorted(ips[a.node_id] for a in actors)))
    """)


def test_nothing_on_the_worker_host_used_the_heads_home(two_hosts, served):
    """The worker host ran a replica, a Ray Train worker and the traffic driver: its own home
    holds only the token it was given, and the head's files as it sees them (an empty mount over
    the head's folder) stayed empty: nothing there wrote into or read the head's home."""
    head, worker = two_hosts.head, two_hosts.worker
    assert sorted(p.name for p in worker.home.iterdir()) == ["ray"]
    assert sorted(p.name for p in (worker.home / "ray").iterdir()) == ["auth_token"]
    seen = worker.run(["find", str(head.home.parent)]).stdout.split()
    assert seen == [str(head.home.parent)], seen
