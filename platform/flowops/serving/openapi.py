"""The classifier app's OpenAPI document (`/openapi.json`, `/docs`): what each route accepts and
answers, as strictly as the replica serving it checks.

- Request bodies are read by dependencies (`http.json_body`), so each route names its body model
  (`route(body=...)`); `document` moves the models into `components/schemas`.
- Answers: each route declares its 2xx model and its errors (`route(errors=(400, 404), ...)`): the
  `{"error": "..."}` body of `http.flowops_error`, with the status each FlowOps error has.
- Keys: the admin key (`X-API-Key` or `Authorization: Bearer`) and the API key (also Basic auth with
  the key as password, which Label Studio sends) are security schemes; the API key is optional when
  the app runs without `require_api_key`.
- What a replica's config decides (images per call, the model a `models:/` URI may name, whether the
  API key is needed) is written into the document the replica serves (`Served`).

Light: pydantic and FastAPI's schema builder; Ray only to ask the replica for its config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from flowops.refs import model_ref_pattern
from flowops.serving.config import ServeAppConfig

REF = "#/components/schemas/"

# Errors ------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error answer: `error` says what was wrong (some add details, e.g. `results`)."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(..., description="What was wrong, in one line.")


ERRORS = {
    400: "Invalid input: not JSON, or a field or parameter of a wrong shape, type or value (the "
         "error names it)",
    401: "No key was sent (`Authorization: Bearer <key>` or `X-API-Key: <key>`)",
    403: "A wrong key, or a route whose key the server does not have",
    404: "Not found",
    409: "Conflicts with the current routing",
    413: "The request body is over the app's limit (max_body_bytes; 64 KiB for small bodies)",
    422: "Understood, but nothing in it could be used",
    503: "The model failed (not the request)",
}


def error_answers(*codes: int, **described: str) -> dict[int, dict[str, Any]]:
    """`responses=` entries for the error statuses of a route (`_404="unknown request_id"` words
    one of them for that route)."""
    return {code: {"model": ErrorBody, "description": described.get(f"_{code}", ERRORS[code])}
            for code in codes}


# Keys --------------------------------------------------------------------------------------------

SECURITY_SCHEMES = {
    "AdminKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                 "description": "The admin key (FLOWOPS_ADMIN_KEY, or the file the deployer wrote)."},
    "AdminBearer": {"type": "http", "scheme": "bearer",
                    "description": "The admin key as `Authorization: Bearer <key>`."},
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "The API key (FLOWOPS_API_KEY); needed only when the app is deployed "
               "with require_api_key."},
    "ApiBearer": {"type": "http", "scheme": "bearer",
                  "description": "The API key as `Authorization: Bearer <key>`."},
    "ApiBasic": {"type": "http", "scheme": "basic",
                 "description": "The API key as the password of basic auth (what Label Studio "
                 "sends); the user name is ignored."},
}
ADMIN_SECURITY = [{"AdminKey": []}, {"AdminBearer": []}]
API_SECURITY = [{"ApiKey": []}, {"ApiBearer": []}, {"ApiBasic": []}]


def route(*, answers: dict[int, dict[str, Any]], body: type[BaseModel] | None = None,
          errors: tuple[int, ...] = (), keys: str | None = None, **described: str) -> dict[str, Any]:
    """The documentation options of a route (`openapi_extra`, `responses`): its body model (read
    by a dependency, so FastAPI cannot see it), its answers, its errors, and its key ('admin' or
    'api'; 401 and 403 join the errors)."""
    extra: dict[str, Any] = {}
    if body is not None:
        schema = body.model_json_schema(ref_template=f"{REF}{{model}}")
        extra["requestBody"] = {"content": {"application/json": {"schema": schema}},
                                "required": True}
    if keys:
        extra["security"] = {"admin": ADMIN_SECURITY, "api": API_SECURITY}[keys]
        errors = (*errors, 401, 403)
    return {"openapi_extra": extra, "responses": {**answers, **error_answers(*errors, **described)}}


# Answers -----------------------------------------------------------------------------------------


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Prediction(Open):
    label: str = Field(..., description="The most probable class.")
    score: float = Field(..., ge=0, le=1, description="Its probability.")
    probabilities: dict[str, float] = Field(..., description="Probability of every class.")
    model_version: str
    request_id: str = Field(..., description="Send it to POST /feedback with the true label.")


class PredictResponse(Open):
    predictions: list[Prediction] = Field(..., description="One per instance, in order.")
    model_version: str = Field(..., description="The version that answered (also the "
                               "X-Model-Version header).")


class FeedbackResponse(Open):
    request_id: str
    version: str = Field(..., description="The version that made the prediction.")
    predicted: str
    label: str
    correct: bool


class Health(Open):
    status: str
    model_name: str
    stable: str
    canary: str | None = None
    loaded: list[str]


class RoutingStatus(Open):
    app: str
    model_name: str
    epoch: int
    stable: str
    canary: str | None = None
    weight: int = Field(..., ge=0, le=100)
    shadow_pct: int = Field(..., ge=0, le=100)
    sticky_images: bool
    canary_fallback: bool
    ready: bool = Field(..., description="Every replica serves this routing.")
    replicas: dict[str, dict[str, Any]]
    deployment_hash: str | None = None


class Ledger(Open):
    since: float = Field(..., description="Unix time the counting started.")
    versions: dict[str, dict[str, Any]] = Field(..., description="Per version: requests, errors, "
                                                "latencies_ms (recent), feedback_correct/total, "
                                                "shadow_agree/total, ...")


class LabelStudioHealth(Open):
    status: str
    model_class: str
    model_version: str


class LabelStudioSetupResponse(Open):
    model_version: str


class LabelStudioTaskResult(Open):
    result: list[dict[str, Any]] = Field(..., description="A `choices` result for the project's "
                                         "<Choices> tag (empty when the task failed).")
    score: float
    model_version: str
    error: str | None = Field(None, description="Why this task got no prediction.")


class LabelStudioPredictResponse(Open):
    results: list[LabelStudioTaskResult] = Field(..., description="One per task, in order.")
    model_version: str


class LabelStudioWebhookResponse(Open):
    status: str = Field(..., description="ok (recorded) or ignored")
    recorded: int


def ok(model: type[BaseModel], status: int = 200, description: str = "Successful Response",
       headers: dict[str, str] | None = None) -> dict[int, dict[str, Any]]:
    """`responses=` entry of a success answer (with the string headers it always carries)."""
    out: dict[str, Any] = {"model": model, "description": description}
    if headers:
        out["headers"] = {name: {"description": text, "required": True, "schema": {"type": "string"}}
                          for name, text in headers.items()}
    return {status: out}


# The document ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What the replica serving the document enforces beyond the request models."""

    model_name: str | None = None
    max_instances: int = ServeAppConfig.model_fields["max_instances"].default
    require_api_key: bool = False


