"""Canary analysis: is the canary worse than stable? (in the spirit of Argo Rollouts' AnalysisRun).

A rollout walks weight steps (default 10 → 25 → 50 → 100; reaching 100 is the promotion). At each
step the canary must receive a minimum number of requests over a minimum duration; then it is
compared with stable, from the serving ledger (`flowops.serving.ledger_snapshot`), on

* **error rate** — one-sided two-proportion z-test (Agresti–Caffo adjusted) of
  `p_canary - p_stable > margin`;
* **p99 latency** — bootstrap of `p99_canary - (ratio * p99_stable + margin_ms)`; fails when the
  lower confidence bound is above 0 (Mann–Whitney U p-value kept as evidence);
* **accuracy** (where feedback labels exist) — the same one-sided test on
  `acc_stable - acc_canary > margin`.

A check *fails* only when the degradation beyond its margin is statistically significant, so
noise does not roll a good model back; any failure rolls back at once. Everything here is a pure
function of ledger snapshots, so it is tested without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import stats

from flowops.errors import InvalidInput

Action = Literal["wait", "continue", "promote", "rollback"]
CheckStatus = Literal["pass", "fail", "skipped"]


class AnalysisConfig(BaseModel):
    """Weight steps, per-step gates, margins and the significance level of the canary analysis."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] = Field([10, 25, 50, 100], description="Canary weights (%); 100 = promote.")
    min_requests: int = Field(40, ge=1, description="Canary requests needed per step.")
    min_duration_s: float = Field(5.0, ge=0, description="Seconds each step lasts at least.")
    max_step_s: float = Field(300.0, gt=0, description="A step without enough traffic by then "
                              "is inconclusive: roll back.")
    alpha: float = Field(0.01, gt=0, lt=0.5, description="Significance level of each test.")
    error_margin: float = Field(0.02, ge=0, le=1, description="Tolerated error-rate increase.")
    latency_ratio: float = Field(1.5, ge=1, description="Tolerated p99 latency ratio.")
    latency_margin_ms: float = Field(25.0, ge=0, description="Tolerated p99 increase (ms) on top.")
    min_latency_samples: int = Field(30, ge=5, description="Latencies needed per version.")
    accuracy_margin: float = Field(0.05, ge=0, le=1, description="Tolerated accuracy drop.")
    min_feedback: int = Field(20, ge=1, description="Feedback labels needed per version.")
    bootstrap_resamples: int = Field(400, ge=50, le=10000)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if not value or value[-1] != 100 or any(not 0 < w <= 100 for w in value) or \
                any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("steps must be increasing weights in 1-100 ending with 100, "
                             f"e.g. [10, 25, 50, 100]; got {value}")
        return value


@dataclass
class VersionStats:
    """One version's cumulative serving ledger."""

    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    feedback_correct: int = 0
    feedback_total: int = 0
    shadow_agree: int = 0
    shadow_total: int = 0

    @classmethod
    def from_ledger(cls, raw: dict[str, Any] | None) -> VersionStats:
        raw = raw or {}
        return cls(
            requests=int(raw.get("requests", 0)),
            errors=int(raw.get("errors", 0)),
            latencies_ms=latencies_from_ledger(raw.get("latencies_ms")),
            feedback_correct=int(raw.get("feedback_correct", 0)),
            feedback_total=int(raw.get("feedback_total", 0)),
            shadow_agree=int(raw.get("shadow_agree", 0)),
            shadow_total=int(raw.get("shadow_total", 0)),
        )


def latencies_from_ledger(raw: Any) -> list[float]:
    """Latencies as a list: the ledger may hold a list, or a histogram {upper_bound: count} /
    {"buckets": [...], "counts": [...]} (each count contributes its bucket's upper bound)."""
    if raw is None:
        return []
    if isinstance(raw, list | tuple | np.ndarray):
        return [float(x) for x in raw]
    if isinstance(raw, dict):
        if "buckets" in raw and "counts" in raw:
            pairs = zip(raw["buckets"], raw["counts"], strict=False)
        else:
            pairs = raw.items()
        items = [(float("inf") if str(b).lower() in ("+inf", "inf") else float(b), int(n))
                 for b, n in pairs]
        finite = [b for b, _ in items if not math.isinf(b)]
        top = 2 * max(finite) if finite else 1e6
        out: list[float] = []
        for bound, count in items:
            out.extend([top if math.isinf(bound) else bound] * count)
        return out
    raise InvalidInput(f"latencies_ms must be a list or a histogram; got {type(raw).__name__}")


