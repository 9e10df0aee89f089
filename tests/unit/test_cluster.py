"""The KubeRay layer's promises: one pinned image and Ray version, hardened pods, secrets by reference,
and the training RayJob behind `flowops train --target k8s`."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import ray
import yaml

from flowops import cluster, manifests
from flowops.errors import InvalidInput
from flowops.settings import get_settings
from tests.conftest import REPO, run_cli

SECRET_WORDS = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", re.I)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: cluster.render(get_settings(), name) for name in cluster.OVERLAYS}


def _pod_specs(node, path=""):
    """Every pod spec (a mapping with `containers`) anywhere in an object."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from _pod_specs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _pod_specs(value, f"{path}/{i}")


def test_ray_version_and_image_pinned_once(rendered):
    assert ray.__version__.startswith(manifests.RAY_VERSION.rsplit(".", 1)[0])
    dockerfile = (REPO / "cluster" / "image" / "Dockerfile").read_text()
    assert f"rayproject/ray:{manifests.RAY_VERSION}-py311" in dockerfile
    assert "torch==2.13.0" in dockerfile and "pip install" in dockerfile
    base = yaml.safe_load((REPO / "cluster" / "base" / "kustomization.yaml").read_text())
    assert [i["name"] for i in base["images"]] == ["flowops-runtime"]
    for overlay, objects in rendered.items():
        images = {c["image"] for o in objects if o["apiVersion"].startswith("ray.io")
                  for _, pod in _pod_specs(o) for c in pod["containers"]}
        assert len(images) == 1, (overlay, images)
        assert images.pop().startswith("ghcr.io/flowops/flowops-runtime:")
        for o in objects:
            if o["kind"] in ("RayCluster", "RayJob", "RayService"):
                spec = o["spec"].get("rayClusterSpec") or o["spec"].get("rayClusterConfig") or o["spec"]
                if "headGroupSpec" in spec:
                    assert spec["rayVersion"] == manifests.RAY_VERSION
                    assert spec["authOptions"] == {"mode": "token", "secretName": "flowops-ray-auth"}


def test_pods_are_non_root_and_secrets_are_references(rendered):
    for objects in rendered.values():
        for obj in objects:
            for where, pod in _pod_specs(obj):
                name = f"{obj['kind']}/{obj['metadata']['name']}{where}"
                assert pod["securityContext"]["runAsNonRoot"] is True, name
                for c in pod["containers"]:
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
                    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
                    for env in c.get("env", []):
                        if SECRET_WORDS.search(env["name"]) and env["name"] != "RAY_AUTH_MODE":
                            assert "secretKeyRef" in env.get("valueFrom", {}), (name, env)
    kinds = {o["kind"] for o in rendered["prod"]}
    assert "Secret" not in kinds  # credentials are created by hand (docs/kubernetes.md), never rendered


def test_platform_cluster_shape(rendered):
    for objects in rendered.values():
        rc = next(o for o in objects if o["kind"] == "RayCluster")
        head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["containerPort"] for p in head["ports"]}
        assert {8265, 10001, 8000, 8080} <= ports
        assert rc["spec"]["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu["nodeSelector"] and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert groups["gpu"]["minReplicas"] == 0
    gpu_rc = next(o for o in rendered["gpu"] if o["kind"] == "RayCluster")
    assert gpu_rc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    jobs = {o["metadata"]["name"]: o["spec"] for o in rendered["prod"] if o["kind"] == "RayJob"}
    for name in ("flowops-train", "flowops-pseudo-label"):
        spec = jobs[name]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert jobs["flowops-train-on-platform"]["clusterSelector"] == {"ray.io/cluster": "flowops-platform"}


def test_every_non_default_field_is_commented():
    """Each setting in the base manifests carries a comment: on its line, on the line above, or (for
    pod boilerplate repeated across groups) on the same key elsewhere in the file."""
    structural = {"apiVersion", "kind", "name", "key", "value", "operator", "effect", "mountPath", "path",
                  "port", "protocol", "targetPort", "containerPort", "groupName", "apiGroup", "apiGroups",
                  "verbs", "selector", "valueFrom", "configMap", "configMapRef", "emptyDir", "rayStartParams",
                  "policyTypes", "newName", "newTag", "app.kubernetes.io/name", "ray.io/is-ray-node"}
    uncommented = []
    for path in sorted((REPO / "cluster" / "base").glob("*.yaml")):
        lines = path.read_text().splitlines()
        commented = {ln.split("#")[0].strip().lstrip("- ").split(":")[0] for ln in lines if "#" in ln}
        commented |= {ln.strip().lstrip("- ").split(":")[0] for i, ln in enumerate(lines)
                      if i and lines[i - 1].strip().startswith("#")}
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.endswith((":", "|")):
                continue
            if ":" not in stripped:
                continue
            if "#" in line or (i and lines[i - 1].strip().startswith("#")):
                continue
            item = stripped.lstrip("- ")
            if item.split(":")[0] in structural or item.split(":")[0] in commented:
                continue
            blocks = ("ray-service.classifier.yaml", "config-map.dvc-remote.yaml")
            if line.startswith("    ") and path.name in blocks:
                continue  # inside a block string (serveConfigV2, DVC's config), explained above it
            uncommented.append(f"{path.name}:{i + 1}: {stripped}")
    assert not uncommented, "\n".join(uncommented)


def test_train_rayjob_for_k8s(tmp_path, monkeypatch):
    text = cluster.submit_train_k8s(get_settings(home=tmp_path), '{"epochs": 2, "data_version": "v3"}',
                                    apply=False)
    (job,) = list(yaml.safe_load_all(text))
    assert job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "flowops.workloads.train", "--config"] and len(argv) == 5
    # The job gets the config it was given, with the cluster's default worker count.
    assert json.loads(argv[4]) == {"epochs": 2, "data_version": "v3", "workers": 2}
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["minReplicas"] == workers["maxReplicas"] == 2
    assert "nvidia.com/gpu" not in workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    # The worker pods follow the config: 3 workers with a GPU each.
    job = cluster.train_job(get_settings(home=tmp_path), '{"workers": 3, "gpus_per_worker": 0.5}')
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 3
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # FLOWOPS_CLUSTER_* settings size the pods of a config that leaves it open.
    monkeypatch.setenv("FLOWOPS_CLUSTER_TRAIN_WORKERS", "4")
    monkeypatch.setenv("FLOWOPS_CLUSTER_TRAIN_WORKER_GPUS", "2")
    monkeypatch.setenv("FLOWOPS_CLUSTER_NAMESPACE", "ml")
    job = cluster.train_job(get_settings(home=tmp_path), "{}")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert job["metadata"]["namespace"] == "ml" and group["replicas"] == 4
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    with pytest.raises(InvalidInput, match="train config: epochs"):
        cluster.train_job(get_settings(home=tmp_path), '{"epochs": 0}')


def test_cluster_render_cli(tmp_path):
    proc = run_cli("cluster", "render", "--overlay", "prod", check=True, timeout=120)
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert objs == cluster.render(get_settings(), "prod")
    assert all(o["metadata"].get("namespace") == "flowops" for o in objs if o["kind"] != "Namespace")
    bad = run_cli("cluster", "render", "--overlay", "staging", timeout=120)
    assert bad.returncode != 0
    assert "overlay 'staging' not found" in bad.stderr and "dev, gpu, prod" in bad.stderr
    assert "Traceback" not in bad.stderr
