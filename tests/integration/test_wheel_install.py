"""FlowOps installed as a wheel works like a checkout: built from this repository, installed into a
fresh virtual environment, and run from a folder outside the checkout.

The wheel holds `flowops` only (the checkout's jobs/, serve_apps/ and cluster/ inside it); the
resources it reads at run time (alert rules, the kustomize tree, the KubeRay CRD schemas) are
found through importlib.resources. Its dependencies come from the project's environment (a path
entry in the new venv), so the test needs no download and still imports FlowOps from the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import httpx
import pytest

from flowops.durable import wait_until
from tests.conftest import REPO, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, wheel path): the wheel built from the checkout, installed with pip."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    venv = out / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "flowops-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    # the `ray` command pip would have installed with the ray dependency (`flowops up` runs it)
    ray = venv / "bin" / "ray"
    ray.write_text(f"#!{venv / 'bin' / 'python'}\nfrom ray.scripts.scripts import main\nmain()\n")
    ray.chmod(0o755)
    return venv / "bin", wheel


@pytest.fixture
def outside(installed, tmp_path):
    """Environment of a user of the installed wheel, in a folder outside the checkout."""
    bin_dir, _ = installed
    home = Path(tempfile.mkdtemp(prefix="fo-wheel-", dir="/tmp"))
    used = {int(v) for k, v in os.environ.items() if k.startswith("FLOWOPS_") and k.endswith("_PORT")}
    env = {**os.environ, "FLOWOPS_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    for key in ("RAY", "DASHBOARD", "CLIENT", "SERVE", "METRICS", "MLFLOW", "MONITOR_EXPORTER",
                "MONITOR_PROMETHEUS"):
        env[f"FLOWOPS_{key}_PORT"] = str(_free_port(used))
    env["RAY_AUTH_TOKEN_PATH"] = str(home / "ray" / "auth_token")
    yield env, tmp_path
    subprocess.run([str(bin_dir / "flowops"), "down"], env=env, cwd=tmp_path, capture_output=True,
                   timeout=180)


def _run(env, cwd, *args, timeout=600):
    return subprocess.run(["flowops", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_flowops_only_with_its_resources(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"flowops", *{n.split("/")[0] for n in names
                                                              if ".dist-info/" in n}}
    for needed in ("flowops/workloads/train.py", "flowops/apps/classifier.py",
                   "flowops/apps/classifier.yaml",
                   "flowops/resources/cluster/monitoring/rules.yaml",
                   "flowops/resources/cluster/overlays/prod/kustomization.yaml",
                   "flowops/resources/kuberay-crds/README.md"):
        assert needed in names, needed


def test_cluster_render_and_validate_from_outside_the_checkout(outside):
    env, cwd = outside
    version = _run(env, cwd, "--help")
    assert version.returncode == 0, version.stderr
    code = "import flowops; print(flowops.__file__)"
    where = subprocess.run(["python", "-c", code], env=env, cwd=cwd, capture_output=True, text=True)
    assert "site-packages" in where.stdout and str(REPO) not in where.stdout  # the wheel's copy
    rendered = _run(env, cwd, "cluster", "render", "--overlay", "prod")
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: RayService" in rendered.stdout and "flowops.apps.classifier:build_app" in rendered.stdout
    validated = _run(env, cwd, "cluster", "validate")
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_up_with_prometheus_loads_the_rules_and_runs_a_job_from_the_wheel(outside):
    env, cwd = outside
    up = _run(env, cwd, "up", "--num-cpus", "2", "--with-prometheus")
    assert up.returncode == 0, up.stdout + up.stderr
    prometheus = f"http://127.0.0.1:{env['FLOWOPS_MONITOR_PROMETHEUS_PORT']}"

    def rule_groups():
        resp = httpx.get(f"{prometheus}/api/v1/rules", timeout=5)
        return resp.status_code == 200 and resp.json()["data"]["groups"]

    groups = wait_until(rule_groups, 60, what="Prometheus serving the alert rules")
    names = {r["name"] for g in groups for r in g["rules"]}
    assert "FlowOpsCanaryDegraded" in names, names
    # a Ray job runs `python -m flowops.workloads.data_check` from the installed package
    assert _run(env, cwd, "data", "init").returncode == 0
    check = _run(env, cwd, "data", "check")
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    jobs = _run(env, cwd, "jobs", "list", "--json")
    entrypoints = [j["entrypoint"] for j in json.loads(jobs.stdout)]
    assert any(e.startswith("python -m flowops.workloads.data_check") for e in entrypoints), entrypoints
