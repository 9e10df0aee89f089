"""The KubeRay layer: render `cluster/` overlays, generate the platform RayCluster, validate, make
RayJobs (from options or from the suspended templates), apply objects.

`cluster/` is a kustomize tree (base + overlays dev, gpu, prod), rendered by `kubectl kustomize` (or
`kustomize build`): FlowOps does not reimplement kustomize. `cluster/base/ray-cluster.platform.yaml` is
generated from the typed builders (`platform_cluster`) by `flowops cluster generate`; a unit test fails
when the committed file is stale, as for the PrometheusRule. `submit_train_k8s` is what
`flowops train --target k8s` calls: a RayJob running
`python -m flowops.workloads.train --config '<JSON>'` on its own short-lived RayCluster, built by
the builders the tests validate against KubeRay's CRD schemas. Objects are applied with kubectl's
server-side apply (`apply_command`), so applying twice is harmless.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowops import manifests, resources
from flowops.durable import atomic_write_text
from flowops.errors import ClusterUnavailable, Conflict, InvalidInput, NotFound, validated_json
from flowops.settings import Settings

OVERLAYS = ("dev", "gpu", "prod")
PLATFORM_CLUSTER_FILE = Path("base") / "ray-cluster.platform.yaml"  # inside the manifests folder


def manifests_dir(settings: Settings) -> Path:
    """The kustomize tree: FLOWOPS_CLUSTER_MANIFESTS_DIR, else the one FlowOps ships (`cluster/`)."""
    return settings.cluster.manifests_dir or resources.cluster_tree()


def overlay_dir(settings: Settings, name: str) -> Path:
    overlays = manifests_dir(settings) / "overlays"
    if not overlays.is_dir():
        raise NotFound(f"no kustomize overlays in {overlays.parent}: FLOWOPS_CLUSTER_MANIFESTS_DIR must "
                       "name a tree like FlowOps' cluster/ (base/ and overlays/)")
    path = overlays / name
    if not (path / "kustomization.yaml").is_file():
        known = sorted(p.name for p in overlays.iterdir() if p.is_dir())
        raise NotFound(
            f"overlay {name!r} not found in {overlays}; overlays: {', '.join(known) or 'none'}"
        )
    return path


def kustomize(directory: Path) -> str:
    """The YAML kustomize renders for a directory: `kubectl kustomize`, else `kustomize build`."""
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    elif standalone := shutil.which("kustomize"):
        command = [standalone, "build", str(directory)]
    else:
        raise ClusterUnavailable("rendering needs kubectl (`kubectl kustomize`) or kustomize on PATH; "
                                 "neither is installed")
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise InvalidInput(f"{Path(command[0]).name} {command[1]} {directory} failed: {last}")
    return out.stdout


def render_text(settings: Settings, overlay: str = "dev") -> str:
    """An overlay rendered by kustomize, as YAML."""
    return kustomize(overlay_dir(settings, overlay))


def render(settings: Settings, overlay: str = "dev") -> list[dict[str, Any]]:
    """The objects of an overlay, rendered by kustomize."""
    return [d for d in yaml.safe_load_all(render_text(settings, overlay)) if d]


# Validation --------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)  # "overlay: Kind/name: where: what"
    skipped: list[str] = field(default_factory=list)  # kinds without a schema (Prometheus operator's)


def validate(settings: Settings, overlays: list[str] | None = None,
             crd_dir: Path | None = None) -> ValidationReport:
    """Validate every rendered object of the overlays (default: all) against KubeRay's CRD schemas
    (crd_dir, else FLOWOPS_CLUSTER_CRD_DIR, else the packaged copy) and Kubernetes' schemas."""
    validator = manifests.ManifestValidator(crd_dir or settings.cluster.crd_dir)
    report = ValidationReport()
    for name in overlays or OVERLAYS:
        for obj in render(settings, name):
            try:
                error = validator.check(obj)
            except NotFound as exc:
                report.skipped.append(f"{name}: {exc}")
                continue
            report.checked += 1
            if error:
                report.problems.append(f"{name}: {error}")
    return report


# The platform RayCluster (cluster/base/ray-cluster.platform.yaml) ---------------------------------


