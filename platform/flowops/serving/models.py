"""The model versions one replica holds, and which of them answers a request.

A plain class (no Ray, no FastAPI, no MLflow): the replica hands it a resolver (reference ->
version number) and a loader (numbered reference -> model), both blocking, which it runs in a
thread. The rules of the canary live here, testable without a cluster:

- `choose`: the canary answers `weight` % of requests, by a hash of the routing key when one is
  given (sticky), else at random; never before this replica has loaded it.
- `shadow_target`: a share of stable's requests is mirrored to the canary.
- `next_routing`: a change (PUT /routing, promote) checked against the current routing.
- `unload`: a version leaves memory only once no routing names it any more.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from typing import Any

from flowops.errors import Conflict, FlowOpsError, InvalidInput
from flowops.refs import ModelRef

Resolver = Callable[[ModelRef], str]
Loader = Callable[[ModelRef], Any]


class ModelUnavailable(FlowOpsError):
    """The model (not the request) cannot answer: not loaded, or it failed."""

    http_status = 503


def named_versions(routing: dict[str, Any]) -> list[str]:
    """The versions a routing serves: stable, and the canary when there is one."""
    return [v for v in (routing.get("stable"), routing.get("canary")) if v]


def next_routing(current: dict[str, Any], changes: dict[str, Any],
                 resolved: dict[str, str]) -> dict[str, Any]:
    """`current` with `changes` applied and their references replaced by `resolved` version
    numbers. An empty canary removes it (and its weight); Conflict when canary and stable would be
    the same version."""
    routing = {**current, **changes, **resolved}
    if not routing.get("canary"):
        routing.update(canary=None, weight=0)
    elif routing["canary"] == routing["stable"]:
        raise Conflict(f"canary and stable are the same version ({routing['stable']})")
    return routing


class VersionSet:
    """Loaded models by version number, the routing in force, and the choice of a version."""

    def __init__(self, model_name: str, resolve: Resolver, load: Loader,
                 rng: random.Random | None = None) -> None:
        self.model_name = model_name
        self._resolve, self._load = resolve, load
        self._random = rng or random.Random()
        self.models: dict[str, Any] = {}
        self.routing: dict[str, Any] = {}
        self.pending_canary: str | None = None  # named by the routing, still loading here

    async def resolve(self, stable: str | None = None, canary: str | None = None) -> dict[str, str]:
        """Version numbers of the references given (aliases resolved; NotFound naming what exists)."""
        out = {}
        for role, ref in (("stable", stable), ("canary", canary)):
            if ref:
                parsed = ModelRef.parse(ref, self.model_name)
                if parsed.name != self.model_name:
                    raise InvalidInput(f"{role} {ref!r} names another model; this app serves "
                                       f"{self.model_name!r}")
                out[role] = await asyncio.to_thread(self._resolve, parsed)
        return out

    async def load(self, routing: dict[str, Any]) -> None:
        """Load every version `routing` names that is not loaded yet, beside those that are (in a
        thread; the models are added on the event loop, where requests read them)."""
        for version in named_versions(routing):
            if version not in self.models:
                ref = ModelRef.of(self.model_name, version)
                self.models[version] = await asyncio.to_thread(self._load, ref)

    def switch(self, routing: dict[str, Any]) -> list[str]:
        """Serve `routing` from now on (its versions are loaded); returns the loaded versions it no
        longer names, to `unload` once the requests in flight on them are done."""
        self.routing = dict(routing)
        self.pending_canary = None
        wanted = named_versions(routing)
        return [v for v in self.models if v not in wanted]

    def follow(self, routing: dict[str, Any]) -> None:
        """Take another replica's change at once, before loading anything: weights apply now, and
        a canary that is not loaded here yet keeps its share on stable until `switch`."""
        canary = routing.get("canary")
        self.routing = {**routing, "canary": canary if canary in self.models else None}
        self.pending_canary = canary

    def drop_canary(self) -> dict[str, Any]:
        """All traffic to stable, now (a rollback); returns the new routing."""
        self.routing = {**self.routing, "canary": None, "weight": 0, "shadow_pct": 0}
        return self.routing

    def unload(self, version: str) -> bool:
        """Drop a version unless the routing (or a canary still loading) names it again."""
        if version in (*named_versions(self.routing), self.pending_canary):
            return False
        return self.models.pop(version, None) is not None

    def choose(self, key: str | None = None) -> tuple[str, str]:
        """('stable' | 'canary', version). With a key, a hash of it picks the bucket (sticky)."""
        r = self.routing
        canary = r.get("canary")
        if not canary or canary not in self.models or not r.get("weight"):
            return "stable", r["stable"]
        if key is not None:
            bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
            x = (bucket % 10_000) / 100.0
        else:
            x = self._random.random() * 100.0
        return ("canary", canary) if x < r["weight"] else ("stable", r["stable"])

    def shadow_target(self) -> str | None:
        """The canary, for the shadow share of stable's requests (None for the others)."""
        canary, pct = self.routing.get("canary"), self.routing.get("shadow_pct") or 0
        if canary and canary in self.models and pct and self._random.random() * 100 < pct:
            return canary
        return None

    def loaded_model(self, version: str) -> Any:
        """The loaded model of a version; ModelUnavailable when this replica does not hold it."""
        model = self.models.get(version)
        if model is None:
            raise ModelUnavailable(f"model version {version} is not loaded on this replica")
        return model

    def loaded(self) -> list[str]:
        return sorted(self.models)
