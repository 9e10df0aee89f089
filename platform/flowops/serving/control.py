"""Deploy the classifier app and steer its traffic (canary, shadow, rollback), from any process.

- `deploy(s, stable=, canary=, weight=, ...)`: start the app with `serve.run`, or, when it already
  runs with the same deployment options, change only its routing at runtime (no restart).
- `set_canary`, `set_weight`, `set_shadow`, `promote_canary`, `rollback`, `update_routing`,
  `routing_status`, `ledger_snapshot`.

Every call reaches the app's replicas one of two ways:
- a process that is already a Ray driver of the cluster running the app (a notebook, a test, any
  driver on any node) calls the replica's method through a Serve handle: no HTTP address, no admin
  key (the cluster's token is the authority);
- anything else calls the app's HTTP routes at `settings.serve_url` (FLOWOPS_SERVE_URL, else the
  head's Serve port), admin routes with the admin key: the CLI, the loop controller, a driver of
  another cluster (a RayService on Kubernetes runs in its own RayCluster).
Either way a change is live in well under a second.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx

from flowops.durable import wait_until
from flowops.errors import (
    ClusterUnavailable,
    Conflict,
    FlowOpsError,
    InvalidInput,
    NotFound,
    validated,
)
from flowops.ray_client import connect
from flowops.refs import ModelRef
from flowops.serving.config import (
    APP_NAME,
    ROUTING_FIELDS,
    RoutingUpdate,
    ServeAppConfig,
    parse_app_config,
)
from flowops.serving.keys import admin_key, write_key_files
from flowops.settings import Settings

ERRORS_BY_STATUS = {400: InvalidInput, 401: InvalidInput, 403: InvalidInput, 404: NotFound,
                    409: Conflict, 422: InvalidInput}


def build_app(args: dict[str, Any] | None = None):
    """The Serve application (an ingress deployment bound to its config)."""
    from flowops.serving.app import bind_classifier

    return bind_classifier(parse_app_config(args))


def _request(settings: Settings, method: str, path: str, *, admin: bool = False,
             json_body: dict | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """One call to the app; its `{"error": ...}` answers become the matching FlowOps errors."""
    headers = {"Authorization": f"Bearer {admin_key(settings)}"} if admin else {}
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
        raise ERRORS_BY_STATUS.get(resp.status_code, FlowOpsError)(f"{method} {path}: {msg}")
    return body


def _ray_handle():
    """The app's Serve handle when this process is a Ray driver connected to the cluster that runs
    the app; None otherwise (not a driver, inside an actor, no such app there: use HTTP)."""
    ray = sys.modules.get("ray")  # never imported for this: the CLI stays light
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id():
        return None
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_app_handle(APP_NAME)
    except RayServeException:  # no Serve, or no classifier app in this cluster
        return None


def _call(handle, method: str, timeout: float, *args: Any) -> Any:
    """One replica method through the handle; its FlowOps error is raised as itself."""
    from ray.exceptions import RayError, RayTaskError

    try:
        return getattr(handle, method).remote(*args).result(timeout_s=timeout)
    except RayTaskError as exc:
        if isinstance(exc.cause, FlowOpsError):
            raise exc.cause from None
        raise FlowOpsError(f"{method} failed in the classifier app: {exc.cause!r}") from None
    except (RayError, TimeoutError) as exc:
        raise ClusterUnavailable(f"the classifier app did not answer {method} through Ray "
                                 f"({type(exc).__name__})") from None


def _app(settings: Settings, method: str, http: tuple[str, str], *args: Any, admin: bool = False,
         json_body: dict | None = None, timeout: float = 60.0) -> Any:
    """Replica `method(*args)` through a Ray handle where this process has one, else the HTTP
    route `http` (verb, path)."""
    handle = _ray_handle()
    if handle is not None:
        return _call(handle, method, timeout, *args)
    return _request(settings, *http, admin=admin, json_body=json_body, timeout=timeout)


def app_running(settings: Settings, attempts: int = 3) -> dict[str, Any] | None:
    """The app's routing status if the classifier app answers, else None.

    A busy machine (training beside serving) can make one status call slow: a deployed app is
    asked `attempts` times before it counts as absent, because `deploy` redeploys an absent app,
    and a redeploy briefly takes its route away from users (HTTP 404 from the proxy).
    """
    for attempt in range(attempts):
        try:
            return _app(settings, "status", ("GET", "/routing"), timeout=15)
        except ClusterUnavailable:
            if attempt + 1 < attempts:
                time.sleep(1.0)
        except FlowOpsError:
            return None
    return None


def deploy(settings: Settings, stable: str | None = None, canary: str | None = None,
           weight: int | None = None, *, redeploy: bool = False, wait_s: float = 120,
           **options: Any) -> dict[str, Any]:
    """Serve `stable` (default: the `production` alias) and optionally a canary at `weight` %.

    When the app already runs with the same deployment options, or serves this registered model
    and no option is given, only its routing changes (at runtime: replicas load the new version
    beside the old one, nothing restarts). The second case is how the loop controller steers an app
    it did not deploy: the RayService's on Kubernetes, or one deployed with `--replicas 2`.
    Otherwise the app is (re)deployed with `serve.run`.
    """
    args: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    keep_options = not set(args) - set(ROUTING_FIELDS)  # only routing asked for
    args.update({k: v for k, v in (("stable", stable), ("canary", canary), ("weight", weight))
                 if v is not None})
    args.setdefault("model_name", settings.model_name)
    args.setdefault("home", str(settings.home))
    args.setdefault("tracking_uri", settings.tracking_uri)
    args.setdefault("storage_uri", settings.storage)
    args.setdefault("storage_endpoint_url", settings.storage_endpoint_url)
    cfg = parse_app_config(args)
    _check_versions(settings, cfg)

    running = app_running(settings)
    same_app = running and (running.get("deployment_hash") == cfg.deployment_hash()
                            or (keep_options and running.get("model_name") == cfg.model_name))
    if same_app and not redeploy:
        update = {"stable": cfg.stable, "canary": cfg.canary, "weight": cfg.weight}
        update.update({k: args[k] for k in ("shadow_pct", "sticky_images", "canary_fallback")
                       if k in args})
        return update_routing(settings, **update)

    admin_file, api_file = write_key_files(settings, cfg.require_api_key)
    cfg = cfg.model_copy(update={"admin_key_file": admin_file, "api_key_file": api_file})
    _serve_run(settings, cfg)
    wait_until(lambda: (app_running(settings) or {}).get("ready"), wait_s,
               what="the classifier app becoming ready", error=ClusterUnavailable)
    # Serve leaves replicas alone when their arguments did not change (and a replica restart
    # keeps runtime routing): set the asked-for routing explicitly.
    return update_routing(settings, **cfg.routing())


def _check_versions(settings: Settings, cfg: ServeAppConfig) -> None:
    """Fail early (NotFound naming what exists) when a version or alias does not exist."""
    from flowops.model import resolve_model_version

    name = cfg.model_name or settings.model_name
    for ref in (cfg.stable, cfg.canary):
        if ref:
            resolve_model_version(settings, ModelRef.parse(ref, name).uri)


def _serve_run(settings: Settings, cfg: ServeAppConfig) -> None:
    connect(settings)  # checks that the cluster answers, with the token
    from ray import serve

    serve.run(build_app(cfg.model_dump()), name=cfg.name, route_prefix="/", blocking=False)


# Routing control ------------------------------------------------------------------------------


def update_routing(settings: Settings, **changes: Any) -> dict[str, Any]:
    """PUT /routing: change stable/canary/weight/shadow at runtime; returns the new status."""
    body = validated(RoutingUpdate, "invalid routing change", **changes).model_dump(exclude_unset=True)
    return _app(settings, "change_routing", ("PUT", "/routing"), body, admin=True, json_body=body,
                timeout=180)


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
    return _app(settings, "promote", ("POST", path), set_alias, admin=True, timeout=180)


def rollback(settings: Settings) -> dict[str, Any]:
    """All traffic to stable now (every replica within ~0.1 s); the canary is unloaded and tagged
    `rolled_back=true` in the registry right after."""
    return _app(settings, "rollback", ("POST", "/routing/rollback"), admin=True, timeout=30)


def routing_status(settings: Settings) -> dict[str, Any]:
    """Stable and canary versions, weight, shadow share, replicas and whether they are ready."""
    return _app(settings, "status", ("GET", "/routing"), timeout=10)


def ledger_snapshot(settings: Settings) -> dict[str, dict[str, Any]]:
    """Exact per-version counters shared by all replicas: requests, errors, latencies_ms (recent),
    feedback_correct/total, shadow_agree/total. Complete up to ~0.1 s ago (replicas flush often)."""
    return _app(settings, "ledger_snapshot", ("GET", "/ledger"), timeout=10)["versions"]
