"""Alert rules: promtool checks and unit-tests them; the shipped PrometheusRule is generated from them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flowops import observability
from flowops.errors import Conflict

MONITORING = Path(__file__).resolve().parents[2] / "cluster" / "monitoring"
REQUIRED_ALERTS = {
    "FlowOpsServingDown",
    "FlowOpsServingErrorRateHigh",
    "FlowOpsServingLatencyHigh",
    "FlowOpsCanaryDegraded",
    "FlowOpsDriftDetected",
    "FlowOpsRetrainPipelineFailed",
    "FlowOpsDevEnvGPUsIdle",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("promtool is missing in CI: install Debian's prometheus package (make tools)")
    pytest.skip("promtool not installed (apt-get install prometheus, or make tools); CI requires it")


def _alerts() -> set[str]:
    groups = yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def test_rules_cover_every_required_alert():
    assert _alerts() == REQUIRED_ALERTS


def test_promtool_check_rules_accepts_rules_and_generated_prometheus_rule_groups(tmp_path):
    out = subprocess.run(
        [_promtool(), "check", "rules", str(MONITORING / "rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The PrometheusRule's spec is a rule file too: promtool must accept it as one.
    spec = yaml.safe_load((MONITORING / "prometheus-rule.flowops.yaml").read_text())["spec"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [_promtool(), "check", "rules", str(tmp_path / "spec.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    out = subprocess.run(
        [_promtool(), "test", "rules", "rules_test.yaml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    tests = yaml.safe_load((MONITORING / "rules_test.yaml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == REQUIRED_ALERTS, f"alerts never shown firing: {REQUIRED_ALERTS - firing}"
    assert quiet == REQUIRED_ALERTS, f"alerts never shown quiet: {REQUIRED_ALERTS - quiet}"


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests can fail: raise the error-rate threshold and they must."""
    rules = (MONITORING / "rules.yaml").read_text()
    broken = rules.replace(
        "flowops:serve_error_ratio:rate5m > 0.05", "flowops:serve_error_ratio:rate5m > 0.5"
    )
    assert broken != rules
    (tmp_path / "rules.yaml").write_text(broken)
    shutil.copy(MONITORING / "rules_test.yaml", tmp_path / "rules_test.yaml")
    out = subprocess.run(
        [_promtool(), "test", "rules", "rules_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "FlowOpsServingErrorRateHigh" in out.stdout + out.stderr


def test_committed_prometheus_rule_equals_generated():
    committed = (MONITORING / "prometheus-rule.flowops.yaml").read_text()
    assert committed == observability.render_prometheus_rule(), (
        "cluster/monitoring/prometheus-rule.flowops.yaml is stale: run `flowops monitor rules`"
    )
    resource = yaml.safe_load(committed)
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    observability.check_prometheus_rule()  # what `flowops monitor rules --check` runs


def test_rules_check_fails_on_a_stale_prometheus_rule(tmp_path):
    stale = tmp_path / "prometheus-rule.yaml"
    stale.write_text(observability.render_prometheus_rule().replace("for: 5m", "for: 50m", 1))
    with pytest.raises(Conflict, match="is stale: run `flowops monitor rules`"):
        observability.check_prometheus_rule(stale)
    observability.write_prometheus_rule(stale)
    observability.check_prometheus_rule(stale)


def test_kustomization_ships_rule_monitors_and_every_dashboard():
    spec = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    for resource in spec["resources"]:
        assert (MONITORING / resource).is_file(), resource
    kinds = {yaml.safe_load((MONITORING / r).read_text())["kind"] for r in spec["resources"]}
    assert kinds == {"PrometheusRule", "PodMonitor", "ServiceMonitor"}
    (generator,) = spec["configMapGenerator"]
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    shipped = {Path(f).name for f in generator["files"]}
    assert shipped == {p.name for p in (MONITORING / "dashboards").glob("*.json")}


def test_monitor_rules_check_cli_reports_current_file():
    from tests.conftest import run_cli

    out = run_cli("monitor", "rules", "--check")
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout
