"""Isolated per-engineer dev environments: a Ray cluster with the GPUs asked for, reached from the IDE.

Two backends behind one request (`DevenvRequest`):
- `k8s`: a namespace of its own with a ResourceQuota (GPUs, CPU, memory), a NetworkPolicy, RBAC
  limited to the namespace, and a RayCluster whose GPU worker group scales to zero when idle; the Ray
  Client port is exposed by a Service for `kubectl port-forward`. Rendered from flowops.manifests'
  typed builders; applied through the Kubernetes API with `apply=True` (the `k8s` extra).
- `local`: a Ray head on this machine with its own ports, temp folder and token, offering exactly the
  CPUs/GPUs asked for (GPUs pinned with CUDA_VISIBLE_DEVICES), recorded in <home>/devenvs/NAME.json.

Both give a `ray://` address and the token an IDE needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowops import cluster, manifests
from flowops.durable import atomic_write_text, wait_until
from flowops.errors import ClusterUnavailable, Conflict, InvalidInput, NotFound, invalid_input, validated
from flowops.ray_client import RayHead, free_port, kill_session, port_in_use, session_processes
from flowops.settings import Settings

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RAY_WORKER_PORTS = range(10002, 20000)
K8S_DEFAULT_MEMORY = "16Gi"
HEAD_CPUS, HEAD_MEMORY_MI = 1, 4096  # the k8s head (runs no tasks) and what its quota reserves

# Node labels of the common GPU types: GKE's accelerator label, NVIDIA GPU feature discovery elsewhere.
DEFAULT_GPU_TYPES: dict[str, dict[str, Any]] = {
    "t4": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}},
    "l4": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}},
    "a100": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}},
    "h100": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
    "a10g": {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A10G"}},
}


class GpuType(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_selector: dict[str, str] = Field(min_length=1)
    resource: str = "nvidia.com/gpu"  # the extended resource the device plugin advertises


def gpu_types(settings: Settings) -> dict[str, GpuType]:
    """The configured GPU types: the defaults plus those of FLOWOPS_DEVENV_GPU_TYPES_FILE."""
    path = settings.devenv.gpu_types_file
    raw: dict[str, Any] = dict(DEFAULT_GPU_TYPES)
    if path:
        try:
            extra = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"GPU types file {path}: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidInput(f"GPU types file {path} must map type -> {{node_selector: ...}}")
        raw.update({str(k).lower(): v for k, v in extra.items()})
    with invalid_input("GPU types"):
        return {name: GpuType.model_validate(value) for name, value in raw.items()}


class DevenvRequest(BaseModel):
    """What an engineer asks for. Invalid requests fail before anything is created."""

    model_config = ConfigDict(extra="forbid")

    name: str
    gpus: int
    gpu_type: str
    cpus: int = Field(4)
    memory: str | None = None  # k8s default K8S_DEFAULT_MEMORY; local: Ray's default (no cap)
    backend: Literal["local", "k8s"] = "k8s"
    owner: str | None = None  # Kubernetes user bound to the namespace's Role (default: the name)

    @field_validator("name")
    @classmethod
    def _namespace_name(cls, value: str) -> str:
        if len(value) > 63 or not DNS1123_LABEL.match(value):
            raise ValueError(
                f"name {value!r} is not a valid namespace name: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return value

    @field_validator("gpus")
    @classmethod
    def _positive_gpus(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"--gpus must be at least 1 (got {value}); a dev environment is for GPU work")
        return value

    @field_validator("cpus")
    @classmethod
    def _positive_cpus(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"--cpus must be at least 1 (got {value})")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[1-9][0-9]*(Mi|Gi)", value):
            raise ValueError(f"--memory {value!r} must look like 512Mi or 16Gi")
        return value

    @property
    def memory_mi(self) -> int:
        memory = self.memory or K8S_DEFAULT_MEMORY
        number = int(memory[:-2])
        return number * 1024 if memory.endswith("Gi") else number


def make_request(settings: Settings, **fields: Any) -> DevenvRequest:
    """Validate a request (including the GPU type against the configuration); one clear error line."""
    request = validated(DevenvRequest, **fields)
    types = gpu_types(settings)
    key = request.gpu_type.lower()
    if key not in types:
        raise InvalidInput(
            f"GPU type {request.gpu_type!r} is not configured; configured: {', '.join(sorted(types))} "
            "(add types with FLOWOPS_DEVENV_GPU_TYPES_FILE)"
        )
    return request.model_copy(update={"gpu_type": key})


# Kubernetes backend ------------------------------------------------------------------------------


def k8s_objects(settings: Settings, request: DevenvRequest) -> list[dict[str, Any]]:
    """Namespace, quota, network policy, RBAC, RayCluster and Ray Client Service of a dev environment."""
    cfg = settings.devenv
    gpu = gpu_types(settings)[request.gpu_type]
    ns = request.name
    # Pod Security: enforce baseline, warn on anything short of restricted (what our pods meet).
    labels = {"flowops.io/devenv": ns, "pod-security.kubernetes.io/enforce": "baseline",
              "pod-security.kubernetes.io/warn": "restricted"}
    ray_cluster = manifests.RayClusterInput(
        image=cfg.image,
        head_cpus=HEAD_CPUS,
        head_memory=f"{HEAD_MEMORY_MI}Mi",
        autoscaling=True,
        idle_timeout_s=cfg.idle_timeout_s,
        auth_secret=None,  # KubeRay generates a Secret named after the cluster (key auth_token)
        env_config_map=None,  # a dev environment is standalone: none of the platform's settings or Secrets
        s3_secret=None,
        state_secret=None,
        keys_secret=None,
        worker_service_account="ray",
        workers=[manifests.WorkerGroup(
            name="gpu", cpus=request.cpus, memory=f"{request.memory_mi}Mi", gpus=request.gpus,
            min_replicas=0, max_replicas=1, replicas=0, node_selector=gpu.node_selector,
            idle_timeout_s=cfg.idle_timeout_s,
        )],
    )
    # The quota covers the head, the GPU worker and the autoscaler sidecar, and nothing more.
    quota_cpus = request.cpus + HEAD_CPUS + 1
    quota_memory = f"{request.memory_mi + HEAD_MEMORY_MI + 1024}Mi"
    owner = request.owner or request.name
    return [
        manifests.namespace(ns, labels),
        manifests.resource_quota("devenv", ns, quota_cpus, quota_memory, request.gpus),
        manifests.network_policy("devenv", ns, [
            {"from": [{"podSelector": {}}]},  # pods of this namespace only (port-forward is not affected)
            {"from": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "kuberay-operator"}}}],
             "ports": [{"port": 8265, "protocol": "TCP"}]},  # the operator reads the dashboard API
        ]),
        manifests.service_account("ray", ns),
        manifests.role("devenv-owner", ns, [
            {"apiGroups": ["ray.io"], "resources": ["rayclusters", "rayjobs", "rayservices"],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": [""], "resources": ["pods", "pods/log", "services", "events"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [ns], "verbs": ["get"]},
        ]),
        manifests.role_binding("devenv-owner", ns, "devenv-owner", [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": owner},
        ]),
        manifests.ray_cluster(ns, ns, ray_cluster, {"flowops.io/devenv": ns}),
        manifests.service(f"{ns}-ray-client", ns, {"ray.io/cluster": ns, "ray.io/node-type": "head"}, [
            {"name": "client", "port": 10001, "targetPort": 10001},
            {"name": "dashboard", "port": 8265, "targetPort": 8265},
        ]),
    ]


def k8s_connect_text(request: DevenvRequest) -> str:
    ns = request.name
    token = str(Path.home() / ".ray" / f"{ns}.token")
    return (
        f"kubectl -n {ns} port-forward svc/{ns}-ray-client 10001:10001 8265:8265 &\n"
        f"kubectl -n {ns} get secret {ns} -o jsonpath='{{.data.auth_token}}' | base64 -d > {token}"
        f" && chmod 600 {token}\n"
        + ide_text("ray://127.0.0.1:10001", token)
    )


def ide_text(address: str, token_path: str) -> str:
    return (
        f"address:  {address}\n"
        f"token:    {token_path}\n"
        "connect:  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<token> python -c "
        f"\"import ray; ray.init('{address}'); print(ray.cluster_resources())\"\n"
        "VS Code:  pick the project's .venv as interpreter (same Ray version); in .vscode/launch.json add\n"
        f"          \"env\": {{\"RAY_AUTH_MODE\": \"token\", \"RAY_AUTH_TOKEN_PATH\": \"{token_path}\"}}\n"
        f"          and call ray.init(\"{address}\") in your script or notebook\n"
        "PyCharm:  Run > Edit Configurations > Environment variables:\n"
        f"          RAY_AUTH_MODE=token;RAY_AUTH_TOKEN_PATH={token_path}; interpreter: the project's .venv\n"
    )


# Local backend -----------------------------------------------------------------------------------


def _dir(settings: Settings) -> Path:
    return settings.home / "devenvs"


def _record_path(settings: Settings, name: str) -> Path:
    return _dir(settings) / f"{name}.json"


def read_record(settings: Settings, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(settings, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _port(used: set[int]) -> int:
    """A free port outside Ray's worker port range, not already picked."""
    for _ in range(200):
        port = free_port()
        if port not in RAY_WORKER_PORTS and port not in used and not port_in_use(port):
            used.add(port)
            return port
    raise Conflict("no free port outside Ray's worker port range 10002-19999")


