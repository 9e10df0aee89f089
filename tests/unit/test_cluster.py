"""The KubeRay layer's promises: one pinned image and Ray version, hardened pods, secrets by reference,
and the training RayJob behind `flowops train --target k8s`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import ray
import yaml

from flowops import cluster, manifests
from flowops.errors import InvalidInput, NotFound
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
    assert set(jobs) == {"flowops-train", "flowops-pseudo-label"}
    for spec in jobs.values():
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]


def test_every_non_default_field_is_commented():
    """Each setting in the base manifests carries a comment: on its line, on the line above, or (for
    pod boilerplate repeated across groups) on the same key elsewhere in the file."""
    structural = {"apiVersion", "kind", "name", "key", "value", "operator", "effect", "mountPath", "path",
                  "port", "protocol", "targetPort", "containerPort", "groupName", "apiGroup", "apiGroups",
                  "verbs", "selector", "valueFrom", "secretKeyRef", "configMap", "configMapRef", "emptyDir",
                  "rayStartParams", "policyTypes", "newName", "newTag", "app.kubernetes.io/name",
                  "ray.io/is-ray-node"}
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
            if line.startswith("    ") and path.name == "ray-service.classifier.yaml":
                continue  # inside a block string (serveConfigV2), explained above it
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


# The Kubernetes path: shared state, monitoring that reaches its targets, templates that stay put ---

IGNORED_BY_KUBERAY = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}  # kuberay#1685
# What KubeRay adds to the pods it makes from a template (the selectors of monitors and policies).
KUBERAY_LABELS = {"head": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"},
                  "worker": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"}}
PROMETHEUS = {"namespace": {"kubernetes.io/metadata.name": "monitoring"},
              "pod": {"app.kubernetes.io/name": "prometheus"}}


def _named(objects, kind: str, name: str):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _walk_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _walk_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_keys(value)


def _ray_specs(obj):
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    if obj["kind"] not in key:
        return None
    return obj["spec"] if key[obj["kind"]] is None else obj["spec"].get(key[obj["kind"]])


def _pods(objects):
    """(where, labels as the running pod has them, pod spec, rayStartParams or None) of every pod
    template: Ray heads and workers with KubeRay's labels, Deployments and StatefulSets."""
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            tpl = obj["spec"]["template"]
            yield name, tpl["metadata"]["labels"], tpl["spec"], None
        elif (spec := _ray_specs(obj)) is not None:
            groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec["workerGroupSpecs"]]
            for node_type, group in groups:
                tpl = group["template"]
                labels = {**tpl.get("metadata", {}).get("labels", {}), **KUBERAY_LABELS[node_type]}
                yield f"{name}/{node_type}", labels, tpl["spec"], group.get("rayStartParams", {})


def _selects(selector, labels) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        if (op == "In" and value not in e["values"]) or (op == "NotIn" and value in e["values"]) or \
                (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def _admits(policies, pod_labels, port: int, port_name: str, source) -> bool:
    """Whether the NetworkPolicies let a pod of another namespace (`source`: its namespace's and its
    own labels) reach `port` of a pod with `pod_labels`: Kubernetes' rules, ingress only."""
    isolating = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], pod_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return True
    for spec in isolating:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, port_name) and p.get("protocol", "TCP") == "TCP"
                                 for p in ports):
                continue
            for peer in rule.get("from") or [{"namespaceSelector": {}}]:
                ns_sel = peer.get("namespaceSelector")  # absent: this namespace only
                if ns_sel is not None and _selects(ns_sel, source["namespace"]) and \
                        _selects(peer.get("podSelector", {}), source["pod"]):
                    return True
    return False


