"""A real two-host Ray cluster on one machine, built from Linux network namespaces.

Why: a Ray node on another machine shares nothing with the head but the network. Two network
namespaces joined by a veth pair give two hosts with their own addresses and ports; the worker
host also gets its own mount namespace in which the head's files (its FLOWOPS_HOME, its Ray temp
folder) are covered by empty tmpfs mounts, as a pod on another node would see them.

    head host   <ns>-head    10.213.0.1  `flowops up` (the real one: Ray head, Serve, MLflow server)
                                         with FLOWOPS_RAY_HOST = its address, FLOWOPS_HOME = head.home
    worker host <ns>-worker  10.213.0.2  `ray start --address=<head>:6380 --resources={"worker_host": 1}`
                                         own empty FLOWOPS_HOME (worker.home), the token copied in

(the /24 is the first of a few private ranges that this machine does not use itself.)

The cluster's storage URI is an S3 bucket on the head host (moto's server mode on head.addr:9000,
`s3://flowops/platform`): both hosts get FLOWOPS_STORAGE_URI, its endpoint and the (test) AWS
credentials in their environment before their Ray node starts, as a ConfigMap and a Secret give
them to every pod (`two_hosts.s3_url` is the endpoint: boto3 inside `head.python` reaches it). The
cluster's state is in PostgreSQL on the head host (head.addr:5432, database `flowops`) when
PostgreSQL is installed: both hosts get it as FLOWOPS_STATE_URL before their Ray node starts, and
both get one FLOWOPS_ADMIN_KEY, as a Kubernetes Secret gives every pod (so replicas on either host
hold the app's keys and write to the one database).

Each host is a network namespace with its own pid 1 (a small reaper) in fresh PID, mount and UTS
namespaces: the processes of one host cannot see the other's (Ray finds "its" raylet by listing
processes, as on a real machine), its hostname is the namespace's name (`fo<pid>-head`), and the
worker host's mounts hide the head's files.

Use, in a test under tests/integration (its conftest.py registers the fixtures, and runs the tests
that use them last, so the two hosts live only while they are needed):

    def test_x(two_hosts):
        head, worker = two_hosts.head, two_hosts.worker
        out = worker.python("import socket; print(socket.gethostname())")   # on the worker host
        done = head.run([*FLOWOPS, "models", "list"], env={"X": "1"})        # `flowops` on the head
        head.env, worker.env     # a driver's environment on that host (FLOWOPS_*, Ray's token);
                                 # the worker's points FLOWOPS_RAY_ADDRESS at the head
        head.addr, worker.addr   # the hosts' addresses; two_hosts.gcs_address, two_hosts.job_api
        head.home, worker.home   # each host's FLOWOPS_HOME (readable from the test process)
        head.prefix              # `nsenter ...`: prepend it to run any command on that host

    def test_y(two_hosts, head_postgres):   # needs the state on PostgreSQL (skips/fails without)
        url = head_postgres.database_url("flowops")  # postgresql+psycopg://postgres@10.213.0.1:5432/flowops
        assert two_hosts.head.env["FLOWOPS_STATE_URL"] == url

`Host.run(cmd, env)` runs `cmd` inside the host (its network, processes, files, hostname) with the
host's `env` plus `env`, and returns a `subprocess.CompletedProcess` (text; with `check` on, a
failure raises with the output). The test process itself stays in the root namespaces and cannot
reach the hosts' addresses: talk to the hosts through commands run inside them. On the worker host,
pin Ray work with `resources={"worker_host": 1}`; the head node is the one whose
`NodeManagerAddress` is `head.addr`. A server the tests need (an S3 endpoint, say) is started on
a host with `head.popen(cmd, log_path)`; it ends with the host at the latest.

It needs root (namespaces, mounts). Without root or the tools it skips with one line; in CI (`CI`
set) it fails instead, so CI never silently drops the multi-host tests. Everything is torn down at
the end, also after a failure: the head by `flowops down`, then each host's pid 1 is killed (the
kernel kills whatever is left on the host), the namespaces (and the veth pair) are deleted, the
folders removed. If pytest itself is killed, the hosts die with it (their pid 1 has pytest as
parent-death signal) and the next session deletes the namespaces and folders left behind. Names
carry the pid, so two sessions never collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from flowops.settings import Settings
from tests.conftest import S3_CREDENTIALS  # moto takes any
from tests.pg import PostgresServer, pg_bin, start_postgres

REPO = Path(__file__).resolve().parents[1]
FLOWOPS = [sys.executable, "-m", "flowops.cli.main"]
SUBNETS = ("10.213.0.0/24", "192.168.213.0/24", "10.214.0.0/24", "172.31.213.0/24")
PORTS = {"RAY_PORT": 6380, "DASHBOARD_PORT": 8265, "CLIENT_PORT": 10001, "SERVE_PORT": 8000,
         "METRICS_PORT": 8090, "MLFLOW_PORT": 5000}  # each host has its own ports: defaults fit
HEAD_CPUS, WORKER_CPUS = 2, 2
S3_PORT = 9000
STORAGE_URI = "s3://flowops/platform"



class HarnessUnavailable(RuntimeError):
    """This machine cannot build the hosts (not root, no `ip`/`unshare`, namespaces refused)."""


def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _clean_env() -> dict[str, str]:
    """This process's environment without the single-host test platform's FLOWOPS_*/RAY_* (the root
    conftest sets them), with this interpreter's `ray` and `python` first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWOPS_", "RAY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "platform"), str(REPO), env.get("PYTHONPATH")) if p
    )
    return env


