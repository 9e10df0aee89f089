"""Label Studio protocol pieces that need no cluster: label configs, image references, webhooks."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from flowops import labelstudio
from flowops.errors import InvalidInput

CONFIG = """<View><Image name="img" value="$picture"/>
<Choices name="digit" toName="img"><Choice value="3"/><Choice value="7"/></Choices></View>"""


def test_label_config_names_the_choices_and_the_image_field():
    schema = labelstudio.parse_label_config(CONFIG)
    assert (schema.from_name, schema.to_name, schema.image_key) == ("digit", "img", "picture")
    assert schema.choices == ("3", "7")
    assert labelstudio.parse_label_config(None).image_key == "image"


@pytest.mark.parametrize("config", ["<View>", "<View><Image name='i' value='$i'/></View>",
                                    '<!DOCTYPE x [<!ENTITY a "aaa">]><View/>', 42])
def test_bad_label_configs_are_invalid_input(config):
    with pytest.raises(InvalidInput):
        labelstudio.parse_label_config(config)


def test_prediction_becomes_a_choices_result_only_for_known_choices():
    schema = labelstudio.parse_label_config(CONFIG)
    pred = {"label": "7", "score": 0.9, "model_version": "4"}
    out = labelstudio.task_result(pred, schema)
    assert out == {"result": [{"from_name": "digit", "to_name": "img", "type": "choices",
                               "value": {"choices": ["7"]}, "score": 0.9}],
                   "score": 0.9, "model_version": "4"}
    assert labelstudio.task_result({**pred, "label": "5"}, schema)["result"] == []


@pytest.mark.parametrize("data,expected", [
    ({"image_id": "abc", "image": "/data/upload/1/x.png"}, "abc"),
    ({"image": "/data/local-files/?d=images/unlabeled/u-0042.png"}, "u-0042"),
    ({"image": "http://localhost:8080/data/upload/3/1a2b3c4d-u-0007.png"}, "u-0007"),
    ({"image": "data:image/png;base64,AAAA"}, None),
])
def test_image_id_of_a_task(data, expected):
    assert labelstudio.image_id_of({"id": 1, "data": data}) == expected


def _roots(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "media" / "upload" / "1").mkdir(parents=True)
    return labelstudio.ImageRoots(tmp_path / "ws", tmp_path / "media", tmp_path / "ws")


def test_image_references_resolve_inside_allowed_folders_only(tmp_path):
    roots = _roots(tmp_path)
    (tmp_path / "ws" / "a.png").write_bytes(b"A")
    (tmp_path / "media" / "upload" / "1" / "b.png").write_bytes(b"B")
    (tmp_path / "secret.png").write_bytes(b"S")
    fetch = lambda ref: asyncio.run(labelstudio._fetch(ref, roots))  # noqa: E731
    assert fetch("/data/local-files/?d=a.png") == b"A"
    assert fetch("http://localhost:8080/data/upload/1/b.png") == b"B"
    assert fetch("data:image/png;base64," + base64.b64encode(b"C").decode()) == b"C"
    assert fetch(str(tmp_path / "ws" / "a.png")) == b"A"
    for bad in ("/data/local-files/?d=../secret.png", str(tmp_path / "secret.png"),
                "http://example.com/a.png", "ftp://localhost/a.png", "data:image/png,raw",
                "/data/local-files/"):
        with pytest.raises(InvalidInput):
            fetch(bad)


def test_images_of_a_label_studio_elsewhere_are_fetched_from_it_with_its_token(tmp_path, monkeypatch):
    """Label Studio on another host (a pod, a colleague's machine): its relative /data/upload URLs
    are fetched from the host POST /setup named, with `Authorization: Token ...`; a URL on any
    other host stays refused."""
    import http.server
    import threading

    seen: list[str | None] = []

    class LabelStudio(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            ok = self.path == "/data/upload/7/c.png" and seen[-1] in ("Token s3cret", "Bearer acc")
            self.send_response(200 if ok else 403)
            self.end_headers()
            self.wfile.write(b"C" if ok else b"no")

        def do_POST(self):  # noqa: N802 - a personal access token is exchanged for an access token
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok = self.path == "/api/token/refresh" and body == {"refresh": "h.p.s"}
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(json.dumps({"access": "acc"} if ok else {"detail": "no"}).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), LabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.2:{server.server_address[1]}"
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.setattr(labelstudio, "_setup", {})
    roots = _roots(tmp_path)
    fetch = lambda ref: asyncio.run(labelstudio._fetch(ref, roots))  # noqa: E731
    try:
        with pytest.raises(InvalidInput, match="does not exist"):
            fetch("/data/upload/7/c.png")  # no Label Studio known: the local file is missing
        with pytest.raises(InvalidInput, match="Label Studio host"):
            fetch(f"{host}/data/upload/7/c.png")  # not localhost, not a known host
        labelstudio.remember_setup({"project": "3.1700000000", "hostname": host + "/",
                                    "access_token": "s3cret"})
        assert fetch("/data/upload/7/c.png") == b"C"
        assert fetch(f"{host}/data/upload/7/c.png") == b"C"
        assert seen == ["Token s3cret", "Token s3cret"]
        with pytest.raises(InvalidInput, match="HTTP 403"):
            fetch(f"{host}/data/upload/7/other.png")
        # A replica that never saw /setup reads the names Label Studio's ML backends use.
        monkeypatch.setattr(labelstudio, "_setup", {})
        monkeypatch.setenv("LABEL_STUDIO_URL", host)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "s3cret")
        assert fetch("/data/upload/7/c.png") == b"C"
        # A personal access token (Label Studio >= 1.18's default) goes through /api/token/refresh.
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "h.p.s")
        assert fetch("/data/upload/7/c.png") == b"C" and seen[-1] == "Bearer acc"
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x.y.z")
        with pytest.raises(InvalidInput, match="personal access token"):
            fetch("/data/upload/7/c.png")
    finally:
        server.shutdown()


def test_webhook_records_the_chosen_label_and_ignores_other_events(tmp_path):
    from flowops.labels import new_labels
    from flowops.settings import get_settings

    settings = get_settings(home=tmp_path / "home")
    event = {"action": "ANNOTATION_UPDATED",
             "annotation": {"id": 5, "completed_by": {"id": 1, "email": "a@b.c"},
                            "result": [{"type": "choices", "value": {"choices": ["3"]}}]},
             "task": {"id": 12, "data": {"image": "/data/local-files/?d=images/u-0012.png"}}}
    out = labelstudio.handle_webhook(settings, event)
    assert out["recorded"] == 1
    (row,) = new_labels(settings)
    assert (row["task_id"], row["image_id"], row["label"], row["annotator"]) == \
        ("labelstudio-12", "u-0012", "3", "a@b.c")
    assert labelstudio.handle_webhook(settings, {"action": "TASKS_DELETED"})["status"] == "ignored"
    skipped = {**event, "annotation": {**event["annotation"], "was_cancelled": True}}
    assert labelstudio.handle_webhook(settings, skipped)["recorded"] == 0
    with pytest.raises(InvalidInput):
        labelstudio.handle_webhook(settings, {"action": "ANNOTATION_CREATED", "task": {}})


@pytest.mark.parametrize("annotation,task", [
    ({"result": 5}, {"id": 1}),
    ({"result": [{"type": "choices", "value": ["3"]}]}, {"id": 1}),
    ({"result": [{"type": "choices", "value": {"choices": {"a": 1}}}]}, {"id": 1}),
    ({"result": [{"type": "choices", "value": {"choices": ["3"]}}]}, {"id": 1, "data": [1]}),
    ({"result": [{"type": "choices", "value": {"choices": ["3"]}}]},
     {"id": 1, "data": {"image": "http://[::1"}}),
])
def test_webhook_bodies_of_odd_shapes_are_ignored_or_refused_never_crash(tmp_path, annotation, task):
    from flowops.settings import get_settings

    settings = get_settings(home=tmp_path / "home")
    event = {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task}
    try:
        assert labelstudio.handle_webhook(settings, event)["recorded"] == 0
    except InvalidInput as exc:
        assert "image id" in str(exc)


def test_a_malformed_host_is_no_origin():
    assert labelstudio._origin("http://[::1") == ""
    labelstudio.remember_setup({"project": "9", "hostname": "http://[::1"})
    assert labelstudio._setup["9"]["hostname"] == ""
