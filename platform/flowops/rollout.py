"""Canary analysis with sequential, anytime-valid tests: is the canary worse than stable?

The loop asks `decide()` about once a second, from the serving ledger, while the canary walks its
weight steps (default 10 -> 25 -> 50 -> 100 %). Each look is allowed: the tests stay valid under
continuous monitoring, so looking every second does not inflate the error rates.

**Checks.** Each check compares a "bad outcome" rate, canary minus stable (b = bad_c - bad_s):

* `accuracy`: a feedback label that disagrees with the prediction (needs feedback labels);
* `error_rate`: a request that failed;
* `latency_tail`: a request slower than stable's p99 (stable's own share is about 1 %), a tail
  measure that needs no distributional assumption about latencies.

**Confidence sequences.** For each check, a time-uniform confidence sequence for b: the mixture
sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis and Walsh, "Peeking at A/B
tests" (KDD 2017), which is the normal-mixture boundary of Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences" (Ann. Statist. 2021), applied to
the difference of two proportions with a plug-in (Agresti-Caffo smoothed) variance. The mixing
scale is itself an equal-weight mixture over `TAUS`, so one test is sharp both for gross failures
seen in five requests and for small differences seen in thousands (an average of e-processes is
an e-process). With a plug-in variance the guarantee is asymptotic; `tests/benchmarks/
canary_bench.py` measures the error rates actually achieved on simulated streams.

**Decisions.**

* Roll back as soon as one check shows harm: the lower bound of its `1 - alpha/k` sequence is
  above 0 (k checks share alpha, Bonferroni), so a canary that is equal to stable is rolled back
  with probability at most alpha, however long and often the analysis looks.
* Promote only when every required check shows non-inferiority: the upper bound of its `1 - beta`
  sequence is below the check's margin. A canary worse than stable by the margin is promoted with
  probability at most beta. Missing evidence never promotes.
* Weight steps are driven by evidence: step i (of the n steps before 100 %) is left once every
  required check has excluded a degradation larger than `margin * n / (i + 1)` (3x the margin at
  10 %, 1.5x at 25 %, the margin itself, i.e. promotion, at 50 %).
* Past `max_duration_s` without a decision: roll back as inconclusive, saying which check needs how
  much more evidence (the candidate stays in the registry).

Everything here is a pure function of ledger snapshots, vectorised over many ledgers at once so
the benchmark runs thousands of simulated rollouts through the same code as the controller.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowops.errors import InvalidInput

Action = Literal["wait", "continue", "promote", "rollback"]
CheckStatus = Literal["harm", "non_inferior", "pending", "no_data"]
CHECKS = ("accuracy", "error_rate", "latency_tail")
TAUS = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.5])  # mixing scales of the mSPRT (rates: 0-1)
MIN_SAMPLES = 5  # observations per version before a check may decide anything
# Upper bounds of the latency histogram the serving ledger keeps per version (the last bucket is
# open-ended): 10 % apart, so "slower than stable's p99" is resolved to about 10 %.
LATENCY_BUCKETS_MS = [round(float(b), 3) for b in np.geomspace(0.5, 60_000, 124)]
# Keys of the request-count analysis (before sequential tests) still accepted, and ignored, in
# stored loop configs, so a home written by an older FlowOps keeps loading.
_LEGACY_KEYS = ("min_requests", "min_duration_s", "max_step_s", "latency_ratio", "latency_margin_ms",
                "min_latency_samples", "min_feedback", "bootstrap_resamples")


class AnalysisConfig(BaseModel):
    """Weight steps, margins and the two error rates of the canary analysis."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] = Field([10, 25, 50, 100], description="Canary weights (%); 100 = promote.")
    alpha: float = Field(0.01, gt=0, lt=0.5, description="False rollback rate: an equal canary is "
                         "rolled back at most this often (all checks together).")
    beta: float = Field(0.05, gt=0, lt=0.5, description="False promotion rate: a canary worse by a "
                        "margin is promoted at most this often.")
    accuracy_margin: float = Field(0.05, gt=0, le=1, description="Tolerated accuracy drop.")
    error_margin: float = Field(0.01, gt=0, le=1, description="Tolerated error-rate increase.")
    latency_margin: float = Field(0.02, gt=0, le=1, description="Tolerated increase of the share "
                                  "of requests slower than stable's p99 (1 % for an equal canary).")
    required: list[Literal["accuracy", "error_rate", "latency_tail"]] = Field(
        list(CHECKS), description="Checks that must show non-inferiority before promotion "
        "(leave out accuracy where no feedback labels arrive).")
    min_step_s: float = Field(2.0, ge=0, description="Seconds each weight lasts at least.")
    max_duration_s: float = Field(900.0, gt=0, description="Past this without a decision the "
                                  "analysis is inconclusive: roll back.")

    @model_validator(mode="before")
    @classmethod
    def _drop_legacy_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in _LEGACY_KEYS}
        return data

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if len(value) < 2 or value[-1] != 100 or any(not 0 < w <= 100 for w in value) or \
                any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("steps must be increasing weights in 1-100 ending with 100, "
                             f"e.g. [10, 25, 50, 100]; got {value}")
        return value

    @field_validator("required")
    @classmethod
    def _required(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"at least one check must be required; choose from {list(CHECKS)}")
        return list(dict.fromkeys(value))

    def margin(self, check: str) -> float:
        return {"accuracy": self.accuracy_margin, "error_rate": self.error_margin,
                "latency_tail": self.latency_margin}[check]


