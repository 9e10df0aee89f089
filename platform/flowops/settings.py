"""Typed settings: environment variables `FLOWOPS_*`, an optional YAML config file, defaults.

Read when asked for (`get_settings()`), never at import time. Every path is resolved to an absolute
path, so the values can be handed to Ray jobs that run in another working directory
(`Settings.job_env()`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from flowops.errors import InvalidInput, invalid_input

CONFIG_ENV = "FLOWOPS_CONFIG"
# The runtime image of every KubeRay pod (cluster/image/Dockerfile); Ray's minor version matches ours.
DEFAULT_IMAGE = "ghcr.io/flowops/flowops-runtime:0.1.0-ray2.60.0"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateSettings(_Section):
    """The validation gate (env FLOWOPS_GATE_MIN_ACCURACY, FLOWOPS_GATE_MAX_REGRESSION)."""

    min_accuracy: float = Field(0.80, ge=0, le=1, description="Holdout accuracy floor.")
    max_regression: float = Field(0.02, ge=0, le=1, description="Allowed accuracy drop vs production.")


class MonitorSettings(_Section):
    """Observability ports and intervals (env FLOWOPS_MONITOR_EXPORTER_PORT, ...)."""

    exporter_port: int = Field(8091, ge=1024, le=65535, description="Port of the platform exporter.")
    exporter_host: str = Field("127.0.0.1", description="Interface the exporter listens on "
                               "(0.0.0.0 in a Kubernetes pod, so Prometheus can reach it).")
    prometheus_port: int = Field(9090, ge=1024, le=65535, description="Port of the loopback Prometheus.")
    scrape_interval_s: int = Field(5, ge=1, le=300, description="Prometheus scrape interval.")


class ClusterSettings(_Section):
    """Kubernetes (env FLOWOPS_CLUSTER_*)."""

    manifests_dir: Path | None = Field(None, description="The kustomize tree (default: the packaged one).")
    crd_dir: Path | None = Field(None, description="KubeRay CRDs to validate against (default: packaged).")
    namespace: str = Field("flowops", description="Namespace RayJobs are created in.")
    image: str = Field(DEFAULT_IMAGE, description="Runtime image (cluster/image/Dockerfile).")
    train_workers: int = Field(2, ge=1, description="Worker pods of a training RayJob's cluster.")
    train_worker_cpus: int = Field(2, ge=1, description="CPUs per training worker pod.")
    train_worker_memory: str = Field("8Gi", description="Memory per training worker pod.")
    train_worker_gpus: int = Field(0, ge=0, description="GPUs per training worker pod.")


class DevenvSettings(_Section):
    """Dev environments (env FLOWOPS_DEVENV_*)."""

    gpu_types_file: Path | None = Field(
        None,
        description="YAML mapping of GPU type -> {node_selector: {...}}; adds to/overrides the defaults.",
    )
    image: str = Field(DEFAULT_IMAGE, description="Runtime image of k8s dev clusters.")
    idle_timeout_s: int = Field(600, ge=60, description="Idle GPU workers are removed after this.")


SECTIONS = ("gate", "monitor", "cluster", "devenv")
# Interfaces that mean "listen everywhere": a server bound there is reached at the head's address.
WILDCARD_HOSTS = ("0.0.0.0", "::")
# Credentials (and where they are kept) that a Ray job must never receive in its runtime env: Ray's
# dashboard and Jobs API show a job's runtime env to anyone who can list jobs. A job inherits them
# from its node's environment instead: a Kubernetes Secret in every Ray pod, the environment of
# `flowops up` in the embedded head (Settings.head_env), else the 0600 key files in the home.
SECRET_ENV = ("FLOWOPS_ADMIN_KEY", "FLOWOPS_ADMIN_KEY_FILE", "FLOWOPS_API_KEY", "FLOWOPS_API_KEY_FILE",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# What HAProxy retries on another replica: nothing reached a replica, or the replica died without
# a (valid) answer; not once the answer's headers came (Settings.serve_env). Not 5xx answers:
# those are the app's own. HAProxy replays a request only if it held the whole request when it
# first sent it; a client that writes headers and body apart
# (httpx, most clients) loses that race, and HAProxy then closes its keep-alive connection with no
# answer and no log line. So the second line makes HAProxy read the body (up to its 16 KB buffer)
# before choosing a replica. Ray has no setting for it; it writes this value verbatim after
# `retry-on` in its `defaults` section, hence the line break (tests/unit/test_settings.py renders it).
HAPROXY_RETRY_ON = ("conn-failure empty-response junk-response response-timeout\n"
                    "    option http-buffer-request")


class _YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by FLOWOPS_CONFIG, else `flowops.yaml` in the cwd if present."""

    def _load(self) -> dict[str, Any]:
        named = os.environ.get(CONFIG_ENV)
        path = Path(named) if named else Path("flowops.yaml")
        if not path.exists():
            if named:
                raise InvalidInput(f"config file {path} (from {CONFIG_ENV}) does not exist")
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InvalidInput(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"config file {path} must hold a mapping of setting: value")
        return data

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ is used
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._load()


