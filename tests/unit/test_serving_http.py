"""The classifier app's HTTP edge without Serve: key guards, body limits and error answers, on a
small FastAPI app built from the same dependencies and exception handler."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from fastapi import Depends, FastAPI, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict

from flowops.errors import Conflict, FlowOpsError
from flowops.serving.config import FeedbackRequest
from flowops.serving.http import (
    HttpPolicy,
    current_policy,
    flowops_error,
    json_body,
    parameters_invalid,
    require_admin_key,
    require_api_key,
)


class OpenBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    clash: bool = False


class _Client:
    """POSTs to an ASGI app in-process (httpx's ASGI transport)."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api

    def post(self, path: str, **kwargs) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.api)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                return await client.post(path, **kwargs)

        return asyncio.run(call())


def _client(require_api: bool = False, admin_key: str | None = "adm") -> _Client:
    api = FastAPI()
    api.add_exception_handler(FlowOpsError, flowops_error)
    api.add_exception_handler(RequestValidationError, parameters_invalid)
    policy = HttpPolicy(admin_key=admin_key, api_key="k", require_api_key=require_api,
                        max_body_bytes=1024)
    api.dependency_overrides[current_policy] = lambda: policy

    @api.post("/admin", dependencies=[Depends(require_admin_key)])
    async def admin(body: FeedbackRequest = Depends(json_body(FeedbackRequest, 100))):
        return body.model_dump()

    @api.post("/open", dependencies=[Depends(require_api_key)])
    async def open_route(body: OpenBody = Depends(json_body(OpenBody)), flag: bool = Query(False)):
        if body.clash:
            raise Conflict("it clashes")
        return body.model_dump(exclude_unset=True)

    return _Client(api)


BODY = {"request_id": "r", "label": "3"}


def test_admin_routes_answer_401_without_a_key_and_403_with_a_wrong_one():
    client = _client()
    assert client.post("/admin", json=BODY).status_code == 401
    wrong = client.post("/admin", json=BODY, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and "nope" not in wrong.text
    assert client.post("/admin", json=BODY, headers={"X-API-Key": "adm"}).json() == BODY
    assert client.post("/admin", json=BODY, headers={"Authorization": "Bearer adm"}).status_code == 200
    unset = _client(admin_key=None).post("/admin", json=BODY, headers={"X-API-Key": "adm"})
    assert unset.status_code == 403 and "none is configured" in unset.json()["error"]


def test_the_api_key_is_asked_only_when_required_and_label_studio_sends_it_as_password():
    assert _client().post("/open", json={"a": 1}).json() == {"a": 1}
    client = _client(require_api=True)
    assert client.post("/open", json={"a": 1}).status_code == 401
    basic = base64.b64encode(b"user:k").decode()
    assert client.post("/open", json={"a": 1}, headers={"Authorization": f"Basic {basic}"}).status_code == 200


@pytest.mark.parametrize("content,status,says", [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "should be an object"),
    (b"{" + b" " * 2000 + b"}", 413, "limit"),
    (b'{"clash": true}', 409, "clashes"),
])
def test_bad_bodies_and_raised_errors_answer_json_errors(content, status, says):
    resp = _client().post("/open", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status and says in resp.json()["error"]


def test_typed_bodies_are_checked_and_limited():
    client = _client()
    headers = {"X-API-Key": "adm"}
    typo = client.post("/admin", json={**BODY, "lable": "3"}, headers=headers)
    assert typo.status_code == 400 and "lable" in typo.json()["error"]
    big = client.post("/admin", json={**BODY, "label": "x" * 200}, headers=headers)
    assert big.status_code == 413


def test_fastapis_own_parameter_checks_answer_400_with_an_error():
    resp = _client().post("/open?flag=maybe", json={"a": 1})
    assert resp.status_code == 400 and resp.json()["error"].startswith("invalid request: query.flag")
