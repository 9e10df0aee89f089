"""Kubernetes manifests: a small kustomize renderer, typed builders for KubeRay objects, validation.

- `render_kustomization(dir)` renders the subset of kustomize that `cluster/` uses (resources,
  nested kustomizations, namespace, labels, images, patches as JSON 6902 or strategic-merge on
  mappings, configMapGenerator) without kubectl. A test compares it with `kubectl kustomize` for every
  overlay, so the two cannot drift apart silently; anything outside the subset is an error, not a
  silent difference.
- The builders (`ray_cluster`, `ray_job`, `namespace`, `resource_quota`, ...) produce the objects
  FlowOps generates at run time (dev environments, `flowops train --target k8s`) from typed inputs.
- `validate_objects` checks ray.io objects against KubeRay's CRD schemas and core objects against
  Kubernetes' own schemas (`kubernetes-validate`, a dev dependency, imported when called).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from flowops.errors import InvalidInput, NotFound

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "ghcr.io/flowops/flowops-runtime:0.1.0-ray2.60.0"
AUTH_SECRET = "flowops-ray-auth"  # Secret holding the Ray token under key `auth_token`
K8S_VERSION = "1.32.0"  # Kubernetes schema version core objects are validated against

Obj = dict[str, Any]

# Kustomize -------------------------------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "namespace", "labels", "images", "patches",
    "configMapGenerator", "generatorOptions",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "IngressClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "APIService", "RuntimeClass", "CSIDriver", "Node",
}
# kustomize's "legacy" output order (api/resid/gvk.go): these kinds first, in this order.
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


def load_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document of a file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRD files are megabytes
    try:
        docs = list(yaml.load_all(path.read_text(), Loader=loader))
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path} is not valid YAML: {exc}") from None
    return [d for d in docs if d]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise NotFound(f"no kustomization.yaml in {directory}")


def _gvk(obj: Obj) -> tuple[str, str, str]:
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    return group, version, obj.get("kind", "")


def _matches(obj: Obj, target: dict[str, Any]) -> bool:
    group, version, kind = _gvk(obj)
    meta = obj.get("metadata", {})
    for key, value in (("group", group), ("version", version), ("kind", kind),
                       ("name", meta.get("name", "")), ("namespace", meta.get("namespace", ""))):
        wanted = target.get(key)
        if wanted is not None and not re.fullmatch(str(wanted), value or ""):
            return False
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise InvalidInput(f"patch target fields {sorted(unsupported)} are not supported by the renderer")
    return True


def _merge(base: Any, patch: Any, builtin: bool) -> Any:
    """Strategic merge restricted to mappings: keys merge recursively, null deletes, lists replace."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        if isinstance(patch, list) and builtin:
            raise InvalidInput(
                "strategic-merge patches that set lists on built-in kinds are not supported by the "
                "renderer (kustomize would merge them by key): use a JSON 6902 patch"
            )
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(base.get(key), value, builtin)
    return out


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise InvalidInput(f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Obj, ops: list[dict[str, Any]]) -> Obj:
    doc = copy.deepcopy(obj)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        try:
            if kind in ("add", "replace"):
                value = copy.deepcopy(op["value"])
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, value)
                    else:
                        parent[index] = value
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = value
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent[last]
                if current != op.get("value"):
                    raise InvalidInput(f"JSON patch test failed at {op['path']}")
            else:
                raise InvalidInput(f"JSON patch op {kind!r} is not supported (add, replace, remove, test)")
        except (KeyError, IndexError, ValueError):
            raise InvalidInput(f"JSON patch {kind} {op.get('path')}: no such path") from None
    return doc


def _config_map_hash(cm: Obj) -> str:
    """kustomize's name suffix (api/hasher): sha256 of the sorted JSON encoding, 10 chars, re-lettered.
    kubectl's kustomize (v5.5) hashes the generated map with an empty name; so does this."""
    data: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": cm.get("data", {})}
    if cm.get("binaryData"):
        data["binaryData"] = cm["binaryData"]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _generate_config_maps(directory: Path, spec: dict[str, Any]) -> list[Obj]:
    options = spec.get("generatorOptions") or {}
    out = []
    for gen in spec.get("configMapGenerator") or []:
        unsupported = set(gen) - {"name", "files", "literals", "options", "namespace"}
        if unsupported or gen.get("behavior"):
            raise InvalidInput(f"configMapGenerator fields {sorted(unsupported)} are not supported")
        data: dict[str, str] = {}
        for entry in gen.get("files") or []:
            key, _, rel = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (directory / rel).read_text()
        for literal in gen.get("literals") or []:
            key, _, value = literal.partition("=")
            data[key] = value
        opts = {**options, **(gen.get("options") or {})}
        meta: dict[str, Any] = {"name": gen["name"]}
        if gen.get("namespace"):
            meta["namespace"] = gen["namespace"]
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        if opts.get("annotations"):
            meta["annotations"] = dict(opts["annotations"])
        cm: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
        if not opts.get("disableNameSuffixHash"):
            meta["name"] = f"{gen['name']}-{_config_map_hash(cm)}"
        out.append(cm)
    return out