def _scrape_targets(objects):
    """(monitor, pod where, pod labels, pod spec, port name, rayStartParams) for every endpoint of
    every ServiceMonitor/PodMonitor: pods behind the Services it selects (KubeRay's head Services
    carry the head container's named ports), or the pods a PodMonitor selects."""
    pods = list(_pods(objects))
    services = [o for o in objects if o["kind"] == "Service"]
    for mon in (o for o in objects if o["kind"] in ("ServiceMonitor", "PodMonitor")):
        selector = mon["spec"]["selector"]
        for endpoint in mon["spec"].get("endpoints") or mon["spec"]["podMetricsEndpoints"]:
            found = []
            if mon["kind"] == "PodMonitor" or _selects(selector, KUBERAY_LABELS["head"]):
                found = [(p, endpoint["port"]) for p in pods if _selects(selector, p[1])]
            for svc in services:
                if _selects(selector, svc["metadata"].get("labels", {})):
                    port = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
                    found += [(p, port["targetPort"]) for p in pods
                              if _selects({"matchLabels": svc["spec"]["selector"]}, p[1])]
            assert found, f"{mon['metadata']['name']} scrapes {endpoint['port']} of no pod"
            for (where, labels, spec, params), port_name in found:
                yield mon["metadata"]["name"], where, labels, spec, port_name, params


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_every_scraped_port_is_declared_and_admitted(overlay, rendered):
    """The bug this guards: a ServiceMonitor scraping a port no container declares, or that the
    NetworkPolicies close, makes every alert on its metrics silently impossible."""
    objects = rendered[overlay]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)  # deny all
    targets = list(_scrape_targets(objects))
    assert {t[0] for t in targets} == {"flowops-ray-head", "flowops-ray-workers", "flowops-exporter"}
    for monitor, where, labels, spec, port_name, params in targets:
        declared = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        assert port_name in declared, f"{monitor} scrapes {port_name!r} of {where}, which declares {declared}"
        port = declared[port_name]
        if params is not None:  # a Ray node exports its metrics on the port it is told
            assert int(params.get("metrics-export-port", 0)) == port, (where, params)
        assert _admits(policies, labels, port, port_name, PROMETHEUS), f"Prometheus: {where}:{port} closed"
    exporter = next(t for t in targets if t[0] == "flowops-exporter")
    stranger = {"namespace": {"kubernetes.io/metadata.name": "elsewhere"}, "pod": {}}
    assert not _admits(policies, exporter[2], 8091, "flowops-metrics", stranger)  # the policy means something


