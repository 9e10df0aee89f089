"""A registered version used where FlowOps is not installed: `mlflow.pyfunc.load_model` and
`mlflow models serve --env-manager local` in a clean virtual environment that has mlflow and torch
(and the model's declared requirements) but not this repository, answering exactly what FlowOps's
own loading answers.

The environment is built once per machine (pip, from the package registry and the local torch
wheel) in a cache folder keyed by the mlflow, torch and Python versions, and reused afterwards.
Without a registry to install from, the test skips with one line, or fails with one line in CI.
"""

from __future__ import annotations

import base64
import fcntl
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from flowops.durable import wait_until
from flowops.refs import ModelRef
from flowops.train import TrainConfig, train
from tests.conftest import REPO, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MLFLOW_VERSION = importlib.metadata.version("mlflow")
TORCH_VERSION = importlib.metadata.version("torch").split("+")[0]
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
VENV_CACHE = Path(os.environ.get("FLOWOPS_TEST_VENV_CACHE",
                                 Path.home() / ".cache" / "flowops-test-venvs"))
# mlflow-skinny has `mlflow models serve` (uvicorn + FastAPI) without the tracking server's UI
# and its heavy dependencies; SQLAlchemy and alembic let it read the default `sqlite:` registry.
# pillow, numpy and pandas are what a version declares beside torch (checked below).
OUTSIDE_PACKAGES = (f"torch=={TORCH_VERSION}", f"mlflow-skinny=={MLFLOW_VERSION}", "sqlalchemy",
                    "alembic", "pillow", "numpy", "pandas")
PUBLIC_REQUIREMENTS = {"mlflow", "mlflow-skinny", "torch", "pillow", "numpy", "pandas"}
NO_REGISTRY = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
               "Network is unreachable", "ConnectTimeout", "ReadTimeoutError",
               "No matching distribution found")
COMPLETE = ".complete"


def _build_venv(target: Path) -> None:
    """`python -m venv` + pip install at `target` (venvs are not relocatable: their scripts name
    their interpreter, so the build happens in place and a marker written last says it is whole)."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(target / "bin" / "python"), "-m", "pip", "install", "-q",
         "-c", str(REPO / "constraints.txt"), *OUTSIDE_PACKAGES],
        env=env, cwd=target.parent, capture_output=True, text=True, timeout=1500,
    )
    if proc.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        offline = [hint for hint in NO_REGISTRY if hint in proc.stderr]
        if offline:
            message = f"cannot build the clean mlflow venv: no package registry reachable " \
                      f"(pip: {', '.join(offline)})"
            if os.environ.get("CI"):
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        pytest.fail(f"pip install {' '.join(OUTSIDE_PACKAGES)} failed: {last}", pytrace=False)
    (target / COMPLETE).write_text("\n".join(OUTSIDE_PACKAGES) + "\n")


@pytest.fixture(scope="module")
def outside_bin() -> Path:
    """The clean venv's bin folder (built on first use, under a lock, then reused)."""
    target = VENV_CACHE / f"mlflow-{MLFLOW_VERSION}-torch-{TORCH_VERSION}-py{PYTHON_VERSION}"
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / COMPLETE).exists():
            start = time.monotonic()
            _build_venv(target)
            print(f"built {target} in {time.monotonic() - start:.0f} s")
    return target / "bin"


@pytest.fixture(scope="module")
def version(stack, dataset) -> tuple[str, str]:
    """(name, number) of a version trained and registered by the real FlowOps."""
    result = train(stack, TrainConfig(data_version=dataset, epochs=2, local=True,
                                      experiment="it-outside"))
    assert result.version
    return result.model_name, result.version


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Encoded images as users send them: grayscale and colour PNGs (one with alpha, odd sizes)
    and a JPEG; the digits model converts each to its own input."""
    rng = np.random.default_rng(3)
    found = []
    for shape, fmt in [((8, 8), "PNG"), ((8, 8), "PNG"), ((28, 28), "PNG"), ((13, 21, 3), "PNG"),
                       ((40, 30, 4), "PNG"), ((16, 16, 3), "JPEG")]:
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        found.append(buf.getvalue())
    return found


@pytest.fixture(scope="module")
def expected(stack, version, images) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, labels, probabilities) FlowOps itself gives: its `load_model`, `task.decode`,
    softmax."""
    from flowops.model import load_model, predict_proba, to_batch

    loaded = load_model(stack, ModelRef.of(*version))
    probs = predict_proba(loaded.model, to_batch([loaded.task.decode(b) for b in images]))
    return loaded.classes, [loaded.classes[i] for i in probs.argmax(axis=1)], probs


