"""The HTTP edge of the classifier app: FastAPI dependencies for keys and body limits, and the one
mapping of FlowOps errors to JSON answers.

A route declares what it needs (`dependencies=[Depends(require_admin_key)]`,
`body: PredictRequest = Depends(json_body(PredictRequest))`) and raises FlowOps errors; the
app's one exception handler (`flowops_error`) answers `{"error": "..."}` with the error's status.
The dependencies find their replica's keys and limits in its `HttpPolicy` (Serve runs one ingress
object per replica process and names it in the replica context).
"""

# No `from __future__ import annotations`: FastAPI must see real annotation objects (Request).

import base64
import binascii
import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from flowops.errors import FlowOpsError, InvalidInput, describe_validation_error, validated_json

SMALL_BODY_BYTES = 64 * 1024  # feedback and routing changes


class Unauthorized(FlowOpsError):
    """No key was sent."""

    http_status = 401


class Forbidden(FlowOpsError):
    """A wrong key was sent, or the route needs a key that the server does not have."""

    http_status = 403


class TooLarge(FlowOpsError):
    """The request body is over the limit."""

    http_status = 413


@dataclass(frozen=True)
class HttpPolicy:
    """The keys and the body limit one replica enforces."""

    admin_key: str | None
    api_key: str | None
    require_api_key: bool
    max_body_bytes: int


def current_policy() -> HttpPolicy:
    """The policy of the replica serving this request."""
    from ray import serve

    return serve.get_replica_context().servable_object.http


# Errors ------------------------------------------------------------------------------------------


async def flowops_error(request: Request, exc: FlowOpsError) -> JSONResponse:
    """The exception handler: `{"error": message, **exc.details}` with the error's status."""
    return JSONResponse({"error": str(exc), **getattr(exc, "details", {})},
                        status_code=exc.http_status)


async def parameters_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks (query and header parameters) answer like the bodies' do: 400."""
    return await flowops_error(request, InvalidInput(describe_validation_error(exc, "invalid request")))


# Keys --------------------------------------------------------------------------------------------


def sent_key(request: Request) -> str | None:
    """The key a request carries: `X-API-Key`, `Authorization: Bearer <key>`, or Basic auth with
    the key as password (what Label Studio sends)."""
    sent = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not sent and auth.lower().startswith("bearer "):
        sent = auth[7:].strip()
    elif not sent and auth.lower().startswith("basic "):
        try:
            sent = base64.b64decode(auth[6:].strip()).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            sent = None
    return sent or None


def check_key(sent: str | None, expected: str | None) -> None:
    """401 when no key is sent, 403 when it is wrong (constant-time compare; never logged)."""
    if not expected:
        raise Forbidden("this route needs a key, and none is configured on the server "
                        "(FLOWOPS_ADMIN_KEY / FLOWOPS_API_KEY)")
    if not sent:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("wrong API key")


async def require_admin_key(request: Request, policy: HttpPolicy = Depends(current_policy)) -> None:
    check_key(sent_key(request), policy.admin_key)


async def require_api_key(request: Request, policy: HttpPolicy = Depends(current_policy)) -> None:
    """Prediction routes: the API key when the app was deployed with `require_api_key`."""
    if policy.require_api_key:
        check_key(sent_key(request), policy.api_key)


# Bodies ------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is over `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(model: type[BaseModel], limit: int | None = None):
    """Dependency: the body as `model` (InvalidInput saying what is wrong), read up to `limit`
    bytes (default: the app's `max_body_bytes`)."""

    async def body(request: Request, policy: HttpPolicy = Depends(current_policy)) -> BaseModel:
        raw = await read_body(request, limit or policy.max_body_bytes)
        return validated_json(model, raw, "invalid request body")

    return body
