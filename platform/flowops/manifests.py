"""Kubernetes manifests: typed builders for KubeRay objects, YAML output, schema validation.

- The builders (`ray_cluster`, `ray_job`, `namespace`, `resource_quota`, ...) produce every object
  FlowOps generates: dev environments, `flowops train --target k8s`, and the committed platform
  RayCluster (`cluster/base/ray-cluster.platform.yaml`, written by `flowops cluster generate`).
- `dump` writes objects as YAML; `dump_commented` writes one object with a comment on each field
  that needs one, as hand-written manifests have (kustomize itself renders `cluster/`: `flowops.cluster`).
- `ManifestValidator` checks ray.io objects against KubeRay's CRD schemas (vendored in
  `flowops/resources/kuberay-crds`) and core objects against Kubernetes' own schemas.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from flowops import resources
from flowops.errors import InvalidInput, NotFound
from flowops.settings import DEFAULT_IMAGE

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

RAY_VERSION = "2.60.0"
AUTH_SECRET = "flowops-ray-auth"  # Secret holding the Ray token under key `auth_token`
STATE_SECRET = "flowops-state"  # Secret: `url` (FLOWOPS_STATE_URL), `mlflow-url` (MLflow's backend store)
KEYS_SECRET = "flowops-keys"  # Secret: `admin-key` (FLOWOPS_ADMIN_KEY), `api-key` (FLOWOPS_API_KEY, optional)
K8S_VERSION = "1.32.0"  # Kubernetes schema version core objects are validated against
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # what Kubernetes accepts as an object's name here
COMPONENT = "app.kubernetes.io/component"  # pod label: ray-head or ray-worker (NetworkPolicy, monitoring)

Obj = dict[str, Any]


# YAML output -------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, serveConfigV2) as `|` blocks, like hand-written manifests."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(objects: list[Obj]) -> str:
    """Multi-document YAML."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


PLAIN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./-]*")
FLOW_WIDTH = 72  # mappings and lists of scalars up to this long stay on one line: {cpu: "2", memory: 8Gi}


def _scalar(value: Any) -> str:
    """Plain where every YAML reader reads the same string back; JSON-quoted (valid YAML) otherwise."""
    if isinstance(value, str):
        plain = PLAIN.fullmatch(value) and not re.fullmatch(r"[0-9.]+", value)
        return value if plain and yaml.safe_load(value) == value else json.dumps(value)
    return json.dumps(value)  # numbers, booleans, null


def _flow(node: Any) -> str:
    if isinstance(node, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in node.items()) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(_flow(v) for v in node) + "]"
    return _scalar(node)


def _item_key(index: int, item: Any) -> str:
    """A list item's step in a comment path: its groupName or name, else its index."""
    if isinstance(item, dict):
        return str(item.get("groupName") or item.get("name") or index)
    return str(index)


def _flows(value: Any, path: str, comments: dict[str, str]) -> bool:
    """Written on one line: scalars; short mappings and lists of scalars with no comment inside.
    Lists of mappings stay block lists (`- {name: x, ...}` per item), as people write them."""
    if not isinstance(value, dict | list):
        return True
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return False
    inner = any(key.startswith(path + "/") for key in comments)
    return not inner and len(_flow(value)) <= FLOW_WIDTH


def _emit(node: Obj | list, path: str, indent: int, comments: dict[str, str], out: list[str]) -> None:
    pad = " " * indent
    if isinstance(node, dict):
        entries = [(str(k), f"{_scalar(k)}:", v) for k, v in node.items()]
    else:
        entries = [(_item_key(i, v), "-", v) for i, v in enumerate(node)]
    for step, lead, value in entries:
        here = f"{path}/{step}" if path else step
        comment = comments.get(here, "")
        if "\n" in comment:  # a paragraph goes above the line
            out.extend(f"{pad}# {line}".rstrip() for line in comment.strip("\n").splitlines())
            comment = ""
        tail = f"  # {comment}" if comment else ""
        if _flows(value, here, comments):
            out.append(f"{pad}{lead} {_flow(value)}{tail}")
        elif lead == "-" and isinstance(value, dict):  # a block mapping in a list: `- ` on its first key
            start = len(out)
            _emit(value, here, indent + 2, comments, out)
            out[start] = f"{pad}- {out[start][indent + 2:]}{tail}"
        else:
            out.append(f"{pad}{lead}{tail}")
            _emit(value, here, indent + 2, comments, out)


