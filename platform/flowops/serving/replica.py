"""What one replica of the classifier app does; `flowops.serving.app` puts its routes on top.

Why one deployment that routes AND predicts: a separate router in front of model deployments makes
every request cross two processes (proxy -> router -> model) and roughly halves throughput on a
small machine. Here each replica holds the stable model and, during a rollout, the canary beside it
(a `VersionSet`); choosing a version is a function call, and `@serve.batch` batches concurrent
images per version. The routing and the exact ledger are shared through the app's state actor
(`flowops.serving.state`): replicas follow its routing and flush their counts to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics as serve_metrics

from flowops import labelstudio
from flowops.drift import InputWindow, write_window
from flowops.errors import Conflict, FlowOpsError, NotFound
from flowops.serving.config import FeedbackRequest, PredictRequest, RequestImages, ServeAppConfig
from flowops.serving.http import HttpPolicy
from flowops.serving.keys import ADMIN, API, read_key
from flowops.serving.models import ModelUnavailable, VersionSet, named_versions, next_routing
from flowops.serving.state import METRIC_BUCKETS_MS, LedgerBuffer, get_state_actor
from flowops.settings import get_settings
from flowops.tracking import configure_mlflow

log = logging.getLogger("flowops.serving")
SCORE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
UNLOAD_AFTER_S = 10.0  # a version leaving the routing stays loaded for the requests in flight
FLUSH_EVERY_S = 0.1


class TasksUnreadable(FlowOpsError):
    """No task of a Label Studio /predict call could be read; `details` holds each task's error."""

    http_status = 422

    def __init__(self, message: str, results: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.details = {"results": results}


class Metrics:
    """Prometheus metrics through Ray (exported as ray_flowops_serve_*), tagged by version."""

    def __init__(self) -> None:
        tags = ("version",)
        self.requests = serve_metrics.Counter("flowops_serve_requests_total",
                                        "Predictions answered, per model version.", tag_keys=tags)
        self.errors = serve_metrics.Counter("flowops_serve_errors_total",
                                      "Failed predictions, per model version.", tag_keys=tags)
        self.latency = serve_metrics.Histogram("flowops_serve_latency_ms", "Prediction latency (ms).",
                                         boundaries=METRIC_BUCKETS_MS, tag_keys=tags)
        self.scores = serve_metrics.Histogram("flowops_serve_score", "Top-class score of predictions.",
                                        boundaries=SCORE_BUCKETS, tag_keys=tags)
        self.feedbacks = serve_metrics.Counter("flowops_serve_feedback_total",
                                         "Feedback received, by version and correctness.",
                                         tag_keys=("version", "correct"))
        self.shadows = serve_metrics.Counter("flowops_serve_shadow_total",
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


class ClassifierReplica:
    """Routes each request to the stable or canary model it holds, batches, counts everything."""

    async def __init__(self, config: dict[str, Any]) -> None:
        # torch only here: the deploying process builds the app (and imports this module) but
        # never runs a replica.
        import torch

        from flowops.model import load_model, resolve_model_version

        torch.set_num_threads(1)
        self.cfg = cfg = ServeAppConfig.model_validate(config)
        self.settings = settings = get_settings(
            home=cfg.home, mlflow_tracking_uri=cfg.tracking_uri, model_name=cfg.model_name,
            storage_uri=cfg.storage_uri, storage_endpoint_url=cfg.storage_endpoint_url)
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.http = HttpPolicy(admin_key=read_key(settings, ADMIN, cfg.admin_key_file),
                               api_key=read_key(settings, API, cfg.api_key_file),
                               require_api_key=cfg.require_api_key, max_body_bytes=cfg.max_body_bytes)
        self.versions = VersionSet(
            cfg.model_name or settings.model_name,
            resolve=lambda ref: resolve_model_version(settings, ref.uri)[1],
            load=lambda ref: load_model(settings, ref.uri, device),  # network + task + classes
        )
        self.replica_id = uuid.uuid4().hex[:8]
        self.state = get_state_actor(cfg.name, settings)
        self.ledger = LedgerBuffer()
        self.metrics = Metrics()
        self.window = InputWindow(cfg.input_window_max)
        routing = {**cfg.routing(), **await self.versions.resolve(cfg.stable, cfg.canary)}
        self.epoch, routing = await self.state.init_routing.remote(routing, cfg.deployment_hash())
        await self._apply(routing)
        self._infer.set_max_batch_size(cfg.max_batch_size)
        self._infer.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        await self.state.report_replica.remote(self.replica_id, self.epoch, self.versions.loaded())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_routing()), loop.create_task(self._flush_loop())]
        if cfg.input_window_s > 0:
            self._tasks.append(loop.create_task(self._window_loop()))

    # Routing ------------------------------------------------------------------------------------

    async def _apply(self, routing: dict[str, Any]) -> None:
        """Load what the routing names (beside what runs), switch to it, unload the rest later."""
        await self.versions.load(routing)
        for version in self.versions.switch(routing):
            asyncio.get_running_loop().call_later(UNLOAD_AFTER_S, self.versions.unload, version)

    async def _follow_routing(self) -> None:
        while True:
            try:
                epoch, routing = await self.state.wait_change.remote(self.epoch, 5.0)
                if routing is None:  # the state actor restarted: it gets the routing back
                    epoch, routing = await self.state.adopt_routing.remote(
                        self.versions.routing, self.cfg.deployment_hash(), self.epoch)
                if epoch != self.epoch and routing is not None:
                    self.versions.follow(routing)  # weights now; a new canary once loaded
                    await self._apply(routing)
                    self.epoch = epoch
                await self.state.report_replica.remote(self.replica_id, self.epoch,
                                                       self.versions.loaded())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep following; the state actor restarts
                log.warning("routing follow failed: %s", type(exc).__name__)
                await asyncio.sleep(0.5)

    async def status(self) -> dict[str, Any]:
        """Routing, replicas, and whether every replica serves the current routing."""
        st = await self.state.status.remote()
        routing = st["routing"] or {}
        wanted = set(named_versions(routing))
        replicas = st["replicas"]
        ready = bool(replicas) and all(
            r["epoch"] == st["epoch"] and wanted <= set(r["loaded"]) for r in replicas.values()
        )
        return {"app": self.cfg.name, "model_name": self.versions.model_name, "epoch": st["epoch"],
                **routing, "ready": ready, "replicas": replicas,
                "deployment_hash": st["deployment_hash"]}

    async def _wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """The status once every replica serves the routing (or as it is after `timeout_s`)."""
        async def ready() -> dict[str, Any]:
            while not (status := await self.status())["ready"]:
                await asyncio.sleep(0.1)
            return status

        try:
            return await asyncio.wait_for(ready(), timeout_s)
        except asyncio.TimeoutError:
            return await self.status()

    async def change_routing(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a routing change here first (so a version that cannot load fails this call, 409),
        then publish it to every replica and wait until they serve it."""
        _, current = await self.state.get_routing.remote()
        resolved = await self.versions.resolve(changes.get("stable"), changes.get("canary"))
        routing = next_routing(current or self.versions.routing, changes, resolved)
        try:
            await self._apply(routing)
        except Exception as exc:  # noqa: BLE001 - whatever the loader raised, the version is unusable
            raise Conflict(f"cannot load model: {type(exc).__name__}: {exc}") from None
        await self.state.set_routing.remote(routing)
        return await self._wait_ready()

    async def promote(self, set_alias: bool) -> dict[str, Any]:
        """The canary becomes stable; then (never before) it gets the `production` alias."""
        _, current = await self.state.get_routing.remote()
        if not current or not current.get("canary"):
            raise Conflict("there is no canary to promote")
        status = await self.change_routing({"stable": current["canary"], "canary": None,
                                            "weight": 0, "shadow_pct": 0})
        if set_alias:
            self._in_background(self._registry_update, "alias", current["canary"])
        return status

    async def rollback(self) -> dict[str, Any]:
        """All traffic to stable: this replica at once, the others through the state actor."""
        _, current = await self.state.get_routing.remote()
        routing = {**(current or self.versions.routing), "canary": None, "weight": 0, "shadow_pct": 0}
        self.versions.drop_canary()
        await self.state.set_routing.remote(routing)
        if current and current.get("canary"):
            self._in_background(self._registry_update, "rolled_back", current["canary"])
        return await self._wait_ready(timeout_s=5)

    def _in_background(self, fn, *args) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(fn, *args))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _registry_update(self, what: str, version: str) -> None:
        """After a switch (never before it): move the production alias, or tag a rolled-back version."""
        name = self.versions.model_name
        try:
            client = configure_mlflow(self.settings)
            if what == "alias":
                client.set_registered_model_alias(name, "production", version)
            else:
                client.set_model_version_tag(name, version, "rolled_back", "true")
        except Exception as exc:  # noqa: BLE001 - traffic already moved; the registry is informational
            log.warning("registry update %s of version %s failed: %s", what, version,
                        type(exc).__name__)

    # Predictions --------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _infer(self, items: list[tuple[str, np.ndarray]]) -> list[Any]:
        """Batch of (version, image) -> class probabilities per image (or the exception raised).
        Each version's images were decoded by its own preprocessing, so a group stacks."""
        from flowops.model import predict_proba, to_batch

        out: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (version, _) in enumerate(items):
            groups.setdefault(version, []).append(i)
        for version, idx in groups.items():
            try:
                model = self.versions.loaded_model(version)
                probs = predict_proba(model.model, to_batch([items[i][1] for i in idx]))
                if probs.shape != (len(idx), len(model.classes)) or not np.isfinite(probs).all():
                    raise RuntimeError(f"version {version} returned malformed probabilities")
                for j, i in enumerate(idx):
                    out[i] = probs[j]
            except Exception as exc:  # noqa: BLE001 - returned per item, counted per version
                for i in idx:
                    out[i] = exc
        return out

    async def _predict_arrays(self, version: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities of `version` for images decoded by its preprocessing."""
        results = await asyncio.gather(*(self._infer((version, a)) for a in arrays))
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def _failed(self, version: str) -> None:
        self.ledger.count(version, "errors")
        self.metrics.error(version)

    async def predict(self, body: PredictRequest, routing_key: str | None) -> tuple[list[dict], str]:
        """POST /predict: (predictions, the version that answered)."""
        images = body.images(self.cfg.max_instances)
        key = routing_key or body.routing_key
        if key is None and self.versions.routing.get("sticky_images"):
            arrays = images.arrays(self._stable().preprocess)
            key = hashlib.blake2b(arrays[0].tobytes(), digest_size=8).hexdigest()
        return await self.classify(images, key)

    def _stable(self):
        return self.versions.loaded_model(self.versions.routing["stable"])

    async def classify(self, images: RequestImages, key: str | None) -> tuple[list[dict], str]:
        """Route, predict (canary failures fall back to stable), count, maybe shadow.

        Every image is decoded by stable's preprocessing first, so a bad image is the same 400
        whichever version would answer; a canary of another task decodes the images its own way.
        """
        start = time.perf_counter()
        stable_pre = self._stable().preprocess
        arrays = images.arrays(stable_pre)
        if self.cfg.input_window_s > 0:
            self.window.add(arrays, stable_pre)
        role, version = self.versions.choose(key)
        stable = self.versions.routing["stable"]
        try:
            mine = images.arrays(self.versions.loaded_model(version).preprocess)
            probs = await self._predict_arrays(version, mine)
        except Exception as exc:
            self._failed(version)
            if role != "canary" or not self.versions.routing.get("canary_fallback", True):
                raise ModelUnavailable(f"model version {version} failed: {type(exc).__name__}") from None
            role, version = "stable", stable
            probs = await self._predict_arrays(version, arrays)
        classes = self.versions.loaded_model(version).classes
        base = uuid.uuid4().hex[:16]
        preds = []
        for i, p in enumerate(probs):
            top = int(np.argmax(p))
            rid = f"{base}-{i}"
            preds.append({"label": classes[top], "score": round(float(p[top]), 6),
                          "probabilities": {c: round(float(x), 6) for c, x in zip(classes, p, strict=True)},
                          "model_version": version, "request_id": rid})
            self.ledger.prediction(rid, version, classes[top])
            self.metrics.score(version, float(p[top]))
        ms = (time.perf_counter() - start) * 1000.0
        self.ledger.request(version, ms)
        self.metrics.request(version, ms)
        canary = self.versions.shadow_target() if role == "stable" else None
        if canary:
            asyncio.get_running_loop().create_task(
                self._shadow(canary, images, [p["label"] for p in preds]))
        return preds, version

    async def _shadow(self, canary: str, images: RequestImages, labels: list[str]) -> None:
        try:
            model = self.versions.loaded_model(canary)
            probs = await self._predict_arrays(canary, images.arrays(model.preprocess))
        except Exception:  # noqa: BLE001 - a shadow failure is the canary's error, never the user's
            self._failed(canary)
            return
        agree = sum(model.classes[int(np.argmax(p))] == lab for p, lab in zip(probs, labels, strict=True))
        self.ledger.count(canary, "shadow_total", len(labels))
        self.ledger.count(canary, "shadow_agree", int(agree))
        self.metrics.shadow(canary, int(agree), len(labels) - int(agree))

    async def feedback(self, body: FeedbackRequest) -> dict[str, Any]:
        """Count the true label of an earlier prediction, once, for the version that answered."""
        result = await self.state.feedback.remote(body.request_id, body.label)
        if result is None:  # maybe still in this replica's buffer, or another replica's
            await self.ledger.flush(self.state)
            await asyncio.sleep(0.25)
            result = await self.state.feedback.remote(body.request_id, body.label)
        if result is None:
            raise NotFound(f"unknown request_id {body.request_id!r} (or feedback for it was "
                           "already counted)")
        self.metrics.feedback(result["version"], result["correct"])
        return result

    def health(self) -> dict[str, Any]:
        r = self.versions.routing
        return {"status": "ok", "model_name": self.versions.model_name, "stable": r["stable"],
                "canary": r.get("canary"), "loaded": self.versions.loaded()}

    async def ledger_snapshot(self) -> dict[str, Any]:
        await self.ledger.flush(self.state)
        return await self.state.snapshot.remote()

    # Ledger and live inputs -----------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.ledger.flush(self.state)

    async def _window_loop(self) -> None:
        """Write a sample of the live inputs every `input_window_s` for the drift monitor."""
        while True:
            await asyncio.sleep(self.cfg.input_window_s)
            if len(self.window.images) < self.cfg.input_window_min:
                continue  # too little traffic: the window grows until it is worth a test
            try:
                images = self.window.take()
                await asyncio.to_thread(write_window, self.settings, images, self.replica_id)
            except OSError as exc:  # a full disk, an unreachable store
                log.warning("could not write a live-input window: %s", str(exc).splitlines()[0][:200])

    # Label Studio ML backend ----------------------------------------------------------------------

    def label_studio_health(self) -> dict[str, Any]:
        return {"status": "UP", "model_class": "FlowOpsClassifier",
                "model_version": self.versions.routing["stable"]}

    def label_studio_setup(self, body: dict[str, Any]) -> dict[str, Any]:
        labelstudio.remember_setup(body)
        return {"model_version": self.versions.routing["stable"]}

    async def label_studio_predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """One prediction per task, in order; a task whose image cannot be read gets its error
        (TasksUnreadable when none can)."""
        tasks, schema = labelstudio.parse_predict_request(body, self.cfg.max_instances)
        roots = labelstudio.ImageRoots.from_config(self.cfg, self.settings)
        results: list[dict[str, Any]] = []
        for task in tasks:
            try:
                data = await labelstudio.fetch_task_image(task, schema, roots)
                images = RequestImages(lambda preprocess, data=data: [labelstudio.decode(data, preprocess)])
                preds, _ = await self.classify(images, str(task.get("id", "")) or None)
                results.append(labelstudio.task_result(preds[0], schema))
            except ModelUnavailable:
                raise
            except FlowOpsError as exc:
                results.append(labelstudio.task_error(exc, self.versions.routing["stable"]))
        if all("error" in r for r in results):
            raise TasksUnreadable("; ".join(r["error"] for r in results[:5]), results)
        return {"results": results, "model_version": self.versions.routing["stable"]}

    async def label_studio_webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(labelstudio.handle_webhook, self.settings, body)
