"""The classifier app's two keys (admin: routing changes; API: predictions when required).

One reader for the deployer, the CLI and the replicas: `read_key`. A key never travels in the Serve
config (Serve logs it and shows it on its dashboard). FLOWOPS_<KIND>_KEY in the environment wins
everywhere: on Kubernetes every pod gets it from one Secret, and no file is written. Without it, the
deployer writes the key to a 0600 file in the home folder and hands the replicas the file's path.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from flowops.durable import atomic_write_text
from flowops.errors import InvalidInput
from flowops.settings import Settings

KeyKind = Literal["admin", "api"]
ADMIN, API = "admin", "api"


def env_names(kind: KeyKind) -> tuple[str, str]:
    """(FLOWOPS_<KIND>_KEY, FLOWOPS_<KIND>_KEY_FILE)."""
    name = f"FLOWOPS_{kind.upper()}_KEY"
    return name, f"{name}_FILE"


def key_path(settings: Settings, kind: KeyKind) -> Path:
    return settings.home / "serve" / f"{kind}_key"


def read_key(settings: Settings, kind: KeyKind, file: str | None = None) -> str | None:
    """The key, from the first of: FLOWOPS_<KIND>_KEY, `file` (the one the deployer wrote; skipped
    when this node does not have it), the file FLOWOPS_<KIND>_KEY_FILE names (InvalidInput when it
    cannot be read), home/serve/<kind>_key. None when there is none."""
    env, file_env = env_names(kind)
    if os.environ.get(env):
        return os.environ[env].strip()
    if file and (value := _read(Path(file))):
        return value
    if os.environ.get(file_env):
        try:
            return Path(os.environ[file_env]).read_text().strip() or None
        except OSError as exc:
            raise InvalidInput(f"cannot read {file_env}={os.environ[file_env]}: {exc.strerror}") from None
    return _read(key_path(settings, kind))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def admin_key(settings: Settings, create: bool = False) -> str:
    """The admin key: FLOWOPS_ADMIN_KEY, else the file FLOWOPS_ADMIN_KEY_FILE, else
    home/serve/admin_key (created, mode 0600, when `create`)."""
    key = read_key(settings, ADMIN)
    if key:
        return key
    env, file_env = env_names(ADMIN)
    default = key_path(settings, ADMIN)
    if not create:
        raise InvalidInput(f"no admin key: set {env} or {file_env}, or deploy once to create {default}")
    key = secrets.token_urlsafe(32)
    _write(default, key)
    return key


def write_key_files(settings: Settings, require_api_key: bool) -> tuple[str | None, str | None]:
    """The files the replicas read the keys from: (admin key file, API key file or None)."""
    api = read_key(settings, API)
    if require_api_key and not api:
        env, file_env = env_names(API)
        raise InvalidInput(f"--require-api-key needs a key: set {env} or {file_env}")
    return (_key_file(settings, ADMIN, admin_key(settings, create=True)),
            _key_file(settings, API, api))


def _key_file(settings: Settings, kind: KeyKind, key: str | None) -> str | None:
    """Write `key` to its 0600 file in the home folder and return the path; None (nothing written)
    when there is no key or it comes from FLOWOPS_<KIND>_KEY, which the replicas read too (a
    Kubernetes Secret; `flowops up` hands its own environment's to the local cluster)."""
    if not key or os.environ.get(env_names(kind)[0]):
        return None
    _write(key_path(settings, kind), key)
    return str(key_path(settings, kind))


def _write(path: Path, key: str) -> None:
    """Write a key file (0600) unless it already holds that key."""
    if _read(path) != key:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, key, mode=0o600)