# The host's pid 1: reaps the orphans it inherits (Ray's daemons after `ray start` exits).
INIT = ("import os, time\nwhile True:\n    try:\n        os.waitpid(-1, 0)\n"
        "    except ChildProcessError:\n        time.sleep(0.5)")


def _die_with_parent() -> None:
    """In the child before exec: if pytest dies (even SIGKILL), the host's init goes with it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Host:
    """One host: a network namespace with its own pid 1 (own PID, mount and UTS namespaces), its
    address, hostname (= the namespace's name), FLOWOPS_HOME and a driver's environment."""

    role: str  # "head" or "worker"
    netns: str
    addr: str
    home: Path  # this host's FLOWOPS_HOME
    env: dict[str, str]  # FLOWOPS_* and Ray's token settings of a driver on this host
    hidden: list[Path] = field(default_factory=list)  # covered by empty tmpfs mounts on this host
    hosts_file: Path | None = None  # this host's /etc/hosts (both hosts' names and addresses)
    init: subprocess.Popen | None = None
    init_pid: int | None = None  # the host's pid 1, as the root namespace numbers it

    def boot(self) -> None:
        """Start the host's init: hostname set, the hidden paths covered, then it waits."""
        steps = [f"hostname {shlex.quote(self.netns)}"]
        if self.hosts_file is not None:  # the hosts' names resolve, as on a real network (Gloo needs it)
            steps.append(f"mount --bind {shlex.quote(str(self.hosts_file))} /etc/hosts")
        steps += [f"mount -t tmpfs -o size=1m,mode=0755 fo-private {shlex.quote(str(p))}"
                  for p in self.hidden if p.exists()]
        steps += ["echo ready", f"exec {shlex.quote(sys.executable)} -c {shlex.quote(INIT)}"]
        self.init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--kill-child",
             "--mount-proc", "--mount", "--propagation", "private", "--uts",
             "sh", "-c", " && ".join(steps)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        if self.init.stdout.readline().strip() != "ready":
            self.init.kill()
            raise RuntimeError(f"the {self.role} host did not start: {self.init.stderr.read()}")
        self.init_pid = psutil.Process(self.init.pid).children()[0].pid

    def shutdown(self) -> None:
        """Kill the host's pid 1: the kernel then kills every process left on the host."""
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            self.init.wait(timeout=60)
            self.init_pid = None

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside this host (its network, processes, files, hostname)."""
        return ["nsenter", f"--target={self.init_pid}", "--net", "--pid", "--mount", "--uts",
                f"--wd={REPO}", "--"]

    def run(self, cmd: list[str], env: dict[str, str] | None = None, *, check: bool = True,
            timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on this host with `self.env` (+ `env`); raise with its output if it fails."""
        done = subprocess.run(
            [*self.prefix, *cmd], env={**_clean_env(), **self.env, **(env or {})},
            capture_output=True, text=True, timeout=timeout, input=input,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"on the {self.role} host, {shlex.join(cmd)} exited {done.returncode}\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done

    def python(self, code: str, env: dict[str, str] | None = None, **kwargs) -> str:
        """Run Python code on this host; return its stdout."""
        return self.run([sys.executable, "-c", code], env, **kwargs).stdout

    def popen(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running `cmd` (a server) on this host, its output appended to `log`."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*self.prefix, *cmd], env={**_clean_env(), **self.env, **(env or {})},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )


@dataclass
class TwoHosts:
    """The cluster: `head`, `worker` and how drivers reach the head."""

    base: Path
    subnet: str
    head: Host
    worker: Host
    postgres: PostgresServer | None = None  # the state database, when PostgreSQL is installed
    s3: subprocess.Popen | None = None  # moto's S3 server on the head host (the storage URI)
    timings: dict[str, float] = field(default_factory=dict)
    _netns: list[str] = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"{self.head.addr}:{PORTS['RAY_PORT']}"

    @property
    def job_api(self) -> str:
        return f"http://{self.head.addr}:{PORTS['DASHBOARD_PORT']}"

    @property
    def token(self) -> str:
        return (self.head.home / "ray" / "auth_token").read_text().strip()

    # Building ----------------------------------------------------------------------------------

    def create_network(self) -> None:
        for host in (self.head, self.worker):
            _sh("ip", "netns", "add", host.netns)
            self._netns.append(host.netns)
        # Created straight inside the namespaces: the names never exist in the root namespace.
        _sh("ip", "link", "add", "eth0", "netns", self.head.netns, "type", "veth",
            "peer", "name", "eth0", "netns", self.worker.netns)
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        for host in (self.head, self.worker):
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.addr}/{prefix}", "dev", "eth0")
            _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")

    def start_head(self) -> None:
        """Boot the head host, start PostgreSQL there (when installed) with the database `flowops`
        as both hosts' FLOWOPS_STATE_URL, as a Secret gives every pod, then `flowops up`."""
        self.head.boot()
        self.start_s3()
        if pg_bin() is not None:
            self.postgres = start_postgres(self.base / "head", host=self.head.addr, port=5432,
                                           prefix=self.head.prefix, allow=[self.subnet])
            self.head.python(f"import psycopg; psycopg.connect({pg_dsn(self.postgres.url)!r}, "
                             "autocommit=True).execute('CREATE DATABASE flowops')")
            for host in (self.head, self.worker):
                host.env["FLOWOPS_STATE_URL"] = self.postgres.database_url("flowops")
        self.head.run([*FLOWOPS, "up", "--num-cpus", str(HEAD_CPUS)], timeout=600)

    @property
    def s3_url(self) -> str:
        return f"http://{self.head.addr}:{S3_PORT}"

    def start_s3(self) -> None:
        """moto's S3 server on the head host with the bucket `flowops`: the storage URI of both
        hosts (set in their environments, with the credentials, before any Ray node starts)."""
        binary = Path(sys.executable).parent / "moto_server"
        self.s3 = self.head.popen([str(binary), "-H", self.head.addr, "-p", str(S3_PORT)],
                                  self.base / "head-s3.log")
        self.head.python(textwrap.dedent(f"""
            import time, boto3, httpx
            deadline = time.time() + 60
            while True:
                try:
                    httpx.get("{self.s3_url}/moto-api/", timeout=1)
                    break
                except httpx.HTTPError:
                    assert time.time() < deadline, "moto_server did not start"
                    time.sleep(0.2)
            boto3.client("s3", endpoint_url="{self.s3_url}").create_bucket(Bucket="flowops")
        """), env=S3_CREDENTIALS, timeout=120)
        for host in (self.head, self.worker):
            host.env.update({**S3_CREDENTIALS, "FLOWOPS_STORAGE_URI": STORAGE_URI,
                             "FLOWOPS_STORAGE_ENDPOINT_URL": self.s3_url})

    def start_worker(self) -> None:
        """Boot the worker host once the head's files exist (to hide them), copy the token into
        its own home (0600) and join it to the head."""
        self.worker.hidden.append(Settings(home=self.head.home).ray_temp_dir)
        self.worker.boot()
        token_dir = self.worker.home / "ray"
        token_dir.mkdir(parents=True, mode=0o700)
        token = token_dir / "auth_token"
        token.write_text(self.token)
        token.chmod(0o600)
        log = self.base / "worker-ray-start.log"  # Ray's daemons keep it: a file, never a pipe
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start",
            f"--address={self.gcs_address}", f"--node-ip-address={self.worker.addr}",
            f"--num-cpus={WORKER_CPUS}", "--num-gpus=0",
            f"--resources={json.dumps({'worker_host': 1})}",
            # short: Ray's unix socket paths are limited to 107 bytes
            f"--temp-dir={self.base / 'wray'}", "--disable-usage-stats",
        ]
        # as for flowops' own heads: no gRPC fork handlers (ray-project/ray#63202)
        proc = self.worker.popen(cmd, log, env={"GRPC_ENABLE_FORK_SUPPORT": "false"})
        if proc.wait(timeout=300) != 0:
            raise RuntimeError(f"ray start on the worker host failed:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")

    def wait_for_nodes(self, n: int = 2, timeout_s: float = 120) -> None:
        self.head.python(textwrap.dedent(f"""
            import time
            from flowops.ray_client import connect
            from flowops.settings import get_settings

            ray = connect(get_settings())
            deadline = time.time() + {timeout_s}
            while sum(node["Alive"] for node in ray.nodes()) < {n}:
                assert time.time() < deadline, ray.nodes()
                time.sleep(0.5)
        """), timeout=timeout_s + 120)

    # Tearing down ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this cluster started; safe on a half-built cluster and twice."""
        if self.head.init_pid and (self.head.home / "state.json").exists():
            with contextlib.suppress(Exception):
                self.head.run([*FLOWOPS, "down"], timeout=120, check=False)
        if self.postgres is not None and self.head.init_pid:
            self.postgres.stop()
        for host in (self.worker, self.head):
            host.shutdown()
        for netns in self._netns:  # anything else still inside our namespaces is ours too
            pids = [int(p) for p in _sh("ip", "netns", "pids", netns, check=False).stdout.split()]
            _signal_all(pids)
            _sh("ip", "netns", "del", netns, check=False)
        self._netns.clear()
        shutil.rmtree(Settings(home=self.head.home).ray_temp_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _signal_all(pids: list[int], grace_s: float = 10) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    for proc in psutil.wait_procs(procs, timeout=grace_s)[1]:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise HarnessUnavailable("needs root (network namespaces, mounts); run as root or in CI")
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mount") if not shutil.which(tool)]
    if missing:
        raise HarnessUnavailable(f"missing {', '.join(missing)} (Debian: iproute2, util-linux)")


def free_subnet() -> str:
    """The first test range that overlaps no address or route of this machine."""
    used = []
    for cmd in (("ip", "-4", "-o", "addr", "show"), ("ip", "-4", "route", "show")):
        for word in _sh(*cmd).stdout.split():
            with contextlib.suppress(ValueError):  # words like "dev" or "eth0" are no network
                if "." in word:
                    used.append(ipaddress.ip_network(word, strict=False))
    for subnet in SUBNETS:
        net = ipaddress.ip_network(subnet)
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    raise HarnessUnavailable(f"every test range {SUBNETS} is in use on this machine")


def sweep_stale() -> None:
    """Delete the namespaces and folders of harness sessions whose pytest is gone (killed hard)."""
    for line in _sh("ip", "netns", "list").stdout.splitlines():
        match = re.fullmatch(r"fo(\d+)-(head|worker)", line.split()[0]) if line.split() else None
        if match and not psutil.pid_exists(int(match[1])):
            _signal_all([int(p) for p in _sh("ip", "netns", "pids", match[0]).stdout.split()])
            _sh("ip", "netns", "del", match[0], check=False)
    for path in Path("/tmp").glob("fo[0-9]*-*"):
        match = re.fullmatch(r"fo(\d+)-\w{8}", path.name)
        if match and path.is_dir() and not psutil.pid_exists(int(match[1])):
            shutil.rmtree(Settings(home=path / "head" / "home").ray_temp_dir, ignore_errors=True)
            shutil.rmtree(path, ignore_errors=True)


def build_two_hosts() -> TwoHosts:
    """Plan the hosts (nothing started yet): names, addresses, folders, environments."""
    check_prerequisites()
    sweep_stale()
    subnet = free_subnet()
    hosts = list(ipaddress.ip_network(subnet).hosts())
    tag = f"fo{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp"))
    base.chmod(0o755)  # the `postgres` user must reach its folder below
    head_home, worker_home = base / "head" / "home", base / "worker" / "home"
    for path in (head_home, worker_home):
        path.mkdir(parents=True)
    ports = {f"FLOWOPS_{k}": str(v) for k, v in PORTS.items()}
    # The classifier app's admin key as a Kubernetes Secret gives it to every pod: in the
    # environment of both hosts' drivers and Ray nodes (so of every replica), no key file.
    common = {**ports, "RAY_AUTH_MODE": "token", "FLOWOPS_ADMIN_KEY": secrets.token_urlsafe(24)}
    head = Host(
        "head", f"{tag}-head", str(hosts[0]), head_home,
        {**common, "FLOWOPS_HOME": str(head_home), "FLOWOPS_RAY_HOST": str(hosts[0]),
         "RAY_AUTH_TOKEN_PATH": str(head_home / "ray" / "auth_token")},
    )
    worker = Host(
        "worker", f"{tag}-worker", str(hosts[1]), worker_home,
        {**common, "FLOWOPS_HOME": str(worker_home),
         "FLOWOPS_RAY_ADDRESS": f"http://{hosts[0]}:{PORTS['DASHBOARD_PORT']}",
         "RAY_AUTH_TOKEN_PATH": str(worker_home / "ray" / "auth_token")},
        # The head host's files: its folder (home, PostgreSQL), Ray's default temp folder (the
        # head's own Ray temp folder is added once it exists).
        hidden=[base / "head", Path("/tmp/ray")],
    )
    hosts_file = base / "etc-hosts"
    hosts_file.write_text(f"127.0.0.1 localhost\n{head.addr} {head.netns}\n{worker.addr} {worker.netns}\n")
    hosts_file.chmod(0o644)
    head.hosts_file = worker.hosts_file = hosts_file
    return TwoHosts(base=base, subnet=subnet, head=head, worker=worker)