def dump_commented(obj: Obj, comments: dict[str, str], header: str = "") -> str:
    """One object as YAML with comments, keyed by path: `spec/workerGroupSpecs/gpu/maxReplicas` (list
    items by groupName or name, else index). A one-line comment ends its line; a comment with a
    newline is written above. Small leaf mappings are written in flow style, as people write them."""
    out: list[str] = [f"# {line}".rstrip() for line in header.strip("\n").splitlines()]
    _emit(obj, "", 0, comments, out)
    return "\n".join(out) + "\n"


# Typed builders ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerGroup(_Strict):
    """A Ray worker group: its pods' size, GPU placement and autoscaling bounds."""

    name: str
    cpus: int = Field(ge=1)
    memory: str = Field(pattern=r"^[0-9]+(Mi|Gi|Ti)$")
    gpus: int = Field(0, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=0)
    replicas: int | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    idle_timeout_s: int | None = Field(None, ge=1)


class Mount(_Strict):
    """A scratch volume (emptyDir) every Ray container mounts."""

    name: str
    path: str


class RayClusterInput(_Strict):
    """What a RayCluster (or a RayJob's / RayService's cluster) is made of."""

    image: str = DEFAULT_IMAGE
    head_cpus: int = Field(1, ge=1)
    head_memory: str = Field("4Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$")
    head_runs_tasks: bool = False
    workers: list[WorkerGroup] = Field(default_factory=list)
    autoscaling: bool = False
    idle_timeout_s: int = Field(300, ge=1)
    auth_secret: str | None = AUTH_SECRET  # None: KubeRay generates a Secret named after the cluster
    env_config_map: str | None = "flowops-platform"
    # S3 credentials of the storage URI, the DVC remote and MLflow's artifacts. Optional keys: with
    # IAM roles for service accounts (IRSA) or a node role, the Secret does not exist and the AWS
    # SDKs find their credentials themselves.
    s3_secret: str | None = "flowops-s3"
    # The platform's shared state (FLOWOPS_STATE_URL) and the classifier app's keys: every pod reads
    # them from Secrets, so no pod depends on what another pod wrote to its own disk.
    state_secret: str | None = STATE_SECRET
    keys_secret: str | None = KEYS_SECRET
    worker_service_account: str | None = None
    head_service_account: str | None = None
    mounts: list[Mount] = Field(default_factory=list)


POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
HEAD_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
    {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
    {"containerPort": 8080, "name": "metrics"},
]
# Declared on every worker too: the PodMonitor scrapes the named port `metrics`, which a pod
# only has when its container lists it.
WORKER_PORTS = [{"containerPort": 8080, "name": "metrics"}]
# The autoscaler sidecar's own budget: small, and explicit so that a ResourceQuota admits it.
AUTOSCALER_RESOURCES = {"requests": {"cpu": "200m", "memory": "256Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"}}


def secret_env(var: str, secret: str, key: str, optional: bool = False) -> Obj:
    """An environment variable read from a Secret's key (a missing optional key leaves it unset)."""
    ref: Obj = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": var, "valueFrom": {"secretKeyRef": ref}}


def _container(name: str, spec: RayClusterInput, cpus: int, memory: str, gpus: int = 0,
               ports: list | None = None) -> Obj:
    container: Obj = {"name": name, "image": spec.image}
    if ports:
        container["ports"] = copy.deepcopy(ports)
    if spec.env_config_map:
        container["envFrom"] = [{"configMapRef": {"name": spec.env_config_map}}]
    env = []
    if spec.state_secret:
        env.append(secret_env("FLOWOPS_STATE_URL", spec.state_secret, "url"))
    if spec.keys_secret:
        env.append(secret_env("FLOWOPS_ADMIN_KEY", spec.keys_secret, "admin-key"))
        env.append(secret_env("FLOWOPS_API_KEY", spec.keys_secret, "api-key", optional=True))
    if spec.s3_secret:
        env.append(secret_env("AWS_ACCESS_KEY_ID", spec.s3_secret, "access-key-id", optional=True))
        env.append(secret_env("AWS_SECRET_ACCESS_KEY", spec.s3_secret, "secret-access-key",
                              optional=True))
    if env:
        container["env"] = env
    limits: dict[str, str] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container["resources"] = {"requests": {"cpu": str(cpus), "memory": memory}, "limits": limits}
    container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY)
    if spec.mounts:
        container["volumeMounts"] = [{"name": m.name, "mountPath": m.path} for m in spec.mounts]
    return container


def _pod_template(component: str, container: Obj, spec: RayClusterInput, service_account: str | None,
                  node_selector: dict[str, str] | None = None, gpu: bool = False) -> Obj:
    pod: Obj = {}
    if service_account:
        pod["serviceAccountName"] = service_account
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod["securityContext"] = copy.deepcopy(POD_SECURITY)
    pod["containers"] = [container]
    if spec.mounts:
        pod["volumes"] = [{"name": m.name, "emptyDir": {}} for m in spec.mounts]
    return {"metadata": {"labels": {COMPONENT: component}}, "spec": pod}