def test_the_exporter_deployment_runs_the_foreground_exporter(rendered, tmp_path):
    """The command the Deployment runs serves /metrics on the port it declares and stops on SIGTERM
    (a container's process must: Kubernetes stops pods with it)."""
    dep = _named(rendered["prod"], "Deployment", "flowops-exporter")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"]
    assert argv[:4] == ["flowops", "monitor", "exporter", "run"]
    assert int(argv[argv.index("--port") + 1]) == container["ports"][0]["containerPort"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv[argv.index("--port") + 1], argv[argv.index("--host") + 1] = str(port), "127.0.0.1"
    proc = subprocess.Popen([sys.executable, "-m", "flowops.cli.main", *argv[1:]],
                            env={**os.environ, "FLOWOPS_HOME": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline and "flowops_exporter_source_up" not in text:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            except httpx.HTTPError:
                time.sleep(0.3)
        assert 'flowops_exporter_source_up{source="labels"}' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        proc.kill()


def _env(container, config_maps):
    """name -> ("value", v) | ("secret", name, key), with envFrom ConfigMaps resolved."""
    out = {}
    for source in container.get("envFrom", []):
        for key, value in config_maps[source["configMapRef"]["name"]].items():
            out[key] = ("value", value)
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        out[e["name"]] = ("secret", ref["name"], ref["key"]) if ref else ("value", e.get("value"))
    return out


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_every_flowops_pod_reaches_the_shared_state(overlay, rendered):
    """Every pod that runs FlowOps code (Ray heads and workers of the platform, the RayService and
    the RayJobs, and the exporter) gets the state database's URL from a Secret and the MLflow
    server's in-cluster address; Ray pods get the app's keys from a Secret. No pod depends on a file
    another pod wrote."""
    objects = rendered[overlay]
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    rayservice = next(o["metadata"]["name"] for o in objects if o["kind"] == "RayService")
    flowops_pods = [p for p in _pods(objects) if p[3] is not None or p[0] == "Deployment/flowops-exporter"]
    assert len(flowops_pods) >= 9
    for where, _, spec, params in flowops_pods:
        for c in spec["containers"]:
            env = _env(c, config_maps)
            assert env["FLOWOPS_STATE_URL"] == ("secret", "flowops-state", "url"), where
            kind, uri = env["FLOWOPS_MLFLOW_TRACKING_URI"]
            host, port = _host_port(uri)
            assert kind == "value" and port in {p["port"] for p in services[host]["spec"]["ports"]}, where
            assert services[host]["spec"]["selector"] == {"app.kubernetes.io/name": "mlflow"}
            host, port = _host_port(env["FLOWOPS_SERVE_URL"][1])
            assert (host, port) == (f"{rayservice}-serve-svc", 8000), where  # the Service KubeRay makes
            if params is not None:
                assert env["FLOWOPS_ADMIN_KEY"] == ("secret", "flowops-keys", "admin-key"), where
            for volume in spec.get("volumes", []):
                assert "emptyDir" in volume or "configMap" in volume, (where, volume)  # caches, config
    container = _named(objects, "Deployment", "flowops-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert _env(container, config_maps)["MLFLOW_BACKEND_STORE_URI"] == \
        ("secret", "flowops-state", "mlflow-url")
    assert "--serve-artifacts" in container["args"]  # clients reach artifacts through the server only


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_every_ray_container_reaches_the_storage(overlay, rendered):
    """Every Ray container (the platform's head and workers, the RayService, the RayJobs) gets the
    storage URI and its endpoint from the ConfigMap, and the S3 credentials from the Secret
    flowops-s3 by optional reference: with IAM roles (IRSA) there is no Secret and the pod still
    starts. The DVC remote is not set: it follows the storage URI (<storage>/dvc)."""
    objects = rendered[overlay]
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    ray_pods = [p for p in _pods(objects) if p[3] is not None]
    assert len(ray_pods) >= 7
    for where, _, spec, _ in ray_pods:
        for c in spec["containers"]:
            env = _env(c, config_maps)
            kind, uri = env["FLOWOPS_STORAGE_URI"]
            assert kind == "value" and uri.startswith("s3://"), where
            assert env["FLOWOPS_STORAGE_ENDPOINT_URL"][0] == "value", where
            assert env["FLOWOPS_DATA_REPO"][0] == "value" and "://" in env["FLOWOPS_DATA_REPO"][1], where
            assert "FLOWOPS_DVC_REMOTE" not in env, where
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]
                    if "secretKeyRef" in e.get("valueFrom", {})}
            assert refs["AWS_ACCESS_KEY_ID"] == {"name": "flowops-s3", "key": "access-key-id",
                                                 "optional": True}, where
            assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "flowops-s3", "key": "secret-access-key",
                                                     "optional": True}, where
            assert get_settings(storage_uri=uri).remote == f"{uri}/dvc"
    assert "flowops-dvc-remote" not in config_maps  # one source: the settings


def _host_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host, parsed.port


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_bundled_postgres_keeps_its_data_and_its_credentials_secret(overlay, rendered):
    objects = rendered[overlay]
    (pg,) = [o for o in objects if o["kind"] == "StatefulSet"]
    assert pg["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    container = pg["spec"]["template"]["spec"]["containers"][0]
    env = _env(container, {})
    assert env["POSTGRES_PASSWORD"] == ("secret", "flowops-postgres", "password")
    assert env["POSTGRES_DB"] == ("value", "flowops")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert env["PGDATA"][1].startswith(next(p for p, n in mounts.items() if n == "data") + "/")
    init = _named(objects, "ConfigMap", "flowops-postgres-init")
    assert "CREATE DATABASE mlflow;" in "".join(init["data"].values())
    # The URLs docs/kubernetes.md tells operators to put in the Secret point at what is bundled.
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    svc = _named(objects, "Service", "flowops-postgres")
    host = f"@{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert f"url=\"postgresql://flowops:$PGPASSWORD{host}/flowops\"" in doc
    assert f"mlflow-url=\"postgresql://flowops:$PGPASSWORD{host}/mlflow\"" in doc


def test_external_postgres_component_removes_only_the_bundled_database(tmp_path):
    """An overlay with components/external-postgres renders no PostgreSQL of its own, and every
    object still validates; pods keep reading the URLs from the Secret."""
    tree = tmp_path / "cluster"
    shutil.copytree(REPO / "cluster", tree)
    overlay = tree / "overlays" / "managed-db"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "flowops",
        "resources": ["../prod"], "components": ["../../components/external-postgres"],
    }))
    objects = [d for d in yaml.safe_load_all(cluster.kustomize(overlay)) if d]
    bundled = {(o["kind"], o["metadata"]["name"]) for o in cluster.render(get_settings(), "prod")}
    left = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert bundled - left == {("StatefulSet", "flowops-postgres"), ("Service", "flowops-postgres"),
                              ("ConfigMap", "flowops-postgres-init"), ("NetworkPolicy", "flowops-postgres")}
    validator = manifests.ManifestValidator()
    assert [validator.check(o) for o in objects if "coreos" not in o["apiVersion"]] == \
        [None] * sum("coreos" not in o["apiVersion"] for o in objects)