@dataclass
class CheckResult:
    name: str
    status: CheckStatus
    p_value: float | None
    canary: float | None
    stable: float | None
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


# Statistics --------------------------------------------------------------------------------


def worse_proportion_p(bad_c: int, n_c: int, bad_s: int, n_s: int, margin: float) -> float:
    """p-value of H1: rate_c - rate_s > margin (one-sided, Agresti–Caffo adjusted z-test)."""
    pc = (bad_c + 1) / (n_c + 2)
    ps = (bad_s + 1) / (n_s + 2)
    se = math.sqrt(pc * (1 - pc) / (n_c + 2) + ps * (1 - ps) / (n_s + 2))
    z = (pc - ps - margin) / se
    return float(stats.norm.sf(z))


def p99_bootstrap(canary: np.ndarray, stable: np.ndarray, ratio: float, margin_ms: float,
                  alpha: float, resamples: int, seed: int = 0) -> tuple[float, float]:
    """(lower confidence bound, share of resamples <= 0) of p99_c - (ratio*p99_s + margin)."""
    rng = np.random.default_rng(seed)
    c = rng.choice(canary, size=(resamples, canary.size), replace=True)
    s = rng.choice(stable, size=(resamples, stable.size), replace=True)
    diff = np.percentile(c, 99, axis=1) - (ratio * np.percentile(s, 99, axis=1) + margin_ms)
    return float(np.quantile(diff, alpha)), float((diff <= 0).mean())


def check_errors(c: VersionStats, s: VersionStats, cfg: AnalysisConfig) -> CheckResult:
    rate_c = c.errors / c.requests if c.requests else 0.0
    rate_s = s.errors / s.requests if s.requests else 0.0
    if c.requests == 0:
        return CheckResult("error_rate", "skipped", None, None, rate_s, "no canary requests")
    p = worse_proportion_p(c.errors, c.requests, s.errors, s.requests, cfg.error_margin)
    status: CheckStatus = "fail" if p < cfg.alpha else "pass"
    return CheckResult("error_rate", status, p, rate_c, rate_s,
                       f"canary {c.errors}/{c.requests} vs stable {s.errors}/{s.requests} "
                       f"(margin {cfg.error_margin:.3f}, p={p:.4f})")


def check_latency(c: VersionStats, s: VersionStats, cfg: AnalysisConfig) -> CheckResult:
    if len(c.latencies_ms) < cfg.min_latency_samples or \
            len(s.latencies_ms) < cfg.min_latency_samples:
        return CheckResult("p99_latency", "skipped", None, None, None,
                           f"fewer than {cfg.min_latency_samples} latencies per version")
    ca, sa = np.asarray(c.latencies_ms, float), np.asarray(s.latencies_ms, float)
    p99_c, p99_s = float(np.percentile(ca, 99)), float(np.percentile(sa, 99))
    lower, share_ok = p99_bootstrap(ca, sa, cfg.latency_ratio, cfg.latency_margin_ms, cfg.alpha,
                                    cfg.bootstrap_resamples)
    mw = stats.mannwhitneyu(ca, sa, alternative="greater")
    status: CheckStatus = "fail" if lower > 0 else "pass"
    return CheckResult("p99_latency", status, share_ok, p99_c, p99_s,
                       f"p99 canary {p99_c:.1f} ms vs stable {p99_s:.1f} ms (allowed "
                       f"{cfg.latency_ratio}x + {cfg.latency_margin_ms:.0f} ms; bootstrap lower "
                       f"bound of excess {lower:.1f} ms; Mann-Whitney p={mw.pvalue:.4f})")


