"""The classifier app as the ML backend of a REAL Label Studio (opt-in: Label Studio is a large
install, so CI does not run it).

Start Label Studio on this machine with local ML backends allowed and a legacy API token, e.g.

    pip install label-studio   # in its own virtualenv
    ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false label-studio start --port 8081 \\
        --username me@example.com --password ... --user-token <40 hex chars>

(enable legacy tokens for the organization in Label Studio's settings), then

    FLOWOPS_TEST_LABEL_STUDIO_URL=http://127.0.0.1:8081 FLOWOPS_TEST_LABEL_STUDIO_TOKEN=<token> \\
        pytest tests/integration/test_label_studio_live.py

Label Studio connects to `/labelstudio` (health + setup), asks it for predictions of uploaded
images (which the backend fetches back from Label Studio with the token from setup), and sends
annotations to `/labelstudio/webhook`, which land in the label inbox.
"""

from __future__ import annotations

import io
import os
import time

import httpx
import numpy as np
import pytest

from tests.integration.conftest_serving import DIGITS, digits_pixels, fit_classifier, register_version

LS_URL = os.environ.get("FLOWOPS_TEST_LABEL_STUDIO_URL")
LS_TOKEN = os.environ.get("FLOWOPS_TEST_LABEL_STUDIO_TOKEN")

pytestmark = pytest.mark.skipif(
    not (LS_URL and LS_TOKEN),
    reason="set FLOWOPS_TEST_LABEL_STUDIO_URL and FLOWOPS_TEST_LABEL_STUDIO_TOKEN (a running Label Studio)",
)

LABEL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
                + "".join(f'<Choice value="{d}"/>' for d in DIGITS) + "</Choices></View>")


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").resize((32, 32)).save(buf, "PNG")
    return buf.getvalue()


def test_label_studio_gets_predictions_and_sends_labels(stack):
    from flowops import labels, serving
    version = register_version(stack, fit_classifier(epochs=5), alias="production")
    serving.deploy(stack, stable=version)
    backend = f"{stack.serve_url}/labelstudio"

    ls = httpx.Client(base_url=LS_URL, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=120)
    assert ls.get("/api/current-user/whoami").status_code == 200, "the Label Studio token is refused"
    project = ls.post("/api/projects", json={"title": f"flowops-{int(time.time())}",
                                             "label_config": LABEL_CONFIG}).json()["id"]
    try:
        pixels, truth = digits_pixels(4)
        files = {f"file{i}": (f"digit{i}.png", _png(p), "image/png") for i, p in enumerate(pixels)}
        assert ls.post(f"/api/projects/{project}/import", files=files).status_code == 201

        ml = ls.post("/api/ml", json={"url": backend, "project": project, "title": "flowops"})
        assert ml.status_code == 201, ml.text  # Label Studio called /health and /setup
        assert ml.json()["model_version"] == version

        action = ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                         json={"selectedItems": {"all": True, "excluded": []}})
        assert action.status_code == 200, action.text
        tasks = ls.get("/api/tasks", params={"project": project}).json()["tasks"]
        assert len(tasks) == 4
        for task in tasks:
            preds = ls.get("/api/predictions", params={"task": task["id"]}).json()
            assert len(preds) == 1 and preds[0]["model_version"] == version
            (choice,) = preds[0]["result"]
            assert choice["from_name"] == "choice" and choice["value"]["choices"][0] in DIGITS

        hook = ls.post("/api/webhooks", json={
            "project": project, "url": f"{backend}/webhook", "send_payload": True,
            "send_for_all_actions": False, "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]})
        assert hook.status_code == 201, hook.text
        for task, label in zip(tasks, truth, strict=True):
            ann = ls.post(f"/api/tasks/{task['id']}/annotations", json={"result": [{
                "from_name": "choice", "to_name": "image", "type": "choices",
                "value": {"choices": [str(label)]}}]})
            assert ann.status_code == 201, ann.text
        wanted = {f"labelstudio-{t['id']}": str(lab) for t, lab in zip(tasks, truth, strict=True)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = {r["task_id"]: r["label"] for r in labels.new_labels(stack) if r["task_id"] in wanted}
            if got == wanted:
                break
            time.sleep(0.5)
        assert got == wanted
    finally:
        ls.delete(f"/api/projects/{project}")
