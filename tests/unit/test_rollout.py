"""Canary analysis on synthetic ledgers: worse canaries roll back, equal ones promote, noise does not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flowops import rollout
from flowops.rollout import AnalysisConfig, decide

CFG = AnalysisConfig(min_requests=100, min_duration_s=1.0)


def ledger(rng, n, error_rate=0.01, latency_ms=20.0, accuracy=0.95, feedback=None, jitter=5.0):
    feedback = n // 2 if feedback is None else feedback
    return {
        "requests": n,
        "errors": int(rng.binomial(n, error_rate)),
        "latencies_ms": list(rng.gamma(4.0, latency_ms / 4.0, size=n) + rng.uniform(0, jitter, n)),
        "feedback_correct": int(rng.binomial(feedback, accuracy)),
        "feedback_total": feedback,
        "shadow_agree": 0,
        "shadow_total": 0,
    }


def run_step(snapshot, step=0, started=0, elapsed=10.0, cfg=CFG):
    return decide(snapshot, stable="1", canary="2", step=step, step_started_requests=started,
                  step_elapsed_s=elapsed, config=cfg)


def test_canary_with_many_errors_is_rolled_back_with_the_reason():
    rng = np.random.default_rng(1)
    snap = {"1": ledger(rng, 2000, error_rate=0.005), "2": ledger(rng, 300, error_rate=0.15)}
    decision = run_step(snap)
    assert decision.action == "rollback"
    assert any("canary" in r and "/300" in r for r in decision.reasons)
    assert [c.status for c in decision.checks if c.name == "error_rate"] == ["fail"]


def test_slow_canary_is_rolled_back_on_p99_latency():
    rng = np.random.default_rng(2)
    snap = {"1": ledger(rng, 1000, latency_ms=20), "2": ledger(rng, 300, latency_ms=120)}
    decision = run_step(snap)
    assert decision.action == "rollback"
    assert [c.name for c in decision.checks if c.status == "fail"] == ["p99_latency"]


def test_less_accurate_canary_is_rolled_back_on_feedback():
    rng = np.random.default_rng(3)
    snap = {"1": ledger(rng, 1000, accuracy=0.95), "2": ledger(rng, 300, accuracy=0.3)}
    decision = run_step(snap)
    assert decision.action == "rollback"
    assert [c.name for c in decision.checks if c.status == "fail"] == ["accuracy"]
    assert decision.evidence["canary_feedback"][1] == 150


def test_equal_canary_continues_through_the_steps_and_is_promoted_at_the_last():
    rng = np.random.default_rng(4)
    snap = {"1": ledger(rng, 2000), "2": ledger(rng, 400)}
    actions = [run_step(snap, step=i).action for i in range(3)]
    assert actions == ["continue", "continue", "promote"]


def test_a_step_waits_for_its_own_requests_and_duration_then_times_out_inconclusive():
    rng = np.random.default_rng(5)
    snap = {"1": ledger(rng, 2000), "2": ledger(rng, 150)}
    assert run_step(snap, started=100).action == "wait"  # only 50 new requests at this step
    assert run_step(snap, elapsed=0.2).action == "wait"  # not long enough
    timed_out = run_step(snap, started=100, elapsed=CFG.max_step_s + 1)
    assert timed_out.action == "rollback" and "inconclusive" in timed_out.reasons[0]


def test_without_feedback_accuracy_is_skipped_not_failed():
    rng = np.random.default_rng(6)
    snap = {"1": ledger(rng, 500, feedback=0), "2": ledger(rng, 200, feedback=0)}
    decision = run_step(snap)
    assert decision.action == "continue"
    assert {c.name: c.status for c in decision.checks}["accuracy"] == "skipped"


def test_latency_histograms_are_read_like_lists():
    hist = {"10": 50, "50": 40, "+Inf": 10}
    values = rollout.latencies_from_ledger(hist)
    assert len(values) == 100 and max(values) == 100.0
    assert rollout.latencies_from_ledger({"buckets": [5, 10], "counts": [1, 2]}) == [5, 10, 10]


def test_bad_step_configuration_is_rejected_with_what_is_allowed():
    with pytest.raises(ValidationError, match="ending with 100"):
        AnalysisConfig(steps=[50, 25, 100])
    with pytest.raises(ValidationError):
        AnalysisConfig(unknown_margin=1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    error_rate=st.floats(0.0, 0.08),
    accuracy=st.floats(0.6, 0.99),
    latency=st.floats(5, 200),
    n_stable=st.integers(200, 3000),
    n_canary=st.integers(100, 600),
)
def test_noise_alone_never_rolls_back_an_equal_canary(seed, error_rate, accuracy, latency,
                                                      n_stable, n_canary):
    rng = np.random.default_rng(seed)
    snap = {"1": ledger(rng, n_stable, error_rate, latency, accuracy),
            "2": ledger(rng, n_canary, error_rate, latency, accuracy)}
    decision = run_step(snap)
    assert decision.action == "continue", decision.reasons


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), base=st.floats(0.0, 0.05), n_canary=st.integers(300, 800))
def test_a_clearly_worse_error_rate_is_always_caught(seed, base, n_canary):
    rng = np.random.default_rng(seed)
    snap = {"1": ledger(rng, 2000, error_rate=base), "2": ledger(rng, n_canary,
                                                                  error_rate=base + 0.15)}
    assert run_step(snap).action == "rollback"
