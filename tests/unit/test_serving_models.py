"""The version set of a serving replica, without a cluster: which version answers, and when a
version is loaded and unloaded."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from flowops.errors import Conflict, NotFound
from flowops.refs import ModelRef
from flowops.serving.models import ModelUnavailable, VersionSet, next_routing

ALIASES = {"production": "1", "staging": "2"}


def _versions(seed: int = 0) -> tuple[VersionSet, list[ModelRef]]:
    """A version set over a fake registry (versions 1-5; aliases production=1, staging=2)."""
    loads: list[ModelRef] = []

    def resolve(ref: ModelRef) -> str:
        number = ALIASES.get(ref.alias) if ref.alias else ref.version
        if number not in {"1", "2", "3", "4", "5"}:
            raise NotFound(f"model {ref.uri} does not exist")
        return number

    def load(ref: ModelRef):
        loads.append(ref)
        return SimpleNamespace(version=ref.version, classes=["a", "b"])

    return VersionSet("digits", resolve, load, rng=random.Random(seed)), loads


def _serve(versions: VersionSet, **routing) -> None:
    routing = {"stable": "1", "canary": None, "weight": 0, "shadow_pct": 0, **routing}
    asyncio.run(versions.load(routing))
    versions.switch(routing)


def test_references_resolve_through_model_refs():
    versions, _ = _versions()
    resolved = asyncio.run(versions.resolve("production", "3"))
    assert resolved == {"stable": "1", "canary": "3"}
    assert asyncio.run(versions.resolve(canary="models:/digits@staging")) == {"canary": "2"}
    with pytest.raises(NotFound):
        asyncio.run(versions.resolve("9"))


def test_each_named_version_is_loaded_once_by_number():
    versions, loads = _versions()
    _serve(versions, stable="1", canary="2", weight=10)
    _serve(versions, stable="1", canary="2", weight=50)
    assert loads == [ModelRef.of("digits", "1"), ModelRef.of("digits", "2")]
    assert versions.loaded() == ["1", "2"] and versions.loaded_model("2").version == "2"
    with pytest.raises(ModelUnavailable, match="version 3 is not loaded"):
        versions.loaded_model("3")


def test_choose_gives_the_canary_its_weight():
    versions, _ = _versions(seed=1)
    _serve(versions, canary="2", weight=10)
    picks = [versions.choose() for _ in range(10_000)]
    share = sum(role == "canary" for role, _ in picks) / len(picks)
    assert 0.08 < share < 0.12
    assert {v for role, v in picks if role == "canary"} == {"2"}
    _serve(versions, canary="2", weight=0)
    assert {versions.choose() for _ in range(200)} == {("stable", "1")}


def test_a_routing_key_always_gets_the_same_version_and_keys_spread_by_weight():
    versions, _ = _versions()
    _serve(versions, canary="2", weight=30)
    for key in ("user-1", "user-2", "user-3"):
        assert len({versions.choose(key) for _ in range(50)}) == 1
    share = sum(versions.choose(f"user-{i}")[0] == "canary" for i in range(5000)) / 5000
    assert 0.26 < share < 0.34


def test_no_canary_share_before_it_is_loaded_here():
    """Another replica's change: the weight applies at once, a new canary only once loaded."""
    versions, _ = _versions()
    _serve(versions)
    routing = {"stable": "1", "canary": "3", "weight": 100, "shadow_pct": 0}
    versions.follow(routing)
    assert versions.choose("k") == ("stable", "1") and versions.routing["weight"] == 100
    asyncio.run(versions.load(routing))
    versions.switch(routing)
    assert versions.choose("k") == ("canary", "3")


def test_shadow_mirrors_only_its_share_and_only_to_a_loaded_canary():
    versions, _ = _versions(seed=2)
    _serve(versions, canary="2", weight=0, shadow_pct=100)
    assert versions.shadow_target() == "2"
    _serve(versions, canary="2", weight=0, shadow_pct=25)
    share = sum(versions.shadow_target() == "2" for _ in range(4000)) / 4000
    assert 0.22 < share < 0.28
    _serve(versions, canary="2", shadow_pct=0)
    assert versions.shadow_target() is None
    _serve(versions, shadow_pct=100)
    assert versions.shadow_target() is None  # no canary


def test_a_removed_version_is_unloaded_unless_it_is_named_again():
    versions, _ = _versions()
    _serve(versions, canary="2", weight=10)
    routing = {"stable": "1", "canary": None, "weight": 0}
    asyncio.run(versions.load(routing))
    assert versions.switch(routing) == ["2"]
    assert versions.unload("2") and versions.loaded() == ["1"]
    assert not versions.unload("1")  # stable stays
    _serve(versions, canary="3", weight=10)
    stale = versions.switch({"stable": "1", "canary": None, "weight": 0})
    versions.follow({"stable": "1", "canary": "3", "weight": 10})  # named again, meanwhile
    assert stale == ["3"] and not versions.unload("3") and "3" in versions.loaded()


def test_rollback_sends_everything_to_stable_at_once():
    versions, _ = _versions()
    _serve(versions, canary="2", weight=100, shadow_pct=50)
    routing = versions.drop_canary()
    assert routing["canary"] is None and routing["weight"] == 0 and routing["shadow_pct"] == 0
    assert versions.choose("k") == ("stable", "1") and versions.shadow_target() is None


def test_next_routing_applies_resolved_changes_and_refuses_a_canary_equal_to_stable():
    current = {"stable": "1", "canary": "2", "weight": 20, "shadow_pct": 5}
    assert next_routing(current, {"weight": 40}, {}) == {**current, "weight": 40}
    assert next_routing(current, {"canary": "staging"}, {"canary": "3"})["canary"] == "3"
    removed = next_routing(current, {"canary": ""}, {})
    assert removed["canary"] is None and removed["weight"] == 0
    with pytest.raises(Conflict, match="same version"):
        next_routing(current, {"stable": "production"}, {"stable": "2"})
