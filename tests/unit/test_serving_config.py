"""Serving configuration and keys, without a cluster."""

from __future__ import annotations

import stat

import pytest

from flowops import serving
from flowops.errors import InvalidInput


def test_app_config_rejects_typos_and_out_of_range_values():
    assert serving.parse_app_config({"weight": "10"}).weight == 10
    with pytest.raises(InvalidInput, match="weigth"):
        serving.parse_app_config({"weigth": 10})
    with pytest.raises(InvalidInput, match="weight"):
        serving.parse_app_config({"weight": 101})


def test_routing_changes_do_not_change_the_deployment_hash():
    base = serving.parse_app_config({})
    routed = serving.parse_app_config({"canary": "3", "weight": 50, "shadow_pct": 10})
    scaled = serving.parse_app_config({"num_replicas": 2})
    assert base.deployment_hash() == routed.deployment_hash() != scaled.deployment_hash()


def test_model_uri_of_numbers_aliases_and_uris():
    assert serving._model_uri("m", "3") == "models:/m/3"
    assert serving._model_uri("m", "production") == "models:/m@production"
    assert serving._model_uri("m", "models:/x/1") == "models:/x/1"


def test_admin_key_comes_from_env_then_file_then_a_private_default(tmp_path, monkeypatch):
    from flowops.settings import get_settings

    settings = get_settings(home=tmp_path)
    monkeypatch.delenv("FLOWOPS_ADMIN_KEY", raising=False)
    monkeypatch.delenv("FLOWOPS_ADMIN_KEY_FILE", raising=False)
    with pytest.raises(InvalidInput, match="FLOWOPS_ADMIN_KEY"):
        serving.admin_key(settings)
    created = serving.admin_key(settings, create=True)
    path = tmp_path / "serve" / "admin_key"
    assert path.read_text() == created and stat.S_IMODE(path.stat().st_mode) == 0o600
    key_file = tmp_path / "k"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("FLOWOPS_ADMIN_KEY_FILE", str(key_file))
    assert serving.admin_key(settings) == "from-file"
    monkeypatch.setenv("FLOWOPS_ADMIN_KEY", "from-env")
    assert serving.admin_key(settings) == "from-env"
