"""The alert rules: `cluster/monitoring/rules.yaml` is the source; the PrometheusRule that ships
to Kubernetes is generated from it (`flowops monitor rules`) and checked to be current
(`flowops monitor rules --check`, and a unit test), so the two never disagree."""

from __future__ import annotations

from pathlib import Path

import yaml

from flowops import resources
from flowops.durable import atomic_write_text
from flowops.errors import Conflict, InvalidInput

MONITORING_DIR = resources.monitoring_dir()
RULES_FILE = MONITORING_DIR / "rules.yaml"
PROMETHEUS_RULE_FILE = MONITORING_DIR / "prometheus-rule.flowops.yaml"


def render_prometheus_rule(rules_file: Path = RULES_FILE) -> str:
    """The PrometheusRule (prometheus-operator) that carries exactly the groups of rules.yaml."""
    try:
        groups = yaml.safe_load(rules_file.read_text())["groups"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"{rules_file} is not a Prometheus rules file with `groups`: {exc}") from None
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "flowops-alerts", "labels": {"release": "prometheus"}},
        "spec": {"groups": groups},
    }
    header = (
        "# GENERATED from cluster/monitoring/rules.yaml by `flowops monitor rules`; do not edit.\n"
        "# The same rules run on the embedded stack's Prometheus and are unit-tested with\n"
        "# `promtool test rules cluster/monitoring/rules_test.yaml`.\n"
    )
    return header + yaml.dump(resource, Dumper=_BlockDumper, sort_keys=False, width=1000)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as `|` blocks, as they are written in rules.yaml."""


def _str_block(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_block)


def write_prometheus_rule(path: Path = PROMETHEUS_RULE_FILE, rules_file: Path = RULES_FILE) -> Path:
    atomic_write_text(path, render_prometheus_rule(rules_file))
    return path


def check_prometheus_rule(path: Path = PROMETHEUS_RULE_FILE, rules_file: Path = RULES_FILE) -> None:
    """Raise Conflict when the committed PrometheusRule is not what rules.yaml generates."""
    current = path.read_text() if path.exists() else ""
    if current != render_prometheus_rule(rules_file):
        raise Conflict(f"{path} is stale: run `flowops monitor rules`")