# Ledgers as arrays -------------------------------------------------------------------------------


@dataclass
class Counts:
    """Bad outcomes and observations per check, canary and stable, for R ledgers at once.

    Each array has shape (R, 3): columns follow CHECKS.
    """

    bad_c: np.ndarray
    n_c: np.ndarray
    bad_s: np.ndarray
    n_s: np.ndarray

    @classmethod
    def from_arrays(cls, requests_c, errors_c, fb_total_c, fb_correct_c, hist_c,
                    requests_s, errors_s, fb_total_s, fb_correct_s, hist_s) -> Counts:
        """Counts from ledger arrays (length R) and latency histograms (R, buckets)."""
        slow_c, seen_c, slow_s, seen_s = tail_counts(np.asarray(hist_c), np.asarray(hist_s))
        return cls(
            bad_c=_columns(np.subtract(fb_total_c, fb_correct_c), errors_c, slow_c),
            n_c=_columns(fb_total_c, requests_c, seen_c),
            bad_s=_columns(np.subtract(fb_total_s, fb_correct_s), errors_s, slow_s),
            n_s=_columns(fb_total_s, requests_s, seen_s),
        )


def _columns(*cols) -> np.ndarray:
    """(R, len(cols)) float array: one column per check, in CHECKS order."""
    return np.stack([np.asarray(c, float) for c in cols], axis=-1)


def tail_counts(hist_c: np.ndarray, hist_s: np.ndarray):
    """Per ledger (rows of two (R, buckets) histograms): canary slower than stable's p99, canary
    seen, stable slower, stable seen.

    The threshold is the first bucket bound below which at least 99 % of stable's latencies fall;
    both versions count what lies in the buckets above it.
    """
    total_s = hist_s.sum(axis=-1)
    edge = np.argmax(np.cumsum(hist_s, axis=-1) >= 0.99 * np.maximum(total_s, 1)[:, None], axis=-1)
    above = np.arange(hist_s.shape[-1])[None, :] > edge[:, None]
    return (hist_c * above).sum(axis=-1), hist_c.sum(axis=-1), (hist_s * above).sum(axis=-1), total_s


