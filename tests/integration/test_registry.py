"""The alias flow on the real MLflow registry: validate (pass, fail), promote, list, prune,
and reproducibility (two runs, same weights hash; `models reproduce` reports a match)."""

from __future__ import annotations

import json

import pytest

from flowops import registry
from flowops.errors import Conflict, GateFailed
from flowops.train import TrainConfig, train
from tests.conftest import run_cli

pytestmark = pytest.mark.integration
NAME = "it-registry-model"  # its own registered model: other stages' tests never see these aliases
ENV = {"FLOWOPS_MODEL_NAME": NAME}


def test_gate_fail_then_pass_promote_and_reproduce(stack, dataset):
    first = train(stack, TrainConfig(data_version=dataset, epochs=3, seed=11, local=True,
                                     experiment="it-registry", model_name=NAME))
    again = train(stack, TrainConfig(data_version=dataset, epochs=3, seed=11, local=True,
                                     experiment="it-registry", register_version=False,
                                     model_name=NAME))
    assert again.weights_hash == first.weights_hash and again.metrics == first.metrics
    v = first.version

    # An impossible floor fails: tagged, non-zero exit, and promotion is refused.
    proc = run_cli("models", "validate", v, "--min-accuracy", "1.01", timeout=180, env=ENV)
    assert proc.returncode != 0 and "between 0 and 1" in proc.stderr
    with pytest.raises(GateFailed, match="below the floor"):
        registry.validate_version(stack, v, name=NAME, min_accuracy=0.999)
    mv = registry.get_version(stack, v, name=NAME)
    assert mv.tags["validation"] == "failed" and "below the floor" in mv.tags["validation_reasons"]
    proc = run_cli("models", "validate", v, "--min-accuracy", "0.999", "--json", timeout=180, env=ENV)
    assert proc.returncode == GateFailed.exit_code
    failed = json.loads(proc.stdout)  # the report, also when the gate fails
    assert failed["passed"] is False and "below the floor" in failed["reasons"][0]
    assert proc.stderr.startswith(f"error: version {v} failed validation")
    proc = run_cli("models", "promote", v, timeout=120, env=ENV)
    assert proc.returncode != 0 and "has not passed validation" in proc.stderr
    with pytest.raises(Conflict):
        registry.promote(stack, v, name=NAME)

    proc = run_cli("models", "validate", v, "--min-accuracy", "0.05", "--json", timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"]
    assert report["accuracy"] == pytest.approx(first.metrics["holdout_accuracy"], abs=1e-4)
    assert registry.aliases(stack, name=NAME)["staging"] == v
    run_cli("models", "promote", v, check=True, timeout=120, env=ENV)
    assert registry.production_version(stack, name=NAME) == v

    # A worse candidate regresses against production on the same holdout.
    worse = train(stack, TrainConfig(data_version=dataset, epochs=1, lr=1e-5, local=True,
                                     experiment="it-registry", model_name=NAME))
    with pytest.raises(GateFailed, match="regression"):
        registry.validate_version(stack, worse.version, name=NAME, min_accuracy=0.0, max_regression=0.0)

    listed = run_cli("models", "list", "--json", check=True, env=ENV).stdout
    rows = {r["version"]: r for r in json.loads(listed)}
    assert "production" in rows[v]["aliases"] and rows[v]["data_version"] == dataset

    pruned = registry.prune(stack, "0s", name=NAME)
    assert v not in pruned["deleted"] and worse.version in pruned["deleted"]

    proc = run_cli("models", "reproduce", v, "--json", timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["match"] is True
    assert "epoch 3/3" in proc.stderr  # the re-run's progress


def test_mark_rolled_back_restores_the_previous_production(stack, dataset):
    a = train(stack, TrainConfig(data_version=dataset, epochs=1, local=True, experiment="it-rb",
                                 model_name=NAME))
    b = train(stack, TrainConfig(data_version=dataset, epochs=1, local=True, seed=2, experiment="it-rb",
                                 model_name=NAME))
    registry.promote(stack, a.version, force=True, name=NAME)
    registry.promote(stack, b.version, force=True, name=NAME)
    out = registry.mark_rolled_back(stack, b.version, ["canary error rate 12%"], name=NAME)
    assert out["production"] == a.version == registry.production_version(stack, name=NAME)
    assert registry.get_version(stack, b.version, name=NAME).tags["rolled_back"] == "true"
