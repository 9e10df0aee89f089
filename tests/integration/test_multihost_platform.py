"""The platform across two hosts (tests/multihost.py): the head host runs `flowops up` with its state
in PostgreSQL on the head; the worker host is a second Ray node with its own empty FLOWOPS_HOME that
reaches the head only over the network. Proved with the real CLI, Serve, MLflow server and exporter:

- a model trained and registered on the worker host (MLflow over HTTP, artifacts through the
  server's proxy) is served, first by a replica on the worker host, then by one on the head;
- Label Studio annotations posted to the replica on the worker host land in the one state database:
  the head counts them;
- routing changed by a driver on the worker host takes effect for requests served by the head;
- the exporter on the head reports the inbox and the canary weight to a scraper on the worker host;
- killing the app's state actor (routing and ledger) loses no ledger totals and no routing.

The tests run in file order and build on each other (one cluster, one app); the last one
redeploys the app onto the head.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.multihost import FLOWOPS

pytestmark = pytest.mark.integration

MODEL = "digits-classifier"  # what `flowops data init` names the digits models
DIGIT = [[0, 0, 80, 200, 200, 80, 0, 0]] * 8  # any 8x8 image: the versions answering are checked


def cli(host, *args: str, timeout: float = 300) -> dict:
    """`flowops <args> --json` on `host`; its JSON answer."""
    done = host.run([*FLOWOPS, *args, "--json"], env={"FLOWOPS_MODEL_NAME": MODEL}, timeout=timeout)
    return json.loads(done.stdout)


def http(host, method: str, url: str, body: dict | None = None, n: int = 1) -> list[dict]:
    """`n` HTTP requests made on `host`: [{status, version (X-Model-Version), body}]."""
    out = host.python(textwrap.dedent(f"""
        import json, httpx
        answers = []
        for _ in range({n}):
            r = httpx.request({method!r}, {url!r}, json={body!r}, timeout=60)
            answers.append({{"status": r.status_code, "version": r.headers.get("x-model-version"),
                             "body": r.json()}})
        print(json.dumps(answers))
    """))
    return json.loads(out.strip().splitlines()[-1])


def replica_hosts(two_hosts) -> list[str]:
    """The addresses of the hosts the classifier app's replicas run on (Ray's state API)."""
    out = two_hosts.head.python(textwrap.dedent("""
        import json
        from ray.util.state import list_actors
        from flowops.ray_client import connect
        from flowops.settings import get_settings

        ray = connect(get_settings())
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        print(json.dumps(sorted(ips[a.node_id] for a in actors
                                if a.class_name.endswith(":classifier:Classifier"))))
    """))
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def app(two_hosts, head_postgres):
    """Two model versions trained and registered on the worker host (`flowops train --local`:
    the driver there, its data in the worker host's own workspace, the head's MLflow server over
    HTTP); the app deployed from the head with its one replica pinned to the worker host."""
    worker = two_hosts.worker
    worker.run([*FLOWOPS, "data", "init"], timeout=300)
    versions = []
    for seed in (0, 1):
        result = cli(worker, "train", "--local", "--epochs", "1", "--seed", str(seed), timeout=600)
        assert result["model_name"] == MODEL
        versions.append(str(result["version"]))
    status = cli(two_hosts.head, "serve", "deploy", "--stable", versions[0],
                 "--resource", "worker_host=0.01")
    assert status["ready"] and str(status["stable"]) == versions[0]
    assert replica_hosts(two_hosts) == [worker.addr]
    return versions


def test_a_replica_on_the_worker_host_records_annotations_that_the_head_counts(two_hosts, app):
    head, worker = two_hosts.head, two_hosts.worker
    before = cli(head, "loop", "status")["inbox"]

    events = [{"action": "ANNOTATION_CREATED", "task": {"id": 100 + i, "data": {"image_id": f"img-{i}"}},
               "annotation": {"completed_by": {"email": "ann@example.com"},
                              "result": [{"type": "choices", "value": {"choices": [str(i)]}}]}}
              for i in range(3)]
    answers = [http(worker, "POST", f"http://{worker.addr}:8000/labelstudio/webhook", event)[0]
               for event in events]

    assert [(a["status"], a["body"]["recorded"]) for a in answers] == [(201, 1)] * 3
    after = cli(head, "loop", "status")["inbox"]
    assert (after["new"] - before["new"], after["total"] - before["total"]) == (3, 3)


def test_routing_changed_from_the_worker_host_takes_effect_on_the_head(two_hosts, app):
    head, worker = two_hosts.head, two_hosts.worker
    stable, following = app
    predict = f"http://{head.addr}:8000/predict"

    routed = cli(worker, "serve", "canary", following, "--weight", "100")
    assert (str(routed["canary"]), routed["weight"], routed["ready"]) == (following, 100, True)
    assert {a["version"] for a in http(head, "POST", predict, {"instances": [DIGIT]}, n=5)} == {following}

    assert cli(worker, "serve", "set-weight", "0")["weight"] == 0
    assert {a["version"] for a in http(head, "POST", predict, {"instances": [DIGIT]}, n=5)} == {stable}
    assert cli(worker, "serve", "set-weight", "40")["weight"] == 40  # the exporter test reads it


def test_the_exporter_on_the_head_is_scraped_from_the_worker_host(two_hosts, app):
    head, worker = two_hosts.head, two_hosts.worker
    started = cli(head, "monitor", "exporter", "start", "--host", "0.0.0.0")
    assert started["url"] == f"http://{head.addr}:8091/metrics"

    text = worker.python(f"import httpx; print(httpx.get({started['url']!r}, timeout=60).text)")

    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    inbox = cli(head, "loop", "status")["inbox"]
    assert metrics['flowops_label_inbox{state="new"}'] == inbox["new"] >= 3
    assert metrics["flowops_canary_weight_percent"] == 40
    assert metrics[f'flowops_serving_version_info{{role="canary",version="{app[1]}"}}'] == 1
    assert metrics['flowops_exporter_source_up{source="labels"}'] == 1


KILL_STATE_ACTOR = textwrap.dedent("""
    import json, time
    from flowops import serving
    from flowops.ray_client import connect
    from flowops.serving.state import DURABLE_KEYS, STATE_NAMESPACE, state_actor_name
    from flowops.settings import get_settings

    s = get_settings()
    ray = connect(s)

    def totals():
        return {v: {k: e[k] for k in DURABLE_KEYS} for v, e in serving.ledger_snapshot(s).items()}

    before, routing = totals(), serving.routing_status(s)
    actor = ray.get_actor(state_actor_name("classifier"), namespace=STATE_NAMESPACE)
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 60
    while True:  # Ray restarts it (max_restarts=-1): the calls fail until it is back
        try:
            after = totals()
            break
        except Exception:
            assert time.time() < deadline, "the state actor did not come back"
            time.sleep(0.5)
    new_actor = ray.get_actor(state_actor_name("classifier"), namespace=STATE_NAMESPACE)
    print(json.dumps({"before": before, "after": after, "routing": routing,
                      "routing_after": serving.routing_status(s),
                      "restarted": ray.get(new_actor.get_routing.remote())[0] is not None}))
