"""The classifier Serve application: one FastAPI ingress deployment that routes AND predicts.

Why one deployment: a separate router in front of model deployments makes every request cross two
processes (proxy -> router -> model) and roughly halves throughput on a small machine. Here each
replica holds the stable model and, during a rollout, the canary beside it; choosing a version is a
function call, and `@serve.batch` batches concurrent images per version.

Shared state lives in one named, detached actor per app (`ServingState`): the routing (stable,
canary, weight, shadow share; an epoch that increases on every change) and the exact per-version
ledger. Replicas long-poll it, so a change (a rollback) reaches every replica within milliseconds,
and they flush their counters to it every 0.1 s. Nothing restarts when the weights change.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI
# must see real annotation objects (Request) rather than names to resolve in lost globals.

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from flowops.errors import Conflict, FlowOpsError, InvalidInput, NotFound
from flowops.serving import ServeAppConfig, _model_uri

log = logging.getLogger("flowops.serving")
STATE_NAMESPACE = "flowops"
RECENT_LATENCIES = 2000
REMEMBERED_PREDICTIONS = 200_000
LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
SCORE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
STATUS = {InvalidInput: 400, NotFound: 404, Conflict: 409}


def state_actor_name(app_name: str) -> str:
    return f"flowops-serving-{app_name}"


def _empty_entry() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "latencies_ms": collections.deque(maxlen=RECENT_LATENCIES),
            "latency_hist": [0] * (len(LATENCY_BUCKETS_MS) + 1), "latency_sum_ms": 0.0,
            "feedback_correct": 0, "feedback_total": 0, "shadow_agree": 0, "shadow_total": 0}


@ray.remote(num_cpus=0, max_restarts=-1)
class ServingState:
    """Routing and the exact per-version ledger of one app, shared by all of its replicas."""

    def __init__(self) -> None:
        self.epoch = 0
        self.routing: dict[str, Any] | None = None
        self.deployment_hash: str | None = None
        self.changed = asyncio.Event()
        self.ledger: dict[str, dict[str, Any]] = collections.defaultdict(_empty_entry)
        self.predictions: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.since = time.time()

    async def init_routing(self, routing: dict[str, Any], deployment_hash: str) -> tuple[int, dict]:
        """A replica starting: a new deployment's arguments win; a restart keeps runtime changes."""
        if self.routing is None or self.deployment_hash != deployment_hash:
            self.deployment_hash = deployment_hash
            await self.set_routing(routing)
        return self.epoch, self.routing

    async def set_routing(self, routing: dict[str, Any]) -> int:
        self.routing = dict(routing)
        self.epoch += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return self.epoch

    async def get_routing(self) -> tuple[int, dict[str, Any] | None]:
        return self.epoch, self.routing

    async def wait_change(self, epoch: int, timeout_s: float) -> tuple[int, dict[str, Any] | None]:
        if epoch == self.epoch:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.epoch, self.routing

    async def report_replica(self, replica: str, epoch: int, loaded: list[str]) -> None:
        self.replicas[replica] = {"epoch": epoch, "loaded": loaded, "seen": time.time()}

    async def flush(self, deltas: dict[str, dict[str, Any]], predictions: list[tuple]) -> None:
        for version, d in deltas.items():
            e = self.ledger[version]
            for key in ("requests", "errors", "shadow_agree", "shadow_total"):
                e[key] += d.get(key, 0)
            for ms in d.get("latencies_ms", ()):
                e["latencies_ms"].append(ms)
                e["latency_sum_ms"] += ms
                e["latency_hist"][_bucket(ms, LATENCY_BUCKETS_MS)] += 1
        for request_id, version, label in predictions:
            self.predictions[request_id] = (version, label)
        while len(self.predictions) > REMEMBERED_PREDICTIONS:
            self.predictions.popitem(last=False)

    async def feedback(self, request_id: str, label: str) -> dict[str, Any] | None:
        """Count the true label of an earlier prediction once; None when the id is unknown."""
        found = self.predictions.pop(request_id, None)
        if found is None:
            return None
        version, predicted = found
        correct = predicted == label
        e = self.ledger[version]
        e["feedback_total"] += 1
        e["feedback_correct"] += int(correct)
        return {"request_id": request_id, "version": version, "predicted": predicted,
                "label": label, "correct": correct}

    async def snapshot(self) -> dict[str, Any]:
        versions = {}
        for version, e in self.ledger.items():
            versions[version] = {**e, "latencies_ms": list(e["latencies_ms"]),
                                 "latency_buckets_ms": LATENCY_BUCKETS_MS}
        return {"since": self.since, "versions": versions}

    async def status(self) -> dict[str, Any]:
        now = time.time()
        live = {r: v for r, v in self.replicas.items() if now - v["seen"] < 15}
        self.replicas = live
        return {"epoch": self.epoch, "routing": self.routing, "replicas": live,
                "deployment_hash": self.deployment_hash}


