"""The command line's contract with scripts: exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _flowops(*args, home):
    return subprocess.run([sys.executable, "-m", "flowops.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "FLOWOPS_HOME": str(home),
                               "FLOWOPS_DASHBOARD_PORT": "29998",
                               "PYTHONPATH": os.environ.get("PYTHONPATH", "")})


def test_unhealthy_status_exits_5(tmp_path):
    out = _flowops("status", "--json", home=tmp_path)
    assert out.returncode == 5  # ClusterUnavailable
    assert '"healthy": false' in out.stdout


@pytest.mark.parametrize("args, code, text", [
    (["data", "versions", "--bogus"], 2, "No such option: --bogus"),
    (["jobs", "status"], 2, "Missing argument"),
    (["data", "show", "v7"], 3, "no data version exists yet"),
    (["jobs", "submit", "data_check", "--", "--config", "{oops"], 2, "--config is not valid JSON"),
    (["jobs", "submit", "train", "--", "--epochs", "3"], 2, "unexpected arguments '--epochs 3'"),
    (["jobs", "submit", "train", "--", "--config", "@/no/such.json"], 2, "cannot read"),
])
def test_usage_and_lookup_errors_are_one_line_with_their_code(tmp_path, args, code, text):
    out = _flowops(*args, home=tmp_path)
    assert out.returncode == code, out.stderr
    assert text in out.stderr and "Traceback" not in out.stderr


def test_help_exits_zero(tmp_path):
    assert _flowops("--help", home=tmp_path).returncode == 0


def test_pointed_at_a_cluster_elsewhere_the_local_home_is_never_silently_the_platform(tmp_path):
    """With FLOWOPS_RAY_ADDRESS on another host, a state or data command that would read this
    machine's home says so on stderr (stdout keeps its one JSON object); with FLOWOPS_STATE_URL /
    FLOWOPS_DATA_REPO given, or a local cluster, nothing is said."""
    base = {"PATH": "/usr/bin:/bin", "FLOWOPS_HOME": str(tmp_path / "home"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

    def run(*args, **env):
        return subprocess.run([sys.executable, "-m", "flowops.cli.main", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env={**base, **env})

    remote = {"FLOWOPS_RAY_ADDRESS": "http://10.255.0.9:8265"}
    out = run("loop", "report", "--json", **remote)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    assert "the state database is this machine's" in out.stderr and "FLOWOPS_STATE_URL" in out.stderr
    out = run("data", "versions", "--json", **remote)
    assert out.returncode == 0 and "FLOWOPS_DATA_REPO" in out.stderr, out.stderr
    shared = {**remote, "FLOWOPS_STATE_URL": f"sqlite:///{tmp_path}/shared.db"}
    assert "note:" not in run("loop", "report", "--json", **shared).stderr
    local = {"FLOWOPS_RAY_ADDRESS": "http://127.0.0.1:8265"}
    assert "note:" not in run("loop", "report", "--json", **local).stderr
    assert "FLOWOPS_DATA_REPO" in run("data", "--help").stdout