@pytest.mark.parametrize("overlay", cluster.OVERLAYS)
def test_apply_runs_nothing_and_sets_no_ignored_field(overlay, rendered):
    """`kubectl apply -k` installs the RayJobs as suspended templates (KubeRay creates no cluster for
    a suspended RayJob); no object carries a field KubeRay ignores."""
    jobs = [o for o in rendered[overlay] if o["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        assert job["spec"].get("suspend") is True, job["metadata"]["name"]
        # KubeRay refuses to suspend a RayJob that keeps its cluster or uses clusterSelector.
        assert job["spec"]["shutdownAfterJobFinishes"] is True and "clusterSelector" not in job["spec"]
    used = {key for o in rendered[overlay] for key in _walk_keys(o)}
    assert not used & IGNORED_BY_KUBERAY


def test_run_job_makes_a_runnable_copy_of_a_template(tmp_path):
    settings = get_settings(home=tmp_path)
    template = cluster.job_templates(settings, "gpu")["flowops-train"]
    job = cluster.job_from_template(settings, "flowops-train", "gpu")
    assert job["metadata"]["name"].startswith("flowops-train-") and "suspend" not in job["spec"]
    assert job["metadata"]["namespace"] == "flowops-gpu"
    assert {**job["spec"], "suspend": True} == template["spec"]  # the overlay's job, nothing else changed
    named = cluster.job_from_template(settings, "flowops-pseudo-label", "dev", name="pl-1")
    assert named["metadata"]["name"] == "pl-1"
    proc = run_cli("cluster", "run-job", "flowops-train", "--overlay", "prod", "--name", "nightly",
                   check=True, timeout=120)
    (printed,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert printed["metadata"]["name"] == "nightly" and "suspend" not in printed["spec"]
    bad = run_cli("cluster", "run-job", "flowops-tune", timeout=120)
    assert bad.returncode == NotFound.exit_code and "Traceback" not in bad.stderr
    assert ("no RayJob template 'flowops-tune' in overlay dev; templates: flowops-pseudo-label, "
            "flowops-train") in bad.stderr
    bad = run_cli("cluster", "run-job", "flowops-train", "--name", "Bad_Name", timeout=120)
    assert bad.returncode != 0 and "Bad_Name" in bad.stderr and "Traceback" not in bad.stderr


def _fake_kubectl(folder, stderr: str = "", rc: int = 0):
    """A `kubectl` that records its arguments and stdin: the command FlowOps builds is what is
    tested here (no Kubernetes API server on this machine)."""
    script = folder / "kubectl"
    script.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {folder}/argv
cat > {folder}/stdin
printf 'rayjob.ray.io/x serverside-applied\\n'
printf '%s' '{stderr}' >&2
exit {rc}
""")
    script.chmod(0o755)
    return folder


def test_apply_is_server_side_and_idempotent(tmp_path, monkeypatch):
    """--apply runs `kubectl apply --server-side --field-manager=flowops -f -` with the objects on
    stdin: applying the same objects again updates nothing and never fails with "already exists"."""
    bin_dir = _fake_kubectl(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert cluster.apply_command() == [str(bin_dir / "kubectl"), "apply", "--server-side",
                                       "--field-manager=flowops", "-f", "-"]
    settings = get_settings(home=tmp_path)
    for _ in range(2):  # the same command twice: server-side apply is what makes that harmless
        out = cluster.submit_train_k8s(settings, '{"epochs": 1}', apply=True)
        assert out.startswith("rayjob.ray.io/x serverside-applied")
    assert (tmp_path / "argv").read_text().split() == cluster.apply_command()[1:]
    (sent,) = list(yaml.safe_load_all((tmp_path / "stdin").read_text()))
    assert sent["kind"] == "RayJob" and "suspend" not in sent["spec"]
    assert manifests.ManifestValidator().check(sent) is None
    # A field another manager owns: one line naming it, exit 4, no traceback.
    _fake_kubectl(tmp_path, stderr="error: Apply failed with 1 conflict: conflict with kubectl-edit "
                  "using ray.io/v1: .spec.entrypoint\nPlease review the fields above", rc=1)
    proc = run_cli("train", "--target", "k8s", "--apply", env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                   timeout=120)
    assert proc.returncode == 4 and ".spec.entrypoint" in proc.stderr and "Traceback" not in proc.stderr


def test_dev_environments_name_no_platform_secret():
    """A dev environment lives in its own namespace, where the platform's Secrets and ConfigMap do
    not exist: a pod naming one would never start."""
    from flowops import devenv

    settings = get_settings()
    request = devenv.make_request(settings, name="dana", gpus=1, gpu_type="t4", cpus=4, memory="16Gi")
    text = manifests.dump(devenv.k8s_objects(settings, request))
    for name in ("flowops-state", "flowops-keys", "flowops-s3", "flowops-platform"):
        assert name not in text