def _bucket(value: float, bounds: list[float]) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


def get_state_actor(app_name: str):
    return ServingState.options(
        name=state_actor_name(app_name), namespace=STATE_NAMESPACE, lifetime="detached",
        get_if_exists=True,
    ).remote()


# Request bodies ----------------------------------------------------------------------------------


class B64Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(..., description="A PNG or JPEG file, base64-encoded.")


class PredictRequest(BaseModel):
    """KServe / TF-Serving v1: each instance is {"b64": ...} or a 2-D array of pixel values 0-255."""

    model_config = ConfigDict(extra="forbid")
    instances: list[B64Instance | list[list[float]]] = Field(..., min_length=1)
    routing_key: str | None = Field(None, max_length=256, description="Sticky routing key.")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(..., min_length=1, max_length=128)
    label: str = Field(..., min_length=1, max_length=128)


class RoutingUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stable: str | None = Field(None, min_length=1, max_length=128)
    canary: str | None = Field(None, max_length=128, description="null or '' removes the canary.")
    weight: int | None = Field(None, ge=0, le=100)
    shadow_pct: int | None = Field(None, ge=0, le=100)
    sticky_images: bool | None = None
    canary_fallback: bool | None = None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("request body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid request body: {_validation_message(exc)}") from None


def decode_instance(instance: Any, index: int, image_size: int) -> np.ndarray:
    from flowops.model import decode_image, pixels_to_array

    try:
        if isinstance(instance, B64Instance):
            try:
                data = base64.b64decode(instance.b64, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("b64 is not valid base64") from None
            return decode_image(data, image_size)
        arr = pixels_to_array(instance, image_size)
        return arr
    except InvalidInput as exc:
        raise InvalidInput(f"instances[{index}]: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. ragged rows, decompression bombs
        raise InvalidInput(f"instances[{index}]: cannot read image ({type(exc).__name__})") from None


def error_response(exc: Exception) -> JSONResponse:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
    return JSONResponse({"error": str(exc)}, status_code=status)


def _check_key(request: Request, expected: str | None) -> JSONResponse | None:
    """401 when no key is sent, 403 when it is wrong (constant-time compare; never logged)."""
    if not expected:
        return JSONResponse({"error": "this route needs a key, and none is configured on the "
                             "server (FLOWOPS_ADMIN_KEY / FLOWOPS_API_KEY)"}, status_code=403)
    sent = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not sent and auth.lower().startswith("bearer "):
        sent = auth[7:].strip()
    elif not sent and auth.lower().startswith("basic "):  # Label Studio's basic auth: key = password
        try:
            sent = base64.b64decode(auth[6:].strip()).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            sent = None
    if not sent:
        return JSONResponse({"error": "missing API key: send 'Authorization: Bearer <key>' or "
                             "'X-API-Key: <key>'"}, status_code=401)
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return JSONResponse({"error": "wrong API key"}, status_code=403)
    return None


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(InvalidInput):
    pass


def _read_key_file(path: str | None, env_name: str, default: Path) -> str | None:
    """A key from the file the deployer wrote, else the replica's environment, else the default
    file in the home folder."""
    for candidate in (path, None, default):
        if candidate is None:
            if os.environ.get(env_name):
                return os.environ[env_name].strip()
            continue
        try:
            value = Path(candidate).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return None


class _ModelFailed(FlowOpsError):
    """The model (not the request) failed: 503."""


class _Metrics:
    """Prometheus metrics through Ray (exported as ray_flowops_serve_*), tagged by version."""

    def __init__(self) -> None:
        from ray.serve import metrics

        tags = ("version",)
        self.requests = metrics.Counter("flowops_serve_requests_total",
                                        "Predictions answered, per model version.", tag_keys=tags)
        self.errors = metrics.Counter("flowops_serve_errors_total",
                                      "Failed predictions, per model version.", tag_keys=tags)
        self.latency = metrics.Histogram("flowops_serve_latency_ms", "Prediction latency (ms).",
                                         boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.scores = metrics.Histogram("flowops_serve_score", "Top-class score of predictions.",
                                        boundaries=SCORE_BUCKETS, tag_keys=tags)
        self.feedbacks = metrics.Counter("flowops_serve_feedback_total",
                                         "Feedback received, by version and correctness.",
                                         tag_keys=("version", "correct"))
        self.shadows = metrics.Counter("flowops_serve_shadow_total",
                                       "Shadow comparisons, by canary version and agreement.",
                                       tag_keys=("version", "agree"))

    def request(self, version: str, ms: float) -> None:
        tags = {"version": version}
        self.requests.inc(1, tags)
        self.latency.observe(ms, tags)

    def score(self, version: str, score: float) -> None:
        self.scores.observe(score, {"version": version})

    def error(self, version: str) -> None:
        self.errors.inc(1, {"version": version})

    def feedback(self, version: str, correct: bool) -> None:
        self.feedbacks.inc(1, {"version": version, "correct": str(correct).lower()})

    def shadow(self, version: str, agree: int, disagree: int) -> None:
        if agree:
            self.shadows.inc(agree, {"version": version, "agree": "true"})
        if disagree:
            self.shadows.inc(disagree, {"version": version, "agree": "false"})


# The deployment -----------------------------------------------------------------------------------

api = FastAPI(
    title="FlowOps classifier",
    description="Image classification with weighted canary routing, shadow traffic and a Label "
    "Studio ML backend under /labelstudio.",
)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, FlowOpsError):
        return error_response(exc)
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


@serve.deployment(name="Classifier")
@serve.ingress(api)
class Classifier:
    """Routes each request to the stable or canary model it holds, batches, counts everything."""

    async def __init__(self, config: dict[str, Any]):
        import torch

        from flowops.settings import get_settings

        torch.set_num_threads(1)
        self.cfg = ServeAppConfig.model_validate(config)
        self.settings = get_settings(home=self.cfg.home, mlflow_tracking_uri=self.cfg.tracking_uri,
                                     model_name=self.cfg.model_name)
        self.model_name = self.cfg.model_name or self.settings.model_name
        self.device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        keys = self.settings.home / "serve"
        self.admin_key = _read_key_file(self.cfg.admin_key_file, "FLOWOPS_ADMIN_KEY",
                                        keys / "admin_key")
        self.api_key = _read_key_file(self.cfg.api_key_file, "FLOWOPS_API_KEY", keys / "api_key")
        self.replica_id = uuid.uuid4().hex[:8]
        self.models: dict[str, Any] = {}
        self.state = get_state_actor(self.cfg.name)
        routing = self.cfg.routing()
        routing.update(await self._resolve(routing["stable"], routing["canary"]))
        self.epoch, self.routing = await self.state.init_routing.remote(
            routing, self.cfg.deployment_hash()
        )
        await self._apply(self.routing)
        self._infer.set_max_batch_size(self.cfg.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._pending: dict[str, dict[str, Any]] = collections.defaultdict(dict)
        self._pending_predictions: list[tuple[str, str, str]] = []
        self._metrics = _Metrics()
        await self.state.report_replica.remote(self.replica_id, self.epoch, sorted(self.models))
        from flowops.drift import InputWindow

        self._window = InputWindow(self.cfg.input_window_max)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_routing()), loop.create_task(self._flush_loop())]
        if self.cfg.input_window_s > 0:
            self._tasks.append(loop.create_task(self._window_loop()))

    # Models and routing -----------------------------------------------------------------------

    async def _resolve(self, stable: str | None, canary: str | None) -> dict[str, Any]:
        """Aliases -> version numbers (NotFound naming what exists)."""
        from flowops.model import resolve_model_version

        out: dict[str, Any] = {}
        if stable:
            out["stable"] = (await asyncio.to_thread(
                resolve_model_version, self.settings, _model_uri(self.model_name, stable)))[1]
        if canary:
            out["canary"] = (await asyncio.to_thread(
                resolve_model_version, self.settings, _model_uri(self.model_name, canary)))[1]
        return out

    async def _apply(self, routing: dict[str, Any]) -> None:
        """Load what the routing names (beside what runs), then drop versions no longer named."""
        from flowops.model import load_model

        wanted = [v for v in (routing.get("stable"), routing.get("canary")) if v]
        for version in wanted:
            if version not in self.models:
                loaded = await asyncio.to_thread(
                    load_model, self.settings, f"models:/{self.model_name}/{version}", self.device
                )
                self.models[version] = loaded.model
        self.routing = routing
        # Unload versions no longer named a little later, so requests in flight finish on them.
        for version in list(self.models):
            if version not in wanted:
                asyncio.get_running_loop().call_later(10.0, self._drop_if_unused, version)

    def _drop_if_unused(self, version: str) -> None:
        if version not in (self.routing.get("stable"), self.routing.get("canary"),
                           self.routing.get("_pending_canary")):
            self.models.pop(version, None)

    async def _follow_routing(self) -> None:
        while True:
            try:
                epoch, routing = await self.state.wait_change.remote(self.epoch, 5.0)
                if epoch != self.epoch and routing is not None:
                    # Weight-only changes apply at once; a new version is loaded first, and until
                    # then `choose` keeps its share on stable.
                    self.routing = {**routing, "canary": routing.get("canary")
                                    if routing.get("canary") in self.models else None,
                                    "_pending_canary": routing.get("canary")}
                    await self._apply(routing)
                    self.epoch = epoch
                await self.state.report_replica.remote(self.replica_id, self.epoch, sorted(self.models))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep following; the state actor restarts
                log.warning("routing follow failed: %s", type(exc).__name__)
                await asyncio.sleep(0.5)

    def choose(self, key: str | None) -> tuple[str, str]:
        """('stable'|'canary', version). Sticky when a key is given: a hash of it picks the bucket."""
        r = self.routing
        canary = r.get("canary")
        if not canary or canary not in self.models or not r.get("weight"):
            return "stable", r["stable"]
        if key is not None:
            bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
            x = (bucket % 10_000) / 100.0
        else:
            x = random.random() * 100.0
        return ("canary", canary) if x < r["weight"] else ("stable", r["stable"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _infer(self, items: list[tuple[str, np.ndarray]]) -> list[Any]:
        """Batch of (version, image) -> class probabilities per image (or the exception raised)."""
        from flowops.model import predict_proba, to_batch

        out: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, (version, _) in enumerate(items):
            groups[version].append(i)
        for version, idx in groups.items():
            model = self.models.get(version)
            try:
                if model is None:
                    raise RuntimeError(f"version {version} is not loaded on this replica")
                probs = predict_proba(model, to_batch([items[i][1] for i in idx]))
                if probs.shape != (len(idx), len(model.classes)) or not np.isfinite(probs).all():
                    raise RuntimeError(f"version {version} returned malformed probabilities")
                for j, i in enumerate(idx):
                    out[i] = probs[j]
            except Exception as exc:  # noqa: BLE001 - returned per item, counted per version
                for i in idx:
                    out[i] = exc
        return out

    async def _predict_arrays(self, version: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        results = await asyncio.gather(*(self._infer((version, a)) for a in arrays))
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    # Ledger ------------------------------------------------------------------------------------

    def _count(self, version: str, key: str, n: int = 1) -> None:
        entry = self._pending[version]
        entry[key] = entry.get(key, 0) + n

    async def _flush(self) -> None:
        if not self._pending and not self._pending_predictions:
            return
        deltas, self._pending = dict(self._pending), collections.defaultdict(dict)
        preds, self._pending_predictions = self._pending_predictions, []
        try:
            await self.state.flush.remote(deltas, preds)
        except Exception:  # noqa: BLE001 - put them back; the next flush retries
            for version, d in deltas.items():
                for key, value in d.items():
                    if key == "latencies_ms":
                        self._pending[version].setdefault(key, []).extend(value)
                    else:
                        self._count(version, key, value)
            self._pending_predictions.extend(preds)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self._flush()

    async def _window_loop(self) -> None:
        """Write a sample of the live inputs every `input_window_s` for the drift monitor."""
        from flowops.drift import write_window

        while True:
            await asyncio.sleep(self.cfg.input_window_s)
            if len(self._window.images) < self.cfg.input_window_min:
                continue  # too little traffic: the window grows until it is worth a test
            try:
                images = self._window.take()
                await asyncio.to_thread(write_window, self.settings, images, self.replica_id)
            except (OSError, ValueError) as exc:  # a full disk; images of two sizes (two models)
                log.warning("could not write a live-input window: %s", type(exc).__name__)

    # Routes --------------------------------------------------------------------------------------

    async def predict_instances(self, request: Request, body_model=PredictRequest):
        """Shared by /predict: returns (body, version) or raises FlowOpsError."""
        raw = await read_limited(request, self.cfg.max_body_bytes)
        req = parse_body(raw, PredictRequest)
        if len(req.instances) > self.cfg.max_instances:
            raise InvalidInput(f"too many instances: {len(req.instances)} (at most "
                               f"{self.cfg.max_instances} per call)")
        model_any = next(iter(self.models.values()))
        arrays = [decode_instance(inst, i, model_any.image_size)
                  for i, inst in enumerate(req.instances)]
        key = request.headers.get("x-routing-key") or req.routing_key
        if key is None and self.routing.get("sticky_images"):
            key = hashlib.blake2b(arrays[0].tobytes(), digest_size=8).hexdigest()
        return await self.classify(arrays, key)

    async def classify(self, arrays: list[np.ndarray], key: str | None) -> tuple[list[dict], str]:
        """Route, predict (canary failures fall back to stable), count, maybe shadow."""
        start = time.perf_counter()
        if self.cfg.input_window_s > 0:
            self._window.add(arrays)
        role, version = self.choose(key)
        stable = self.routing["stable"]
        try:
            probs = await self._predict_arrays(version, arrays)
        except Exception as exc:
            self._count(version, "errors")
            self._metrics.error(version)
            if role != "canary" or not self.routing.get("canary_fallback", True):
                raise _ModelFailed(f"model version {version} failed: {type(exc).__name__}") from None
            role, version = "stable", stable
            probs = await self._predict_arrays(version, arrays)
        classes = self.models[version].classes if version in self.models else None
        if classes is None:
            raise _ModelFailed(f"model version {version} was unloaded during the request")
        base = uuid.uuid4().hex[:16]
        preds = []
        for i, p in enumerate(probs):
            top = int(np.argmax(p))
            rid = f"{base}-{i}"
            preds.append({"label": classes[top], "score": round(float(p[top]), 6),
                          "probabilities": {c: round(float(x), 6) for c, x in zip(classes, p, strict=True)},
                          "model_version": version, "request_id": rid})
            self._pending_predictions.append((rid, version, classes[top]))
            self._metrics.score(version, float(p[top]))
        ms = (time.perf_counter() - start) * 1000.0
        self._count(version, "requests")
        self._pending[version].setdefault("latencies_ms", []).append(round(ms, 3))
        self._metrics.request(version, ms)
        canary = self.routing.get("canary")
        shadow = self.routing.get("shadow_pct") or 0
        if role == "stable" and canary and canary in self.models and shadow \
                and random.random() * 100 < shadow:
            asyncio.get_running_loop().create_task(
                self._shadow(canary, arrays, [p["label"] for p in preds]))
        return preds, version

    async def _shadow(self, canary: str, arrays: list[np.ndarray], labels: list[str]) -> None:
        try:
            probs = await self._predict_arrays(canary, arrays)
        except Exception:  # noqa: BLE001 - a shadow failure is the canary's error, never the user's
            self._count(canary, "errors")
            self._metrics.error(canary)
            return
        classes = self.models[canary].classes if canary in self.models else None
        if classes is None:
            return
        agree = sum(classes[int(np.argmax(p))] == lab for p, lab in zip(probs, labels, strict=True))
        self._count(canary, "shadow_total", len(labels))
        self._count(canary, "shadow_agree", int(agree))
        self._metrics.shadow(canary, int(agree), len(labels) - int(agree))

    def _gate(self, request: Request) -> JSONResponse | None:
        if self.cfg.require_api_key:
            return _check_key(request, self.api_key)
        return None

    @api.post("/predict", summary="Classify images (KServe v1: {'instances': [...]})",
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")}},
                  "required": True}})
    async def predict(self, request: Request):
        denied = self._gate(request)
        if denied:
            return denied
        try:
            preds, version = await self.predict_instances(request)
        except _ModelFailed as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        except _TooLarge as exc:
            return JSONResponse({"error": str(exc)}, status_code=413)
        except FlowOpsError as exc:
            return error_response(exc)
        return JSONResponse({"predictions": preds, "model_version": version},
                            headers={"X-Model-Version": version})

    @api.post("/feedback", summary="The true label of an earlier prediction")
    async def feedback(self, request: Request):
        denied = self._gate(request)
        if denied:
            return denied
        try:
            body = parse_body(await read_limited(request, 64 * 1024), FeedbackRequest)
        except FlowOpsError as exc:
            return error_response(exc)
        result = await self.state.feedback.remote(body.request_id, body.label)
        if result is None:  # maybe still in this replica's buffer, or another replica's
            await self._flush()
            await asyncio.sleep(0.25)
            result = await self.state.feedback.remote(body.request_id, body.label)
        if result is None:
            return JSONResponse({"error": f"unknown request_id {body.request_id!r} (or feedback for "
                                 "it was already counted)"}, status_code=404)
        self._metrics.feedback(result["version"], result["correct"])
        return JSONResponse(result)

    @api.get("/health", summary="Liveness and the versions served")
    async def health(self):
        r = self.routing
        return {"status": "ok", "model_name": self.model_name, "stable": r["stable"],
                "canary": r.get("canary"), "loaded": sorted(self.models)}

    async def _status(self) -> dict[str, Any]:
        st = await self.state.status.remote()
        routing = st["routing"] or {}
        wanted = {v for v in (routing.get("stable"), routing.get("canary")) if v}
        replicas = st["replicas"]
        ready = bool(replicas) and all(
            r["epoch"] == st["epoch"] and wanted <= set(r["loaded"]) for r in replicas.values()
        )
        return {"app": self.cfg.name, "model_name": self.model_name, "epoch": st["epoch"],
                **{k: v for k, v in routing.items() if not k.startswith("_")},
                "ready": ready, "replicas": replicas, "deployment_hash": st["deployment_hash"]}

    async def _wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status = await self._status()
        while not status["ready"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            status = await self._status()
        return status

    @api.get("/routing", summary="Current routing, replicas and readiness")
    async def get_routing(self):
        return await self._status()

    async def _set_routing(self, changes: dict[str, Any]) -> JSONResponse:
        _, current = await self.state.get_routing.remote()
        routing = {k: v for k, v in (current or self.routing).items() if not k.startswith("_")}
        if "canary" in changes and not changes["canary"]:
            changes["canary"] = None
        try:
            resolved = await self._resolve(changes.get("stable"), changes.get("canary"))
        except FlowOpsError as exc:
            return error_response(exc)
        routing.update(changes)
        routing.update(resolved)
        if routing.get("canary") == routing["stable"]:
            return JSONResponse({"error": f"canary and stable are the same version "
                                 f"({routing['stable']})"}, status_code=409)
        if not routing.get("canary"):
            routing.update(canary=None, weight=0)
        try:
            await self._apply(routing)  # load here first so a bad version fails this call
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"error": f"cannot load model: {type(exc).__name__}: {exc}"},
                                status_code=409)
        await self.state.set_routing.remote(routing)
        return JSONResponse(await self._wait_ready())

    @api.put("/routing", summary="Change stable/canary/weight/shadow at runtime (admin)")
    async def put_routing(self, request: Request):
        denied = _check_key(request, self.admin_key)
        if denied:
            return denied
        try:
            body = parse_body(await read_limited(request, 64 * 1024), RoutingUpdate)
        except FlowOpsError as exc:
            return error_response(exc)
        return await self._set_routing(body.model_dump(exclude_unset=True))

    @api.post("/routing/promote", summary="The canary becomes stable (admin)")
    async def promote(self, request: Request):
        denied = _check_key(request, self.admin_key)
        if denied:
            return denied
        _, current = await self.state.get_routing.remote()
        if not current or not current.get("canary"):
            return JSONResponse({"error": "there is no canary to promote"}, status_code=409)
        response = await self._set_routing({"stable": current["canary"], "canary": None,
                                            "weight": 0, "shadow_pct": 0})
        if response.status_code == 200 and request.query_params.get("alias", "true") != "false":
            self._in_background(self._registry_update, "alias", current["canary"])
        return response

    @api.post("/routing/rollback", summary="All traffic to stable, canary removed (admin)")
    async def rollback(self, request: Request):
        denied = _check_key(request, self.admin_key)
        if denied:
            return denied
        _, current = await self.state.get_routing.remote()
        routing = {**(current or self.routing), "canary": None, "weight": 0, "shadow_pct": 0}
        # Switch this replica at once; the others follow through the state actor's long-poll.
        self.routing = {**self.routing, "canary": None, "weight": 0, "shadow_pct": 0}
        await self.state.set_routing.remote(routing)
        if current and current.get("canary"):
            self._in_background(self._registry_update, "rolled_back", current["canary"])
        return JSONResponse(await self._wait_ready(timeout_s=5))

    def _in_background(self, fn, *args) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(fn, *args))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _registry_update(self, what: str, version: str) -> None:
        """After a switch (never before it): move the production alias, or tag a rolled-back version."""
        from flowops.tracking import configure_mlflow

        try:
            client = configure_mlflow(self.settings)
            if what == "alias":
                client.set_registered_model_alias(self.model_name, "production", version)
            else:
                client.set_model_version_tag(self.model_name, version, "rolled_back", "true")
        except Exception as exc:  # noqa: BLE001 - traffic already moved; the registry is informational
            log.warning("registry update %s of version %s failed: %s", what, version,
                        type(exc).__name__)

    @api.get("/ledger", summary="Exact per-version counters (shared by all replicas)")
    async def ledger(self):
        await self._flush()
        return await self.state.snapshot.remote()

    # Label Studio ML backend ----------------------------------------------------------------------

    @api.get("/labelstudio/health")
    @api.get("/labelstudio/")
    @api.get("/labelstudio")
    async def ls_health(self):
        return {"status": "UP", "model_class": "FlowOpsClassifier",
                "model_version": self.routing["stable"]}

    @api.post("/labelstudio/setup")
    async def ls_setup(self, request: Request):
        from flowops import labelstudio

        denied = self._gate(request)
        if denied:
            return denied
        try:
            body = labelstudio.parse_json(await read_limited(request, self.cfg.max_body_bytes))
        except FlowOpsError as exc:
            return error_response(exc)
        labelstudio.remember_setup(body)
        return {"model_version": self.routing["stable"]}

    @api.post("/labelstudio/predict")
    async def ls_predict(self, request: Request):
        from flowops import labelstudio

        denied = self._gate(request)
        if denied:
            return denied
        try:
            body = labelstudio.parse_json(await read_limited(request, self.cfg.max_body_bytes))
            tasks, schema = labelstudio.parse_predict_request(body, self.cfg.max_instances)
        except _TooLarge as exc:
            return JSONResponse({"error": str(exc)}, status_code=413)
        except FlowOpsError as exc:
            return error_response(exc)
        model_any = next(iter(self.models.values()))
        roots = labelstudio.ImageRoots.from_config(self.cfg, self.settings)
        results: list[dict[str, Any]] = []
        for task in tasks:
            try:
                data = await labelstudio.fetch_task_image(task, schema, roots)
                arr = labelstudio.decode(data, model_any.image_size)
                preds, version = await self.classify([arr], str(task.get("id", "")) or None)
                results.append(labelstudio.task_result(preds[0], schema))
            except _ModelFailed as exc:
                return JSONResponse({"error": str(exc)}, status_code=503)
            except FlowOpsError as exc:
                results.append(labelstudio.task_error(exc, self.routing["stable"]))
        if results and all("error" in r for r in results):
            return JSONResponse({"error": "; ".join(r["error"] for r in results[:5]),
                                 "results": results}, status_code=422)
        return {"results": results, "model_version": self.routing["stable"]}

    @api.post("/labelstudio/webhook")
    async def ls_webhook(self, request: Request):
        from flowops import labelstudio

        denied = self._gate(request)
        if denied:
            return denied
        try:
            body = labelstudio.parse_json(await read_limited(request, self.cfg.max_body_bytes))
            outcome = await asyncio.to_thread(labelstudio.handle_webhook, self.settings, body)
        except FlowOpsError as exc:
            return error_response(exc)
        return JSONResponse(outcome, status_code=201 if outcome.get("recorded") else 200)