class _DevHead(RayHead):
    """RayHead plus a memory budget for the dev cluster."""

    memory_bytes: int | None = None

    def command(self) -> list[str]:
        cmd = super().command()
        if self.memory_bytes:
            cmd += [f"--memory={self.memory_bytes}",
                    f"--object-store-memory={max(100 * 2**20, self.memory_bytes // 4)}"]
        return cmd


def physical_gpus() -> int:
    """NVIDIA GPUs this machine has (0 without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _healthy(record: dict[str, Any], timeout: float = 2.0) -> bool:
    if not session_processes(record["sid"]):
        return False
    try:
        token = Path(record["token_path"]).read_text().strip()
        resp = httpx.get(f"http://127.0.0.1:{record['ports']['dashboard']}/api/version",
                         headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        return resp.status_code == 200
    except (OSError, httpx.HTTPError):
        return False


def create_local(settings: Settings, request: DevenvRequest) -> dict[str, Any]:
    """Start an isolated Ray head for the engineer; returns its record (address, token, ports)."""
    existing = read_record(settings, request.name)
    if existing:
        if existing.get("backend") == "local" and session_processes(existing["sid"]):
            raise Conflict(
                f"dev environment {request.name} already runs ({existing['address']}); "
                f"`flowops devenv delete {request.name}` first"
            )
        if existing.get("backend") == "k8s":
            raise Conflict(f"dev environment {request.name} exists on Kubernetes; delete it first")
        _cleanup_local(settings, existing)  # a stale record: its Ray died
    folder = _dir(settings) / request.name
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_path = folder / "auth_token"
    atomic_write_text(token_path, secrets.token_hex(32), mode=0o600)  # the IDE's credential: owner only

    used: set[int] = set()
    ports = {"gcs": _port(used), "dashboard": _port(used), "client": _port(used), "metrics": _port(used)}
    digest = hashlib.sha1(f"{settings.home}/{request.name}".encode()).hexdigest()[:10]
    temp_dir = Path("/tmp") / f"flowops-dev-{digest}"
    env = settings.head_env()
    env.update({
        "FLOWOPS_RAY_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}",
        "FLOWOPS_RAY_PORT": str(ports["gcs"]), "FLOWOPS_DASHBOARD_PORT": str(ports["dashboard"]),
        "FLOWOPS_CLIENT_PORT": str(ports["client"]), "FLOWOPS_METRICS_PORT": str(ports["metrics"]),
        # Only the asked GPUs are visible to Ray's workers (GPUs 0..N-1 of this machine).
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(request.gpus)),
        # The Ray Client proxy gives a new client's server 30 s to start by default; a busy
        # workstation can need more (the IDE then sees "Starting Ray client server failed").
        "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120",
    })
    head = _DevHead(
        temp_dir=temp_dir, token_path=token_path, log_path=folder / "ray-start.log",
        ray_port=ports["gcs"], dashboard_port=ports["dashboard"], client_port=ports["client"],
        metrics_port=ports["metrics"], num_cpus=request.cpus, num_gpus=request.gpus, env=env,
    )
    head.memory_bytes = request.memory_mi * 2**20 if request.memory else None
    sid = head.start()
    record = {
        "name": request.name, "backend": "local", "sid": sid, "ports": ports,
        "address": f"ray://127.0.0.1:{ports['client']}",
        "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
        "token_path": str(token_path), "temp_dir": str(temp_dir),
        "cpus": request.cpus, "gpus": request.gpus, "gpu_type": request.gpu_type,
        "memory": request.memory, "physical_gpus": physical_gpus(), "created_at": time.time(),
    }
    atomic_write_text(_record_path(settings, request.name), json.dumps(record, indent=2))

    def ready() -> bool:
        if _healthy(record) and port_in_use(ports["client"]):
            return True
        if not session_processes(sid):
            raise ClusterUnavailable(f"the Ray head of {request.name} exited")
        return False

    try:
        wait_until(ready, 90, what=f"dev environment {request.name} becoming healthy",
                   error=ClusterUnavailable)
    except ClusterUnavailable as exc:
        _cleanup_local(settings, record)
        raise ClusterUnavailable(f"{exc}; see {head.log_path}") from None
    return record


def _cleanup_local(settings: Settings, record: dict[str, Any]) -> int:
    killed = kill_session(record["sid"]) if record.get("sid") else 0
    if record.get("temp_dir"):
        shutil.rmtree(record["temp_dir"], ignore_errors=True)
    shutil.rmtree(_dir(settings) / record["name"], ignore_errors=True)
    _record_path(settings, record["name"]).unlink(missing_ok=True)
    return killed


# Both backends -----------------------------------------------------------------------------------


def create(settings: Settings, request: DevenvRequest, apply: bool = False) -> dict[str, Any]:
    """Create a dev environment. k8s without `apply`: returns the manifests (nothing is created)."""
    if request.backend == "local":
        return create_local(settings, request)
    objects = k8s_objects(settings, request)
    result: dict[str, Any] = {"name": request.name, "backend": "k8s", "objects": objects,
                              "address": "ray://127.0.0.1:10001", "applied": False}
    if apply:
        if read_record(settings, request.name):
            raise Conflict(f"dev environment {request.name} is already recorded; delete it first")
        result["created"] = cluster.apply_objects(objects)
        result["applied"] = True
        record = {k: v for k, v in result.items() if k != "objects"}
        record.update(gpus=request.gpus, gpu_type=request.gpu_type, cpus=request.cpus,
                      memory=request.memory, created_at=time.time())
        _dir(settings).mkdir(parents=True, exist_ok=True)
        atomic_write_text(_record_path(settings, request.name), json.dumps(record, indent=2))
    return result


def list_devenvs(settings: Settings) -> list[dict[str, Any]]:
    """Recorded dev environments with their health (local ones are probed)."""
    out = []
    for path in sorted(_dir(settings).glob("*.json")) if _dir(settings).is_dir() else []:
        record = read_record(settings, path.stem)
        if not record:
            continue
        if record.get("backend") == "local":
            record["healthy"] = _healthy(record)
            record["processes"] = len(session_processes(record["sid"]))
        else:
            record["healthy"] = None  # ask the cluster: kubectl -n NAME get raycluster
        out.append(record)
    return out


def delete(settings: Settings, name: str) -> dict[str, Any]:
    """Stop a dev environment and remove its record; a local one leaves no process behind."""
    record = read_record(settings, name)
    if not record:
        known = [r["name"] for r in list_devenvs(settings)]
        raise NotFound(f"no dev environment {name!r}; existing: {', '.join(known) or 'none'}")
    if record.get("backend") == "k8s":
        cluster.delete_namespace(name)
        _record_path(settings, name).unlink(missing_ok=True)
        return {"name": name, "backend": "k8s", "deleted": f"namespace/{name}"}
    killed = _cleanup_local(settings, record)
    left = session_processes(record["sid"])
    if left:
        raise ClusterUnavailable(f"{len(left)} processes of {name} survived SIGKILL: {[p.pid for p in left]}")
    return {"name": name, "backend": "local", "stopped_processes": killed}
