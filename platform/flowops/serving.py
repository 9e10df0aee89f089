"""Online serving: deploy the classifier app and steer its traffic (canary, shadow, rollback).

The app itself (a Ray Serve FastAPI ingress that routes AND runs the models in-process, so a
request makes one hop: HTTP proxy -> replica) lives in `flowops.serving_app`. This module holds
its typed configuration, the API keys, and the control functions that every adapter (the CLI,
`serve_apps/classifier.py`, the loop controller) calls:

- `deploy(s, stable=, canary=, weight=, ...)`: start the app with `serve.run`, or, when it already
  runs with the same deployment options, change only its routing at runtime (no restart).
- `set_weight`, `set_shadow`, `promote_canary`, `rollback`, `routing_status`, `ledger_snapshot`.

Routing changes go through the app's admin HTTP routes (with the admin key), so they work from any
process that can reach the Serve port: no Ray driver, a change is live in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowops.errors import ClusterUnavailable, Conflict, FlowOpsError, InvalidInput, NotFound
from flowops.settings import Settings

APP_NAME = "classifier"
ADMIN_KEY_ENV = "FLOWOPS_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "FLOWOPS_ADMIN_KEY_FILE"
API_KEY_ENV = "FLOWOPS_API_KEY"
API_KEY_FILE_ENV = "FLOWOPS_API_KEY_FILE"


class ServeAppConfig(BaseModel):
    """Arguments of the classifier app (`build_app(args)`, the Serve config file, `serve deploy`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(APP_NAME, description="Serve application name (also names its state actor).")
    model_name: str | None = Field(None, description="Registered model (default: settings).")
    stable: str = Field("production", description="Stable version number or alias.")
    canary: str | None = Field(None, description="Canary version number or alias; none by default.")
    weight: int = Field(0, ge=0, le=100, description="Percent of traffic sent to the canary.")
    shadow_pct: int = Field(0, ge=0, le=100, description="Percent of stable traffic mirrored to "
                            "the canary (its answers are compared, never returned).")
    sticky_images: bool = Field(False, description="Route by a hash of the image when a request "
                                "has no X-Routing-Key (the same image always gets the same version).")
    canary_fallback: bool = Field(True, description="Answer from stable when the canary fails.")
    num_replicas: int = Field(1, ge=1, le=64)
    num_cpus: float = Field(0.2, gt=0, le=64, description="CPUs per replica (fractional).")
    num_gpus: float = Field(0, ge=0, le=8, description="GPUs per replica (models run on cuda).")
    max_ongoing_requests: int = Field(64, ge=1, le=10_000)
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)
    max_instances: int = Field(64, ge=1, le=10_000, description="Images per /predict call.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Request body limit.")
    require_api_key: bool = Field(False, description="Prediction routes need FLOWOPS_API_KEY.")
    admin_key_file: str | None = Field(None, description="File holding the admin key.")
    api_key_file: str | None = Field(None, description="File holding the prediction API key.")
    home: str | None = Field(None, description="FLOWOPS_HOME for the replicas (default: env).")
    tracking_uri: str | None = Field(None, description="MLflow URI for the replicas (default: env).")
    input_window_s: float = Field(60.0, ge=0, le=86_400, description="Seconds of traffic per "
                                  "live-input window written for drift detection (0: none).")
    input_window_max: int = Field(2000, ge=10, le=100_000, description="Images kept per window "
                                  "(a uniform sample of the traffic).")
    input_window_min: int = Field(50, ge=1, description="Fewest images a window is written with.")
    labelstudio_root: str | None = Field(None, description="Folder that Label Studio's "
                                         "/data/local-files/?d= paths are relative to.")
    labelstudio_upload_dir: str | None = Field(None, description="Label Studio's media folder "
                                               "(for /data/upload/... image URLs).")

    def deployment_hash(self) -> str:
        """Hash of the options that need a redeploy (everything except the runtime routing)."""
        fixed = self.model_dump(exclude={"stable", "canary", "weight", "shadow_pct",
                                         "sticky_images", "canary_fallback", "admin_key_file",
                                         "api_key_file"})
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]

    def routing(self) -> dict[str, Any]:
        return {"stable": self.stable, "canary": self.canary, "weight": self.weight,
                "shadow_pct": self.shadow_pct, "sticky_images": self.sticky_images,
                "canary_fallback": self.canary_fallback}


