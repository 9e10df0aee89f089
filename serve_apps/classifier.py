"""The classifier Serve application (thin: all logic is in the `flowops.serving` package).

    serve run serve_apps.classifier:app                      # stable = the `production` alias
    serve run serve_apps.classifier:build_app canary=3 weight=10
    serve deploy serve_apps/classifier.yaml
    flowops serve deploy --canary 3 --weight 10
"""

from __future__ import annotations

from typing import Any

from flowops.serving import build_app as _build


def build_app(args: dict[str, Any] | None = None):
    """Application builder (Serve passes the config's `args`, or `key=value` from `serve run`)."""
    return _build(args)


def __getattr__(name: str):
    # `app` is built when Serve asks for it, not when the module is imported.
    if name == "app":
        return _build({})
    raise AttributeError(name)
