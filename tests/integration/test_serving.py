"""The classifier app over real HTTP on the real Serve of the test stack: routing shares, sticky
routing, runtime weight changes and rollback under load, shadow traffic, canary failures, feedback,
admin keys, bad input (hypothesis), Prometheus metrics, the CLI, and the Label Studio ML-backend
round trip with bodies shaped as Label Studio sends them."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import run_cli
from tests.integration.conftest_serving import (
    broken_classifier,
    colour_classifier,
    digits_pixels,
    fit_classifier,
    png_b64,
    register_version,
)

pytestmark = pytest.mark.integration

PIXELS, LABELS = digits_pixels(64)


@pytest.fixture(scope="module")
def served(stack):
    """Versions 'good' (production), 'other' (a second good model) and 'broken'; the app deployed
    with two replicas, as the shipped RayService runs it."""
    from flowops import serving

    versions = {
        "good": register_version(stack, fit_classifier(seed=0), alias="production"),
        "other": register_version(stack, fit_classifier(seed=1)),
        "broken": register_version(stack, broken_classifier()),
        "colour": register_version(stack, colour_classifier()),  # another task: 12x12 RGB
    }
    serving.deploy(stack, num_replicas=2)
    yield stack, versions
    serving.rollback(stack)


def _body(i: int) -> dict:
    return {"instances": [PIXELS[i % len(PIXELS)].tolist()]}


async def _fire(url: str, n: int, concurrency: int, headers_for=None) -> list[httpx.Response]:
    """n POST /predict requests from `concurrency` closed-loop clients."""
    out: list[httpx.Response] = []
    counter = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            headers = headers_for(i) if headers_for else None
            out.append(await client.post(f"{url}/predict", json=_body(i), headers=headers))

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return out


async def _load(url: str, clients: int, stop: asyncio.Event, log: list) -> None:
    """Closed-loop clients sending /predict until `stop`; each answer is logged as (time, status,
    model version), each failure to get one as (time, 0, "ExceptionName: message")."""
    async def worker(client):
        i = 0
        while not stop.is_set():
            try:
                r = await client.post(f"{url}/predict", json=_body(i))
                log.append((time.monotonic(), r.status_code, r.headers.get("x-model-version")))
            except httpx.HTTPError as exc:
                log.append((time.monotonic(), 0, f"{type(exc).__name__}: {exc}"))
            i += 1

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))


def test_predict_names_the_version_everywhere(served):
    settings, v = served
    resp = httpx.post(f"{settings.serve_url}/predict", timeout=30, json={
        "instances": [PIXELS[0].tolist(), {"b64": png_b64(PIXELS[1])}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert resp.headers["x-model-version"] == body["model_version"] == v["good"]
    assert len(body["predictions"]) == 2
    for pred in body["predictions"]:
        assert pred["model_version"] == v["good"] and pred["request_id"]
        assert set(pred["probabilities"]) == {str(i) for i in range(10)}
        assert abs(sum(pred["probabilities"].values()) - 1) < 1e-3
        assert pred["label"] == max(pred["probabilities"], key=pred["probabilities"].get)
    health = httpx.get(f"{settings.serve_url}/health", timeout=10).json()
    assert health["stable"] == v["good"] and health["canary"] is None


def test_a_deploy_naming_no_option_moves_only_the_routing(served):
    """The loop controller deploys with no deployment option. An app it did not start (two replicas
    here; the RayService's on Kubernetes) keeps its replicas and options: only the routing moves."""
    from flowops import serving

    settings, v = served
    before = serving.routing_status(settings)
    assert len(before["replicas"]) == 2
    status = serving.deploy(settings, stable=v["good"], canary=v["other"], weight=0)
    assert status["canary"] == v["other"] and status["weight"] == 0
    assert status["deployment_hash"] == before["deployment_hash"]
    assert set(status["replicas"]) == set(before["replicas"])  # the same replicas: nothing restarted
    status = serving.deploy(settings, stable=v["good"])
    assert status["canary"] is None and set(status["replicas"]) == set(before["replicas"])


def test_canary_share_and_sticky_routing(served):
    from flowops import serving

    settings, v = served
    status = serving.set_canary(settings, v["other"], weight=10)
    assert status["ready"] and status["canary"] == v["other"] and status["weight"] == 10
    responses = asyncio.run(_fire(settings.serve_url, 1000, 16))
    assert all(r.status_code == 200 for r in responses)
    share = sum(r.headers["x-model-version"] == v["other"] for r in responses) / len(responses)
    assert 0.06 <= share <= 0.14, share

    # Sticky: one key always gets one version; many keys spread over both.
    by_key = asyncio.run(_fire(settings.serve_url, 200, 8,
                               headers_for=lambda i: {"X-Routing-Key": f"user-{i % 40}"}))
    seen: dict[str, set] = {}
    for r in by_key:
        seen.setdefault(r.request.headers["x-routing-key"], set()).add(r.headers["x-model-version"])
    assert all(len(versions) == 1 for versions in seen.values())
    serving.set_weight(settings, 50)
    spread = asyncio.run(_fire(settings.serve_url, 100, 8,
                               headers_for=lambda i: {"X-Routing-Key": f"user-{i}"}))
    assert {r.headers["x-model-version"] for r in spread} == {v["good"], v["other"]}


def test_weight_changes_and_rollback_under_load_lose_nothing(served):
    from flowops import serving

    settings, v = served
    serving.set_canary(settings, v["other"], weight=10)
    log: list[tuple[float, int, str]] = []
    stop = asyncio.Event()

    async def scenario() -> float:
        task = asyncio.create_task(_load(settings.serve_url, 8, stop, log))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(serving.set_weight, settings, 60)
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await asyncio.to_thread(serving.rollback, settings)
        await asyncio.sleep(2.5)
        stop.set()
        await task
        return t0

    t0 = asyncio.run(scenario())
    failures = [entry for entry in log if entry[1] != 200]
    assert not failures, failures[:5]
    assert any(ver == v["other"] for _, _, ver in log)  # the canary did answer before
    late_canary = [t for t, _, ver in log if ver == v["other"] and t > t0 + 2.0]
    assert not late_canary, "canary still answered more than 2 s after the rollback command"
    assert serving.routing_status(settings)["canary"] is None


def test_shadow_traffic_is_compared_not_returned(served):
    from flowops import serving

    settings, v = served
    serving.update_routing(settings, canary=v["other"], weight=0, shadow_pct=100)
    before = serving.ledger_snapshot(settings).get(v["other"], {}).get("shadow_total", 0)
    responses = asyncio.run(_fire(settings.serve_url, 60, 4))
    assert {r.headers["x-model-version"] for r in responses} == {v["good"]}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entry = serving.ledger_snapshot(settings)[v["other"]]
        if entry["shadow_total"] - before >= 60:
            break
        time.sleep(0.2)
    assert entry["shadow_total"] - before == 60
    assert 0 < entry["shadow_agree"] <= entry["shadow_total"]  # two fitted models mostly agree
    serving.rollback(settings)


def test_failing_canary_is_counted_and_answered_by_stable(served):
    from flowops import serving

    settings, v = served
    serving.set_canary(settings, v["broken"], weight=100)
    responses = asyncio.run(_fire(settings.serve_url, 30, 4))
    assert all(r.status_code == 200 and r.headers["x-model-version"] == v["good"] for r in responses)
    time.sleep(0.4)
    assert serving.ledger_snapshot(settings)[v["broken"]]["errors"] >= 30
    serving.rollback(settings)


def test_any_image_reaches_any_task_and_a_bad_one_is_a_400(served):
    """Colour, grayscale, odd-sized, EXIF-rotated and transparent image files, and colour pixel
    arrays, reach the 8x8 grayscale digits model through its own preprocessing; a canary of another
    task (12x12 RGB, normalised) gets the same request decoded its own way; an image no task can
    read is a 400 JSON error naming the instance."""
    import base64

    from flowops import serving
    from tests.unit.test_same_tensor import IMAGES, _as_pixels

    settings, v = served
    url = f"{settings.serve_url}/predict"
    instances = [{"b64": base64.b64encode(raw).decode()} for raw in IMAGES.values()]
    instances += [_as_pixels(IMAGES["RGB PNG 37x53"]).tolist(),
                  _as_pixels(IMAGES["RGBA PNG 37x53"]).tolist()]
    for version in (v["good"], v["colour"]):
        if version == v["colour"]:
            assert serving.set_canary(settings, v["colour"], weight=100)["ready"]
        resp = httpx.post(url, json={"instances": instances}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-model-version"] == version
        assert len(resp.json()["predictions"]) == len(instances)
    serving.rollback(settings)
    for body, message in (([{"b64": "QUJDRA=="}], "instances[0]: not a decodable image"),
                          ([[[[0, 1], [2, 3]]]], "1 (gray), 3 (RGB) or 4 (RGBA)")):
        bad = httpx.post(url, json={"instances": body}, timeout=30)
        assert bad.status_code == 400 and message in bad.json()["error"], bad.text


def test_feedback_counts_once_per_prediction(served):
    from flowops import serving

    settings, v = served
    pred = httpx.post(f"{settings.serve_url}/predict", json=_body(3), timeout=30).json()["predictions"][0]
    before = serving.ledger_snapshot(settings)[v["good"]]
    resp = httpx.post(f"{settings.serve_url}/feedback", timeout=30,
                      json={"request_id": pred["request_id"], "label": str(LABELS[3])})
    assert resp.status_code == 200, resp.text
    assert resp.json()["correct"] == (pred["label"] == str(LABELS[3]))
    after = serving.ledger_snapshot(settings)[v["good"]]
    assert after["feedback_total"] == before["feedback_total"] + 1
    again = httpx.post(f"{settings.serve_url}/feedback", timeout=30,
                       json={"request_id": pred["request_id"], "label": "3"})
    assert again.status_code == 404 and "request_id" in again.json()["error"]


def test_admin_routes_need_the_admin_key(served):
    settings, _ = served
    url = f"{settings.serve_url}/routing"
    assert httpx.put(url, json={"weight": 5}, timeout=10).status_code == 401
    wrong = httpx.put(url, json={"weight": 5}, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 403 and "nope" not in wrong.text
    for path in ("/routing/rollback", "/routing/promote"):
        assert httpx.post(f"{settings.serve_url}{path}", timeout=10).status_code == 401


def test_size_and_count_limits(served):
    settings, _ = served
    too_many = {"instances": [PIXELS[0].tolist()] * 65}
    resp = httpx.post(f"{settings.serve_url}/predict", json=too_many, timeout=30)
    assert resp.status_code == 400 and "too many instances" in resp.json()["error"]
    huge = b'{"instances": [' + b"0," * (3 * 1024 * 1024) + b"0]}"
    resp = httpx.post(f"{settings.serve_url}/predict", content=huge, timeout=30)
    assert resp.status_code == 413 and "limit" in resp.json()["error"]
    resp = httpx.post(f"{settings.serve_url}/predict", json={"instances": [{"b64": png_b64(PIXELS[0])[:40]}]})
    assert resp.status_code == 400 and "instances[0]" in resp.json()["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=30,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda x: json.dumps(x).encode()),
    st.builds(lambda inst: json.dumps({"instances": inst}).encode(),
              st.lists(json_values | st.lists(st.lists(st.floats() | st.integers(-999, 999),
                                                       max_size=9), max_size=9), max_size=4)),
    st.builds(lambda b: json.dumps({"instances": [{"b64": b}]}).encode(), st.text(max_size=60)),
)


@pytest.mark.slow
def test_bad_input_never_gives_a_500(served):
    settings, _ = served
    client = httpx.Client(timeout=30)

    @hsettings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/predict", "/feedback", "/labelstudio/predict",
                                               "/labelstudio/webhook"]))
    def check(body: bytes, route: str) -> None:
        resp = client.post(f"{settings.serve_url}{route}", content=body,
                           headers={"content-type": "application/json"})
        assert resp.status_code < 500, (route, body[:200], resp.text)
        assert "error" in resp.json() or resp.status_code < 300

    check()
    client.close()


