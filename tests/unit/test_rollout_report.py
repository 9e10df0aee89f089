"""The rollout report renders in a real browser (headless Chromium): charts present, no console
errors, and the page says what was decided and why."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from flowops import rollout
from flowops.loop import report as rollout_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="headless Chromium is not installed (make test installs Debian's chromium)",
)


def _ticks_of_a_bad_canary() -> tuple[list[dict], rollout.Decision]:
    """Looks at a canary 30 points less accurate, once a second, until the analysis decides."""
    rng = np.random.default_rng(0)
    cfg = rollout.AnalysisConfig()
    ledgers = {v: {"requests": 0, "errors": 0, "feedback_total": 0, "feedback_correct": 0,
                   "latencies_ms": []} for v in ("1", "2")}
    ticks, decision = [], None
    for second in range(1, 120):
        for version, share, accuracy in (("1", 0.9, 0.9), ("2", 0.1, 0.6)):
            n = int(rng.poisson(25 * share))
            led = ledgers[version]
            led["requests"] += n
            led["latencies_ms"] += list(rng.lognormal(3, 0.4, n))
            fb = int(rng.binomial(n, 0.5))
            led["feedback_total"] += fb
            led["feedback_correct"] += int(rng.binomial(fb, accuracy))
        decision = rollout.decide(ledgers, stable="1", canary="2", step=0, step_elapsed_s=second,
                                  config=cfg)
        ticks.append({"ts": 1000.0 + second, **decision.tick()})
        if decision.action == "rollback":
            break
    return ticks, decision


def test_the_report_names_the_decision_and_draws_every_check():
    ticks, decision = _ticks_of_a_bad_canary()
    assert decision.action == "rollback"
    page = rollout_report.render({"rollout": "r007", "version": "7", "outcome": "rolled_back",
                                  "reasons": decision.reasons, "stages": []}, ticks)
    assert "Rollout r007: model v7" in page and "rolled_back" in page
    assert "accuracy: canary worse than stable" in page
    # weight, three checks, requests per version
    assert page.count("<svg") == 5
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


@needs_chromium
def test_the_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    if CHROMIUM is None:
        pytest.fail("CI must have headless Chromium (make test installs Debian's chromium)")
    ticks, decision = _ticks_of_a_bad_canary()
    page = tmp_path / "report.html"
    page.write_text(rollout_report.render(
        {"rollout": "r007", "version": "7", "outcome": "rolled_back", "reasons": decision.reasons,
         "stages": [{"stage": "canary analysis", "start": 1000.0, "end": 1030.0, "seconds": 30.0}]},
        ticks))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<svg", dom.stdout)) == 5
    assert "<polyline" in dom.stdout and "<polygon" in dom.stdout  # estimate lines, bounds bands
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a page with charts, not a blank one
