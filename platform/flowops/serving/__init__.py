"""Online serving: the classifier app (a Ray Serve FastAPI ingress that routes AND runs the models,
so a request makes one hop) and the functions that deploy it and steer its traffic.

The face every adapter uses (the CLI, `serve_apps/classifier.py`, the loop controller, the demo).
Light on purpose: importing it loads neither Ray nor FastAPI. Inside the package:

    config   the app's arguments and the request bodies
    keys     the admin and API keys (one reader)
    control  deploy, routing changes, status, ledger (over the app's HTTP routes)
    models   the version set of a replica: resolve, load, choose, unload (plain Python)
    state    the app's shared routing actor and the replicas' ledger buffer
    http     FastAPI dependencies (keys, body limits) and the one error-to-JSON mapping
    openapi  the app's OpenAPI document: answers, keys, and each replica's limits written in
    replica  what a replica does; app: its routes and the Serve deployment
"""

from flowops.serving.config import ServeAppConfig, parse_app_config
from flowops.serving.control import (
    build_app,
    deploy,
    ledger_snapshot,
    promote_canary,
    rollback,
    routing_status,
    set_canary,
    set_shadow,
    set_weight,
    update_routing,
)
from flowops.serving.keys import admin_key

__all__ = [
    "ServeAppConfig",
    "admin_key",
    "build_app",
    "deploy",
    "ledger_snapshot",
    "parse_app_config",
    "promote_canary",
    "rollback",
    "routing_status",
    "set_canary",
    "set_shadow",
    "set_weight",
    "update_routing",
]
