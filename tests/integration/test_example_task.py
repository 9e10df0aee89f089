"""The example project (examples/shapes) as an engineer runs it, on the session's Ray cluster: their
own network and training loop, made a task by `task.py`, trained on 2 Ray Train workers from a
folder of colour photos, registered under the dataset's name with the task recorded, reproduced,
fine-tuned (the task coming from the base model), served over HTTP and used to pseudo-label.

The shapes dataset lives in its own FlowOps home on the session's cluster (token copied, own data
workspace and MLflow store), as in test_pseudo_label: a data workspace's latest version is what
labeling and the loop work on, so a second dataset in the session's workspace would change the
digits tests that follow.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import pytest
from PIL import Image

from tests.conftest import REPO, run_cli
from tests.image_folders import COLOURS, write_colour_folder, write_unlabeled_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = REPO / "examples"  # the folder above the `shapes` package: where the engineer works
NAME = "shapes-classifier"


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def shapes(stack, tmp_path_factory):
    """The shapes dataset (a labeled colour folder plus an unlabeled one) in its own home, and
    version 1 of shapes-classifier trained from it with the example's task on 2 workers."""
    from flowops.settings import get_settings

    tmp = tmp_path_factory.mktemp("shapes")
    home = tmp / ".flowops"
    settings = get_settings(home=home)
    settings.token_path.parent.mkdir(parents=True)
    shutil.copy(stack.token_path, settings.token_path)
    env = {"FLOWOPS_HOME": str(home)}
    written = write_colour_folder(tmp / "photos", per_class=40)
    pool = write_unlabeled_folder(tmp / "unlabeled", count=12)
    info = _json(run_cli("data", "init", "--from", str(tmp / "photos"), "--unlabeled",
                         str(tmp / "unlabeled"), "--name", "shapes", "--json", env=env, timeout=300))
    assert info["name"] == "shapes" and info["counts"]["unlabeled"] == len(pool)
    assert info["rejected"] == len(written["rejected"])
    out = _json(run_cli("train", "--task", "shapes.task:task", "--workers", "2", "--epochs", "8",
                        "--batch-size", "16", "--experiment", "it-example", "--json",
                        env=env, cwd=EXAMPLES, timeout=600))
    assert out["status"] == "SUCCEEDED", out
    return {"settings": settings, "env": env, "data": info["id"], "result": out["result"]}


def test_the_example_trains_on_two_workers_and_is_registered_with_its_task(shapes):
    from mlflow.tracking import MlflowClient

    result, settings = shapes["result"], shapes["settings"]
    assert result["mode"] == "ray" and result["model_name"] == NAME and result["version"] == "1"
    # the classes differ only by colour: a grayscale pipeline would be at chance
    assert result["metrics"]["holdout_accuracy"] > 0.9, result["metrics"]
    client = MlflowClient(settings.tracking_uri)
    mv = client.get_model_version(NAME, result["version"])
    assert mv.tags["task"] == "shapes.task:task" and json.loads(mv.tags["task_options"]) == {}
    assert mv.tags["data_version"] == shapes["data"]
    run = client.get_run(result["run_id"])
    assert run.data.params["workers"] == "2" and run.data.tags["flowops.task"] == "shapes.task:task"
    assert len(client.get_metric_history(result["run_id"], "val_accuracy")) == 8


def test_models_reproduce_gives_the_same_weights(shapes):
    env = {**shapes["env"], "FLOWOPS_MODEL_NAME": NAME}
    report = _json(run_cli("models", "reproduce", "1", "--json", env=env, cwd=EXAMPLES, timeout=600))
    assert report["match"], report


def test_a_fine_tune_takes_the_task_from_the_base_model(shapes):
    """Run from the repository, where `shapes` does not import: the code comes with version 1."""
    from mlflow.tracking import MlflowClient

    out = _json(run_cli("train", "--init-from", f"models:/{NAME}/1", "--epochs", "2",
                        "--freeze-epochs", "1", "--experiment", "it-example", "--json",
                        env=shapes["env"], timeout=600))
    result = out["result"]
    assert result["model_name"] == NAME and result["base_model_version"] == f"{NAME}/1"
    assert result["metrics"]["holdout_accuracy"] > 0.9, result["metrics"]
    mv = MlflowClient(shapes["settings"].tracking_uri).get_model_version(NAME, result["version"])
    assert mv.tags["task"] == "shapes.task:task" and mv.tags["base_model_version"] == f"{NAME}/1"


def _png_b64(colour: tuple[int, int, int], size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_example_is_served_over_http(shapes):
    env = {**shapes["env"], "FLOWOPS_MODEL_NAME": NAME}
    status = _json(run_cli("serve", "deploy", "--stable", "1", "--json", env=env, timeout=300))
    assert status["stable"] == "1" and status["model_name"] == NAME
    for label, colour in COLOURS.items():
        resp = httpx.post(f"{shapes['settings'].serve_url}/predict", timeout=30,
                          json={"instances": [{"b64": _png_b64(colour, (90, 61))}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0]["label"] == label, resp.json()


def test_the_example_pseudo_labels_the_unlabeled_pool(shapes):
    out = _json(run_cli("pseudo-label", "--model-uri", f"models:/{NAME}/1", "--data-version",
                        shapes["data"], "--no-version", "--json", env=shapes["env"], timeout=420))
    result = out["result"]
    assert out["status"] == "SUCCEEDED" and result["errors"] == 0, result
    assert result["scored"] == result["images"] == 12
    assert set(result["class_counts"]) <= set(COLOURS) and sum(result["class_counts"].values()) == 12