def parse_app_config(args: dict[str, Any] | None) -> ServeAppConfig:
    try:
        return ServeAppConfig.model_validate(args or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise InvalidInput(f"invalid serve app argument {where}: {first['msg']}") from None


# Keys --------------------------------------------------------------------------------------------


def _key_from(env_name: str, file_env_name: str, default_file: Path | None) -> str | None:
    value = os.environ.get(env_name)
    if value:
        return value.strip()
    path = os.environ.get(file_env_name)
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise InvalidInput(f"cannot read {file_env_name}={path}: {exc.strerror}") from None
    if default_file is not None and default_file.exists():
        return default_file.read_text().strip() or None
    return None


def serve_dir(settings: Settings) -> Path:
    return settings.home / "serve"


def admin_key(settings: Settings, create: bool = False) -> str:
    """The admin key: FLOWOPS_ADMIN_KEY, else the file FLOWOPS_ADMIN_KEY_FILE, else
    home/serve/admin_key (created, mode 0600, when `create`)."""
    default = serve_dir(settings) / "admin_key"
    key = _key_from(ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, default)
    if key:
        return key
    if not create:
        raise InvalidInput(
            f"no admin key: set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}, or deploy once to create {default}"
        )
    _write_secret(default, secrets.token_urlsafe(32))
    return default.read_text().strip()


def api_key(settings: Settings) -> str | None:
    return _key_from(API_KEY_ENV, API_KEY_FILE_ENV, serve_dir(settings) / "api_key")


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    os.replace(tmp, path)


def _key_files(settings: Settings, require_api_key: bool) -> tuple[str, str | None]:
    """Write the keys the caller holds to 0600 files in the home folder; replicas read the files,
    so no key travels in the Serve config (which Serve logs and shows on its dashboard)."""
    admin = admin_key(settings, create=True)
    admin_file = serve_dir(settings) / "admin_key"
    if not admin_file.exists() or admin_file.read_text().strip() != admin:
        _write_secret(admin_file, admin)
    api_file = None
    key = api_key(settings)
    if require_api_key and not key:
        raise InvalidInput(f"--require-api-key needs a key: set {API_KEY_ENV} or {API_KEY_FILE_ENV}")
    if key:
        path = serve_dir(settings) / "api_key"
        if not path.exists() or path.read_text().strip() != key:
            _write_secret(path, key)
        api_file = str(path)
    return str(admin_file), api_file


# Building and deploying ------------------------------------------------------------------------


def build_app(args: dict[str, Any] | None = None):
    """The Serve application (an ingress deployment bound to its config)."""
    from flowops.serving_app import bind_classifier

    return bind_classifier(parse_app_config(args))


def _admin_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key(settings)}"}