def platform_cluster() -> dict[str, Any]:
    """The long-lived platform RayCluster; its image `flowops-runtime` is pinned by kustomize."""
    spec = manifests.RayClusterInput(
        image="flowops-runtime", head_cpus=2, head_memory="8Gi", autoscaling=True, idle_timeout_s=300,
        head_service_account="flowops-controller", worker_service_account="flowops-ray",
        mounts=[manifests.Mount(name="ray-logs", path="/tmp/ray")],
        workers=[
            manifests.WorkerGroup(name="cpu", cpus=4, memory="16Gi", replicas=1, min_replicas=1,
                                  max_replicas=8),
            manifests.WorkerGroup(name="gpu", cpus=4, memory="24Gi", gpus=1, replicas=0, min_replicas=0,
                                  max_replicas=4,
                                  node_selector={"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}),
        ],
    )
    return manifests.ray_cluster("flowops-platform", None, spec)


PLATFORM_HEADER = """
GENERATED by `flowops cluster generate` from flowops.cluster.platform_cluster(); do not edit here:
change the builder, run the command, commit both (a unit test fails while this file is stale).

The FlowOps platform cluster: a head (dashboard/job API, Ray Client, Serve, metrics) and two
autoscaled worker groups, CPU and GPU. Long-lived; RayJobs with `clusterSelector` and the
`flowops` CLI (FLOWOPS_RAY_ADDRESS) submit to it. Overlays patch sizes, replicas and the GPU type.
"""
_HEAD = "spec/headGroupSpec/template/spec/"
_HEAD_C = _HEAD + "containers/ray-head/"
_CPU, _GPU = "spec/workerGroupSpecs/cpu/", "spec/workerGroupSpecs/gpu/"
PLATFORM_COMMENTS = {
    "metadata/labels/app.kubernetes.io/part-of": "kustomization.yaml sets it on every object too",
    "spec/rayVersion": "must equal the image's Ray (cluster/image/Dockerfile) and pyproject's pin",
    "spec/enableInTreeAutoscaling": "KubeRay runs the Ray autoscaler as a head sidecar",
    "spec/autoscalerOptions/idleTimeoutSeconds": "a worker idle for 5 min is removed (GPU workers scale "
                                                 "to zero)",
    "spec/autoscalerOptions/upscalingMode": "scale up in steps, not all at once (Aggressive) or not at "
                                            "all (Conservative)",
    "spec/autoscalerOptions/resources": "the sidecar's own budget, kept small",
    "spec/autoscalerOptions/securityContext": "same hardening as the Ray containers",
    "spec/authOptions/mode": "Ray token authentication (Ray >= 2.52): every API call needs the token",
    "spec/authOptions/secretName": "our own Secret (key `auth_token`); KubeRay injects "
                                   "RAY_AUTH_MODE/RAY_AUTH_TOKEN",
    "spec/headGroupSpec/serviceType": "reached in-cluster or via `kubectl port-forward`; never a public "
                                      "LoadBalancer",
    "spec/headGroupSpec/rayStartParams/dashboard-host": "the dashboard/job API listens on the pod IP "
                                                        "(NetworkPolicy restricts it)",
    "spec/headGroupSpec/rayStartParams/num-cpus": "no tasks on the head: it hosts GCS, the job API, "
                                                  "Serve's controller and drivers",
    "spec/headGroupSpec/rayStartParams/metrics-export-port": "Prometheus scrape port (PodMonitor in "
                                                             "cluster/monitoring)",
    "spec/headGroupSpec/rayStartParams/ray-client-server-port": "Ray Client (ray://) for IDEs and notebooks",
    "spec/headGroupSpec/template/metadata/labels/app.kubernetes.io/component": "NetworkPolicy and "
                                                                              "monitoring select on it",
    _HEAD + "serviceAccountName": "the controller job runs here (rbac.controller.yaml)",
    _HEAD + "securityContext/runAsNonRoot": "the Ray image's `ray` user",
    _HEAD + "securityContext/runAsUser": "uid of `ray` in rayproject/ray",
    _HEAD + "securityContext/fsGroup": "gid `users`: mounted volumes are writable by `ray`",
    _HEAD + "securityContext/seccompProfile": "default syscall filter",
    _HEAD_C + "image": "pinned by the `images:` entry of cluster/base/kustomization.yaml",
    _HEAD_C + "ports/gcs-server": "GCS (workers join here)",
    _HEAD_C + "ports/dashboard": "dashboard and job API",
    _HEAD_C + "ports/client": "Ray Client",
    _HEAD_C + "ports/serve": "Ray Serve HTTP (the classifier)",
    _HEAD_C + "ports/metrics": "Prometheus metrics",
    _HEAD_C + "envFrom/0": "FLOWOPS_* settings (config-map.platform.yaml)",
    _HEAD_C + "env/FLOWOPS_STATE_URL": "the state database (labels, loop, events, ledger totals): the "
                                       "Secret flowops-state",
    _HEAD_C + "env/FLOWOPS_ADMIN_KEY": "the classifier app's admin key: the controller steers routing "
                                       "with it",
    _HEAD_C + "env/FLOWOPS_API_KEY": "prediction key, when the app requires one (optional key)",
    _HEAD_C + "env/AWS_ACCESS_KEY_ID": "S3 credentials (storage URI, DVC remote): the Secret "
                                       "flowops-s3; optional for IRSA",
    _HEAD_C + "env/GRPC_ENABLE_FORK_SUPPORT": "Ray Client forks+execs a server per IDE connection; gRPC's "
                                              "fork handlers can abort\nthat child "
                                              "(ray-project/ray#63202). A fork followed by exec needs none.",
    _HEAD_C + "resources/requests": "GCS + dashboard + Serve controller + job drivers",
    _HEAD_C + "resources/limits": "requests == limits: Guaranteed QoS for the head",
    _HEAD_C + "securityContext/allowPrivilegeEscalation": "no setuid escalation",
    _HEAD_C + "securityContext/capabilities": "Ray needs no Linux capabilities",
    _HEAD_C + "volumeMounts/ray-logs": "Ray's session dir (logs, sockets)",
    _HEAD + "volumes/ray-logs": "scratch: gone with the pod",
    _CPU + "groupName": "data preparation, evaluation, batch inference, Serve replicas",
    _CPU + "replicas": "start with one",
    _CPU + "minReplicas": "keep one warm: the classifier's replicas live here",
    _CPU + "maxReplicas": "autoscaler ceiling",
    _CPU + "rayStartParams/metrics-export-port": "the port the PodMonitor scrapes (declared below)",
    _CPU + "template/spec/containers/ray-worker/ports/metrics": "Prometheus metrics (PodMonitor "
                                                                "flowops-ray-workers)",
    _CPU + "template/spec/containers/ray-worker/env/FLOWOPS_STATE_URL": "same Secrets as the head: "
                                                                        "Serve replicas and jobs run here",
    _CPU + "template/metadata": "the component label NetworkPolicy and monitoring select on",
    _CPU + "template/spec/serviceAccountName": "no Kubernetes API token",
    _CPU + "template/spec/containers/ray-worker/resources/requests": "Ray advertises the limits as the "
                                                                     "node's resources",
    _GPU + "groupName": "training and GPU batch inference",
    _GPU + "replicas": "none until a task asks for a GPU",
    _GPU + "minReplicas": "scale to zero when idle (autoscalerOptions.idleTimeoutSeconds)",
    _GPU + "maxReplicas": "autoscaler ceiling (GPU quota)",
    _GPU + "template/spec/nodeSelector/cloud.google.com/gke-accelerator": "GPU type; the gpu/prod "
                                                                          "overlays change it",
    _GPU + "template/spec/tolerations/0": "GPU node pools are tainted so only GPU pods land there",
    _GPU + "template/spec/containers/ray-worker/image": "build the CUDA variant for GPU pools (see the "
                                                        "Dockerfile)",
    _GPU + "template/spec/containers/ray-worker/resources/limits": "one GPU per worker pod; Ray "
                                                                   "advertises GPU: 1",
}


def render_platform_cluster() -> str:
    """The text of cluster/base/ray-cluster.platform.yaml: the builder's object with its comments."""
    return manifests.dump_commented(platform_cluster(), PLATFORM_COMMENTS, PLATFORM_HEADER)


def generate_platform_cluster(settings: Settings, check: bool = False) -> Path:
    """Write the platform RayCluster's file; with `check`, only fail (Conflict) when it is stale."""
    path = manifests_dir(settings) / PLATFORM_CLUSTER_FILE
    text = render_platform_cluster()
    if check:
        if not path.is_file() or path.read_text() != text:
            raise Conflict(f"{path} is stale: run `flowops cluster generate`")
        return path
    atomic_write_text(path, text)
    return path


# Training on Kubernetes --------------------------------------------------------------------------


def train_job(settings: Settings, config_json: str, name: str | None = None) -> dict[str, Any]:
    """A RayJob running `python -m flowops.workloads.train --config '<TrainConfig JSON>'` on its own
    cluster (deleted when it ends): one worker pod per Ray Train worker, with the worker's GPUs. A
    config that does not set `workers` gets FLOWOPS_CLUSTER_TRAIN_WORKERS; one without
    `gpus_per_worker` gets pods with FLOWOPS_CLUSTER_TRAIN_WORKER_GPUS GPUs."""
    from flowops.train import TrainConfig  # pandas and pyarrow: kept out of CLI start-up

    config = validated_json(TrainConfig, config_json, "train config")
    k8s = settings.cluster
    if "workers" not in config.model_fields_set:
        config = config.model_copy(update={"workers": k8s.train_workers})
    gpus = (math.ceil(config.gpus_per_worker) if "gpus_per_worker" in config.model_fields_set
            else k8s.train_worker_gpus)
    job = manifests.RayJobInput(
        name=name or f"flowops-train-{time.strftime('%Y%m%d-%H%M%S')}",
        entrypoint=shlex.join(["python", "-m", "flowops.workloads.train", "--config",
                               config.model_dump_json(exclude_unset=True)]),
        env_vars={"PYTHONUNBUFFERED": "1", **({"FLOWOPS_MODEL_NAME": settings.model_name}
                                              if "model_name" in settings.model_fields_set else {})},
        cluster=manifests.RayClusterInput(
            image=k8s.image,
            worker_service_account="flowops-ray",
            workers=[manifests.WorkerGroup(
                name="train", cpus=k8s.train_worker_cpus, memory=k8s.train_worker_memory,
                gpus=gpus, min_replicas=config.workers, max_replicas=config.workers,
            )],
        ),
    )
    return manifests.ray_job(job, k8s.namespace)


def submit_train_k8s(settings: Settings, config_json: str, apply: bool) -> str:
    """Render (and with `apply`, server-side apply through kubectl) a training RayJob; returns YAML
    or, when applied, what kubectl says it did."""
    obj = train_job(settings, config_json)
    if not apply:
        return manifests.dump([obj])
    applied = apply_objects([obj])
    return f"{applied[0]} (kubectl -n {obj['metadata']['namespace']} get rayjob {obj['metadata']['name']})"


# RayJob templates (cluster/base/ray-job.*.yaml) --------------------------------------------------


def job_templates(settings: Settings, overlay: str) -> dict[str, dict[str, Any]]:
    """The overlay's RayJobs by name. The base ships them suspended (`spec.suspend: true`), so that
    `kubectl apply -k` installs them as templates and runs nothing."""
    return {o["metadata"]["name"]: o for o in render(settings, overlay) if o["kind"] == "RayJob"}


def job_from_template(settings: Settings, template: str, overlay: str = "dev",
                      name: str | None = None) -> dict[str, Any]:
    """A runnable RayJob made from a template: its own name (a RayJob runs once, so each run is a
    new object; default `<template>-<UTC time>`), not suspended, everything else as the overlay
    renders it."""
    templates = job_templates(settings, overlay)
    if template not in templates:
        raise NotFound(f"no RayJob template {template!r} in overlay {overlay}; templates: "
                       f"{', '.join(sorted(templates)) or 'none'}")
    name = name or f"{template}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if not re.fullmatch(manifests.NAME_PATTERN, name):
        raise InvalidInput(f"RayJob name {name!r}: lower-case letters, digits and '-', at most 63")
    job = copy.deepcopy(templates[template])
    job["metadata"]["name"] = name
    job["spec"].pop("suspend", None)
    problem = manifests.ManifestValidator(settings.cluster.crd_dir).check(job)
    if problem:
        raise InvalidInput(problem)
    return job


def run_job_template(settings: Settings, template: str, overlay: str = "dev", name: str | None = None,
                     apply: bool = False) -> str:
    """`flowops cluster run-job`: the RayJob's YAML, or, with `apply`, what kubectl did with it."""
    job = job_from_template(settings, template, overlay, name)
    return apply_objects([job])[0] if apply else manifests.dump([job])


# Applying through kubectl ------------------------------------------------------------------------

FIELD_MANAGER = "flowops"


def apply_command() -> list[str]:
    """Server-side apply from stdin: creates what is missing, updates what FlowOps applied before
    (idempotent: the same objects twice change nothing), and refuses, naming the field, to take over
    a field another manager set (a `kubectl edit`, an operator) instead of silently overwriting it."""
    return [_kubectl(), "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-"]


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        raise ClusterUnavailable("--apply needs kubectl on PATH (with a kubeconfig or in-cluster "
                                 "credentials); without --apply the YAML is printed")
    return path


def _run_kubectl(command: list[str], stdin: str | None = None) -> str:
    out = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        lines = [ln.strip() for ln in out.stderr.splitlines() if ln.strip()] or ["unknown error"]
        error = next((ln for ln in lines if ln.lower().startswith("error")), lines[-1])
        what = " ".join(command[1:3])
        if "conflict" in error.lower():
            raise Conflict(f"kubectl {what}: {error} (another field manager owns it; see "
                           "docs/kubernetes.md)")
        if "(NotFound)" in error:
            raise NotFound(f"kubectl {what}: {error}")
        raise ClusterUnavailable(f"kubectl {what} failed: {error}")
    return out.stdout


def apply_objects(objects: list[dict[str, Any]]) -> list[str]:
    """Server-side apply the objects (`apply_command`); one line per object, as kubectl reports it
    (`rayjob.ray.io/x serverside-applied`)."""
    return _run_kubectl(apply_command(), manifests.dump(objects)).splitlines()


def delete_namespace(name: str) -> None:
    """Delete a namespace and everything in it (returns while Kubernetes finishes in the background)."""
    _run_kubectl([_kubectl(), "delete", "namespace", name, "--wait=false"])
