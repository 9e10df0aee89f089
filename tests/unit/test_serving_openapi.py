"""The classifier app's OpenAPI document without a cluster: every body in components, every answer
declared, the keys as security schemes, and what a replica's config decides written in. (The live
app is fuzzed against its document in tests/integration/test_openapi.py.)"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowops.refs import ModelRef, model_ref_pattern


@pytest.fixture(scope="module")
def app():
    from flowops.serving.app import api

    return api


def _fastapis(app) -> dict:
    """The document FastAPI makes of the app (before `document` makes it exact)."""
    from fastapi import FastAPI

    return FastAPI.openapi(app)


def _operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield f"{method.upper()} {path}", op


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_body_and_answer_is_declared(app):
    from flowops.serving.openapi import ADMIN_SECURITY, API_SECURITY, Served, document

    doc = document(_fastapis(app), Served())
    assert app.openapi() == doc  # outside a replica: the defaults
    schemas = doc["components"]["schemas"]
    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in _refs(doc))
    assert "HTTPValidationError" not in schemas and "$defs" not in str(doc)
    for label, op in _operations(doc):
        if label.startswith(("POST", "PUT")) and not label.endswith(("promote", "rollback")):
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"], label
        assert any(code.startswith("2") for code in op["responses"]), label
        for code, answer in op["responses"].items():
            if code.startswith("4") or code.startswith("5"):
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (label, code)
        admin = "routing" in label and not label.startswith("GET")
        if admin:
            assert op["security"] == ADMIN_SECURITY and {"401", "403"} <= set(op["responses"])
        elif label.startswith("POST"):
            assert op["security"] == [*API_SECURITY, {}], label  # the API key is optional here
        else:
            assert "security" not in op, label
    assert set(doc["components"]["securitySchemes"]) == {"AdminKey", "AdminBearer", "ApiKey",
                                                          "ApiBearer", "ApiBasic"}


def test_the_replicas_config_is_written_into_its_document(app):
    from flowops.serving.openapi import API_SECURITY, Served, document

    doc = document(_fastapis(app), Served("digits-classifier", max_instances=5, require_api_key=True))
    schemas = doc["components"]["schemas"]
    assert schemas["PredictRequest"]["properties"]["instances"]["maxItems"] == 5
    assert schemas["LabelStudioPredict"]["properties"]["tasks"]["maxItems"] == 5
    assert doc["paths"]["/predict"]["post"]["security"] == API_SECURITY  # no {}: a key is needed
    stable = re.compile(schemas["RoutingUpdate"]["properties"]["stable"]["pattern"])
    assert stable.match("models:/digits-classifier/3") and stable.match("production")
    assert not stable.match("models:/other-model/3")
    own = _fastapis(app)["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "maxItems" not in own["schema"]["properties"]["instances"]  # FastAPI's own: left alone


@given(st.from_regex(model_ref_pattern(), fullmatch=True))
def test_every_reference_the_pattern_allows_parses(text):
    ref = ModelRef.parse(text, "digits-classifier")
    assert (ref.version or ref.alias) and text.endswith(ref.version or ref.alias)


def test_label_studio_events_are_one_list():
    from flowops import labelstudio
    from flowops.serving.config import ANNOTATION_EVENTS

    assert set(ANNOTATION_EVENTS) == labelstudio.ANNOTATION_EVENTS