def latency_histogram(raw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(bucket upper bounds, counts) of a version's ledger: its cumulative histogram when it has
    one (`latency_hist` + `latency_buckets_ms`, the last bucket open-ended), else its latency
    list counted on a fine log grid."""
    if raw.get("latency_hist") is not None and raw.get("latency_buckets_ms") is not None:
        bounds = np.append(np.asarray(raw["latency_buckets_ms"], float), np.inf)
        counts = np.asarray(raw["latency_hist"], float)
        if counts.size != bounds.size:
            raise InvalidInput(f"latency_hist has {counts.size} buckets, expected {bounds.size}")
        return bounds, counts
    values = np.asarray(raw.get("latencies_ms") or [], float)
    bounds = np.append(LATENCY_BUCKETS_MS, np.inf)
    counts = np.bincount(np.searchsorted(LATENCY_BUCKETS_MS, values), minlength=bounds.size)
    return bounds, counts.astype(float)


# Statistics ---------------------------------------------------------------------------------------


def difference(counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, variance of the estimate) of bad_c/n_c - bad_s/n_s, per ledger and check.

    The variance uses Agresti-Caffo smoothed rates ((x + 1) / (n + 2)), so a version with no bad
    outcome yet does not claim zero variance."""
    n_c, n_s = np.maximum(counts.n_c, 1), np.maximum(counts.n_s, 1)
    estimate = counts.bad_c / n_c - counts.bad_s / n_s
    pc = (counts.bad_c + 1) / (counts.n_c + 2)
    ps = (counts.bad_s + 1) / (counts.n_s + 2)
    return estimate, pc * (1 - pc) / (counts.n_c + 2) + ps * (1 - ps) / (counts.n_s + 2)


def halfwidth(variance: np.ndarray, level: float) -> np.ndarray:
    """Half-width h of the mixture-mSPRT confidence sequence at error `level`.

    For an estimate with variance V, the normal mixture over the effect with scale tau gives the
    likelihood ratio sqrt(V / (V + tau^2)) * exp(tau^2 h^2 / (2 V (V + tau^2))); h solves
    mean over TAUS of that ratio = 1 / level (Ville's inequality makes the bound time-uniform).
    h depends on V alone, so it is solved once per level on a grid and interpolated in log-log.
    """
    log_v, log_h = _halfwidth_table(float(level))
    v = np.clip(np.asarray(variance, float), 1e-12, 1.0)
    return np.exp(np.interp(np.log(v), log_v, log_h))


@functools.lru_cache(maxsize=16)
def _halfwidth_table(level: float) -> tuple[np.ndarray, np.ndarray]:
    v = np.geomspace(1e-12, 1.0, 600)[:, None]
    tau2 = TAUS**2
    scale = np.sqrt(v / (v + tau2))
    rate = tau2 / (2 * v * (v + tau2))
    lo, hi = np.zeros(len(v)), np.full(len(v), 1.0)
    while True:  # grow the bracket until the ratio at hi exceeds 1 / level everywhere
        ratio = (scale * np.exp(np.minimum(rate * hi[:, None] ** 2, 700))).mean(axis=-1)
        if (ratio >= 1.0 / level).all():
            break
        hi = hi * 2
    for _ in range(60):  # bisection: the mixture ratio grows with h
        mid = (lo + hi) / 2
        ratio = (scale * np.exp(np.minimum(rate * mid[:, None] ** 2, 700))).mean(axis=-1)
        below = ratio < 1.0 / level
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.log(v[:, 0]), np.log(hi)


def more_needed(estimate, variance, n_c, bound, level) -> np.ndarray:
    """Roughly how many more canary observations make `estimate + h < bound` (inf when, on the
    current estimate, none will): traffic keeps its mix, so the variance shrinks like 1/n."""
    room = bound - estimate
    done = estimate + halfwidth(variance, level) < bound
    lo, hi = np.ones_like(estimate), np.full_like(estimate, 1e6)
    for _ in range(40):  # bisection on the growth factor m of the sample size
        mid = np.sqrt(lo * hi)
        ok = halfwidth(variance / mid, level) < room
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    more = np.ceil((hi - 1) * np.maximum(n_c, 1))
    return np.where(done, 0.0, np.where(room <= 0, np.inf, more))


@dataclass
class Assessment:
    """Per ledger and check (shape (R, 3)): estimate, bounds, status flags, evidence still needed."""

    estimate: np.ndarray
    variance: np.ndarray
    lower: np.ndarray  # lower bound of the 1 - alpha/k sequence: > 0 shows harm
    upper: np.ndarray  # upper bound of the 1 - beta sequence: < margin shows non-inferiority
    harm: np.ndarray
    non_inferior: np.ndarray
    step_ok: np.ndarray  # the current step's (looser) bound is excluded
    step_bound: np.ndarray
    has_data: np.ndarray


def assess(counts: Counts, config: AnalysisConfig, step: np.ndarray | int) -> Assessment:
    """Every check of R ledgers at their steps (index into config.steps)."""
    estimate, variance = difference(counts)
    has_data = (counts.n_c >= MIN_SAMPLES) & (counts.n_s >= MIN_SAMPLES)
    k = len(CHECKS)
    lower = estimate - halfwidth(variance, config.alpha / k)
    h_beta = halfwidth(variance, config.beta)
    upper = estimate + h_beta
    margins = np.array([config.margin(c) for c in CHECKS])
    before_last = len(config.steps) - 1
    factor = before_last / (np.minimum(np.asarray(step), before_last - 1) + 1)
    step_bound = np.broadcast_to(margins * np.asarray(factor, float)[..., None], estimate.shape)
    return Assessment(
        estimate=estimate, variance=variance, lower=lower, upper=upper,
        harm=has_data & (lower > 0),
        non_inferior=has_data & (upper < margins),
        step_ok=has_data & (upper < step_bound),
        step_bound=step_bound,
        has_data=has_data,
    )


ACTIONS = ("wait", "continue", "promote", "rollback")


def decide_batch(counts: Counts, config: AnalysisConfig, step, step_elapsed_s, elapsed_s):
    """Action index into ACTIONS for R ledgers at once, with their assessment."""
    a = assess(counts, config, step)
    required = np.array([c in config.required for c in CHECKS])
    harm = a.harm.any(axis=-1)
    step = np.asarray(step)
    last = step >= len(config.steps) - 2
    step_ok = (a.step_ok | ~required).all(axis=-1) & (np.asarray(step_elapsed_s) >= config.min_step_s)
    action = np.where(step_ok, np.where(last, 2, 1), 0)  # at the last step, step_ok = all_ni
    action = np.where((action == 0) & (np.asarray(elapsed_s) >= config.max_duration_s), 3, action)
    return np.where(harm, 3, action), a


# One decision, explained ---------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    status: CheckStatus
    estimate: float | None  # canary minus stable rate of the bad outcome
    lower: float | None
    upper: float | None
    margin: float
    canary: str  # "bad/observed"
    stable: str
    needed: float | None  # more canary observations for the current step (None: done)
    detail: str


@dataclass
class Decision:
    """What to do now, why, and the evidence behind it."""

    action: Action
    step: int  # index into config.steps
    weight: int
    reasons: list[str]
    checks: list[CheckResult]
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tick(self) -> dict[str, Any]:
        """The compact record of one look that the rollout report draws (an `analysis_tick`)."""
        keep = ("name", "status", "estimate", "lower", "upper", "margin", "canary", "stable", "needed")
        return {"weight": self.weight, "action": self.action, "reasons": self.reasons,
                "requests": {"stable": self.evidence["stable_requests"],
                             "canary": self.evidence["canary_requests"]},
                "checks": [{k: getattr(c, k) for k in keep} for c in self.checks]}


_NOUNS = {"accuracy": ("wrong", "feedback labels"), "error_rate": ("failed", "requests"),
          "latency_tail": ("slower than stable's p99", "latencies")}


def _ledger_counts(snapshot: dict[str, Any], stable: str, canary: str) -> Counts:
    raw_c, raw_s = snapshot.get(str(canary)) or {}, snapshot.get(str(stable)) or {}
    bounds_c, hist_c = latency_histogram(raw_c)
    bounds_s, hist_s = latency_histogram(raw_s)
    if hist_c.sum() and hist_s.sum() and not np.array_equal(bounds_c, bounds_s):
        raise InvalidInput("canary and stable latencies use different histogram buckets")

    def get(raw, key):
        return [float(raw.get(key, 0) or 0)]

    return Counts.from_arrays(
        get(raw_c, "requests"), get(raw_c, "errors"), get(raw_c, "feedback_total"),
        get(raw_c, "feedback_correct"), hist_c[None, :],
        get(raw_s, "requests"), get(raw_s, "errors"), get(raw_s, "feedback_total"),
        get(raw_s, "feedback_correct"), hist_s[None, :],
    )


def decide(
    snapshot: dict[str, Any],
    *,
    stable: str,
    canary: str,
    step: int,
    step_elapsed_s: float,
    elapsed_s: float | None = None,
    config: AnalysisConfig,
) -> Decision:
    """The decision at weight step `step` (index into config.steps) from a ledger snapshot.

    `elapsed_s` is the time since the analysis began (default: `step_elapsed_s`); it sets the
    deadline and the observation rates behind "how much more evidence" in the reasons.
    """
    if not 0 <= step < len(config.steps) - 1:
        raise InvalidInput(f"step {step} outside 0-{len(config.steps) - 2} (the last weight, 100, "
                           "is the promotion)")
    elapsed = step_elapsed_s if elapsed_s is None else elapsed_s
    counts = _ledger_counts({str(k): v for k, v in snapshot.items()}, stable, canary)
    code, a = decide_batch(counts, config, step, step_elapsed_s, elapsed)
    action: Action = ACTIONS[int(code[0])]  # type: ignore[assignment]
    needed = more_needed(a.estimate, a.variance, counts.n_c, a.step_bound, config.beta)
    checks = [_explain(counts, a, needed, i, name, config, elapsed) for i, name in enumerate(CHECKS)]
    weight = config.steps[step]
    if action == "rollback":
        harmful = [c.detail for c in checks if c.status == "harm"]
        reasons = harmful or [f"inconclusive after {elapsed:.0f}s (limit {config.max_duration_s:.0f}s): "
                              + "; ".join(c.detail for c in checks
                                          if c.name in config.required and c.needed)]
    elif action == "wait":
        reasons = [f"at {weight}%: " + c.detail for c in checks
                   if c.name in config.required and c.needed]
        reasons = reasons or [f"at {weight}% for {step_elapsed_s:.0f}s of at least "
                              f"{config.min_step_s:.0f}s"]
    else:
        reasons = [c.detail for c in checks if c.name in config.required]
    evidence = {
        "stable": str(stable), "canary": str(canary), "weight": weight, "step": step,
        "step_elapsed_s": round(step_elapsed_s, 2), "elapsed_s": round(elapsed, 2),
        "alpha": config.alpha, "beta": config.beta,
        "canary_requests": int(counts.n_c[0, 1]), "stable_requests": int(counts.n_s[0, 1]),
        **{f"{c.name}_{key}": getattr(c, key) for c in checks
           for key in ("estimate", "lower", "upper", "needed")},
    }
    return Decision(action, step, weight, reasons, checks, evidence)


def _explain(counts: Counts, a: Assessment, needed_all: np.ndarray, i: int, name: str,
             config: AnalysisConfig, elapsed_s: float) -> CheckResult:
    bad_c, n_c, bad_s, n_s = (int(x[0, i]) for x in (counts.bad_c, counts.n_c, counts.bad_s,
                                                     counts.n_s))
    what, unit = _NOUNS[name]
    margin = config.margin(name)
    seen = f"canary {bad_c}/{n_c} {what} vs stable {bad_s}/{n_s}"
    if not a.has_data[0, i]:
        more = max(MIN_SAMPLES - n_c, MIN_SAMPLES - n_s, 1)
        return CheckResult(name, "no_data", None, None, None, margin, f"{bad_c}/{n_c}",
                           f"{bad_s}/{n_s}", float(more),
                           f"{name}: needs at least {MIN_SAMPLES} {unit} per version ({seen})")
    est, lo, up = (float(x[0, i]) for x in (a.estimate, a.lower, a.upper))
    needed = float(needed_all[0, i])
    bounds = f"difference {est:+.3f}, [{lo:+.3f} (1-alpha/3), {up:+.3f} (1-beta)], margin {margin:.3f}"
    if a.harm[0, i]:
        status: CheckStatus = "harm"
        detail = f"{name}: canary worse than stable ({seen}; {bounds})"
    elif a.non_inferior[0, i]:
        status, detail = "non_inferior", f"{name}: not worse than the margin ({seen}; {bounds})"
    elif needed == 0:
        status = "pending"
        bound = float(a.step_bound[0, i])
        detail = (f"{name}: excludes a degradation above {bound:.3f} (this weight's bound), not yet "
                  f"the margin ({seen}; {bounds})")
    else:
        status = "pending"
        rate = n_c / elapsed_s if elapsed_s > 0 else 0.0
        if math.isinf(needed):
            more = "no amount of further evidence will show non-inferiority at the current estimate"
        else:
            eta = f", ~{needed / rate:.0f}s at the traffic so far" if rate > 0 else ""
            more = f"~{needed:.0f} more canary {unit}{eta}"
        detail = f"{name}: {more} ({seen}; {bounds})"
    return CheckResult(name, status, est, lo, up, margin, f"{bad_c}/{n_c}", f"{bad_s}/{n_s}",
                       None if needed == 0 else needed, detail)
