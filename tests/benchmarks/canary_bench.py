"""Canary analysis benchmark: error rates and decision speed of four rules on simulated ledgers.

    python tests/benchmarks/canary_bench.py [--runs 2000] [--out tests/benchmarks/canary_bench.json]

Each simulated rollout serves `rate` requests per second; the canary gets its rule's current weight.
Stable answers correctly 90 % of the time, fails 1 % of requests, and has log-normal latencies
(median 20 ms, sigma 0.4); half the requests get a feedback label. The canary is identical (A/A)
or worse in one way (A/B). Every rule looks at the same kind of cumulative ledger the serving app
keeps (requests, errors, feedback, a latency histogram), and all rules of a scenario draw from the
same seeds (common random numbers). Rules:

* `sequential`: FlowOps' analysis (`flowops.rollout.decide_batch`, default AnalysisConfig: alpha 1 %,
  beta 5 %, margins accuracy 0.05 / errors 0.01 / slow share 0.02), looking every second.
* `previous`: the rule FlowOps used before (fixed-alpha one-sided Agresti-Caffo tests of errors and
  accuracy re-run every second; a step completes after 40 canary requests, 20 feedback labels per
  version and 5 s; inconclusive after 300 s at one step). Its p99 bootstrap is not simulated (too
  slow for thousands of runs), so its latency rows are left empty.
* `argo`: Argo Rollouts' documented background analysis: weight +20 % every 10 min; a measurement
  every 5 min over the last 5 min; the run fails after more than 3 failed measurements
  (`failureLimit: 3`); promoted when the steps end.
* `flagger`: Flagger's documented analysis: every 1 min check the last minute, weight +10 % per
  passing check up to 50 %, roll back after 5 failed checks (`threshold: 5`), promote after a
  passing check at 50 %.
* `oracle` (A/A and accuracy -10 pts only): a bound no valid test can beat, not a usable rule. Wald's
  SPRT told both accuracies exactly (stable 0.90, canary 0.90 or 0.80) tests that simple pair on
  the canary's feedback labels with 1 % false rollback and 99 % detection; among all tests with
  those error rates it needs the fewest labels on average (Wald and Wolfowitz, 1948). It runs at
  the first weight, 10 %.

Argo and Flagger measure each metric on its window against the same margins as FlowOps
(canary's bad rate minus stable's over the window), a fair version of their absolute thresholds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from flowops import rollout

HERE = Path(__file__).resolve().parent
CFG = rollout.AnalysisConfig()
BOUNDS = np.append(rollout.LATENCY_BUCKETS_MS, np.inf)
STABLE = {"accuracy": 0.90, "error": 0.01, "latency": 1.0}
SCENARIOS = {
    "A/A": {},
    "accuracy -2 pts": {"accuracy": 0.88},
    "accuracy -5 pts": {"accuracy": 0.85},
    "accuracy -10 pts": {"accuracy": 0.80},
    "errors x2": {"error": 0.02},
    "errors x5": {"error": 0.05},
    "latency x1.5": {"latency": 1.5},
    "latency x3": {"latency": 3.0},
}
FEEDBACK_SHARE = 0.5
ROLLBACK, PROMOTE, INCONCLUSIVE = 1, 2, 3
ORACLE_SCENARIOS = ("A/A", "accuracy -10 pts")
ORACLE_ERRORS = 0.01  # false rollback and missed detection of the oracle SPRT


def bucket_probs(scale: float) -> np.ndarray:
    """P(latency in each bucket) for log-normal latencies, median 20 ms x scale, sigma 0.4."""
    cdf = stats.norm.cdf(np.log(np.append(rollout.LATENCY_BUCKETS_MS, np.inf) / (20.0 * scale)) / 0.4)
    return np.diff(np.concatenate([[0.0], cdf]))


class Ledger:
    """Cumulative per-run ledgers of one version for R runs, and the current window's share."""

    def __init__(self, runs: int):
        self.requests = np.zeros(runs)
        self.errors = np.zeros(runs)
        self.fb_total = np.zeros(runs)
        self.fb_correct = np.zeros(runs)
        self.hist = np.zeros((runs, BOUNDS.size))

    def add(self, rng, n, model):
        self.requests += n
        self.errors += rng.binomial(n, model["error"])
        fb = rng.binomial(n, FEEDBACK_SHARE)
        self.fb_total += fb
        self.fb_correct += rng.binomial(fb, model["accuracy"])
        self.hist += rng.multinomial(n.astype(np.int64), bucket_probs(model["latency"]))

    def copy(self) -> Ledger:
        out = Ledger.__new__(Ledger)
        out.__dict__ = {k: v.copy() for k, v in self.__dict__.items()}
        return out


def counts(c: Ledger, s: Ledger) -> rollout.Counts:
    return rollout.Counts.from_arrays(c.requests, c.errors, c.fb_total, c.fb_correct, c.hist,
                                      s.requests, s.errors, s.fb_total, s.fb_correct, s.hist)


