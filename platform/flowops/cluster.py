"""The KubeRay cluster layer: render `cluster/` overlays, create RayJobs, apply objects.

`cluster/` is a kustomize tree (base + overlays dev, gpu, prod). `render` uses `kubectl kustomize`
when kubectl is installed and FlowOps' own renderer (flowops.manifests) otherwise; a test keeps the
two equal. `submit_train_k8s` is what `flowops train --target k8s` calls: a RayJob running
`python -m jobs.train ARGS` on its own short-lived RayCluster, built by the same typed builders the
tests validate against KubeRay's CRD schemas.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowops import manifests
from flowops.errors import ClusterUnavailable, Conflict, FlowOpsError, InvalidInput, NotFound
from flowops.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "gpu", "prod")


class ClusterSettings(BaseSettings):
    """Kubernetes settings (env `FLOWOPS_CLUSTER_*`)."""

    model_config = SettingsConfigDict(env_prefix="FLOWOPS_CLUSTER_", extra="ignore")

    manifests_dir: Path = Field(REPO_ROOT / "cluster", description="The kustomize tree.")
    crd_dir: Path = Field(
        REPO_ROOT.parent / "shared" / "kuberay-crds", description="KubeRay CRDs to validate against."
    )
    namespace: str = Field("flowops", description="Namespace RayJobs are created in.")
    image: str = Field(manifests.DEFAULT_IMAGE, description="Runtime image (cluster/image/Dockerfile).")
    train_workers: int = Field(2, ge=1, description="Worker pods of a training RayJob's cluster.")
    train_worker_cpus: int = Field(2, ge=1)
    train_worker_memory: str = Field("8Gi")
    train_worker_gpus: int = Field(0, ge=0, description="GPUs per training worker pod.")


def cluster_settings(**overrides: Any) -> ClusterSettings:
    try:
        return ClusterSettings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError: one line
        raise InvalidInput(f"invalid FLOWOPS_CLUSTER_* setting: {str(exc).splitlines()[-1]}") from None


def overlay_dir(name: str, cfg: ClusterSettings | None = None) -> Path:
    cfg = cfg or cluster_settings()
    overlays = cfg.manifests_dir / "overlays"
    path = overlays / name
    if not (path / "kustomization.yaml").is_file():
        known = sorted(p.name for p in overlays.iterdir() if p.is_dir()) if overlays.is_dir() else []
        raise NotFound(
            f"overlay {name!r} not found in {overlays}; overlays: {', '.join(known) or 'none'}"
        )
    return path


def render(overlay: str = "dev", renderer: Literal["auto", "kubectl", "python"] = "auto",
           cfg: ClusterSettings | None = None) -> list[dict[str, Any]]:
    """The objects of an overlay, rendered with kubectl when present (auto) or FlowOps' renderer."""
    path = overlay_dir(overlay, cfg)
    kubectl = shutil.which("kubectl")
    if renderer == "kubectl" or (renderer == "auto" and kubectl):
        if not kubectl:
            raise NotFound("kubectl is not on PATH; use --renderer python")
        out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise InvalidInput(f"kubectl kustomize {path} failed: {last}")
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return manifests.render_kustomization(path)


# Training on Kubernetes --------------------------------------------------------------------------


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def train_job(settings: Settings, train_args: list[str], cfg: ClusterSettings | None = None,
              name: str | None = None) -> dict[str, Any]:
    """A RayJob running `python -m jobs.train ARGS` on its own cluster (deleted when it ends).
    The worker group matches the arguments: one pod per `--workers`, GPUs per `--gpus-per-worker`."""
    cfg = cfg or cluster_settings()
    args = list(train_args)
    workers = _flag(args, "--workers")
    if workers is None:
        workers = str(cfg.train_workers)
        args += ["--workers", workers]
    gpus = _flag(args, "--gpus-per-worker")
    try:
        n_workers = int(workers)
        n_gpus = math.ceil(float(gpus)) if gpus is not None else cfg.train_worker_gpus
    except ValueError:
        raise InvalidInput(f"--workers {workers!r} / --gpus-per-worker {gpus!r} must be numbers") from None
    if n_workers < 1:
        raise InvalidInput(f"--workers must be at least 1 (got {n_workers})")
    entrypoint = shlex.join(["python", "-m", "jobs.train", *args])
    job = manifests.RayJobInput(
        name=name or f"flowops-train-{time.strftime('%Y%m%d-%H%M%S')}",
        entrypoint=entrypoint,
        env_vars={"PYTHONUNBUFFERED": "1", "FLOWOPS_MODEL_NAME": settings.model_name},
        cluster=manifests.RayClusterInput(
            image=cfg.image,
            worker_service_account="flowops-ray",
            workers=[manifests.WorkerGroup(
                name="train", cpus=cfg.train_worker_cpus, memory=cfg.train_worker_memory,
                gpus=n_gpus, min_replicas=n_workers, max_replicas=n_workers,
            )],
        ),
    )
    return manifests.ray_job(job, cfg.namespace)


def submit_train_k8s(settings: Settings, train_args: list[str], apply: bool) -> str:
    """Render (and with `apply`, create through the Kubernetes API) a training RayJob; returns YAML
    or, when applied, a line naming what was created."""
    obj = train_job(settings, train_args)
    if not apply:
        return manifests.dump([obj])
    created = apply_objects([obj])
    return f"created {created[0]} (kubectl -n {obj['metadata']['namespace']} get rayjob " \
           f"{obj['metadata']['name']})"


# Applying through the Kubernetes API -------------------------------------------------------------


def _kube_client():
    try:
        from kubernetes import client, config
    except ImportError:
        raise NotFound(
            "the Kubernetes client is not installed: pip install 'flowops[k8s]' (or omit --apply to "
            "print the YAML and `kubectl apply -f -` it)"
        ) from None
    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 - no kubeconfig: try in-cluster credentials
        try:
            config.load_incluster_config()
        except Exception as exc:  # noqa: BLE001
            raise ClusterUnavailable(f"no Kubernetes credentials (kubeconfig or in-cluster): {exc}") from None
    return client


def apply_objects(objects: list[dict[str, Any]]) -> list[str]:
    """Create each object (server-side); custom resources through the CustomObjects API."""
    client = _kube_client()
    from kubernetes import utils
    from kubernetes.client.rest import ApiException

    api = client.ApiClient()
    custom = client.CustomObjectsApi(api)
    created = []
    for obj in objects:
        group, _, version = obj["apiVersion"].rpartition("/")
        kind, meta = obj["kind"], obj["metadata"]
        try:
            if group == "ray.io":
                custom.create_namespaced_custom_object(
                    group, version, meta["namespace"], kind.lower() + "s", obj
                )
            else:
                utils.create_from_dict(api, obj)
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{kind} {meta['name']} already exists") from None
            raise FlowOpsError(f"creating {kind} {meta['name']} failed: {exc.status} {exc.reason}") from None
        except utils.FailToCreateError as exc:
            first = exc.api_exceptions[0]
            if first.status == 409:
                raise Conflict(f"{kind} {meta['name']} already exists") from None
            raise FlowOpsError(
                f"creating {kind} {meta['name']} failed: {first.status} {first.reason}"
            ) from None
        created.append(f"{kind}/{meta['name']}")
    return created


def delete_namespace(name: str) -> None:
    client = _kube_client()
    from kubernetes.client.rest import ApiException

    try:
        client.CoreV1Api().delete_namespace(name)
    except ApiException as exc:
        if exc.status == 404:
            raise NotFound(f"namespace {name} does not exist") from None
        raise FlowOpsError(f"deleting namespace {name} failed: {exc.status} {exc.reason}") from None