def _clean_env(stack, bin_dir: Path) -> dict[str, str]:
    """Only what a user outside FlowOps would have: the venv first on PATH, the tracking URI."""
    env = {k: v for k, v in stack.job_env().items() if k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_TRACKING_URI": stack.tracking_uri, "HOME": str(Path.home()),
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _probabilities(rows: list[dict], classes: list[str]) -> np.ndarray:
    return np.array([[row[f"p_{c}"] for c in classes] for row in rows], dtype=np.float64)


def test_the_version_declares_only_public_requirements(stack, version, tmp_path):
    import mlflow
    from mlflow.models import Model
    from packaging.requirements import Requirement

    from flowops.tracking import configure_mlflow

    configure_mlflow(stack)
    local = Path(mlflow.artifacts.download_artifacts(ModelRef.of(*version).uri, dst_path=tmp_path))
    requirements = [line.strip() for line in (local / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    names = {Requirement(r).name.lower() for r in requirements}
    assert names <= PUBLIC_REQUIREMENTS, requirements
    assert f"torch=={TORCH_VERSION}" in requirements
    conda = (local / "conda.yaml").read_text()
    assert "flowops" not in conda.lower() and "flowops" not in "\n".join(requirements).lower()
    flavor = Model.load(str(local)).flavors["python_function"]
    assert flavor["loader_module"] == "flowops_image_model" and "python_model" not in flavor
    shipped = sorted(p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py"))
    assert shipped == ["flowops_image_model.py"]  # the default task ships no package of its own
    loader = (local / "code" / "flowops_image_model.py").read_text()
    assert "import flowops" not in loader and "from flowops" not in loader


def test_pyfunc_load_model_in_a_clean_venv_predicts_like_flowops(stack, version, images, expected,
                                                                  outside_bin, tmp_path):
    env = _clean_env(stack, outside_bin)
    python = str(outside_bin / "python")
    no_flowops = subprocess.run([python, "-c", "import flowops"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
    assert no_flowops.returncode != 0 and "No module named 'flowops'" in no_flowops.stderr

    (tmp_path / "images.json").write_text(json.dumps([base64.b64encode(b).decode() for b in images]))
    (tmp_path / "predict.py").write_text(
        "import base64, json, sys\n"
        "import mlflow.pyfunc, pandas as pd\n"
        "uri = sys.argv[1]\n"
        "text = json.load(open('images.json'))\n"
        "model = mlflow.pyfunc.load_model(uri)\n"
        "as_text = model.predict(pd.DataFrame({'image': text}))\n"
        "as_bytes = model.predict(pd.DataFrame({'image': [base64.b64decode(t) for t in text]}))\n"
        "try:\n"
        "    model.predict(pd.DataFrame({'image': [b'not an image']}))\n"
        "    bad = 'no error'\n"
        "except Exception as exc:\n"
        "    bad = f'{type(exc).__name__}: {exc}'\n"
        "json.dump({'text': as_text.to_dict('records'), 'bytes': as_bytes.to_dict('records'),\n"
        "           'bad': bad, 'modules': sorted(m for m in sys.modules if 'flowops' in m)},\n"
        "          open('out.json', 'w'))\n"
    )
    proc = subprocess.run([python, "predict.py", ModelRef.of(*version).uri], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["modules"] == ["flowops_image_model"]  # the version's own loader, not FlowOps
    assert out["bad"].startswith("MlflowException: not a decodable image"), out["bad"]
    classes, labels, probs = expected
    for rows in (out["text"], out["bytes"]):
        assert [r["label"] for r in rows] == labels
        np.testing.assert_allclose(_probabilities(rows, classes), probs, atol=1e-5)
        np.testing.assert_allclose([r["score"] for r in rows], probs.max(axis=1), atol=1e-5)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow's CLI and its uvicorn), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_mlflow_models_serve_from_a_clean_venv_answers_like_flowops(stack, version, images,
                                                                    expected, outside_bin,
                                                                    tmp_path):
    port = _free_port({int(v) for k, v in os.environ.items()
                       if k.startswith("FLOWOPS_") and k.endswith("_PORT")})
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(outside_bin / "mlflow"), "models", "serve", "-m", ModelRef.of(*version).uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        env=_clean_env(stack, outside_bin), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/ping", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 180, what="mlflow models serve answering /ping")
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in images]}}
        response = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        rows = response.json()["predictions"]
        classes, labels, probs = expected
        assert [r["label"] for r in rows] == labels
        np.testing.assert_allclose(_probabilities(rows, classes), probs, atol=1e-5)

        records = {"dataframe_records": [{"image": base64.b64encode(images[0]).decode()}]}
        response = httpx.post(f"{url}/invocations", json=records, timeout=60)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == labels[0]

        bad = {"dataframe_split": {"columns": ["image"],
                                   "data": [[base64.b64encode(b"not an image").decode()]]}}
        response = httpx.post(f"{url}/invocations", json=bad, timeout=60)
        assert response.status_code == 400, response.text[:2000]
        error = response.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "not a decodable image" in error["message"]
    finally:
        _stop(server)
        log.close()
