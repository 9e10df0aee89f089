"""A local dev environment: created, reached through Ray Client from another process with its own
token (as an IDE would), offering exactly the asked resources, then deleted without a trace."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from flowops.ray_client import kill_session, session_processes
from tests.conftest import run_cli

CLIENT = textwrap.dedent("""
    import json, sys, ray
    ray.init(sys.argv[1], logging_level="ERROR")
    @ray.remote(num_gpus=1, num_cpus=1)
    def probe():
        import os
        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    print(json.dumps({"resources": ray.cluster_resources(), "task": ray.get(probe.remote(), timeout=120)}))
""")


def _leftover_sessions(temp_dir: str) -> set[int]:
    """Sessions of processes that use this dev environment's Ray temp folder (only ours)."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.add(os.getsid(proc.pid))
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def _client_server_logs(temp_dir: str) -> str:
    """The Ray Client servers' own logs, to tell why a connection failed."""
    logs = sorted(glob.glob(f"{temp_dir}/session_latest/logs/ray_client_server*"))
    return "".join(f"\n--- {path}\n{open(path, errors='replace').read()[-3000:]}" for path in logs)


@pytest.mark.integration
@pytest.mark.slow
def test_local_devenv_reachable_through_ray_client(tmp_path):
    home = tmp_path / "home"
    env = {"FLOWOPS_HOME": str(home)}
    temp_dir = f"/tmp/flowops-dev-{hashlib.sha1(f'{home}/dev-ide'.encode()).hexdigest()[:10]}"
    try:
        created = run_cli("devenv", "create", "dev-ide", "--backend", "local", "--gpus", "1",
                          "--gpu-type", "t4", "--cpus", "1", "--json", env=env, timeout=420, check=True)
        record = json.loads(created.stdout)
        assert record["temp_dir"] == temp_dir
        sid = record["sid"]
        procs = session_processes(sid)
        # The Ray Client proxy runs without gRPC's fork handlers (ray-project/ray#63202).
        (proxy,) = [p for p in procs if "ray.util.client.server" in " ".join(p.cmdline())]
        assert proxy.environ().get("GRPC_ENABLE_FORK_SUPPORT") == "false"
        assert oct(os.stat(record["token_path"]).st_mode & 0o777) == "0o600"
        assert not any(10002 <= p <= 19999 for p in record["ports"].values())
        listed = json.loads(run_cli("devenv", "list", "--json", env=env, timeout=120, check=True).stdout)
        assert [(r["name"], r["healthy"]) for r in listed] == [("dev-ide", True)]

        # A separate process, as an IDE would: only the address and the token file.
        client_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLOWOPS_"))}
        client_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=record["token_path"])
        out = subprocess.run([sys.executable, "-c", CLIENT, record["address"]], capture_output=True,
                             text=True, timeout=300, env=client_env, cwd=tmp_path)
        if "Starting Ray client server failed" in out.stderr:
            # Ray's proxy can still lose a client's server at fork (ray-project/ray#63202; the dev
            # head turns gRPC's fork handlers off, which made it vanish in 36 of 36 stress tries):
            # an IDE reconnects, and so does this test, once.
            out = subprocess.run([sys.executable, "-c", CLIENT, record["address"]], capture_output=True,
                                 text=True, timeout=300, env=client_env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:] + _client_server_logs(temp_dir)
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["resources"]["CPU"] == 1.0 and seen["resources"]["GPU"] == 1.0
        assert seen["task"] == {"gpu_ids": ["0"], "cuda": "0"}

        deleted = run_cli("devenv", "delete", "dev-ide", "--json", env=env, timeout=180)
        assert deleted.returncode == 0, deleted.stderr
        assert session_processes(sid) == []
        assert not os.path.exists(temp_dir)
        assert json.loads(run_cli("devenv", "list", "--json", env=env, timeout=120).stdout) == []
    finally:  # whatever failed, leave no Ray of this test behind
        for leftover in _leftover_sessions(temp_dir):
            kill_session(leftover)
    assert not _leftover_sessions(temp_dir)
