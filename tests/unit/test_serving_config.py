"""Serving configuration, request bodies and keys, without a cluster."""

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


def test_replicas_read_the_deployers_key_file_and_skip_it_when_absent(tmp_path, monkeypatch):
    """One reader for the CLI and the replicas: the file the deployer wrote; a replica on a node
    without that file falls back to the file FLOWOPS_API_KEY_FILE names, then the home folder."""
    from flowops.serving.keys import API, read_key, write_key_files
    from flowops.settings import get_settings

    settings = get_settings(home=tmp_path)
    for name in ("FLOWOPS_ADMIN_KEY", "FLOWOPS_ADMIN_KEY_FILE", "FLOWOPS_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FLOWOPS_API_KEY", raising=False)
    with pytest.raises(InvalidInput, match="FLOWOPS_API_KEY"):
        write_key_files(settings, require_api_key=True)
    assert not (tmp_path / "serve").exists()  # refused before anything is written
    other = tmp_path / "deployer-key"
    other.write_text("deployer-key\n")
    monkeypatch.setenv("FLOWOPS_API_KEY_FILE", str(other))
    admin_file, api_file = write_key_files(settings, require_api_key=True)
    assert api_file == str(tmp_path / "serve" / "api_key")
    assert stat.S_IMODE((tmp_path / "serve" / "api_key").stat().st_mode) == 0o600
    assert serving.admin_key(settings) == (tmp_path / "serve" / "admin_key").read_text()
    monkeypatch.delenv("FLOWOPS_API_KEY_FILE")
    assert read_key(settings, API, api_file) == "deployer-key"
    assert read_key(settings, API, str(tmp_path / "elsewhere")) == "deployer-key"  # home folder
    monkeypatch.setenv("FLOWOPS_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="FLOWOPS_API_KEY_FILE"):
        read_key(settings, API, str(tmp_path / "elsewhere"))


def test_keys_from_the_environment_win_and_are_never_written(tmp_path, monkeypatch):
    """Kubernetes: every pod gets FLOWOPS_ADMIN_KEY / FLOWOPS_API_KEY from one Secret. A replica
    uses its variable even where a (stale) key file exists, and deploying writes no key file."""
    from flowops.serving.keys import ADMIN, API, read_key, write_key_files
    from flowops.settings import get_settings

    settings = get_settings(home=tmp_path)
    monkeypatch.delenv("FLOWOPS_ADMIN_KEY_FILE", raising=False)
    monkeypatch.delenv("FLOWOPS_API_KEY_FILE", raising=False)
    monkeypatch.setenv("FLOWOPS_ADMIN_KEY", "admin-from-secret")
    monkeypatch.setenv("FLOWOPS_API_KEY", "api-from-secret")
    assert write_key_files(settings, require_api_key=True) == (None, None)
    assert not (tmp_path / "serve").exists()
    stale = tmp_path / "stale"
    stale.write_text("old-key")
    assert read_key(settings, ADMIN, str(stale)) == "admin-from-secret"
    assert read_key(settings, API, str(stale)) == "api-from-secret"
    assert serving.admin_key(settings) == "admin-from-secret"


def test_predict_body_names_the_bad_instance():
    """What the body's schema states is checked when it is read (one error naming the instance);
    what only decoding can tell (a broken image file) when the images are made."""
    from flowops.errors import validated_json
    from flowops.image_model import Preprocess
    from flowops.serving.config import PredictRequest

    def read(body: bytes) -> PredictRequest:
        return validated_json(PredictRequest, body)

    with pytest.raises(InvalidInput, match=r"instances\.1\.pixel_array: the rows .* row 1 has 1"):
        read(b'{"instances": [[[0, 255], [128, 64]], [[1, 2], [3]]]}')
    with pytest.raises(InvalidInput, match=r"instances\.0\.pixel_array\.0\.1: .*less than or equal to 255"):
        read(b'{"instances": [[[0, 256]]]}')
    with pytest.raises(InvalidInput, match=r"instances\.0\.image_file\.b64: String should match"):
        read(b'{"instances": [{"b64": "not base64!"}]}')
    with pytest.raises(InvalidInput, match=r"instances\.0: an instance is"):
        read(b'{"instances": [7]}')
    with pytest.raises(InvalidInput, match=r"instances\.0\.pixel_array: List should have at least 1"):
        read(b'{"instances": [[]]}')
    with pytest.raises(InvalidInput, match=r"instances\.0\.colour_pixel_array: .*1 \(gray\), 3 \(RGB\)"):
        read(b'{"instances": [[[[0, 255], [128, 64]]]]}')
    with pytest.raises(InvalidInput, match=r"instances\.0\.colour_pixel_array: .*pixel \[0\]\[1\] has 4"):
        read(b'{"instances": [[[[0, 255, 0], [128, 64, 0, 255]]]]}')
    body = read(b'{"instances": [[[0, 255], [128, 64]], [[1, 2], [3, 4]]]}')
    with pytest.raises(InvalidInput, match="too many instances"):
        body.images(max_instances=1)
    gray, colour = Preprocess(size=8, channels=1), Preprocess(size=(5, 7), channels=3)
    images = PredictRequest(instances=[[[0, 255], [128, 64]]]).images(max_instances=1)
    (image,) = images.arrays(gray)
    assert image.shape == (1, 8, 8) and 0 <= image.min() <= image.max() <= 1
    assert images.arrays(gray) is images.arrays(gray)  # decoded once per preprocessing
    assert images.arrays(colour)[0].shape == (3, 5, 7)
    rgb = read(b'{"instances": [[[[255, 0, 0], [0, 0, 255]]]]}').images(max_instances=1)
    assert rgb.arrays(colour)[0][:, 0, 0] == pytest.approx([1, 0, 0])
    with pytest.raises(InvalidInput, match=r"instances\[0\]: not a decodable image"):
        read(b'{"instances": [{"b64": "QUJDRA=="}]}').images(max_instances=1).arrays(gray)


def test_the_deployment_hash_survives_the_round_trip_to_the_replica():
    """The replica parses the arguments the deploying process dumped; both must agree on the hash,
    or every routing change would redeploy the app (and take its route away for seconds)."""
    from flowops.serving.config import ServeAppConfig, parse_app_config

    deployed = parse_app_config({"stable": "2", "canary": "3", "weight": 10, "home": "/h"})
    replica = ServeAppConfig.model_validate(deployed.model_dump())
    assert replica.deployment_hash() == deployed.deployment_hash()
    assert parse_app_config({"stable": "5"}).deployment_hash() == \
        parse_app_config({"stable": "7", "weight": 50}).deployment_hash()  # routing is not in it


def test_replicas_need_the_custom_resources_asked_for():
    """`--resource worker_host=0.01` places the replicas on the nodes that have that resource."""
    from flowops.cli._common import parse_resources
    from flowops.serving.app import replica_options

    asked = parse_resources(["worker_host=0.01", " node:10.0.0.2 = 1"])
    cfg = serving.parse_app_config({"resources": asked})
    assert replica_options(cfg)["resources"] == {"worker_host": 0.01, "node:10.0.0.2": 1.0}
    assert "resources" not in replica_options(serving.parse_app_config({}))
    assert cfg.deployment_hash() != serving.parse_app_config({}).deployment_hash()
    with pytest.raises(InvalidInput, match="'worker_host' must be NAME=AMOUNT"):
        parse_resources(["worker_host"])
    with pytest.raises(InvalidInput, match="resources"):
        serving.parse_app_config({"resources": {"worker_host": 0}})


def test_max_replicas_per_node_spreads_the_replicas_only_when_asked():
    """`--max-replicas-per-node 1` with two replicas puts one on each of two nodes (Serve's own
    placement constraint); left out, Serve places the replicas as it likes."""
    from flowops.serving.app import deployment_options

    spread = serving.parse_app_config({"num_replicas": 2, "max_replicas_per_node": 1})
    assert deployment_options(spread)["max_replicas_per_node"] == 1
    assert deployment_options(spread)["num_replicas"] == 2
    assert "max_replicas_per_node" not in deployment_options(serving.parse_app_config({}))
    assert spread.deployment_hash() != serving.parse_app_config({"num_replicas": 2}).deployment_hash()
    with pytest.raises(InvalidInput, match="max_replicas_per_node"):
        serving.parse_app_config({"max_replicas_per_node": 0})
