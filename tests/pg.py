"""A throw-away PostgreSQL server for tests: Debian's PostgreSQL run as the `postgres` user.

`start_postgres(tmpdir, host=..., port=...)` makes a fresh cluster (initdb) under `tmpdir`, starts
it listening on `host:port` (and a unix socket in `tmpdir`), and returns a `Postgres` whose `url`
a client uses and whose `stop()` stops it. `prefix=` runs it inside another host (the multi-host
harness passes `head.prefix` to put it on the head host); `trust_cidr=` lets clients from that
range in without a password (a test network only).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here (not installed, no `postgres` user, not root)."""


def postgres_bin_dir() -> Path:
    """Debian keeps the server tools out of PATH, in /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not versions:
        raise PostgresUnavailable("PostgreSQL is not installed (Debian package `postgresql`)")
    return Path(versions[-1]).parent


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Postgres:
    host: str
    port: int
    datadir: Path
    sockdir: Path
    prefix: Sequence[str] = ()  # runs a command on the server's host (pids are that host's)

    @property
    def url(self) -> str:
        """libpq URL of the `postgres` database as the `postgres` superuser (no password)."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def stop(self) -> None:
        """Stop the server (fast shutdown); kill the postmaster if pg_ctl cannot."""
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return
        as_pg = [*self.prefix, "runuser", "-u", "postgres", "--"]
        pg_ctl = str(postgres_bin_dir() / "pg_ctl")
        done = subprocess.run([*as_pg, pg_ctl, "-D", str(self.datadir), "-m", "fast", "-w", "-t",
                               "30", "stop"], capture_output=True, text=True)
        if done.returncode != 0 and pidfile.exists():
            with contextlib.suppress(ValueError, IndexError, FileNotFoundError):
                pid = int(pidfile.read_text().split()[0])
                subprocess.run([*as_pg, "kill", "-9", str(pid)], capture_output=True)
                time.sleep(0.5)


def start_postgres(
    tmpdir: Path | str,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    prefix: Sequence[str] = (),
    trust_cidr: str | None = None,
) -> Postgres:
    """Create a cluster under `tmpdir` and start it on `host:port`; the caller must `stop()` it."""
    if os.geteuid() != 0:
        raise PostgresUnavailable("starting PostgreSQL as the `postgres` user needs root")
    try:
        import pwd

        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("no `postgres` user (Debian package `postgresql`)") from None
    bindir = postgres_bin_dir()
    root = Path(tmpdir)
    datadir, sockdir = root / "data", root / "sock"
    for path in (root, sockdir):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, pg_user.pw_uid, pg_user.pw_gid)
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_pg, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust",
         "--no-sync", "-E", "UTF8", "--locale=C"], check=True, capture_output=True, text=True,
    )
    if trust_cidr:
        with open(datadir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {trust_cidr} trust\n")
    port = port or (5432 if prefix else _free_port(host))  # another host has its own ports
    pg = Postgres(host=host, port=port, datadir=datadir, sockdir=sockdir, prefix=prefix)
    started = subprocess.run(
        [*prefix, *as_pg, str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(root / "log"),
         "-w", "-t", "60", "-o", f"-h {host} -p {port} -k {sockdir} -c fsync=off", "start"],
        capture_output=True, text=True,
    )
    if started.returncode != 0:
        pg.stop()
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start on {host}:{port}: {started.stderr}\n{log}")
    return pg