def _request(settings: Settings, method: str, path: str, *, admin: bool = False,
             json_body: dict | None = None, timeout: float = 60.0) -> dict[str, Any]:
    headers = _admin_headers(settings) if admin else {}
    url = f"{settings.serve_url}{path}"
    try:
        resp = httpx.request(method, url, json=json_body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ClusterUnavailable(
            f"the classifier app does not answer at {settings.serve_url} ({type(exc).__name__}); "
            "start the stack with `flowops up` and the app with `flowops serve deploy`"
        ) from None
    try:
        body = resp.json()
    except ValueError:
        body = {"error": resp.text[:200]}
    if resp.status_code == 404 and "error" not in body:
        raise ClusterUnavailable(
            f"no classifier app at {settings.serve_url}: deploy it with `flowops serve deploy`"
        )
    if resp.status_code >= 400:
        msg = body.get("error") or body.get("detail") or resp.text[:200]
        cls = {400: InvalidInput, 401: InvalidInput, 403: InvalidInput, 404: NotFound,
               409: Conflict, 422: InvalidInput}.get(resp.status_code, FlowOpsError)
        raise cls(f"{method} {path}: {msg}")
    return body


def app_running(settings: Settings) -> dict[str, Any] | None:
    """The app's routing status if the classifier app answers, else None."""
    try:
        return _request(settings, "GET", "/routing", timeout=5)
    except FlowOpsError:
        return None


def deploy(settings: Settings, stable: str | None = None, canary: str | None = None,
           weight: int | None = None, *, redeploy: bool = False, wait_s: float = 120,
           **options: Any) -> dict[str, Any]:
    """Serve `stable` (default: the `production` alias) and optionally a canary at `weight` %.

    When the app already runs with the same deployment options, only its routing changes (at
    runtime: replicas load the new version beside the old one, nothing restarts). Otherwise the
    app is (re)deployed with `serve.run`.
    """
    from flowops.ray_client import apply_ray_auth_env, require_cluster

    apply_ray_auth_env(settings)  # before Ray is imported: it reads RAY_AUTH_MODE once
    args: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if stable is not None:
        args["stable"] = stable
    if canary is not None:
        args["canary"] = canary
    if weight is not None:
        args["weight"] = weight
    args.setdefault("model_name", settings.model_name)
    args.setdefault("home", str(settings.home))
    args.setdefault("tracking_uri", settings.tracking_uri)
    cfg = parse_app_config(args)
    _check_versions(settings, cfg)

    running = app_running(settings)
    if running and not redeploy and running.get("deployment_hash") == cfg.deployment_hash():
        update = {"stable": cfg.stable, "canary": cfg.canary, "weight": cfg.weight}
        for key in ("shadow_pct", "sticky_images", "canary_fallback"):
            if key in args:
                update[key] = args[key]
        return update_routing(settings, **update)

    require_cluster(settings)
    admin_file, api_file = _key_files(settings, cfg.require_api_key)
    cfg = cfg.model_copy(update={"admin_key_file": admin_file, "api_key_file": api_file})
    _serve_run(settings, cfg)
    _wait_ready(settings, wait_s)
    # Serve leaves replicas alone when their arguments did not change (and a replica restart
    # keeps runtime routing): set the asked-for routing explicitly.
    return update_routing(settings, **cfg.routing())


def _check_versions(settings: Settings, cfg: ServeAppConfig) -> None:
    """Fail early (NotFound naming what exists) when a version or alias does not exist."""
    from flowops.model import resolve_model_version

    name = cfg.model_name or settings.model_name
    for ref in (cfg.stable, cfg.canary):
        if ref:
            resolve_model_version(settings, _model_uri(name, ref))


def _model_uri(name: str, ref: str) -> str:
    ref = str(ref)
    if ref.startswith("models:/"):
        return ref
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"


def _serve_run(settings: Settings, cfg: ServeAppConfig) -> None:
    import ray
    from ray import serve

    from flowops.ray_client import apply_ray_auth_env

    apply_ray_auth_env(settings)
    if not ray.is_initialized():
        ray.init(address=settings.gcs_address, logging_level="ERROR", log_to_driver=False)
    serve.run(build_app(cfg.model_dump()), name=cfg.name, route_prefix="/", blocking=False)


def _wait_ready(settings: Settings, wait_s: float) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + wait_s
    status = None
    while time.monotonic() < deadline:
        status = app_running(settings)
        if status and status.get("ready"):
            return status
        time.sleep(0.5)
    raise ClusterUnavailable(f"the classifier app did not become ready within {wait_s:.0f}s: {status}")


# Routing control ------------------------------------------------------------------------------


def update_routing(settings: Settings, **changes: Any) -> dict[str, Any]:
    """PUT /routing: change stable/canary/weight/shadow at runtime; returns the new status."""
    return _request(settings, "PUT", "/routing", admin=True, json_body=changes, timeout=180)


def set_weight(settings: Settings, pct: int) -> dict[str, Any]:
    if not isinstance(pct, int) or not 0 <= pct <= 100:
        raise InvalidInput(f"weight must be an integer percent 0-100, got {pct!r}")
    return update_routing(settings, weight=pct)


def set_canary(settings: Settings, version: str, weight: int = 10) -> dict[str, Any]:
    return update_routing(settings, canary=str(version), weight=weight)


def set_shadow(settings: Settings, pct: int) -> dict[str, Any]:
    return update_routing(settings, shadow_pct=pct)


def promote_canary(settings: Settings, set_alias: bool = True) -> dict[str, Any]:
    """The canary becomes stable (100% of traffic); by default it also gets the `production` alias
    (set by the app right after the switch)."""
    path = "/routing/promote" + ("" if set_alias else "?alias=false")
    return _request(settings, "POST", path, admin=True, timeout=180)


def rollback(settings: Settings) -> dict[str, Any]:
    """All traffic to stable now (every replica within ~0.1 s); the canary is unloaded and tagged
    `rolled_back=true` in the registry right after."""
    return _request(settings, "POST", "/routing/rollback", admin=True, timeout=30)


def routing_status(settings: Settings) -> dict[str, Any]:
    """Stable and canary versions, weight, shadow share, replicas and whether they are ready."""
    return _request(settings, "GET", "/routing", timeout=10)


def ledger_snapshot(settings: Settings) -> dict[str, dict[str, Any]]:
    """Exact per-version counters shared by all replicas: requests, errors, latencies_ms (recent),
    feedback_correct/total, shadow_agree/total. Complete up to ~0.1 s ago (replicas flush often)."""
    return _request(settings, "GET", "/ledger", timeout=10)["versions"]
