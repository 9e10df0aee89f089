"""The classifier Serve application: one FastAPI ingress deployment whose replicas route AND predict
(`ClassifierReplica`). This module holds only its routes: each declares its body and its key and
calls one replica method; errors are raised, and one handler (`http.flowops_error`) answers them.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI
# must see real annotation objects (Request, the bodies) rather than names to resolve in lost globals.

import logging
from typing import Any

from fastapi import Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from flowops.errors import FlowOpsError
from flowops.serving.config import (
    FeedbackRequest,
    LabelStudioPredict,
    LabelStudioSetup,
    LabelStudioWebhook,
    PredictRequest,
    RoutingUpdate,
    ServeAppConfig,
)
from flowops.serving.http import (
    SMALL_BODY_BYTES,
    flowops_error,
    json_body,
    parameters_invalid,
    require_admin_key,
    require_api_key,
)
from flowops.serving.openapi import (
    DocumentedAPI,
    FeedbackResponse,
    Health,
    LabelStudioHealth,
    LabelStudioPredictResponse,
    LabelStudioSetupResponse,
    LabelStudioWebhookResponse,
    Ledger,
    PredictResponse,
    RoutingStatus,
    ok,
    route,
)
from flowops.serving.replica import ClassifierReplica

log = logging.getLogger("flowops.serving")
ADMIN = [Depends(require_admin_key)]
API = [Depends(require_api_key)]

# What each route accepts and answers, for its OpenAPI document.
PREDICT = route(body=PredictRequest, keys="api", errors=(400, 413, 503), answers=ok(
    PredictResponse, headers={"X-Model-Version": "The version that answered."}),
    _400="Invalid input: not JSON, a wrong shape or value, an image that cannot be decoded, more "
    "than max_instances images")
FEEDBACK = route(body=FeedbackRequest, keys="api", errors=(400, 404, 413),
                 answers=ok(FeedbackResponse),
                 _404="Unknown request_id, or feedback for it was already counted")
ROUTING_CHANGE = {"answers": ok(RoutingStatus), "keys": "admin",
                  "_404": "A version or alias that does not exist",
                  "_409": "Canary and stable would be one version, or a version cannot be loaded"}
PUT_ROUTING = route(body=RoutingUpdate, errors=(400, 404, 409, 413), **ROUTING_CHANGE)
PROMOTE = route(errors=(400, 404, 409), **{**ROUTING_CHANGE,
                                            "_409": "There is no canary, or it cannot be loaded"})
ROLLBACK = route(answers=ok(RoutingStatus), keys="admin")
LS_HEALTH = route(answers=ok(LabelStudioHealth))
LS_SETUP = route(body=LabelStudioSetup, keys="api", errors=(400, 413),
                 answers=ok(LabelStudioSetupResponse))
LS_PREDICT = route(body=LabelStudioPredict, keys="api", errors=(400, 413, 422, 503),
                   answers=ok(LabelStudioPredictResponse),
                   _422="No task's image could be read (`results` holds each task's error)")
LS_WEBHOOK = route(body=LabelStudioWebhook, keys="api", errors=(400, 413), answers={
    **ok(LabelStudioWebhookResponse, 200, "Ignored"),
    **ok(LabelStudioWebhookResponse, 201, "Label recorded")})

api = DocumentedAPI(
    title="FlowOps classifier",
    description="Image classification with weighted canary routing, shadow traffic and a Label "
    "Studio ML backend under /labelstudio. Errors answer `{\"error\": \"...\"}` with the status "
    "listed per route.",
)
api.add_exception_handler(FlowOpsError, flowops_error)
api.add_exception_handler(RequestValidationError, parameters_invalid)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


@serve.deployment(name="Classifier")
@serve.ingress(api)
class Classifier(ClassifierReplica):
    """The routes of a replica (its behaviour is `ClassifierReplica`'s)."""

    @api.post("/predict", summary="Classify images (KServe v1: {'instances': [...]})",
              dependencies=API, **PREDICT)
    async def predict_route(
            self, body: PredictRequest = Depends(json_body(PredictRequest)),
            x_routing_key: str | None = Header(None, max_length=256, description="Sticky routing: "
                                               "one key always gets the same version.")):
        preds, version = await self.predict(body, x_routing_key)
        return JSONResponse({"predictions": preds, "model_version": version},
                            headers={"X-Model-Version": version})

    @api.post("/feedback", summary="The true label of an earlier prediction", dependencies=API,
              **FEEDBACK)
    async def feedback_route(self, body: FeedbackRequest = Depends(
            json_body(FeedbackRequest, SMALL_BODY_BYTES))):
        return await self.feedback(body)

    @api.get("/health", summary="Liveness and the versions served", responses=ok(Health))
    async def health_route(self):
        return self.health()

    @api.get("/routing", summary="Current routing, replicas and readiness",
             responses=ok(RoutingStatus))
    async def get_routing(self):
        return await self.status()

    @api.put("/routing", summary="Change stable/canary/weight/shadow at runtime (admin)",
             dependencies=ADMIN, **PUT_ROUTING)
    async def put_routing(self, body: RoutingUpdate = Depends(
            json_body(RoutingUpdate, SMALL_BODY_BYTES))):
        return await self.change_routing(body.model_dump(exclude_unset=True))

    @api.post("/routing/promote", summary="The canary becomes stable (admin)", dependencies=ADMIN,
              **PROMOTE)
    async def promote_route(self, alias: bool = Query(True, description="Then move the "
                                                      "`production` alias to the new stable.")):
        return await self.promote(set_alias=alias)

    @api.post("/routing/rollback", summary="All traffic to stable, canary removed (admin)",
              dependencies=ADMIN, **ROLLBACK)
    async def rollback_route(self):
        return await self.rollback()

    @api.get("/ledger", summary="Exact per-version counters (shared by all replicas)",
             responses=ok(Ledger))
    async def ledger_route(self):
        return await self.ledger_snapshot()

    # Label Studio ML backend ----------------------------------------------------------------------

    @api.get("/labelstudio/health", summary="Label Studio: health", **LS_HEALTH)
    @api.get("/labelstudio/", summary="Label Studio: health", **LS_HEALTH)
    @api.get("/labelstudio", summary="Label Studio: health", **LS_HEALTH)
    async def ls_health(self):
        return self.label_studio_health()

    @api.post("/labelstudio/setup", summary="Label Studio: connect a project", dependencies=API,
              **LS_SETUP)
    async def ls_setup(self, body: LabelStudioSetup = Depends(json_body(LabelStudioSetup))):
        return self.label_studio_setup(body.model_dump(by_alias=True))

    @api.post("/labelstudio/predict", summary="Label Studio: pre-annotate tasks",
              dependencies=API, **LS_PREDICT)
    async def ls_predict(self, body: LabelStudioPredict = Depends(json_body(LabelStudioPredict))):
        return await self.label_studio_predict(body.model_dump(exclude_unset=True))

    @api.post("/labelstudio/webhook", summary="Label Studio: annotation events",
              dependencies=API, **LS_WEBHOOK)
    async def ls_webhook(self, body: LabelStudioWebhook = Depends(json_body(LabelStudioWebhook))):
        outcome = await self.label_studio_webhook(body.model_dump(exclude_unset=True))
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
    if cfg.resources:
        opts["resources"] = dict(cfg.resources)
    return opts


def deployment_options(cfg: ServeAppConfig) -> dict[str, Any]:
    """Serve deployment options of the app: replicas, their actor options and placement."""
    opts: dict[str, Any] = {"num_replicas": cfg.num_replicas,
                            "max_ongoing_requests": cfg.max_ongoing_requests,
                            "ray_actor_options": replica_options(cfg),
                            "logging_config": {"enable_access_log": False},
                            "health_check_period_s": 5}
    if cfg.max_replicas_per_node:  # unset: Serve's default (no limit)
        opts["max_replicas_per_node"] = cfg.max_replicas_per_node
    return opts


def bind_classifier(cfg: ServeAppConfig):
    """The Serve application of `cfg` (the ingress deployment bound to its arguments)."""
    return Classifier.options(**deployment_options(cfg)).bind(cfg.model_dump())
