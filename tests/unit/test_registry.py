"""Registry helpers that need no cluster or store."""

from __future__ import annotations

from datetime import timedelta

import pytest

from flowops.errors import InvalidInput
from flowops.refs import version_number
from flowops.registry import parse_age
from flowops.settings import get_settings


def test_parse_age():
    assert parse_age("30d") == timedelta(days=30)
    assert parse_age("12h") == timedelta(hours=12)
    with pytest.raises(InvalidInput, match="30d"):
        parse_age("30 days")


def test_version_numbers_and_uris():
    assert version_number("3") == "3"
    assert version_number("models:/digits/4") == "4"
    with pytest.raises(InvalidInput, match="alias"):
        version_number("models:/digits@production")
    with pytest.raises(InvalidInput, match="number"):
        version_number("latest")


def test_gate_thresholds_from_env(monkeypatch):
    monkeypatch.setenv("FLOWOPS_GATE_MIN_ACCURACY", "0.9")
    assert get_settings().gate.min_accuracy == 0.9
    assert get_settings().gate.max_regression == 0.02
    # and a controller job started by `flowops loop start` gets the same gate
    assert get_settings().job_env()["FLOWOPS_GATE_MIN_ACCURACY"] == "0.9"
