"""Observability: the platform exporter (`flowops_*` metrics from durable state), the loopback
Prometheus of the embedded stack, and the alert rules.

Importing this package is cheap: Ray and prometheus_client are imported only by the functions
that use them.
"""

from flowops.observability.exporter import render_metrics, run_exporter, start_exporter, stop_exporter
from flowops.observability.prometheus import (
    prometheus_status,
    query_prometheus,
    start_prometheus,
    stop_prometheus,
    up_with_prometheus,
)
from flowops.observability.rules import check_prometheus_rule, render_prometheus_rule, write_prometheus_rule

__all__ = [
    "check_prometheus_rule",
    "prometheus_status",
    "query_prometheus",
    "render_metrics",
    "render_prometheus_rule",
    "run_exporter",
    "start_exporter",
    "start_prometheus",
    "stop_exporter",
    "stop_prometheus",
    "up_with_prometheus",
    "write_prometheus_rule",
]
