"""cluster/ renders the same with FlowOps' renderer and kubectl, and every object validates."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flowops import cluster, manifests
from tests.conftest import REPO

CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def validator() -> manifests.ManifestValidator:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (shared/ must sit beside the repository)")
    return manifests.ManifestValidator(CRD_DIR)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: cluster.render(name, "python") for name in cluster.OVERLAYS}


def _kubectl_kustomize(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.skipif(not KUBECTL, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_python_renderer_equals_kubectl_kustomize(overlay, rendered):
    theirs = _kubectl_kustomize(cluster.overlay_dir(overlay))
    assert rendered[overlay] == theirs  # same objects, same order


@pytest.mark.skipif(not KUBECTL, reason="kubectl is not installed")
def test_renderer_features_match_kubectl(tmp_path):
    """Generators (hash suffix), JSON 6902 and strategic-merge patches, images, namespace, labels."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "deploy.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "repo/app:1", "args": ["a"]}]}}},
    }))
    (base / "dash.json").write_text('{"title": "<Ray & Serve>", "n": 1}\n')
    (base / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["deploy.yaml"],
        "configMapGenerator": [{"name": "dash", "files": ["dash.json"], "literals": ["k=v"]}],
        "images": [{"name": "repo/app", "newTag": "2"}],
    }))
    over = tmp_path / "over"
    over.mkdir()
    (over / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "team", "resources": ["../base"],
        "labels": [{"pairs": {"env": "x"}}],
        "images": [{"name": "repo/app", "newName": "other/app"}],
        "patches": [
            {"target": {"kind": "Deployment", "name": "web"},
             "patch": "- op: add\n  path: /spec/template/spec/containers/0/args/-\n  value: b\n"},
            {"patch": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 3}\n"},
        ],
    }))
    assert manifests.render_kustomization(over) == _kubectl_kustomize(over)


def test_unsupported_kustomize_field_is_an_error(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(Exception, match="namePrefix"):
        manifests.render_kustomization(tmp_path)


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_every_object_validates(overlay, rendered, validator):
    checked = set()
    for obj in rendered[overlay]:
        group = obj["apiVersion"].rpartition("/")[0]
        if group.endswith("coreos.com"):
            continue  # Prometheus operator kinds: no schema here (cluster/monitoring)
        assert validator.check(obj) is None
        checked.add(obj["kind"])
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "NetworkPolicy",
            "Role", "RoleBinding", "ServiceAccount", "ConfigMap"} <= checked


def test_validation_catches_mistakes(rendered, validator):
    objs = {o["kind"]: o for o in rendered["dev"]}
    bad = copy.deepcopy(objs["RayCluster"])
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    assert "maxReplica" in validator.check(bad)
    bad = copy.deepcopy(objs["RayJob"])
    bad["spec"]["backoffLimit"] = "one"
    assert "backoffLimit" in validator.check(bad)
    bad = copy.deepcopy(objs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert validator.check(bad) is not None


def test_entrypoints_and_import_paths_are_project_modules(rendered):
    modules, entrypoints, serve_args = set(), [], []
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] == "RayJob":
                argv = shlex.split(obj["spec"]["entrypoint"])
                assert argv[:2] == ["python", "-m"], argv
                modules.add(argv[2])
                entrypoints.append(argv[2:])
            if obj["kind"] == "RayService":
                config = yaml.safe_load(obj["spec"]["serveConfigV2"])
                for app in config["applications"]:
                    modules.add(app["import_path"].split(":")[0])
                    serve_args.append((app["import_path"], app.get("args", {})))
    assert {"jobs.train", "jobs.pseudo_label", "serve_apps.classifier"} <= modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"entrypoints/import paths that are not modules of the project: {missing}"
    for module in modules:
        assert Path(importlib.util.find_spec(module).origin).is_relative_to(REPO)
    # The arguments are the ones the modules accept.
    import jobs.train
    from flowops.serving import ServeAppConfig

    for argv in entrypoints:
        if argv[0] == "jobs.train":
            jobs.train.build_parser().parse_args(argv[1:])
    for import_path, args in serve_args:
        module, attr = import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))  # a builder: it takes `args`
        ServeAppConfig.model_validate(args)


def test_builders_validate(validator):
    spec = manifests.RayClusterInput(
        autoscaling=True,
        workers=[manifests.WorkerGroup(name="gpu", cpus=4, memory="8Gi", gpus=2, max_replicas=2,
                                       node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})],
    )
    rc = manifests.ray_cluster("x", "ns", spec)
    assert validator.check(rc) is None
    job = manifests.ray_job(manifests.RayJobInput(name="j", entrypoint="python -m jobs.train",
                                                  cluster_selector="flowops-platform"), "ns")
    assert validator.check(job) is None
    from flowops.settings import get_settings

    train = cluster.train_job(get_settings(), ["--epochs", "1", "--workers", "2", "--gpus-per-worker", "1"])
    assert validator.check(train) is None
    with pytest.raises(Exception, match="memory"):
        manifests.WorkerGroup(name="g", cpus=1, memory="8GB")


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_rayservice_runs_serve_in_high_throughput_mode(overlay, rendered):
    """Every RayService pod (head and workers) runs Serve like `flowops up` does: HAProxy ingress
    straight to the replicas. A pod without it would serve through the slow Python proxy."""
    services = [d for d in rendered[overlay] if d["kind"] == "RayService"]
    assert services
    for svc in services:
        spec = svc["spec"]["rayClusterConfig"]
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", container["name"]
                assert env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1", container["name"]
