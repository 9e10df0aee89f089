"""Dev environment requests and their Kubernetes manifests (no cluster needed)."""

from __future__ import annotations

import pytest
import yaml

from flowops import devenv, manifests
from flowops.errors import InvalidInput
from flowops.settings import get_settings
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def validator() -> manifests.ManifestValidator:
    return manifests.ManifestValidator()  # the KubeRay schemas packaged with FlowOps


def test_k8s_devenv_validates_and_carries_gpus_and_quota(validator):
    settings = get_settings()
    request = devenv.make_request(settings, name="alice-dev", gpus=2, gpu_type="A100", cpus=8, memory="32Gi")
    objects = devenv.k8s_objects(settings, request)
    for obj in objects:
        assert validator.check(obj) is None
        assert obj["metadata"].get("namespace", "alice-dev") == "alice-dev"
    by_kind = {o["kind"]: o for o in objects}
    assert set(by_kind) == {"Namespace", "ResourceQuota", "NetworkPolicy", "ServiceAccount", "Role",
                            "RoleBinding", "RayCluster", "Service"}
    hard = by_kind["ResourceQuota"]["spec"]["hard"]
    assert hard["requests.nvidia.com/gpu"] == "2"
    assert int(hard["requests.cpu"]) >= 8 + 1 and hard["limits.memory"].endswith("Mi")
    assert int(hard["limits.memory"][:-2]) >= 32 * 1024
    spec = by_kind["RayCluster"]["spec"]
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert group["minReplicas"] == 0 and group["idleTimeoutSeconds"] > 0  # GPUs go back when idle
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head_env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "GRPC_ENABLE_FORK_SUPPORT", "value": "false"} in head_env  # Ray Client proxy fork
    client = by_kind["Service"]["spec"]
    assert {p["port"] for p in client["ports"]} == {10001, 8265}
    assert client["selector"] == {"ray.io/cluster": "alice-dev", "ray.io/node-type": "head"}
    role = by_kind["Role"]
    assert role["metadata"]["namespace"] == "alice-dev"  # a Role, not a ClusterRole: this namespace only
    assert by_kind["RoleBinding"]["subjects"][0]["name"] == "alice-dev"


def test_gpu_types_are_configuration(tmp_path, monkeypatch):
    assert {"t4", "l4", "a100", "h100"} <= set(devenv.gpu_types(get_settings()))
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump({"v100": {"node_selector": {"nvidia.com/gpu.product": "Tesla-V100"}}}))
    monkeypatch.setenv("FLOWOPS_DEVENV_GPU_TYPES_FILE", str(path))
    settings = get_settings()
    request = devenv.make_request(settings, name="bob", gpus=1, gpu_type="v100")
    rc = next(o for o in devenv.k8s_objects(settings, request) if o["kind"] == "RayCluster")
    assert rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "Tesla-V100"}
    path.write_text("v100: {node_selector: {}}\n")
    with pytest.raises(InvalidInput, match="GPU types"):
        devenv.gpu_types(get_settings())


@pytest.mark.parametrize(("args", "message"), [
    (["good", "--gpus", "0", "--gpu-type", "t4"], "--gpus must be at least 1 (got 0)"),
    (["good", "--gpus", "-2", "--gpu-type", "t4"], "--gpus must be at least 1 (got -2)"),
    (["Not_A_Namespace", "--gpus", "1", "--gpu-type", "t4"], "is not a valid namespace name"),
    (["good", "--gpus", "1", "--gpu-type", "tpu9"], "GPU type 'tpu9' is not configured; configured: a100"),
])
def test_bad_requests_fail_clearly(args, message, tmp_path):
    proc = run_cli("devenv", "create", *args, "--backend", "local", timeout=120,
                   env={"FLOWOPS_HOME": str(tmp_path)})
    assert proc.returncode == InvalidInput.exit_code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "devenvs").exists()  # nothing was created


def test_k8s_devenv_cli_writes_yaml(tmp_path):
    out = tmp_path / "env.yaml"
    proc = run_cli("devenv", "create", "carol", "--gpus", "1", "--gpu-type", "l4", "--output", str(out),
                   timeout=120, env={"FLOWOPS_HOME": str(tmp_path)}, check=True)
    objects = list(yaml.safe_load_all(out.read_text()))
    assert {o["kind"] for o in objects} >= {"Namespace", "RayCluster", "ResourceQuota"}
    assert "ray://127.0.0.1:10001" in proc.stdout and "port-forward" in proc.stdout
    assert "VS Code" in proc.stdout and "PyCharm" in proc.stdout