def check_accuracy(c: VersionStats, s: VersionStats, cfg: AnalysisConfig) -> CheckResult:
    if c.feedback_total < cfg.min_feedback or s.feedback_total < cfg.min_feedback:
        return CheckResult("accuracy", "skipped", None, None, None,
                           f"fewer than {cfg.min_feedback} feedback labels per version "
                           f"(canary {c.feedback_total}, stable {s.feedback_total})")
    acc_c = c.feedback_correct / c.feedback_total
    acc_s = s.feedback_correct / s.feedback_total
    # "wrong" is the bad outcome: canary worse <=> wrong_c - wrong_s > margin
    p = worse_proportion_p(c.feedback_total - c.feedback_correct, c.feedback_total,
                           s.feedback_total - s.feedback_correct, s.feedback_total,
                           cfg.accuracy_margin)
    status: CheckStatus = "fail" if p < cfg.alpha else "pass"
    return CheckResult("accuracy", status, p, acc_c, acc_s,
                       f"accuracy canary {c.feedback_correct}/{c.feedback_total} ({acc_c:.3f}) vs "
                       f"stable {s.feedback_correct}/{s.feedback_total} ({acc_s:.3f}) "
                       f"(margin {cfg.accuracy_margin:.3f}, p={p:.4f})")


def compare(canary: VersionStats, stable: VersionStats, cfg: AnalysisConfig) -> list[CheckResult]:
    """Every check of canary against stable."""
    return [check_errors(canary, stable, cfg), check_latency(canary, stable, cfg),
            check_accuracy(canary, stable, cfg)]


# Decisions ---------------------------------------------------------------------------------


def decide(
    snapshot: dict[str, Any],
    *,
    stable: str,
    canary: str,
    step: int,
    step_started_requests: int,
    step_elapsed_s: float,
    config: AnalysisConfig,
) -> Decision:
    """The decision at analysis step `step` (index into config.steps) from a ledger snapshot.

    `step_started_requests` is the canary's request count when the step began, so each step needs
    its own `min_requests`. rollback: a check failed (or the step ran out of time without enough
    traffic); continue: the step is complete and clean (promote when the next weight is 100);
    wait: not enough evidence yet.
    """
    if not 0 <= step < len(config.steps):
        raise InvalidInput(f"step {step} outside 0-{len(config.steps) - 1}")
    snapshot = {str(k): v for k, v in snapshot.items()}
    c = VersionStats.from_ledger(snapshot.get(str(canary)))
    s = VersionStats.from_ledger(snapshot.get(str(stable)))
    weight = config.steps[step]
    checks = compare(c, s, config)
    step_requests = c.requests - step_started_requests
    evidence = {
        "stable": str(stable), "canary": str(canary), "weight": weight,
        "step_requests": step_requests, "step_elapsed_s": round(step_elapsed_s, 2),
        "canary_requests": c.requests, "stable_requests": s.requests,
        "canary_errors": c.errors, "stable_errors": s.errors,
        "canary_feedback": [c.feedback_correct, c.feedback_total],
        "stable_feedback": [s.feedback_correct, s.feedback_total],
        "shadow_agreement": (c.shadow_agree / c.shadow_total) if c.shadow_total else None,
        **{f"{r.name}_canary": r.canary for r in checks},
        **{f"{r.name}_stable": r.stable for r in checks},
    }
    failed = [r for r in checks if r.status == "fail"]
    if failed:
        return Decision("rollback", step, weight, [r.detail for r in failed], checks, evidence)
    # Where feedback labels exist, model quality is part of the evidence: a step is not complete
    # until both versions have enough feedback for the accuracy test to run.
    accuracy = next(r for r in checks if r.name == "accuracy")
    feedback_missing = accuracy.status == "skipped" and (c.feedback_total or s.feedback_total)
    complete = (step_requests >= config.min_requests and step_elapsed_s >= config.min_duration_s
                and not feedback_missing)
    if not complete:
        if step_elapsed_s >= config.max_step_s:
            reason = (f"inconclusive: only {step_requests} canary requests at {weight}% after "
                      f"{step_elapsed_s:.0f}s (need {config.min_requests})")
            if feedback_missing:
                reason = f"inconclusive after {step_elapsed_s:.0f}s: {accuracy.detail}"
            return Decision("rollback", step, weight, [reason], checks, evidence)
        waiting = [f"{step_requests}/{config.min_requests} requests, "
                   f"{step_elapsed_s:.0f}/{config.min_duration_s:.0f}s at {weight}%"]
        if feedback_missing:
            waiting.append(accuracy.detail)
        return Decision("wait", step, weight, waiting, checks, evidence)
    passed = [r.detail for r in checks if r.status == "pass"]
    next_weight = config.steps[step + 1] if step + 1 < len(config.steps) else 100
    action: Action = "promote" if next_weight >= 100 else "continue"
    return Decision(action, step, weight, passed or ["no check failed"], checks, evidence)