def test_metrics_reach_prometheus_and_the_cli_shows_status(served):
    settings, v = served
    asyncio.run(_fire(settings.serve_url, 20, 2))
    deadline, text = time.monotonic() + 40, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=10).text
        if "flowops_serve_requests_total" in text and "flowops_serve_latency_ms" in text:
            break
        time.sleep(2)
    assert f'version="{v["good"]}"' in text and "flowops_serve_requests_total" in text
    out = run_cli("serve", "status", "--ledger", "--json", check=True, timeout=120)
    status = json.loads(out.stdout)
    assert status["stable"] == v["good"] and status["ledger"][v["good"]]["requests"] > 0


LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="choice" toName="image" choice="single">
    <Choice value="0"/><Choice value="1"/><Choice value="2"/><Choice value="3"/><Choice value="4"/>
    <Choice value="5"/><Choice value="6"/><Choice value="7"/><Choice value="8"/><Choice value="9"/>
  </Choices>
</View>"""


def test_label_studio_round_trip(served):
    from PIL import Image

    from flowops.labels import new_labels

    settings, v = served
    base = f"{settings.serve_url}/labelstudio"
    pixels, _ = digits_pixels(2, seed=3)
    folder = settings.workspace / "ls-images"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[1].astype("uint8"), mode="L").save(folder / "digit-17.png")

    health = httpx.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    setup = httpx.post(f"{base}/setup", timeout=10, json={
        "project": "1.1700000000", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080",
        "access_token": "secret-token", "model_version": "", "extra_params": None})
    assert setup.status_code == 200 and setup.json()["model_version"] == v["good"]

    tasks = [
        {"id": 1, "data": {"image": f"data:image/png;base64,{png_b64(pixels[0])}"}, "meta": {},
         "annotations": [], "predictions": [], "project": 1},
        {"id": 2, "data": {"image": "/data/local-files/?d=ls-images/digit-17.png"}, "meta": {},
         "annotations": [], "predictions": [], "project": 1},
        {"id": 3, "data": {"image": "http://example.com/x.png"}, "project": 1},
    ]
    resp = httpx.post(f"{base}/predict", timeout=60, json={
        "tasks": tasks, "model_version": None, "project": "1.1700000000",
        "label_config": LABEL_CONFIG, "params": {"login": None, "password": None, "context": None}})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 3
    for r in results[:2]:
        assert r["model_version"] == v["good"] and 0 < r["score"] <= 1
        (choice,) = r["result"]
        assert choice["from_name"] == "choice" and choice["to_name"] == "image"
        assert choice["type"] == "choices" and choice["value"]["choices"][0] in "0123456789"
    assert results[2]["result"] == [] and "localhost" in results[2]["error"]

    escape = httpx.post(f"{base}/predict", timeout=30, json={
        "tasks": [{"id": 9, "data": {"image": "/data/local-files/?d=../../etc/passwd"}}],
        "label_config": LABEL_CONFIG})
    assert escape.status_code == 422 and "allowed folder" in escape.json()["error"]

    event = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 11, "completed_by": 1, "was_cancelled": False, "ground_truth": False,
                       "lead_time": 3.2, "task": 2, "project": 1,
                       "result": [{"id": "a1", "type": "choices", "from_name": "choice",
                                   "to_name": "image", "origin": "manual",
                                   "value": {"choices": ["7"]}}]},
        "task": {"id": 2, "data": {"image": "/data/local-files/?d=ls-images/digit-17.png"},
                 "project": 1, "is_labeled": True},
        "project": {"id": 1, "title": "digits"},
    }
    hook = httpx.post(f"{base}/webhook", json=event, timeout=30)
    assert hook.status_code == 201, hook.text
    labels = {r["task_id"]: r for r in new_labels(settings)}
    assert labels["labelstudio-2"]["image_id"] == "digit-17"
    assert labels["labelstudio-2"]["label"] == "7" and labels["labelstudio-2"]["source"] == "labelstudio"

    other = httpx.post(f"{base}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert other.status_code == 200 and other.json()["status"] == "ignored"


def test_promote_makes_the_canary_stable_and_moves_the_alias(served):
    from flowops import serving
    from flowops.model import resolve_model_version
    from flowops.refs import ModelRef

    settings, v = served
    production = ModelRef.production(settings.model_name).uri
    serving.set_canary(settings, v["other"], weight=20)
    status = serving.promote_canary(settings)
    assert status["stable"] == v["other"] and status["canary"] is None and status["ready"]
    responses = asyncio.run(_fire(settings.serve_url, 20, 4))
    assert {r.headers["x-model-version"] for r in responses} == {v["other"]}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if resolve_model_version(settings, production)[1] == v["other"]:
            break
        time.sleep(0.5)
    assert resolve_model_version(settings, production)[1] == v["other"]
    nothing = httpx.post(f"{settings.serve_url}/routing/promote", timeout=30,
                         headers={"Authorization": f"Bearer {serving.admin_key(settings)}"})
    assert nothing.status_code == 409


def test_a_replica_killed_under_load_fails_only_a_response_it_had_begun(served):
    """One of the two replicas is SIGKILLed while 16 clients send predictions. HAProxy replays each
    request the dead replica held on its sibling (settings.HAPROXY_RETRY_ON: L7 retries on a
    request buffered whole; without the buffering a few requests per kill were dropped with a
    silently closed connection), and Serve replaces the replica.

    What HAProxy cannot replay is a response already begun: the replica's HTTP server (uvicorn)
    writes the status line and headers and then the body in two send() calls, ~0.1-0.5 ms apart,
    and HAProxy passes the headers on at once; a kill between the two leaves the client a 200
    whose body never comes (HAProxy logs it `SD--`, 200, headers' bytes only; httpx: "peer closed
    connection without sending complete message body"). Measured in a loop of this scenario:
    1 such request in 42 kills (~134,000 requests), nothing else failed. So: no HTTP error, and
    no failure but a response cut after its headers, at most two per kill."""
    import os
    import signal

    from ray.util.state import list_actors

    from flowops import serving

    settings, _ = served
    serving.rollback(settings)
    replicas = [a for a in list_actors(address=settings.job_api, filters=[("state", "=", "ALIVE")],
                                       limit=1000)
                if a.class_name.startswith("ServeReplica:classifier")]
    assert len(replicas) == 2, [a.class_name for a in replicas]
    log: list[tuple[float, int, str]] = []
    stop = asyncio.Event()

    async def scenario() -> int:
        task = asyncio.create_task(_load(settings.serve_url, 16, stop, log))
        await asyncio.sleep(2.0)
        before = len(log)
        os.kill(replicas[0].pid, signal.SIGKILL)
        await asyncio.sleep(6.0)
        stop.set()
        await task
        return before

    before = asyncio.run(scenario())
    assert before > 20 and len(log) > before + 20  # traffic flowed before and after the kill
    failed = [(code, what) for _, code, what in log if code != 200]
    assert len(failed) <= 2 and all(
        code == 0 and "without sending complete message body" in what for code, what in failed), \
        f"{len(failed)} of {len(log)} requests failed: {failed[:10]}"

