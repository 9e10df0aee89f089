"""Where data versions live: the workspace's git repository, the shared repository it is a clone
of (FLOWOPS_DATA_REPO), and the DVC remote; the git and DVC commands that reach them.

By default all three are in the home folder (one machine). On a cluster the data repository is a
git URL every node reaches (the workspace clones it; every cut pushes its commit and tag there)
and the DVC remote is `<FLOWOPS_STORAGE_URI>/dvc` on S3, with the endpoint of
FLOWOPS_STORAGE_ENDPOINT_URL and the credentials of the AWS_* environment (never written to a
file). The settings, not a commit, name the remote: every workspace pins it in `.dvc/config.local`
and every read through DVC's API passes it, so a node reads and writes where its settings say.
Unreachable or unwritable: one line naming the place and the operation, exit 5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowops import storage
from flowops.durable import atomic_write_text
from flowops.errors import ClusterUnavailable, Conflict, FlowOpsError
from flowops.settings import Settings

REMOTE = "storage"  # the DVC remote's name in every workspace
CONNECT_TIMEOUT_S = 5  # DVC's S3 client: an unreachable endpoint fails in seconds


def run(args: list[str], cwd: Path, what: str, timeout: float = 600,
        error: type[FlowOpsError] = FlowOpsError, env: dict[str, str] | None = None) -> str:
    """Run a command; a failure is `error` with the last line it printed (git's hints skipped)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        msg = [line for line in (out.stderr.strip() or out.stdout.strip()).splitlines()
               if line.strip() and not line.startswith("hint:")]
        raise error(f"{what} failed: {msg[-1] if msg else 'exit ' + str(out.returncode)}")
    return out.stdout


def git(ws: Path, *args: str) -> str:
    return run(["git", *args], ws, f"git {args[0]}")


def dvc(settings: Settings, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], settings.workspace, f"dvc {args[0]}",
               env={k.upper(): v for k, v in _uri_credentials(settings, "aws_").items()})


def origin(settings: Settings) -> str | None:
    """The shared git repository the workspace is a clone of, when it is not the workspace."""
    repo = settings.data_repo
    return repo if repo and Path(repo) != settings.workspace else None


def shared_git(settings: Settings, *args: str) -> str:
    """A git command that talks to the shared repository: unreachable is exit 5, naming it."""
    cwd = settings.workspace if (settings.workspace / ".git").is_dir() else Path("/")
    try:
        return run(["git", *args], cwd, f"git {args[0]}", timeout=300, error=ClusterUnavailable)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"git {args[0]}: data repository {storage.mask(str(origin(settings)))}"
                                 " did not answer in 300 s") from None
    except ClusterUnavailable as exc:
        raise ClusterUnavailable(f"data repository {storage.mask(str(origin(settings)))} "
                                 f"(FLOWOPS_DATA_REPO): {exc}") from None


def _uri_credentials(settings: Settings, prefix: str = "") -> dict[str, str]:
    """Credentials written in the storage URI (s3://KEY:SECRET@bucket), for the DVC remote derived
    from it: handed to DVC in memory or its process environment, never written to a file."""
    parts = urlsplit(settings.storage)
    if settings.dvc_remote or parts.scheme not in ("s3", "s3a") or not parts.username:
        return {}
    return {f"{prefix}access_key_id": parts.username,
            f"{prefix}secret_access_key": parts.password or ""}


def remote_config(settings: Settings) -> dict[str, str]:
    """The DVC remote as this node's settings name it (no credentials: those come from the AWS_*
    environment). The settings, not a commit, say where data goes: a workspace's
    `.dvc/config.local` and every read through DVC's API use this."""
    config = {"url": settings.remote}
    if settings.remote.startswith("s3://"):
        config["connect_timeout"] = str(CONNECT_TIMEOUT_S)
        if settings.storage_endpoint_url:
            config["endpointurl"] = settings.storage_endpoint_url
    return config


def pin_remote(settings: Settings) -> None:
    """Point the workspace's DVC at `remote_config` (.dvc/config.local: not versioned)."""
    lines = ["[core]", f"    remote = {REMOTE}", f"['remote \"{REMOTE}\"']"]
    lines += [f"    {key} = {value}" for key, value in remote_config(settings).items()]
    atomic_write_text(settings.workspace / ".dvc" / "config.local", "\n".join(lines) + "\n")


def api_options(settings: Settings) -> dict[str, Any]:
    return {"remote": REMOTE, "remote_config": {**remote_config(settings), **_uri_credentials(settings)}}


def check_remote(settings: Settings, operation: str) -> None:
    """Before `operation` does any work: the DVC remote takes a write (unless it lies in the
    storage URI, which storage.check probed) and the shared git repository answers. Exit 5."""
    under_storage = settings.remote.startswith(settings.storage.rstrip("/") + "/") or (
        settings.dvc_remote is None and settings.remote.startswith("s3://"))
    if not under_storage:
        try:
            fs, root = storage.filesystem_for(settings.remote, settings.storage_endpoint_url)
        except (ValueError, OSError) as exc:
            raise storage.StorageUnavailable(f"{operation}: DVC remote {storage.mask(settings.remote)}"
                                             f" (FLOWOPS_DVC_REMOTE) is not usable: {exc}") from None
        storage.probe(storage.Storage(settings.remote, fs, root), settings.storage_endpoint_url,
                      operation, "DVC remote")
    if origin(settings):
        shared_git(settings, "ls-remote", "--heads", str(origin(settings)))


def version_tags(settings: Settings) -> list[str]:
    """Data version ids (tags vN), from the local workspace or the configured data repository."""
    if shared := origin(settings):
        out = shared_git(settings, "ls-remote", "--tags", shared)
        names = [line.split("refs/tags/")[-1] for line in out.splitlines() if "refs/tags/" in line]
    elif (settings.workspace / ".git").is_dir():
        names = git(settings.workspace, "tag", "--list", "v*").split()
    else:
        return []
    tags = {t for t in names if t.startswith("v") and t[1:].isdigit()}
    return sorted(tags, key=lambda t: int(t[1:]))


def push_data(settings: Settings, tag: str) -> None:
    """`dvc push`; a remote that cannot take it is exit 5, naming it, and nothing is cut."""
    try:
        dvc(settings, "push", "-q")
    except FlowOpsError as exc:
        endpoint = remote_config(settings).get("endpointurl")
        where = storage.mask(settings.remote) + (f" (endpoint {endpoint})" if endpoint else "")
        raise storage.StorageUnavailable(f"cut {tag}: DVC remote {where} is unreachable or not "
                                         f"writable, nothing cut: {exc}") from None


def push_tag(settings: Settings, tag: str) -> None:
    """Publish the cut: the commit and its tag, atomically, to the shared repository. Another
    node that cut first wins (Conflict: run again, the cut starts from its version)."""
    try:
        shared_git(settings, "push", "-q", "--atomic", "origin", "HEAD:refs/heads/main",
                   f"refs/tags/{tag}")
    except ClusterUnavailable:
        if tag in version_tags(settings):
            raise Conflict(f"cut {tag}: another node cut {tag} at the same time; nothing cut here, "
                           "run again (the cut then starts from that version)") from None
        raise