""")


def test_killing_the_state_actor_loses_no_ledger_totals(two_hosts, app):
    head = two_hosts.head
    stable, following = app
    http(head, "POST", f"http://{head.addr}:8000/predict", {"instances": [DIGIT]}, n=10)

    report = json.loads(head.python(KILL_STATE_ACTOR).strip().splitlines()[-1])

    before, after = report["before"], report["after"]
    # the routing test's 5 + 5 at least (these 10 split at random by the 40 % canary)
    assert before[stable]["requests"] >= 5 and before[following]["requests"] >= 5
    assert after == before
    keep = ("stable", "canary", "weight")
    assert [report["routing_after"][k] for k in keep] == [report["routing"][k] for k in keep]


def test_a_replica_on_the_head_loads_the_model_trained_on_the_worker_host(two_hosts, app):
    head, worker = two_hosts.head, two_hosts.worker
    stable, _ = app

    status = cli(head, "serve", "deploy", "--stable", stable, "--resource",
                 f"node:{head.addr}=0.01", timeout=600)

    assert status["ready"] and str(status["stable"]) == stable
    assert replica_hosts(two_hosts) == [head.addr]
    answers = http(worker, "POST", f"http://{head.addr}:8000/predict", {"instances": [DIGIT]}, n=3)
    assert [(a["status"], a["version"]) for a in answers] == [(200, stable)] * 3