def served_here() -> Served:
    """The config of the replica this runs in (defaults outside a replica)."""
    try:
        from ray import serve

        replica = serve.get_replica_context().servable_object
        return Served(replica.versions.model_name, replica.cfg.max_instances,
                      replica.cfg.require_api_key)
    except Exception:  # noqa: BLE001 - not in a replica (tests, the deploying process)
        return Served()


def document(base: dict[str, Any], served: Served) -> dict[str, Any]:
    """FastAPI's document of the app (`base`, not changed) made exact: body models in components,
    FastAPI's own 422 answers dropped (the app answers 400 with `{"error"}`), the security schemes,
    and what `served` decides."""
    doc = copy.deepcopy(base)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for item in doc["paths"].values():
        for op in item.values():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content:
                content["schema"] = _hoist(content["schema"], schemas)
            validation = op.get("responses", {}).get("422", {})
            if "HTTPValidationError" in str(validation):
                op["responses"].pop("422")
            if op.get("security") == API_SECURITY and not served.require_api_key:
                op["security"] = [*API_SECURITY, {}]  # {}: no key needed
            op["responses"] = dict(sorted(op.get("responses", {}).items()))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"{REF}{unused}" not in str(doc["paths"]):
            schemas.pop(unused, None)
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    for model, field in (("PredictRequest", "instances"), ("LabelStudioPredict", "tasks")):
        if model in schemas:
            schemas[model]["properties"][field]["maxItems"] = served.max_instances
    if served.model_name and "RoutingUpdate" in schemas:
        props = schemas["RoutingUpdate"]["properties"]
        _set_pattern(props["stable"], model_ref_pattern(served.model_name))
        _set_pattern(props["canary"], f"^$|{model_ref_pattern(served.model_name)}")
    return doc


def _hoist(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A body model's schema into components (its $defs beside it); returns the $ref to it."""
    schema = dict(schema)
    schemas.update(schema.pop("$defs", {}))
    name = schema.get("title")
    if not name:
        return schema
    schemas[name] = schema
    return {"$ref": f"{REF}{name}"}


def _set_pattern(prop: dict[str, Any], pattern: str) -> None:
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "string":
            option["pattern"] = pattern


class DocumentedAPI(FastAPI):
    """A FastAPI app whose /openapi.json is `document(...)` for the replica serving it."""

    def openapi(self) -> dict[str, Any]:
        base = super().openapi()
        cached = getattr(self, "_documented", None)
        if cached is None or cached[0] is not base:
            self._documented = (base, document(base, served_here()))
        return self._documented[1]