def _unavailable(exc: Exception) -> BaseException:
    """A skip with one line; in CI a failure instead (CI must run the multi-host tests)."""
    if os.environ.get("CI"):
        return pytest.fail.Exception(f"multi-host harness cannot run in CI: {exc}", pytrace=False)
    return pytest.skip.Exception(f"multi-host harness: {exc}")


@pytest.fixture(scope="session")
def two_hosts(request):
    """The running two-host cluster (see the module docstring); torn down at the session's end."""
    try:
        cluster = build_two_hosts()
    except HarnessUnavailable as exc:
        raise _unavailable(exc) from None
    request.addfinalizer(cluster.close)
    start = time.monotonic()
    try:
        cluster.create_network()
    except RuntimeError as exc:  # e.g. a container without CAP_NET_ADMIN
        raise _unavailable(exc) from None
    for step in (cluster.start_head, cluster.start_worker, cluster.wait_for_nodes):
        step()
        cluster.timings[step.__name__] = round(time.monotonic() - start, 1)
    return cluster


@pytest.fixture(scope="session")
def head_postgres(two_hosts):
    """PostgreSQL on the head host (head.addr:5432; clients from the test range trusted) holding
    the cluster's state: `head_postgres.database_url("flowops")` is both hosts' FLOWOPS_STATE_URL.
    (Its `create_database` connects from the test process, which cannot reach the head host:
    create more from a host.)"""
    if two_hosts.postgres is None:
        raise _unavailable(HarnessUnavailable("PostgreSQL is not installed (Debian: postgresql)"))
    return two_hosts.postgres


def pg_dsn(url: str) -> str:
    """The libpq form (psql, psycopg.connect) of an SQLAlchemy `postgresql+psycopg://` URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)