def replica_options(cfg: ServeAppConfig) -> dict[str, Any]:
    """Ray actor options of a replica: fractional CPUs, a GPU when asked, the throughput-oriented
    replica settings of Serve (user code on the replica's event loop, buffered request logs)."""
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
           "OMP_NUM_THREADS": "1"}
    opts: dict[str, Any] = {"num_cpus": cfg.num_cpus, "runtime_env": {"env_vars": env}}
    if cfg.num_gpus:
        opts["num_gpus"] = cfg.num_gpus
    return opts


def bind_classifier(cfg: ServeAppConfig):
    return Classifier.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options=replica_options(cfg),
        logging_config={"enable_access_log": False},
        health_check_period_s=5,
    ).bind(cfg.model_dump())


# A bare model deployment (no routing, no ledger): the benchmark's reference -----------------------

bare_api = FastAPI(title="FlowOps bare model")


@serve.deployment(name="BareModel")
@serve.ingress(bare_api)
class BareModel:
    async def __init__(self, model_uri: str, home: str | None = None, tracking_uri: str | None = None,
                       max_batch_size: int = 32):
        import torch

        from flowops.model import load_model
        from flowops.settings import get_settings

        torch.set_num_threads(1)
        settings = get_settings(home=home, mlflow_tracking_uri=tracking_uri)
        loaded = await asyncio.to_thread(load_model, settings, model_uri)
        self.model, self.version = loaded.model, loaded.version
        self._infer.set_max_batch_size(max_batch_size)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _infer(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from flowops.model import predict_proba, to_batch

        return list(predict_proba(self.model, to_batch(arrays)))

    @bare_api.post("/predict")
    async def predict(self, request: Request):
        try:
            req = parse_body(await read_limited(request, 4 * 1024 * 1024), PredictRequest)
            arrays = [decode_instance(x, i, self.model.image_size) for i, x in enumerate(req.instances)]
        except FlowOpsError as exc:
            return error_response(exc)
        probs = await asyncio.gather(*(self._infer(a) for a in arrays))
        classes = self.model.classes
        preds = [{"label": classes[int(np.argmax(p))], "score": float(np.max(p)),
                  "probabilities": {c: float(x) for c, x in zip(classes, p, strict=True)},
                  "model_version": self.version} for p in probs]
        return JSONResponse({"predictions": preds}, headers={"X-Model-Version": self.version})


def bind_bare(model_uri: str, home: str | None, tracking_uri: str | None, num_cpus: float = 0.2):
    return BareModel.options(
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "OMP_NUM_THREADS": "1"}}},
        logging_config={"enable_access_log": False},
    ).bind(model_uri, home, tracking_uri)