def _head_container(spec: RayClusterInput) -> Obj:
    container = _container("ray-head", spec, spec.head_cpus, spec.head_memory, ports=HEAD_PORTS)
    # The head's Ray Client proxy forks+execs a server per client; gRPC's fork handlers can abort
    # that child (ray-project/ray#63202). Fork followed by exec needs no handlers.
    container.setdefault("env", []).append({"name": "GRPC_ENABLE_FORK_SUPPORT", "value": "false"})
    return container


def ray_cluster_spec(spec: RayClusterInput) -> Obj:
    """The `spec` of a RayCluster (also RayJob.rayClusterSpec and RayService.rayClusterConfig)."""
    head_params = {"dashboard-host": "0.0.0.0"}
    if not spec.head_runs_tasks:
        head_params["num-cpus"] = "0"
    head_params.update({"metrics-export-port": "8080", "ray-client-server-port": "10001"})
    out: Obj = {"rayVersion": RAY_VERSION}
    if spec.autoscaling:
        out["enableInTreeAutoscaling"] = True
        out["autoscalerOptions"] = {
            "idleTimeoutSeconds": spec.idle_timeout_s,
            "upscalingMode": "Default",
            "resources": copy.deepcopy(AUTOSCALER_RESOURCES),
            "securityContext": {"runAsNonRoot": True, **copy.deepcopy(CONTAINER_SECURITY)},
        }
    out["authOptions"] = {"mode": "token", **({"secretName": spec.auth_secret} if spec.auth_secret else {})}
    out["headGroupSpec"] = {
        "serviceType": "ClusterIP",
        "rayStartParams": head_params,
        "template": _pod_template("ray-head", _head_container(spec), spec, spec.head_service_account),
    }
    out["workerGroupSpecs"] = []
    for group in spec.workers:
        entry: Obj = {
            "groupName": group.name,
            "replicas": group.min_replicas if group.replicas is None else group.replicas,
            "minReplicas": group.min_replicas,
            "maxReplicas": group.max_replicas,
        }
        if group.idle_timeout_s is not None:
            entry["idleTimeoutSeconds"] = group.idle_timeout_s
        entry["rayStartParams"] = {"metrics-export-port": "8080"}
        entry["template"] = _pod_template(
            "ray-worker", _container("ray-worker", spec, group.cpus, group.memory, gpus=group.gpus,
                                     ports=WORKER_PORTS), spec,
            spec.worker_service_account, group.node_selector, gpu=group.gpus > 0,
        )
        out["workerGroupSpecs"].append(entry)
    return out


def _meta(name: str, namespace: str | None, labels: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/part-of": "flowops", **(labels or {})}
    return meta


def ray_cluster(name: str, namespace: str | None, spec: RayClusterInput,
                labels: dict[str, str] | None = None) -> Obj:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(name, namespace, labels),
            "spec": ray_cluster_spec(spec)}


class RayJobInput(_Strict):
    """A RayJob: the entrypoint (a `jobs/` module) and how long its cluster lives."""

    name: str = Field(pattern=NAME_PATTERN)
    entrypoint: str
    env_vars: dict[str, str] = Field(default_factory=lambda: {"PYTHONUNBUFFERED": "1"})
    ttl_seconds_after_finished: int = Field(600, ge=0)
    backoff_limit: int = Field(1, ge=0)
    active_deadline_seconds: int = Field(7200, ge=1)
    cluster: RayClusterInput | None = None  # None: run on an existing cluster (cluster_selector)
    cluster_selector: str | None = None  # name of the RayCluster to submit to


def ray_job(job: RayJobInput, namespace: str | None = None) -> Obj:
    spec: Obj = {
        "entrypoint": job.entrypoint,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": job.env_vars}, sort_keys=True),
        "backoffLimit": job.backoff_limit,
        "activeDeadlineSeconds": job.active_deadline_seconds,
    }
    if job.cluster_selector:
        spec["clusterSelector"] = {"ray.io/cluster": job.cluster_selector}
    elif job.cluster is not None:
        spec["shutdownAfterJobFinishes"] = True
        spec["ttlSecondsAfterFinished"] = job.ttl_seconds_after_finished
        spec["rayClusterSpec"] = ray_cluster_spec(job.cluster)
    else:
        raise InvalidInput("a RayJob needs either its own cluster or a cluster_selector")
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(job.name, namespace), "spec": spec}


def namespace(name: str, labels: dict[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, labels)}


