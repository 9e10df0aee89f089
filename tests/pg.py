"""A throw-away PostgreSQL server for tests: Debian's binaries, a temp folder, trust auth.

`start_postgres()` runs `initdb` and `pg_ctl start` (as the `postgres` user when running as root:
PostgreSQL refuses to run as root), listening on `host:port` and on a unix socket in its own
folder, and returns a handle with the admin `.url`, `.create_database(name)` and `.stop()`.
`prefix` runs the server's commands under another command, e.g. `["ip", "netns", "exec", "head"]`
to start it inside a network namespace; `allow` adds client networks (CIDRs) trusted besides
localhost.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/N/bin), or None."""
    versions = {Path(p).parents[1].name: Path(p).parent
                for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")}
    numbered = sorted((int(v), path) for v, path in versions.items() if v.isdigit())
    if numbered:
        return numbered[-1][1]
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    host: str
    port: int
    folder: Path
    prefix: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The admin URL (superuser `postgres`, database `postgres`)."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{name}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        """Stop the server at once and delete its folder."""
        _run(self.prefix, [str(self.folder / "bin" / "pg_ctl"), "-D", str(self.folder / "data"),
                           "-m", "immediate", "stop"], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", SUPERUSER, "--", *command] if os.geteuid() == 0 else command


def _run(prefix: Sequence[str], command: list[str], check: bool = True) -> None:
    proc = subprocess.run([*prefix, *_as_postgres(command)], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def start_postgres(base: Path | str | None = None, host: str = "127.0.0.1", port: int | None = None,
                   *, prefix: Sequence[str] = (), allow: Sequence[str] = ()) -> PostgresServer:
    """Start a fresh server in a new folder under `base` (default: the temp folder; the
    `postgres` user must be able to enter it when running as root)."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="flowops-pg-", dir=base))
    os.chmod(folder, 0o755)
    (folder / "bin").symlink_to(bindir)
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(sockets, SUPERUSER)
        shutil.chown(folder, SUPERUSER)
    port = port or _free_port(host)
    server = PostgresServer(host, port, folder, list(prefix))
    try:
        _run(prefix, [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync"])
        with open(data / "pg_hba.conf", "a") as fh:
            for network in allow:
                fh.write(f"host all all {network} trust\n")
        options = (f"-c listen_addresses={host} -p {port} -k {sockets} -c max_connections=200 "
                   "-c shared_buffers=32MB")
        _run(prefix, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
                      "-w", "-t", "60", "-o", options, "start"])
    except BaseException:
        server.stop()
        raise
    return server
