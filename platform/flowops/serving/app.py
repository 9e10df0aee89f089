"""The classifier Serve application: one FastAPI ingress deployment whose replicas route AND predict
(`ClassifierReplica`). This module holds only its routes: each declares its body and its key and
calls one replica method; errors are raised, and one handler (`http.flowops_error`) answers them.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI
# must see real annotation objects (Request, the bodies) rather than names to resolve in lost globals.

import logging
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from ray import serve

from flowops.errors import FlowOpsError
from flowops.serving.config import FeedbackRequest, PredictRequest, RoutingUpdate, ServeAppConfig
from flowops.serving.http import (
    SMALL_BODY_BYTES,
    flowops_error,
    json_body,
    json_object,
    openapi_body,
    require_admin_key,
    require_api_key,
)
from flowops.serving.replica import ClassifierReplica

log = logging.getLogger("flowops.serving")
ADMIN = [Depends(require_admin_key)]
API = [Depends(require_api_key)]

api = FastAPI(
    title="FlowOps classifier",
    description="Image classification with weighted canary routing, shadow traffic and a Label "
    "Studio ML backend under /labelstudio.",
)
api.add_exception_handler(FlowOpsError, flowops_error)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


@serve.deployment(name="Classifier")
@serve.ingress(api)
class Classifier(ClassifierReplica):
    """The routes of a replica (its behaviour is `ClassifierReplica`'s)."""

    @api.post("/predict", summary="Classify images (KServe v1: {'instances': [...]})",
              dependencies=API, openapi_extra=openapi_body(PredictRequest))
    async def predict_route(self, body: PredictRequest = Depends(json_body(PredictRequest)),
                            x_routing_key: str | None = Header(None)):
        preds, version = await self.predict(body, x_routing_key)
        return JSONResponse({"predictions": preds, "model_version": version},
                            headers={"X-Model-Version": version})

    @api.post("/feedback", summary="The true label of an earlier prediction", dependencies=API,
              openapi_extra=openapi_body(FeedbackRequest))
    async def feedback_route(self, body: FeedbackRequest = Depends(
            json_body(FeedbackRequest, SMALL_BODY_BYTES))):
        return await self.feedback(body)

    @api.get("/health", summary="Liveness and the versions served")
    async def health_route(self):
        return self.health()

    @api.get("/routing", summary="Current routing, replicas and readiness")
    async def get_routing(self):
        return await self.status()

    @api.put("/routing", summary="Change stable/canary/weight/shadow at runtime (admin)",
             dependencies=ADMIN, openapi_extra=openapi_body(RoutingUpdate))
    async def put_routing(self, body: RoutingUpdate = Depends(
            json_body(RoutingUpdate, SMALL_BODY_BYTES))):
        return await self.change_routing(body.model_dump(exclude_unset=True))

    @api.post("/routing/promote", summary="The canary becomes stable (admin)", dependencies=ADMIN)
    async def promote_route(self, alias: str = "true"):
        return await self.promote(set_alias=alias != "false")

    @api.post("/routing/rollback", summary="All traffic to stable, canary removed (admin)",
              dependencies=ADMIN)
    async def rollback_route(self):
        return await self.rollback()

    @api.get("/ledger", summary="Exact per-version counters (shared by all replicas)")
    async def ledger_route(self):
        return await self.ledger_snapshot()

    # Label Studio ML backend ----------------------------------------------------------------------

    @api.get("/labelstudio/health")
    @api.get("/labelstudio/")
    @api.get("/labelstudio")
    async def ls_health(self):
        return self.label_studio_health()

    @api.post("/labelstudio/setup", dependencies=API)
    async def ls_setup(self, body: dict[str, Any] = Depends(json_object)):
        return self.label_studio_setup(body)

    @api.post("/labelstudio/predict", dependencies=API)
    async def ls_predict(self, body: dict[str, Any] = Depends(json_object)):
        return await self.label_studio_predict(body)

    @api.post("/labelstudio/webhook", dependencies=API)
    async def ls_webhook(self, body: dict[str, Any] = Depends(json_object)):
        outcome = await self.label_studio_webhook(body)
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
    """The Serve application of `cfg` (the ingress deployment bound to its arguments)."""
    return Classifier.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options=replica_options(cfg),
        logging_config={"enable_access_log": False},
        health_check_period_s=5,
    ).bind(cfg.model_dump())
