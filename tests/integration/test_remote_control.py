"""Control over the network: routing, canary, promote, rollback and status reach the classifier app
at the addresses the settings give (never a built-in 127.0.0.1), from a driver that has none of the
head's files, and through a Ray handle from a connected driver.

One host here: the "remote" driver reaches the cluster at `localhost` (the machine's loopback, but
only through FLOWOPS_RAY_ADDRESS / FLOWOPS_SERVE_URL), with Ray's token in RAY_AUTH_TOKEN."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from tests.conftest import FLOWOPS, REPO, _free_port
from tests.integration.conftest_serving import fit_classifier, register_version

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app(stack):
    """Versions 'stable' (production) and 'next'; the app deployed (this process: a Ray driver)."""
    from flowops import serving

    stable = register_version(stack, fit_classifier(seed=0), alias="production")
    following = register_version(stack, fit_classifier(seed=1))
    serving.deploy(stack)
    yield stack, stable, following
    serving.rollback(stack)


def _remote_cli(stack, *args: str, home: str, **extra: str) -> dict:
    """`flowops <args> --json` as a driver elsewhere would run it: an empty home, the cluster's
    addresses and keys (and `extra` variables) from the environment only."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLOWOPS_", "RAY_AUTH", "MLFLOW_"))}
    env.update({
        "FLOWOPS_HOME": home,
        "FLOWOPS_RAY_ADDRESS": f"http://localhost:{stack.dashboard_port}",
        "FLOWOPS_SERVE_URL": f"http://localhost:{stack.serve_port}",
        "FLOWOPS_MLFLOW_PORT": str(stack.mlflow_port),
        "FLOWOPS_RAY_PORT": str(stack.ray_port),
        "RAY_AUTH_TOKEN": stack.token_path.read_text().strip(),
        "FLOWOPS_ADMIN_KEY": (stack.home / "serve" / "admin_key").read_text().strip(),
        **extra,
    })
    out = subprocess.run([*FLOWOPS, *args, "--json"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.stdout.strip(), out.stderr
    return {"code": out.returncode, **json.loads(out.stdout)}


def test_a_driver_elsewhere_steers_the_app_through_the_settings(app):
    stack, stable, following = app
    home = tempfile.mkdtemp(prefix="fo-remote-", dir="/tmp")

    report = _remote_cli(stack, "status", home=home)
    for part in ("ray", "serve", "mlflow"):
        assert report[part]["healthy"], report
    assert report["ray"]["job_api"] == f"http://localhost:{stack.dashboard_port}"
    assert report["ray"]["gcs"] == f"localhost:{stack.ray_port}"
    assert report["serve"]["url"] == f"http://localhost:{stack.serve_port}"
    assert report["mlflow"]["tracking_uri"] == f"http://localhost:{stack.mlflow_port}"
    assert report["code"] == 5 and not report["workspace"]["healthy"]  # its own empty home

    status = _remote_cli(stack, "serve", "status", home=home)
    assert (status["code"], str(status["stable"]), status["ready"]) == (0, stable, True)
    canary = _remote_cli(stack, "serve", "canary", following, "--weight", "30", home=home)
    assert (str(canary["canary"]), canary["weight"], canary["ready"]) == (following, 30, True)
    assert _remote_cli(stack, "serve", "set-weight", "60", home=home)["weight"] == 60
    rolled = _remote_cli(stack, "serve", "rollback", home=home)
    assert (rolled["canary"], str(rolled["stable"])) == (None, stable)
    _remote_cli(stack, "serve", "canary", following, home=home)
    promoted = _remote_cli(stack, "serve", "promote", "--no-alias", home=home)
    assert (str(promoted["stable"]), promoted["canary"]) == (following, None)
    assert _remote_cli(stack, "serve", "status", home=home)["stable"] == promoted["stable"]
    assert os.listdir(home) == []  # the driver needed none of the head's files


def test_a_driver_elsewhere_sees_the_shared_loop_state(app):
    """With the platform's state database (FLOWOPS_STATE_URL), a driver with its own home finds
    the same controller job and the same rollout timeline as the head's home."""
    from flowops import loop
    from flowops.settings import get_settings

    home = tempfile.mkdtemp(prefix="fo-remote-", dir="/tmp")
    # The platform's database: a fresh one, so the rollout queued here reaches no other test.
    shared = {"FLOWOPS_STATE_URL": f"sqlite:///{home}-state.db"}
    head = get_settings(state_url=shared["FLOWOPS_STATE_URL"])
    status = _remote_cli(app[0], "loop", "status", home=home, **shared)
    assert status["controller"]["job_id"] == loop.controller_submission_id(head), status
    loop.submit_candidate(head, str(app[1]))  # queued, never driven: no controller runs
    report = subprocess.run([*FLOWOPS, "loop", "report", "--json"], capture_output=True, text=True,
                            cwd=REPO, timeout=120, env={**os.environ, "FLOWOPS_HOME": home,
                                                        **shared})
    assert json.loads(report.stdout) == loop.timeline.timeline(head) != [], report.stderr


def test_a_connected_driver_steers_through_a_ray_handle(app):
    """This process is a Ray driver of the cluster (it deployed the app): routing goes through a
    Serve handle, so it works even where the Serve URL leads nowhere."""
    from flowops import serving
    from flowops.errors import NotFound
    from flowops.settings import get_settings

    nowhere = get_settings(serve_url=f"http://127.0.0.1:{_free_port(set())}")
    stable = str(serving.routing_status(nowhere)["stable"])
    other = next(v for v in app[1:] if v != stable)
    routed = serving.set_canary(nowhere, other, 25)
    assert (str(routed["canary"]), routed["weight"], routed["ready"]) == (other, 25, True)
    assert serving.routing_status(nowhere)["weight"] == 25
    assert isinstance(serving.ledger_snapshot(nowhere), dict)
    with pytest.raises(NotFound, match="999"):
        serving.set_canary(nowhere, "999", 10)
    assert serving.rollback(nowhere)["canary"] is None
    assert str(serving.routing_status(nowhere)["stable"]) == stable


def test_a_job_steers_the_app_without_secrets_in_its_metadata(app, monkeypatch):
    """A submitter holding the admin key and storage credentials: its Ray job (the runtime env
    every workload gets, jobs.runtime_env) steers routing with the key it finds on its node (the
    home's 0600 key file here; a Secret on Kubernetes), and the Jobs API, which shows runtime envs
    to anyone who can list jobs, shows none of those values."""
    import httpx

    from flowops import jobs, serving
    from flowops.ray_client import auth_headers
    from flowops.settings import get_settings

    stack = app[0]
    secrets = {"FLOWOPS_ADMIN_KEY": (stack.home / "serve" / "admin_key").read_text().strip(),
               "FLOWOPS_API_KEY": "api-key-never-in-metadata",
               "AWS_SECRET_ACCESS_KEY": "aws-secret-never-in-metadata"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    settings = get_settings()
    stable = str(serving.routing_status(settings)["stable"])
    other = next(v for v in app[1:] if v != stable)
    code = ("import os; from flowops import serving; from flowops.settings import get_settings; "
            "assert not os.environ.get('FLOWOPS_ADMIN_KEY'); "
            f"print('weight', serving.set_canary(get_settings(), {other!r}, 35)['weight'])")
    client = jobs.client(settings)
    with jobs.ray_default_excludes_off():
        sid = client.submit_job(entrypoint=f"python -c {json.dumps(code)}",
                                runtime_env=jobs.runtime_env(settings))
    done = jobs.wait(settings, sid, timeout_s=240)
    assert done.status == "SUCCEEDED", client.get_job_logs(sid)
    assert "weight 35" in client.get_job_logs(sid)
    routed = serving.routing_status(settings)
    assert (str(routed["canary"]), routed["weight"]) == (other, 35)
    serving.rollback(settings)

    seen = [client.get_job_info(sid).model_dump_json(),
            *(details.model_dump_json() for details in client.list_jobs())]
    for path in (f"/api/jobs/{sid}", "/api/jobs/"):
        resp = httpx.get(f"{settings.job_api}{path}", headers=auth_headers(settings), timeout=30)
        assert resp.status_code == 200
        seen.append(resp.text)
    assert sid in seen[0] and "FLOWOPS_STORAGE_URI" in seen[0]  # the runtime env is shown
    for name, value in secrets.items():
        assert not any(value in text for text in seen), f"{name} shown by the Jobs API"
