"""Canary analysis on synthetic ledgers: harm rolls back on the evidence that proves it, equal
canaries are promoted only once non-inferiority is shown, noise does not roll back."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from flowops import rollout
from flowops.rollout import AnalysisConfig, decide

CFG = AnalysisConfig()


def ledger(rng, n, error_rate=0.01, latency_ms=20.0, accuracy=0.90, feedback=None):
    feedback = n // 2 if feedback is None else feedback
    return {
        "requests": n,
        "errors": int(rng.binomial(n, error_rate)),
        "latencies_ms": list(rng.lognormal(np.log(latency_ms), 0.4, size=n)),
        "feedback_correct": int(rng.binomial(feedback, accuracy)),
        "feedback_total": feedback,
    }


def run(snapshot, step=0, elapsed=30.0, cfg=CFG, total=None):
    return decide(snapshot, stable="1", canary="2", step=step, step_elapsed_s=elapsed,
                  elapsed_s=total, config=cfg)


def check(decision, name):
    return next(c for c in decision.checks if c.name == name)


def test_a_crashing_canary_is_rolled_back_after_five_requests():
    rng = np.random.default_rng(1)
    crashing = {"requests": 5, "errors": 5, "feedback_total": 0, "feedback_correct": 0}
    decision = run({"1": ledger(rng, 300), "2": crashing}, elapsed=3)
    assert decision.action == "rollback"
    assert check(decision, "error_rate").status == "harm"
    assert "canary 5/5 failed" in decision.reasons[0]


def test_a_canary_with_five_wrong_answers_is_rolled_back():
    rng = np.random.default_rng(2)
    wrong = {"requests": 10, "errors": 0, "feedback_total": 5, "feedback_correct": 0,
             "latencies_ms": [20.0] * 10}
    decision = run({"1": ledger(rng, 300), "2": wrong}, elapsed=3)
    assert decision.action == "rollback"
    assert [c.name for c in decision.checks if c.status == "harm"] == ["accuracy"]


def test_a_slow_canary_is_rolled_back_on_its_latency_tail():
    rng = np.random.default_rng(3)
    decision = run({"1": ledger(rng, 2000), "2": ledger(rng, 200, latency_ms=60)})
    assert decision.action == "rollback"
    assert [c.name for c in decision.checks if c.status == "harm"] == ["latency_tail"]


def test_an_equal_canary_is_promoted_once_non_inferiority_is_shown():
    rng = np.random.default_rng(4)
    snapshot = {"1": ledger(rng, 20000), "2": ledger(rng, 6000)}
    decision = run(snapshot, step=len(CFG.steps) - 2)
    assert decision.action == "promote"
    assert {c.status for c in decision.checks} == {"non_inferior"}
    accuracy = check(decision, "accuracy")
    assert accuracy.upper < CFG.accuracy_margin and accuracy.lower < 0 < accuracy.upper


def test_early_steps_advance_on_looser_bounds_and_the_last_needs_the_margin():
    rng = np.random.default_rng(5)
    snapshot = {"1": ledger(rng, 6000), "2": ledger(rng, 500)}
    assert run(snapshot, step=0).action == "continue"
    last = run(snapshot, step=len(CFG.steps) - 2)
    assert last.action == "wait"
    assert any("more canary feedback labels" in r for r in last.reasons)
    assert check(last, "accuracy").needed > 0


def test_missing_feedback_never_promotes_and_ends_inconclusive():
    rng = np.random.default_rng(6)
    snapshot = {"1": ledger(rng, 20000, feedback=0), "2": ledger(rng, 6000, feedback=0)}
    waiting = run(snapshot, step=len(CFG.steps) - 2, total=60)
    assert waiting.action == "wait"
    timed_out = run(snapshot, step=len(CFG.steps) - 2, total=CFG.max_duration_s)
    assert timed_out.action == "rollback"
    assert "inconclusive" in timed_out.reasons[0] and "feedback labels" in timed_out.reasons[0]
    # where no labels exist, leaving accuracy out of the required checks promotes on the others
    no_labels = AnalysisConfig(required=["error_rate", "latency_tail"])
    assert run(snapshot, step=len(CFG.steps) - 2, cfg=no_labels).action == "promote"


def test_a_canary_much_worse_than_the_margin_cannot_be_promoted():
    rng = np.random.default_rng(7)
    snapshot = {"1": ledger(rng, 20000), "2": ledger(rng, 60, accuracy=0.82)}
    decision = run(snapshot, step=len(CFG.steps) - 2)
    assert decision.action != "promote"


def test_equal_canaries_are_rarely_rolled_back_under_repeated_looks():
    """1,000 A/A rollouts looked at every 50 requests up to 3,000: harm shown in at most alpha."""
    rng = np.random.default_rng(8)
    runs, looks, per_look = 1000, 60, 50
    c = {k: np.zeros(runs) for k in ("requests", "errors", "fb", "correct")}
    s = {k: np.zeros(runs) for k in ("requests", "errors", "fb", "correct")}
    hist_c, hist_s = (np.zeros((runs, len(rollout.LATENCY_BUCKETS_MS) + 1)) for _ in range(2))
    probs = np.diff(np.concatenate([[0.0], np.clip(np.searchsorted(
        np.sort(rng.lognormal(np.log(20), 0.4, 200_000)), rollout.LATENCY_BUCKETS_MS) / 200_000, 0, 1),
        [1.0]]))
    ever = np.zeros(runs, bool)
    for _ in range(looks):
        for side, hist, n in ((c, hist_c, per_look), (s, hist_s, 4 * per_look)):
            side["requests"] += n
            side["errors"] += rng.binomial(n, 0.01, runs)
            fb = rng.binomial(n, 0.5, runs)
            side["fb"] += fb
            side["correct"] += rng.binomial(fb, 0.9)
            hist += rng.multinomial(n, probs, runs)
        counts = rollout.Counts.from_arrays(c["requests"], c["errors"], c["fb"], c["correct"], hist_c,
                                            s["requests"], s["errors"], s["fb"], s["correct"], hist_s)
        ever |= rollout.assess(counts, CFG, 0).harm.any(axis=-1)
    assert ever.mean() <= CFG.alpha


def test_the_confidence_sequence_narrows_with_evidence_and_widens_with_confidence():
    variances = np.array([1e-1, 1e-2, 1e-3, 1e-4])
    widths = rollout.halfwidth(variances, 0.05)
    assert np.all(np.diff(widths) < 0)
    assert np.all(rollout.halfwidth(variances, 0.01) > widths)
    # time-uniform bounds are wider than a fixed-sample z interval of the same level
    assert np.all(widths > 1.96 * np.sqrt(variances))


def test_histograms_and_latency_lists_give_the_same_tail_counts():
    rng = np.random.default_rng(9)
    lat_s, lat_c = rng.lognormal(3, 0.4, 1000), rng.lognormal(3.3, 0.4, 300)
    as_lists = {"1": {"requests": 1000, "latencies_ms": list(lat_s)},
                "2": {"requests": 300, "latencies_ms": list(lat_c)}}
    bounds = rollout.LATENCY_BUCKETS_MS

    def hist(values):
        return np.bincount(np.searchsorted(bounds, values), minlength=len(bounds) + 1).tolist()

    as_hist = {"1": {"requests": 1000, "latency_hist": hist(lat_s), "latency_buckets_ms": bounds},
               "2": {"requests": 300, "latency_hist": hist(lat_c), "latency_buckets_ms": bounds}}
    a, b = check(run(as_lists), "latency_tail"), check(run(as_hist), "latency_tail")
    assert (a.canary, a.stable) == (b.canary, b.stable)
    assert int(a.canary.split("/")[0]) > 3 * 0.01 * 300  # well beyond the 1 % an equal canary has


def test_config_rejects_bad_steps_and_unknown_keys_but_reads_old_stored_configs():
    with pytest.raises(ValidationError, match="increasing"):
        AnalysisConfig(steps=[50, 25, 100])
    with pytest.raises(ValidationError):
        AnalysisConfig(unknown_margin=1)
    with pytest.raises(ValidationError):
        AnalysisConfig(required=["speed"])
    old = AnalysisConfig.model_validate({"min_requests": 40, "min_duration_s": 5.0, "alpha": 0.02})
    assert old.alpha == 0.02


def test_a_step_outside_the_config_is_refused():
    from flowops.errors import InvalidInput

    with pytest.raises(InvalidInput, match="step 3"):
        run({}, step=3)