def window(c: Ledger, s: Ledger, c0: Ledger, s0: Ledger) -> rollout.Counts:
    """Counts of the window since (c0, s0)."""
    def diff(a, b):
        return [getattr(a, k) - getattr(b, k) for k in ("requests", "errors", "fb_total",
                                                          "fb_correct", "hist")]
    return rollout.Counts.from_arrays(*diff(c, c0), *diff(s, s0))


def window_fails(w: rollout.Counts) -> np.ndarray:
    """A measurement fails when a metric's canary bad rate exceeds stable's plus the margin."""
    margins = np.array([CFG.margin(name) for name in rollout.CHECKS])
    rate_c = np.where(w.n_c > 0, w.bad_c / np.maximum(w.n_c, 1), 0.0)
    rate_s = np.where(w.n_s > 0, w.bad_s / np.maximum(w.n_s, 1), 0.0)
    return ((rate_c - rate_s > margins) & (w.n_c > 0)).any(axis=-1)


def simulate(rule: str, canary: dict, rate: float, runs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    model_c = {**STABLE, **canary}
    c, s = Ledger(runs), Ledger(runs)
    outcome = np.zeros(runs, int)
    decided_at = np.full(runs, np.nan)
    decided_requests = np.full(runs, np.nan)
    step = np.zeros(runs, int)
    step_start = np.zeros(runs)
    step_requests = np.zeros(runs)  # previous rule: canary requests when the step began
    failures = np.zeros(runs, int)
    marks = (c.copy(), s.copy())
    dt = 1.0 if rule in ("sequential", "previous", "oracle") else 10.0
    horizon = {"sequential": CFG.max_duration_s + 1, "previous": 1300, "argo": 2410,
               "flagger": 1210, "oracle": 7200}[rule]
    # oracle: log likelihood ratio of a wrong and a right label, canary at 0.80 vs at 0.90 accuracy
    wrong, right = np.log(0.2 / 0.1), np.log(0.8 / 0.9)
    upper = np.log((1 - ORACLE_ERRORS) / ORACLE_ERRORS)
    t = 0.0
    while t < horizon and (outcome == 0).any():
        t += dt
        live = outcome == 0
        weight = weight_of(rule, step)
        n = rng.poisson(rate * dt, runs) * live
        n_c = rng.binomial(n, weight / 100.0)
        c.add(rng, n_c, model_c)
        s.add(rng, n - n_c, STABLE)
        new = np.zeros(runs, int)
        if rule == "sequential":
            action, assessment = rollout.decide_batch(counts(c, s), CFG, step, t - step_start, t)
            harm = assessment.harm.any(axis=-1)
            new = np.select([harm, action == 3, action == 2], [ROLLBACK, INCONCLUSIVE, PROMOTE], 0)
            advance = action == 1
        elif rule == "previous":
            new, advance = previous_rule(counts(c, s), step, t - step_start, c.requests - step_requests)
        elif rule == "oracle":
            advance = np.zeros(runs, bool)
            llr = (c.fb_total - c.fb_correct) * wrong + c.fb_correct * right
            new = np.select([llr >= upper, llr <= -upper], [ROLLBACK, PROMOTE], 0)
        elif rule == "argo":
            advance = np.zeros(runs, bool)
            if t % 300 == 0:
                failures += window_fails(window(c, s, *marks))
                marks = (c.copy(), s.copy())
            new = np.where(failures > 3, ROLLBACK, 0)
            if t % 600 == 0:
                advance = np.ones(runs, bool)
            new = np.where((new == 0) & advance & (step >= 3), PROMOTE, new)  # 20/40/60/80 -> 100
        else:  # flagger
            advance = np.zeros(runs, bool)
            if t % 60 == 0:
                failed = window_fails(window(c, s, *marks))
                marks = (c.copy(), s.copy())
                failures += failed
                advance = ~failed
            new = np.where(failures >= 5, ROLLBACK, 0)
            new = np.where((new == 0) & advance & (step >= 4), PROMOTE, new)  # 10..50 -> promote
        new = np.where(live, new, 0)
        decided_at = np.where(new > 0, t, decided_at)
        decided_requests = np.where(new > 0, c.requests, decided_requests)
        outcome = np.where(new > 0, new, outcome)
        move = advance & live & (new == 0)
        step = np.where(move, step + 1, step)
        step_start = np.where(move, t, step_start)
        step_requests = np.where(move, c.requests, step_requests)
    undecided = outcome == 0
    outcome[undecided] = INCONCLUSIVE
    decided_at[undecided] = t
    decided_requests[undecided] = c.requests[undecided]
    return summarize(outcome, decided_at, decided_requests)


def weight_of(rule: str, step: np.ndarray) -> np.ndarray:
    if rule == "oracle":
        return np.full(step.shape, CFG.steps[0])
    if rule in ("sequential", "previous"):
        return np.asarray(CFG.steps)[np.minimum(step, len(CFG.steps) - 1)]
    if rule == "argo":
        return np.minimum(20 * (step + 1), 80)
    return np.minimum(10 * (step + 1), 50)


def previous_rule(k: rollout.Counts, step, step_elapsed, step_requests):
    """The rule before sequential tests (errors and accuracy checks), vectorised."""
    def worse_p(bad_c, n_c, bad_s, n_s, margin):
        pc, ps = (bad_c + 1) / (n_c + 2), (bad_s + 1) / (n_s + 2)
        se = np.sqrt(pc * (1 - pc) / (n_c + 2) + ps * (1 - ps) / (n_s + 2))
        return stats.norm.sf((pc - ps - margin) / se)

    err_fail = (k.n_c[:, 1] > 0) & (worse_p(k.bad_c[:, 1], k.n_c[:, 1], k.bad_s[:, 1], k.n_s[:, 1],
                                           0.02) < 0.01)
    fb_ok = (k.n_c[:, 0] >= 20) & (k.n_s[:, 0] >= 20)
    acc_fail = fb_ok & (worse_p(k.bad_c[:, 0], k.n_c[:, 0], k.bad_s[:, 0], k.n_s[:, 0], 0.05) < 0.01)
    complete = (step_requests >= 40) & (step_elapsed >= 5.0) & fb_ok
    timed_out = ~complete & (step_elapsed >= 300)
    last = step >= len(CFG.steps) - 2
    new = np.select([err_fail | acc_fail, timed_out, complete & last], [ROLLBACK, INCONCLUSIVE, PROMOTE], 0)
    return new, complete & ~last & (new == 0)


def summarize(outcome, decided_at, decided_requests) -> dict:
    def median(mask, values):
        return round(float(np.median(values[mask])), 1) if mask.any() else None

    rolled, promoted = outcome == ROLLBACK, outcome == PROMOTE
    return {
        "runs": int(outcome.size),
        "rolled_back": round(float(rolled.mean()), 4),
        "promoted": round(float(promoted.mean()), 4),
        "inconclusive": round(float((outcome == INCONCLUSIVE).mean()), 4),
        "median_canary_requests_to_rollback": median(rolled, decided_requests),
        "median_s_to_rollback": median(rolled, decided_at),
        "median_canary_requests_to_promote": median(promoted, decided_requests),
        "median_s_to_promote": median(promoted, decided_at),
    }


def goals(results: dict) -> dict:
    seq = {(r["scenario"], r["rate"]): r for r in results if r["rule"] == "sequential"}
    out = {}
    for (scenario, rate), row in seq.items():
        if scenario == "A/A":
            out[f"A/A false rollback <= alpha at {rate}/s"] = row["rolled_back"] <= CFG.alpha
        if scenario == "accuracy -5 pts":
            out[f"-5 pts promoted <= 5% at {rate}/s"] = row["promoted"] <= 0.05
        if scenario == "accuracy -10 pts":
            ours = row["median_canary_requests_to_rollback"]
            for rule in ("argo", "flagger"):
                other = next(r for r in results if r["rule"] == rule and r["scenario"] == scenario
                             and r["rate"] == rate)["median_canary_requests_to_rollback"]
                out[f"-10 pts rolled back with 10x fewer canary requests than {rule} at {rate}/s"] = (
                    ours is not None and (other is None or other >= 10 * ours))
                oracle = next((r for r in results if r["rule"] == "oracle" and r["scenario"] == scenario
                               and r["rate"] == rate), None)
                if oracle and other is not None:  # can any valid test reach 10x here at all?
                    out[f"10x fewer than {rule} possible at all at {rate}/s (oracle SPRT)"] = (
                        other >= 10 * oracle["median_canary_requests_to_rollback"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rates", type=float, nargs="+", default=[5.0, 25.0, 100.0, 400.0])
    parser.add_argument("--out", type=Path, default=HERE / "canary_bench.json")
    args = parser.parse_args()
    results = []
    started = time.time()
    for rate in args.rates:
        for i, (scenario, canary) in enumerate(SCENARIOS.items()):
            for rule in ("sequential", "previous", "argo", "flagger", "oracle"):
                if (rule == "previous" and "latency" in scenario) or \
                        (rule == "oracle" and scenario not in ORACLE_SCENARIOS):
                    continue
                seed = int(rate * 1000) + i  # the same streams for every rule of a scenario
                row = {"scenario": scenario, "rate": rate, "rule": rule,
                       **simulate(rule, canary, rate, args.runs, seed)}
                results.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "what": __doc__.splitlines()[0],
        "config": CFG.model_dump(),
        "stable": STABLE, "feedback_share": FEEDBACK_SHARE, "runs_per_cell": args.runs,
        "seconds": round(time.time() - started, 1),
        "results": results,
        "goals": goals(results),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["goals"], indent=2))


if __name__ == "__main__":
    main()