def _set_images(node: Any, images: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _retag(container["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _retag(image: str, images: list[dict[str, Any]]) -> str:
    name, digest = (image.split("@", 1) + [""])[:2]
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    for entry in images:
        if entry.get("name") != name:
            continue
        name = entry.get("newName", name)
        if entry.get("digest"):
            return f"{name}@{entry['digest']}"
        tag = entry.get("newTag", tag)
        break
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def render_kustomization(directory: Path) -> list[Obj]:
    """Render a kustomization directory (the subset described in the module docstring)."""
    directory = Path(directory).resolve()
    spec = yaml.safe_load(_kustomization_file(directory).read_text()) or {}
    unsupported = set(spec) - SUPPORTED_FIELDS
    if unsupported:
        raise InvalidInput(
            f"{directory}: kustomize fields {sorted(unsupported)} are not supported by FlowOps' renderer; "
            "use `kubectl kustomize`"
        )
    objects: list[Obj] = []
    for entry in spec.get("resources") or []:
        path = directory / entry
        if path.is_dir():
            objects.extend(render_kustomization(path))
        elif path.is_file():
            objects.extend(load_documents(path))
        else:
            raise NotFound(f"{directory}: resource {entry} does not exist")
    objects.extend(_generate_config_maps(directory, spec))

    namespace = spec.get("namespace")
    if namespace:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
            if obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
                for subject in obj.get("subjects") or []:
                    if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (
                        None, "default"
                    ):
                        subject["namespace"] = namespace

    for patch in spec.get("patches") or []:
        body = patch.get("patch")
        if body is None:
            body = (directory / patch["path"]).read_text()
        parsed = yaml.safe_load(body)
        target = patch.get("target")
        if isinstance(parsed, list):
            if not target:
                raise InvalidInput(f"{directory}: a JSON 6902 patch needs a target")
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            for i in hits:
                objects[i] = _json6902(objects[i], parsed)
        else:
            if not target:
                group, version, kind = _gvk(parsed)
                target = {"kind": kind, "name": parsed.get("metadata", {}).get("name")}
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            for i in hits:
                builtin = "." not in _gvk(objects[i])[0] or _gvk(objects[i])[0].endswith("k8s.io")
                body_ = {k: v for k, v in parsed.items() if k not in ("apiVersion", "kind")}
                body_["metadata"] = {k: v for k, v in (parsed.get("metadata") or {}).items()
                                     if k not in ("name", "namespace")}
                objects[i] = _merge(objects[i], body_, builtin)
        if not hits:
            raise NotFound(f"{directory}: patch target {target} matches no resource")

    for group in spec.get("labels") or []:
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise InvalidInput(
                "labels with includeSelectors/includeTemplates are not supported by the renderer"
            )
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(group.get("pairs") or {})

    if spec.get("images"):
        for obj in objects:
            _set_images(obj, spec["images"])
    return sort_objects(objects)


def sort_objects(objects: list[Obj]) -> list[Obj]:
    """kustomize's default (legacy) order: namespaces, RBAC and config first, workloads after."""

    def key(obj: Obj) -> tuple:
        group, version, kind = _gvk(obj)
        if kind in ORDER_FIRST:
            rank = ORDER_FIRST.index(kind)
        elif kind in ORDER_LAST:
            rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
        else:
            rank = len(ORDER_FIRST)
        meta = obj.get("metadata", {})
        return (rank, f"{group}_{version}_{kind}", meta.get("namespace", ""), meta.get("name", ""))

    return sorted(objects, key=key)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, serveConfigV2) as `|` blocks, like hand-written manifests."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(objects: list[Obj]) -> str:
    """Multi-document YAML."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


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
    s3_secret: str | None = "flowops-s3"
    worker_service_account: str | None = None
    head_service_account: str | None = None


POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
HEAD_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
    {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
    {"containerPort": 8080, "name": "metrics"},
]


def _container(name: str, spec: RayClusterInput, cpus: int, memory: str, gpus: int = 0,
               ports: list | None = None) -> Obj:
    limits: dict[str, str] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container: Obj = {
        "name": name,
        "image": spec.image,
        "resources": {"requests": {"cpu": str(cpus), "memory": memory}, "limits": limits},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    if ports:
        container["ports"] = copy.deepcopy(ports)
    if spec.env_config_map:
        container["envFrom"] = [{"configMapRef": {"name": spec.env_config_map}}]
    if spec.s3_secret:
        container["env"] = [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key}}}
            for var, key in (("AWS_ACCESS_KEY_ID", "access-key-id"),
                             ("AWS_SECRET_ACCESS_KEY", "secret-access-key"))
        ]
    return container


def _pod(container: Obj, service_account: str | None, node_selector: dict[str, str] | None = None,
         gpu: bool = False) -> Obj:
    pod: Obj = {"securityContext": copy.deepcopy(POD_SECURITY), "containers": [container]}
    if service_account:
        pod["serviceAccountName"] = service_account
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return pod


def _head_container(spec: RayClusterInput) -> Obj:
    container = _container("ray-head", spec, spec.head_cpus, spec.head_memory, ports=HEAD_PORTS)
    # The head's Ray Client proxy forks+execs a server per client; gRPC's fork handlers can abort
    # that child (ray-project/ray#63202). Fork followed by exec needs no handlers.
    container.setdefault("env", []).append({"name": "GRPC_ENABLE_FORK_SUPPORT", "value": "false"})
    return container


def ray_cluster_spec(spec: RayClusterInput) -> Obj:
    """The `spec` of a RayCluster (also RayJob.rayClusterSpec and RayService.rayClusterConfig)."""
    head_params = {
        "dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "ray-client-server-port": "10001",
    }
    if not spec.head_runs_tasks:
        head_params["num-cpus"] = "0"
    out: Obj = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", **({"secretName": spec.auth_secret} if spec.auth_secret else {})},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": head_params,
            "template": {"spec": _pod(_head_container(spec), spec.head_service_account)},
        },
        "workerGroupSpecs": [],
    }
    if spec.autoscaling:
        out["enableInTreeAutoscaling"] = True
        out["autoscalerOptions"] = {
            "idleTimeoutSeconds": spec.idle_timeout_s,
            "upscalingMode": "Default",
            "securityContext": {"runAsNonRoot": True, **CONTAINER_SECURITY},
        }
    for group in spec.workers:
        entry: Obj = {
            "groupName": group.name,
            "replicas": group.min_replicas if group.replicas is None else group.replicas,
            "minReplicas": group.min_replicas,
            "maxReplicas": group.max_replicas,
            "rayStartParams": {},
            "template": {"spec": _pod(
                _container("ray-worker", spec, group.cpus, group.memory, gpus=group.gpus),
                spec.worker_service_account, group.node_selector, gpu=group.gpus > 0,
            )},
        }
        if group.idle_timeout_s is not None:
            entry["idleTimeoutSeconds"] = group.idle_timeout_s
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

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
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


def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str, str], Obj]:
    """(group, version, kind) -> the strict openAPIV3Schema of each CRD file in `crd_dir`."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for crd in load_documents(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(group, version["name"], kind)] = _strict_schema(version["schema"]["openAPIV3Schema"])
    if not schemas:
        raise NotFound(f"no CustomResourceDefinitions in {crd_dir}")
    return schemas


class ManifestValidator:
    """Validates objects: ray.io kinds against the CRD schemas in `crd_dir`, core kinds against
    Kubernetes' schemas. `check(obj)` returns None or one line saying what is wrong."""

    def __init__(self, crd_dir: Path, k8s_version: str = K8S_VERSION):
        self.schemas = load_crd_schemas(crd_dir)
        self.k8s_version = k8s_version
        self._validators: dict[tuple[str, str, str], Any] = {}

    def check(self, obj: Obj) -> str | None:
        import jsonschema
        import kubernetes_validate

        group, version, kind = _gvk(obj)
        name = f"{kind}/{obj.get('metadata', {}).get('name')}"
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