def resource_quota(name: str, ns: str, cpus: int, memory: str, gpus: int) -> Obj:
    hard = {"requests.cpu": str(cpus), "limits.cpu": str(cpus), "requests.memory": memory,
            "limits.memory": memory, "requests.nvidia.com/gpu": str(gpus)}
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta(name, ns), "spec": {"hard": hard}}


def network_policy(name: str, ns: str, ingress: list[Obj], pod_selector: Obj | None = None) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, ns),
            "spec": {"podSelector": pod_selector or {}, "policyTypes": ["Ingress"], "ingress": ingress}}


def service_account(name: str, ns: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, ns)}


def role(name: str, ns: str, rules: list[Obj]) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(name, ns),
            "rules": rules}


def role_binding(name: str, ns: str, role_name: str, subjects: list[Obj]) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _meta(name, ns),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
            "subjects": subjects}


def service(name: str, ns: str, selector: dict[str, str], ports: list[Obj], type_: str = "ClusterIP") -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns),
            "spec": {"type": type_, "selector": selector, "ports": ports}}


# Validation --------------------------------------------------------------------------------------


def packaged_crd_dir() -> Path:
    """KubeRay's CRD schemas shipped in the package (resources/kuberay-crds/README.md says which)."""
    return resources.crd_dir()


def _strict_schema(node: Any) -> Any:
    """Unknown fields are errors (as with kubectl's strict field validation), unless the CRD keeps them."""
    if isinstance(node, dict):
        out = {k: _strict_schema(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict_schema(v) for v in node]
    return node


def _crd_documents(entry: Traversable) -> list[Obj]:
    """The documents of a CRD file: KubeRay's YAML, or the vendored JSON (read without YAML's cost)."""
    text = entry.read_text()
    if entry.name.endswith(".json"):
        return [json.loads(text)]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: KubeRay's CRD files are megabytes
    try:
        return [d for d in yaml.load_all(text, Loader=loader) if d]
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{entry} is not valid YAML: {exc}") from None


def load_crd_schemas(crd_dir: Path | Traversable | None = None) -> dict[tuple[str, str, str], Obj]:
    """(group, version, kind) -> the strict openAPIV3Schema of each CRD in `crd_dir` (*.yaml as KubeRay
    publishes them, or *.json); default: the packaged copy."""
    folder = packaged_crd_dir() if crd_dir is None else crd_dir
    if not folder.is_dir():
        raise NotFound(f"KubeRay CRD folder {folder} does not exist (FLOWOPS_CLUSTER_CRD_DIR / --crd-dir; "
                       "unset, the schemas packaged with FlowOps are used)")
    schemas = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith((".yaml", ".yml", ".json")):
            continue
        for crd in _crd_documents(entry):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(group, version["name"], kind)] = _strict_schema(version["schema"]["openAPIV3Schema"])
    if not schemas:
        raise NotFound(f"no CustomResourceDefinitions in {folder}")
    return schemas


def _gvk(obj: Obj) -> tuple[str, str, str]:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    return group, version, obj.get("kind", "")


class ManifestValidator:
    """Validates objects: ray.io kinds against the CRD schemas in `crd_dir` (default: packaged), core
    kinds against Kubernetes' schemas. `check(obj)` returns None or one line saying what is wrong."""

    def __init__(self, crd_dir: Path | None = None, k8s_version: str = K8S_VERSION):
        self.schemas = load_crd_schemas(crd_dir)
        self.k8s_version = k8s_version
        self._validators: dict[tuple[str, str, str], Any] = {}

    def check(self, obj: Obj) -> str | None:
        # Imported here: ~80 ms that no other command of the CLI should pay at start-up.
        import jsonschema
        import kubernetes_validate

        group, version, kind = _gvk(obj)
        meta = obj.get("metadata")
        name = f"{kind}/{meta.get('name') if isinstance(meta, dict) else None}"
        key = (group, version, kind)
        if key in self.schemas:
            if key not in self._validators:
                self._validators[key] = jsonschema.Draft7Validator(self.schemas[key])
            errors = sorted(self._validators[key].iter_errors(obj), key=lambda e: list(e.absolute_path))
            if errors:
                where = "/".join(str(p) for p in errors[0].absolute_path)
                return f"{name}: {where}: {errors[0].message}"
            return None
        if "." in group and not group.endswith("k8s.io"):
            raise NotFound(f"no schema for {group}/{version} {kind}")
        try:
            kubernetes_validate.validate(obj, self.k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            return f"{name}: {path}: {exc.message}"
        except kubernetes_validate.SchemaNotFoundError:
            raise NotFound(f"no Kubernetes {self.k8s_version} schema for {group}/{version} {kind}") from None
        return None
