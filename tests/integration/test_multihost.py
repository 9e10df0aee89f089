"""The multi-host harness holds what later multi-host tests rely on: two Ray nodes on two hosts
with their own addresses, work pinned to the worker host that cannot see the head's files, drivers
on the worker host that join with the copied token, PostgreSQL on the head reachable from the
worker host. (tests/multihost.py builds it; it needs root, and CI must run it.)"""

from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest

from tests.multihost import pg_dsn

pytestmark = pytest.mark.integration

# A driver on one host: joins through flowops' one ray.init (FLOWOPS_* and the token of that host),
# runs `probe` on each node, pinned by node id, and prints what every side saw.
PROBE = textwrap.dedent("""
    import json, os, socket, subprocess
    import ray as _ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from flowops.ray_client import connect
    from flowops.settings import get_settings

    def probe(head_home):
        netns = subprocess.run(["ip", "netns", "identify", str(os.getpid())],
                               capture_output=True, text=True).stdout.strip()
        return {"hostname": socket.gethostname(), "netns": netns,
                "ip": _ray.util.get_node_ip_address(),
                "head_home": sorted(os.listdir(head_home)) if os.path.isdir(head_home) else None,
                "flowops_home": os.environ.get("FLOWOPS_HOME")}

    ray = connect(get_settings())
    nodes = [n for n in ray.nodes() if n["Alive"]]
    remote = ray.remote(num_cpus=1)(probe)
    seen = {n["NodeManagerAddress"]: ray.get(remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(os.environ["HEAD_HOME"])) for n in nodes}
    print(json.dumps({
        "nodes": {n["NodeManagerAddress"]: n["Resources"] for n in nodes},
        "driver_node": ray.get_runtime_context().get_node_id(),
        "node_ids": {n["NodeID"]: n["NodeManagerAddress"] for n in nodes},
        "pinned": ray.get(ray.remote(resources={"worker_host": 1})(probe).remote(os.environ["HEAD_HOME"])),
        "seen": seen,
    }))
""")


def _probe(host, two_hosts) -> dict:
    out = host.python(PROBE, env={"HEAD_HOME": str(two_hosts.head.home)})
    return json.loads(out.strip().splitlines()[-1])


def test_two_nodes_on_two_hosts_and_the_worker_host_cannot_see_the_head(two_hosts):
    head, worker = two_hosts.head, two_hosts.worker
    report = _probe(head, two_hosts)

    assert set(report["nodes"]) == {head.addr, worker.addr}
    assert report["nodes"][worker.addr].get("worker_host") == 1
    assert "worker_host" not in report["nodes"][head.addr]
    assert report["node_ids"][report["driver_node"]] == head.addr
    # Each node's work runs in that host's namespace with that host's name and address.
    on_head, on_worker = report["seen"][head.addr], report["seen"][worker.addr]
    assert (on_head["netns"], on_head["hostname"], on_head["ip"]) == (head.netns,) * 2 + (head.addr,)
    assert (on_worker["netns"], on_worker["hostname"], on_worker["ip"]) == (
        worker.netns, worker.netns, worker.addr)
    # The head's FLOWOPS_HOME is there on the head (state, token) and empty on the worker host.
    assert {"state.json", "ray"} <= set(on_head["head_home"])
    assert on_worker["head_home"] in (None, [])
    assert on_worker["flowops_home"] == str(worker.home)
    assert report["pinned"]["ip"] == worker.addr


def test_a_driver_on_the_worker_host_joins_with_the_copied_token(two_hosts):
    head, worker = two_hosts.head, two_hosts.worker
    assert "FLOWOPS_RAY_ADDRESS" in worker.env and worker.home != head.home

    report = _probe(worker, two_hosts)

    assert report["node_ids"][report["driver_node"]] == worker.addr
    assert set(report["seen"]) == {head.addr, worker.addr}
    assert report["seen"][worker.addr]["head_home"] in (None, [])
    # The token is what lets it in: the head's job API refuses the worker host without it. The
    # head's Serve HTTP and MLflow server answer there too, at the addresses its settings derive.
    out = worker.python(textwrap.dedent(f"""
        import httpx
        from flowops.settings import get_settings
        from flowops.stack import mlflow_healthy, serve_healthy
        url = "{two_hosts.job_api}/api/version"
        token = open("{worker.home}/ray/auth_token").read().strip()
        with_token = httpx.get(url, headers={{"Authorization": "Bearer " + token}})
        s = get_settings()
        print(httpx.get(url).status_code, with_token.status_code, s.serve_url, serve_healthy(s),
              s.tracking_uri, mlflow_healthy(s))
    """))
    assert out.split() == ["401", "200", f"http://{head.addr}:8000", "True",
                           f"http://{head.addr}:5000", "True"]


def test_postgres_on_the_head_is_reachable_from_the_worker_host(two_hosts, head_postgres):
    url = pg_dsn(head_postgres.database_url("flowops"))
    assert head_postgres.host == two_hosts.head.addr
    out = two_hosts.worker.python(textwrap.dedent(f"""
        import psycopg
        with psycopg.connect({url!r}) as conn:
            print(conn.execute("select inet_server_addr(), current_database()").fetchone())
    """))
    assert out.strip() == repr((ipaddress.ip_address(two_hosts.head.addr), "flowops"))