class Settings(BaseSettings):
    """Where FlowOps keeps its state and how it reaches Ray, MLflow and DVC."""

    model_config = SettingsConfigDict(
        env_prefix="FLOWOPS_", extra="forbid", validate_default=True,
        # FLOWOPS_GATE_MIN_ACCURACY -> gate.min_accuracy: one split after the section name.
        env_nested_delimiter="_", env_nested_max_split=1,
    )

    home: Path = Field(Path(".flowops"), description="Folder of the local state (made absolute).")
    ray_address: str | None = Field(
        None, description="Job API address of an existing cluster (http://host:8265). "
        "Default: the embedded cluster that `flowops up` starts."
    )
    state_url: str | None = Field(
        None, description="SQLAlchemy URL of the state database (labels, loop, events, pipelines, "
        "drift reports, ledger totals): postgresql+psycopg://user:password@host/db for a cluster. "
        "Default: SQLite in the home folder."
    )
    ray_host: str | None = Field(
        None, description="Address of the Ray head as drivers reach it (GCS, Ray Client, job API, "
        "Serve); the embedded head listens on it. Default: the host of ray_address, else 127.0.0.1."
    )
    serve_url: str | None = Field(
        None, description="HTTP address of the Serve application as drivers reach it (e.g. a "
        "Kubernetes Service). Default: http://<ray_host>:<serve_port>."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI of an MLflow run elsewhere. Default: the "
        "MLflow server that `flowops up` starts (http://<mlflow host>:<mlflow_port>)."
    )
    mlflow_backend_uri: str | None = Field(
        None, description="Backend store of the MLflow server `flowops up` starts (an SQLAlchemy "
        "URL, e.g. postgresql://...). Default: SQLite in the home folder."
    )
    mlflow_host: str | None = Field(
        None, description="Interface the MLflow server listens on (0.0.0.0: every interface, for "
        "a cluster). Default: ray_host."
    )
    mlflow_port: int = Field(5000, description="Port of the MLflow server (tracking API and UI).")
    mlflow_workers: int = Field(1, ge=1, le=32, description="Worker processes of the MLflow server.")
    data_repo: str | None = Field(
        None, description="Git repository of the data versions (a URL every node reaches, e.g. "
        "https://git.example.com/ml/data.git, or a bare repository's path): the workspace is a "
        "clone of it and every cut pushes its tag there. Default: home/workspace itself."
    )
    dvc_remote: str | None = Field(
        None, description="DVC remote URL. Default: <storage URI>/dvc when the storage is on S3, "
        "else a local folder in the home folder."
    )
    storage_uri: str | None = Field(
        None, description="Where images (Parquet shards) and other large outputs live: a folder, "
        "s3://bucket/prefix or any pyarrow/fsspec filesystem URI. Default: a folder in the home."
    )
    storage_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, Ceph, moto), e.g. "
        "http://minio:9000; credentials come from the usual AWS_* variables."
    )
    model_name: str = Field("digits-classifier", description="Registered model name.")
    task: str | None = Field(
        None, description="The project's task (module:object) for `flowops train` without --task "
        "and without --init-from, e.g. `task: my_project.task:task` in flowops.yaml."
    )
    ray_port: int = Field(6380, description="Ray GCS port of the embedded head node.")
    dashboard_port: int = Field(8265, description="Ray dashboard and job API port.")
    client_port: int = Field(10001, description="Ray Client server port (ray://).")
    serve_port: int = Field(8000, description="Ray Serve HTTP port.")
    metrics_port: int = Field(8090, description="Ray's Prometheus metrics export port.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs the embedded head offers Ray.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs the embedded head offers Ray.")
    serve_fast_path: bool = Field(
        True, description="Serve HTTP through HAProxy straight to the ingress replicas (Serve's "
        "throughput-optimized mode) instead of through Serve's Python proxy actor."
    )
    gate: GateSettings = Field(default_factory=GateSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    devenv: DevenvSettings = Field(default_factory=DevenvSettings)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _YamlFileSource(settings_cls))

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("state_url")
    @classmethod
    def _absolute_sqlite_path(cls, value: str | None) -> str | None:
        """A relative SQLite path would name another file in a Ray job's working directory."""
        prefix = "sqlite:///"
        if value and value.startswith(prefix) and not value.startswith(prefix + "/"):
            path = value[len(prefix):]
            if path and not path.startswith(":memory:"):
                return prefix + str(Path(path).expanduser().resolve())
        return value

    @field_validator(
        "ray_port", "dashboard_port", "client_port", "serve_port", "metrics_port", "mlflow_port"
    )
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 1024 <= value <= 65535:
            raise ValueError(f"port {value} is outside 1024-65535")
        return value

    @field_validator("ray_host", "mlflow_host")
    @classmethod
    def _bare_host(cls, value: str | None) -> str | None:
        if value is not None and not _is_bare_host(value):
            raise ValueError(f"{value!r} is not a host name or IP address (no scheme, no port)")
        return value

    @field_validator("ray_host")
    @classmethod
    def _reachable_host(cls, value: str | None) -> str | None:
        if value in WILDCARD_HOSTS:
            raise ValueError(f"{value!r} listens everywhere but cannot be reached: give the "
                             "head's address")
        return value

    @field_validator("serve_url", "mlflow_tracking_uri", "ray_address")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("serve_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https")
                                  or not urlsplit(value).hostname):
            raise ValueError(f"{value!r} is not an http(s)://host[:port] URL")
        return value

    @model_validator(mode="after")
    def _derived_serve_url(self) -> Settings:
        """The Serve address drivers use: given, or the head's Serve port."""
        if self.serve_url is None:
            self.serve_url = f"http://{url_host(self.head_host)}:{self.serve_port}"
        return self

    # Derived locations -------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def token_path(self) -> Path:
        return self.home / "ray" / "auth_token"

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's temp folder: short (unix socket paths are limited) and unique per home."""
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:10]
        return Path("/tmp") / f"flowops-{digest}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def head_host(self) -> str:
        """The Ray head's address: ray_host, else the host of ray_address, else loopback."""
        if self.ray_host:
            return self.ray_host
        if self.ray_address and (host := urlsplit(self.ray_address).hostname):
            return host
        return "127.0.0.1"

    @property
    def mlflow_listen_host(self) -> str:
        return self.mlflow_host if self.mlflow_host is not None else self.head_host

    @property
    def manages_mlflow(self) -> bool:
        """True when the platform's MLflow is the server `flowops up` starts (no URI was given)."""
        return self.mlflow_tracking_uri is None

    @property
    def mlflow_backend(self) -> str:
        """Backend store of the managed MLflow server."""
        return self.mlflow_backend_uri or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def tracking_uri(self) -> str:
        """What every process (CLI, job, Train worker, replica) tracks to: the given URI, else the
        managed server over HTTP (reached at the head's address when it listens everywhere)."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        host = self.mlflow_listen_host
        if host in WILDCARD_HOSTS:
            host = self.head_host
        return f"http://{url_host(host)}:{self.mlflow_port}"

    @property
    def workspace(self) -> Path:
        """Local checkout of the data workspace (a git + DVC repository)."""
        return self.home / "workspace"

    @property
    def repo(self) -> str:
        """What DVC's API reads data versions from: the workspace, or the configured repository."""
        return self.data_repo or str(self.workspace)

    @property
    def remote(self) -> str:
        """The DVC remote: the setting; else beside the shards when the storage is on S3 (every node
        reaches it), without credentials (DVC reads them from the AWS_* environment); else a
        folder in the home."""
        if self.dvc_remote:
            return self.dvc_remote
        parts = urlsplit(self.storage)
        if parts.scheme in ("s3", "s3a"):
            return f"s3://{parts.hostname or ''}{parts.path.rstrip('/')}/dvc"
        return str(self.home / "dvc-remote")

    @property
    def storage(self) -> str:
        """The storage URI (see flowops.storage): the setting, or `home/storage`."""
        return self.storage_uri or str(self.home / "storage")

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def pipelines_dir(self) -> Path:
        return self.home / "pipelines"

    @property
    def job_api(self) -> str:
        return self.ray_address or f"http://{url_host(self.head_host)}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{url_host(self.head_host)}:{self.ray_port}"

    @property
    def client_address(self) -> str:
        return f"ray://{url_host(self.head_host)}:{self.client_port}"

    def ray_auth_env(self) -> dict[str, str]:
        """What Ray's clients need to send the token: an explicit RAY_AUTH_TOKEN wins, else our file."""
        env = {"RAY_AUTH_MODE": "token"}
        if not os.environ.get("RAY_AUTH_TOKEN"):
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        return env

    def serve_env(self) -> dict[str, str]:
        """Environment of the embedded head that selects Serve's request path.

        The fast path is Ray Serve's throughput-optimized mode: HAProxy listens on the Serve port
        and forwards each request straight to an ingress replica's own HTTP server (one hop
        instead of client -> proxy actor -> replica), user code runs on the replica's event loop,
        request logs are buffered. (Ray keeps HAProxy's files per node id, so two clusters on one
        machine do not share them.) A replica drains for 5 s (not 30) when it stops, enough for
        a local HAProxy to drop it.

        A request whose replica dies before answering (an empty or broken response, a connection
        refused) is retried on another replica (HAProxy's L7 retries with redispatch, the request
        buffered whole first: HAPROXY_RETRY_ON): a prediction has no side effects, so a replica's
        death costs users no failed request, but for a response the replica had begun: its HTTP
        server (uvicorn) sends headers and body in two writes, HAProxy passes the headers on at
        once and cannot replay after that, so a kill between the two cuts that response (about
        1 kill in 25 under load; tests/integration/test_serving.py counts).
        """
        if not self.serve_fast_path:
            return {}
        return {
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
            "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
            "RAY_SERVE_HAPROXY_RETRIES": "3",
        }

    def job_env(self) -> dict[str, str]:
        """Environment variables that make a Ray job see the same platform as this process.

        Only settings that are not secret: this goes into runtime envs, which Ray shows to anyone
        who can list jobs. A state URL with a password is left out, like SECRET_ENV: the job gets
        them from its node (`head_env`)."""
        env = {
            "FLOWOPS_HOME": str(self.home),
            "FLOWOPS_DATA_REPO": self.repo,
            "FLOWOPS_DVC_REMOTE": self.remote,
            "FLOWOPS_MLFLOW_TRACKING_URI": self.tracking_uri,
            "FLOWOPS_RAY_ADDRESS": self.job_api,
            "FLOWOPS_RAY_HOST": self.head_host,
            "FLOWOPS_SERVE_URL": str(self.serve_url),
            "FLOWOPS_SERVE_PORT": str(self.serve_port),
            "FLOWOPS_DASHBOARD_PORT": str(self.dashboard_port),
            "FLOWOPS_RAY_PORT": str(self.ray_port),
            "FLOWOPS_CLIENT_PORT": str(self.client_port),
            "FLOWOPS_METRICS_PORT": str(self.metrics_port),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "PYTHONUNBUFFERED": "1",
        }
        if "model_name" in self.model_fields_set:  # unset: a job names the model after its task/data
            env["FLOWOPS_MODEL_NAME"] = self.model_name
        if self.state_url and not _has_password(self.state_url):  # else: SQLite in FLOWOPS_HOME, or
            env["FLOWOPS_STATE_URL"] = self.state_url             # the node's own (head_env)
        for section in SECTIONS:
            values = getattr(self, section).model_dump(mode="json", exclude_defaults=True)
            for key, value in values.items():
                env[f"FLOWOPS_{section}_{key}".upper()] = str(value)
        env["FLOWOPS_STORAGE_URI"] = self.storage
        if self.storage_endpoint_url:
            env["FLOWOPS_STORAGE_ENDPOINT_URL"] = self.storage_endpoint_url
        for key in ("AWS_REGION", "AWS_DEFAULT_REGION"):  # where the bucket is; not a credential
            if os.environ.get(key):
                env[key] = os.environ[key]
        return env

    def head_env(self) -> dict[str, str]:
        """The process environment of a Ray head FlowOps starts (`flowops up`, a local dev
        cluster): `job_env` and the secrets of this process, which every job, worker and replica
        of that cluster inherits from its raylet without them ever appearing in job metadata."""
        env = self.job_env()
        env.update({key: os.environ[key] for key in SECRET_ENV if os.environ.get(key)})
        if self.state_url:
            env["FLOWOPS_STATE_URL"] = self.state_url
        return env

    def python_bin_dir(self) -> str:
        """The folder of the interpreter running FlowOps: Ray jobs' `python` must be this one."""
        return str(Path(sys.executable).parent)


def _is_bare_host(value: str) -> bool:
    """A host name or IP address alone (IPv6 without brackets)."""
    return value in WILDCARD_HOSTS or (
        not any(c in value for c in "/@ []") and (":" not in value or value.count(":") >= 2)
    )


def _has_password(url: str) -> bool:
    """A database URL with a password in it (user:password@host, or ?password=)."""
    parts = urlsplit(url)
    return bool(parts.password) or "password=" in parts.query


def url_host(host: str) -> str:
    """`host` as written in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def get_settings(**overrides: Any) -> Settings:
    """Read settings now (env, config file, defaults), with explicit overrides on top."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    with invalid_input("invalid setting"):
        return Settings(**clean)
