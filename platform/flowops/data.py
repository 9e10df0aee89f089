"""Versioned data: a git + DVC workspace whose `data/` folder holds images and a manifest.

Layout of a data version (the DVC-tracked folder `data/`):

    images/<split>/<class>/<id>.<ext>  labeled images (train, holdout), the original files' bytes
    images/unlabeled/<id>.<ext>        the unlabeled pool (the path does not reveal the class)
    manifest.csv                       id, path, label, split, source, label_source
    answers.csv                        hidden true labels of the unlabeled pool (simulated labelers)
    meta.json                          name, classes, channels, image_size (a default model input
                                       side), median height/width, rejected (see data_import)
    errors.csv                         (image folders) files skipped at import: path, reason

Every change is a new data version: a git tag `vN` on a commit of `data.dvc` plus `VERSION.json`
(counts per pool and class), pushed to the DVC remote. Workloads read a version through DVC's API
by its id, so any machine that reaches the git repository and the DVC remote reads exactly that
version.

Where they live (flowops.data_repo): the home folder by default; on a cluster a git URL every node
reaches (FLOWOPS_DATA_REPO) and `<FLOWOPS_STORAGE_URI>/dvc` on S3, so a version cut on any node
opens on every other. A workload opens a version once (`open_version`) into a `DataVersion` handle
carrying its tag, manifest and metadata; the files are fetched on first use of `handle.root`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from flowops import data_repo
from flowops.durable import atomic_write_text, file_lock
from flowops.errors import ClusterUnavailable, FlowOpsError, InvalidInput, NotFound
from flowops.settings import Settings

MANIFEST_COLUMNS = ["id", "path", "label", "split", "source", "label_source"]
SPLITS = ("train", "unlabeled", "holdout")
DATA_DIR = "data"
ERRORS_FILE = "errors.csv"
DEFAULT_NAME = "digits"  # versions written before datasets had names hold the digits


@dataclass
class VersionInfo:
    """One data version: its id, commit and counts."""

    id: str
    commit: str = ""
    created: float = 0.0
    message: str = ""
    parent: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # per split
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n
    classes: list[str] = field(default_factory=list)
    name: str = DEFAULT_NAME  # the dataset's name (meta.json): models default to <name>-classifier
    rejected: int = 0  # files skipped when the dataset was imported (listed in errors.csv)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The workspace -----------------------------------------------------------------------------------


def data_lock(settings: Settings):
    """Serialise version cuts in one workspace (waits for the other writer)."""
    return file_lock(settings.home / "data.lock")


def init_workspace(settings: Settings) -> bool:
    """Create the git + DVC workspace: a clone of the shared data repository when one is set (the
    first node to use an empty one initialises and pushes it), else a new repository. Returns True
    if created now."""
    ws = settings.workspace
    if (ws / ".dvc").is_dir() and (ws / ".git").is_dir():
        return False
    origin = data_repo.origin(settings)
    if "://" not in settings.remote:
        Path(settings.remote).mkdir(parents=True, exist_ok=True)
    if origin and not (ws / ".git").is_dir():
        ws.parent.mkdir(parents=True, exist_ok=True)
        data_repo.shared_git(settings, "clone", "-q", origin, str(ws))
        data_repo.git(ws, "config", "user.name", "flowops")
        data_repo.git(ws, "config", "user.email", "flowops@localhost")
        if data_repo.git(ws, "for-each-ref", "refs/remotes/origin/main").strip():
            data_repo.git(ws, "checkout", "-q", "-B", "main", "origin/main")  # whatever its HEAD
            data_repo.pin_remote(settings)
            return True
        data_repo.git(ws, "symbolic-ref", "HEAD", "refs/heads/main")  # an empty repository
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".git").is_dir():
        data_repo.git(ws, "init", "-q", "-b", "main")
    data_repo.git(ws, "config", "user.name", "flowops")
    data_repo.git(ws, "config", "user.email", "flowops@localhost")
    data_repo.dvc(settings, "init", "-q", "--force")
    data_repo.dvc(settings, "config", "core.analytics", "false")
    data_repo.dvc(settings, "config", "core.autostage", "true")
    # Versioned for people who clone the repository; FlowOps itself follows the settings.
    data_repo.dvc(settings, "remote", "add", "-d", "-f", data_repo.REMOTE, settings.remote)
    if "endpointurl" in (config := data_repo.remote_config(settings)):
        data_repo.dvc(settings, "remote", "modify", data_repo.REMOTE, "endpointurl", config["endpointurl"])
    data_repo.pin_remote(settings)
    (ws / "README.md").write_text(
        "# FlowOps data workspace\n\nManaged by `flowops data`. Each git tag vN is a data version;\n"
        "`data/` is tracked by DVC and pushed to the remote in `.dvc/config`.\n"
    )
    data_repo.git(ws, "add", "-A")
    data_repo.git(ws, "commit", "-q", "-m", "Initialise FlowOps data workspace")
    if origin:
        try:
            data_repo.shared_git(settings, "push", "-q", "origin", "HEAD:refs/heads/main")
        except ClusterUnavailable:
            shutil.rmtree(ws, ignore_errors=True)  # the next call clones what another node pushed
            raise
    return True


def workspace_status(settings: Settings) -> dict[str, Any]:
    ws = settings.workspace
    healthy = (ws / ".git").is_dir() and (ws / ".dvc").is_dir()
    report: dict[str, Any] = {"healthy": healthy, "path": str(ws), "remote": settings.remote}
    if healthy:
        tags = data_repo.version_tags(settings)
        report["versions"] = len(tags)
        report["latest"] = tags[-1] if tags else None
    return report


# Versions ------------------------------------------------------------------------------------------


def list_versions(settings: Settings) -> list[VersionInfo]:
    if data_repo.origin(settings):  # read the versions from a clone that has every tag
        init_workspace(settings)
        data_repo.shared_git(settings, "fetch", "-q", "--tags", "origin")
    versions = []
    for tag in data_repo.version_tags(settings):
        raw = json.loads(data_repo.git(settings.workspace, "show", f"{tag}:VERSION.json"))
        raw["commit"] = data_repo.git(settings.workspace, "rev-list", "-n", "1", tag).strip()
        versions.append(VersionInfo(**raw))
    return versions


def latest_version(settings: Settings) -> str | None:
    tags = data_repo.version_tags(settings)
    return tags[-1] if tags else None


def resolve_version(settings: Settings, version: str | None) -> str:
    """A version id that exists: the one asked for, or the latest. Clear error otherwise."""
    tags = data_repo.version_tags(settings)
    if not tags:
        raise NotFound("no data version exists yet: run `flowops data init` first")
    if version in (None, "", "latest"):
        return tags[-1]
    if version not in tags:
        shown = ", ".join(tags[-10:])
        raise NotFound(f"data version {version!r} does not exist; existing versions: {shown}")
    return version


def show_version(settings: Settings, version: str | None) -> VersionInfo:
    tag = resolve_version(settings, version)
    for info in list_versions(settings):
        if info.id == tag:
            return info
    raise NotFound(f"data version {tag!r} has no VERSION.json")  # pragma: no cover


@dataclass(eq=False)
class DataVersion:
    """One data version, opened once: its tag, manifest and metadata; its files on first use."""

    settings: Settings
    tag: str
    manifest: pd.DataFrame
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta["classes"]]

    @property
    def image_size(self) -> int:
        """A default model input side (the images themselves keep their own sizes)."""
        return int(self.meta["image_size"])

    @property
    def channels(self) -> int:
        """3 when any image is colour, else 1."""
        return int(self.meta.get("channels", 1))

    @property
    def name(self) -> str:
        """The dataset's name: a model trained on it registers as `<name>-classifier` by default."""
        return str(self.meta.get("name", DEFAULT_NAME))

    @cached_property
    def root(self) -> Path:
        """A local, read-only copy of the version's `data/` folder (fetched once, then cached)."""
        return _fetch(self.settings, self.tag)

    def rows(self, split: str, *, labeled: bool = False) -> pd.DataFrame:
        """The manifest rows of one split (`labeled`: only rows that carry a label)."""
        rows = self.manifest[self.manifest["split"] == split]
        return rows[rows["label"] != ""] if labeled else rows

    def __str__(self) -> str:
        return self.tag


def open_version(settings: Settings, version: str | None = None) -> DataVersion:
    """Resolve a version id (None/'latest' = the newest) once and read its manifest and metadata."""
    tag = resolve_version(settings, version)
    return DataVersion(settings, tag, _parse_manifest(_read_file(settings, tag, "manifest.csv")),
                       json.loads(_read_file(settings, tag, "meta.json")))


def _read_file(settings: Settings, tag: str, name: str) -> str:
    """One file of a version: from its local copy when fetched already, else through DVC's API."""
    local = _cache_path(settings, tag) / name
    if local.exists():
        return local.read_text()
    import dvc.api

    return dvc.api.read(f"{DATA_DIR}/{name}", repo=settings.repo, rev=tag,
                        **data_repo.api_options(settings))


def _parse_manifest(text: str) -> pd.DataFrame:
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise InvalidInput(f"manifest lacks column(s) {missing}; expected {MANIFEST_COLUMNS}")
    return frame


def _cache_path(settings: Settings, tag: str) -> Path:
    return settings.cache_dir / "data" / tag


def materialize(settings: Settings, version: str | None = None) -> Path:
    """A local, read-only copy of a data version's `data/` folder (see `DataVersion.root`)."""
    return _fetch(settings, resolve_version(settings, version))


def _fetch(settings: Settings, tag: str) -> Path:
    """Fetch a version's `data/` folder through DVC's API into the home's cache, once per version;
    safe when several workers ask at once."""
    from dvc.api import DVCFileSystem

    target = _cache_path(settings, tag)
    if (target / "manifest.csv").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=target.parent))
    try:
        fs = DVCFileSystem(url=settings.repo, rev=tag, **data_repo.api_options(settings))
        fs.get(DATA_DIR, str(staging / DATA_DIR), recursive=True)
        try:
            os.rename(staging / DATA_DIR, target)
        except OSError:  # another worker finished first
            if not (target / "manifest.csv").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# Cutting versions -------------------------------------------------------------------------------


def summarize(manifest: pd.DataFrame, classes: list[str]) -> tuple[dict, dict]:
    counts = {s: int((manifest["split"] == s).sum()) for s in sorted(set(manifest["split"]))}
    class_counts: dict[str, dict[str, int]] = {}
    for split, group in manifest.groupby("split"):
        labeled = group[group["label"] != ""]
        class_counts[str(split)] = {
            c: int(n) for c, n in sorted(Counter(labeled["label"]).items(), key=lambda kv: kv[0])
        }
    return counts, class_counts


def write_manifest(path: Path, manifest: pd.DataFrame) -> None:
    """Write a manifest as a new file (a staging copy's files are hard links into the cache)."""
    columns = MANIFEST_COLUMNS + [c for c in manifest.columns if c not in MANIFEST_COLUMNS]
    atomic_write_text(path, manifest[columns].to_csv(index=False))


def cut_version(
    settings: Settings, message: str, apply: Callable[[Path], None], *, base: str | None = "latest"
) -> VersionInfo:
    """Create a new data version: `apply` edits a staging copy of `data/`; all or nothing.

    The staging copy hard-links the current files, so `apply` must replace files (write a new
    file, then rename) rather than modify them in place. If `apply`, DVC or git fails, the
    workspace and the previous versions are left exactly as they were. With a shared data
    repository the cut starts from its newest commit and ends by pushing the commit and the tag
    there (after the data went to the DVC remote): a version is cut everywhere or nowhere.
    """
    ws = settings.workspace
    if not (ws / ".dvc").is_dir():
        init_workspace(settings)
    origin = data_repo.origin(settings)
    with data_lock(settings):
        data_repo.pin_remote(settings)
        if origin:
            data_repo.shared_git(settings, "fetch", "-q", "--tags", "origin")
            data_repo.git(ws, "checkout", "-q", "main")
            data_repo.git(ws, "reset", "-q", "--hard", "origin/main")
        parent = latest_version(settings) if base else None
        if parent:
            data_repo.git(ws, "checkout", "-q", "main")
            data_repo.git(ws, "reset", "-q", "--hard", parent)
            # A clone's cache may lack the parent's files (another node cut it): pull them.
            data_repo.dvc(settings, "pull" if origin else "checkout", "-q", "--force",
                          f"{DATA_DIR}.dvc")
        head = data_repo.git(ws, "rev-parse", "HEAD").strip()
        current = ws / DATA_DIR
        staging = ws / f".{DATA_DIR}.staging"
        backup = ws / f".{DATA_DIR}.previous"
        for leftover in (staging, backup):
            shutil.rmtree(leftover, ignore_errors=True)
        if parent and current.is_dir():
            shutil.copytree(current, staging, copy_function=os.link)
        else:
            staging.mkdir()
        try:
            apply(staging)
            meta = json.loads((staging / "meta.json").read_text())
            manifest = _parse_manifest((staging / "manifest.csv").read_text())
        except FlowOpsError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise FlowOpsError(f"could not build the new data version: {exc}") from exc

        tags = data_repo.version_tags(settings)
        new_id = f"v{int(tags[-1][1:]) + 1 if tags else 1}"
        counts, class_counts = summarize(manifest, meta["classes"])
        info = VersionInfo(
            id=new_id, created=time.time(), message=message, parent=parent,
            counts=counts, class_counts=class_counts, classes=list(meta["classes"]),
            name=str(meta.get("name", DEFAULT_NAME)), rejected=int(meta.get("rejected", 0)),
        )
        if current.exists():
            os.rename(current, backup)
        os.rename(staging, current)
        try:
            data_repo.dvc(settings, "add", "-q", DATA_DIR)
            (ws / "VERSION.json").write_text(json.dumps(info.to_dict(), indent=2))
            data_repo.git(ws, "add", "-A")
            data_repo.git(ws, "commit", "-q", "-m", f"{new_id}: {message}")
            data_repo.push_data(settings, new_id)
            data_repo.git(ws, "tag", new_id)
            if origin:
                data_repo.push_tag(settings, new_id)
        except Exception:
            shutil.rmtree(current, ignore_errors=True)
            if backup.exists():
                os.rename(backup, current)
            if new_id in data_repo.git(ws, "tag", "--list", new_id).split():
                data_repo.git(ws, "tag", "-d", new_id)
            data_repo.git(ws, "reset", "-q", "--hard", head)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        info.commit = data_repo.git(ws, "rev-parse", "HEAD").strip()
        return info


# New datasets: the default digits or a user's image folder (read by data_import) ---------------


def init_dataset(
    settings: Settings,
    from_dir: Path | None = None,
    *,
    unlabeled_dir: Path | None = None,
    name: str | None = None,
    unlabeled_fraction: float | None = None,
    holdout_fraction: float = 0.2,
    image_size: int | None = None,
    seed: int = 0,
) -> VersionInfo:
    """Write the default dataset (or a user's image folder) as a new data version.

    `unlabeled_fraction` hides that share of the labeled training images' labels (kept in
    answers.csv for simulated labelers); default 0.75 for digits (the demo labels them), 0 for a
    folder, whose unlabeled pool comes from `unlabeled_dir`. Files of a folder that do not decode
    are skipped and listed in the version's errors.csv (`VersionInfo.rejected` counts them).
    """
    from flowops import data_import

    if unlabeled_fraction is None:
        unlabeled_fraction = 0.75 if from_dir is None else 0.0
    if not 0 < holdout_fraction < 0.9:
        raise InvalidInput(f"--holdout-fraction {holdout_fraction} is outside (0, 0.9)")
    if not 0 <= unlabeled_fraction < 0.95:
        raise InvalidInput(f"--unlabeled-fraction {unlabeled_fraction} is outside [0, 0.95)")
    if image_size is not None and not 4 <= image_size <= 512:
        raise InvalidInput(f"--image-size {image_size} is outside 4-512")
    if from_dir is None:
        if unlabeled_dir is not None or name is not None:
            raise InvalidInput("--unlabeled and --name need --from (the digits default is 'digits')")
        dataset = data_import.digits(unlabeled_fraction, holdout_fraction, seed)
        if image_size is not None:
            dataset.meta["image_size"] = image_size
    else:
        dataset = data_import.image_folder(
            Path(from_dir).expanduser().resolve(),
            unlabeled_dir=Path(unlabeled_dir).expanduser().resolve() if unlabeled_dir else None,
            name=name, unlabeled_fraction=unlabeled_fraction, holdout_fraction=holdout_fraction,
            seed=seed, image_size=image_size,
        )

    def write(staging: Path) -> None:
        for old in staging.iterdir():  # a fresh dataset replaces the previous content entirely
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        rows, answers = [], []
        for item in dataset.items:
            if item.split == "unlabeled":
                rel = f"images/unlabeled/{item.id}{item.suffix}"
                label, label_source = "", ""
                if item.hidden:
                    answers.append({"id": item.id, "label": item.label})
            else:
                rel = f"images/{item.split}/{item.label}/{item.id}{item.suffix}"
                label, label_source = item.label, "original"
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if item.path is not None:
                shutil.copyfile(item.path, dest)  # the original bytes, never re-encoded
            else:
                dest.write_bytes(item.data or b"")
            rows.append({"id": item.id, "path": rel, "label": label, "split": item.split,
                         "source": item.source, "label_source": label_source})
        write_manifest(staging / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
        pd.DataFrame(answers, columns=["id", "label"]).to_csv(staging / "answers.csv", index=False)
        if from_dir is not None:
            pd.DataFrame(dataset.rejected, columns=["path", "reason"]).to_csv(
                staging / ERRORS_FILE, index=False)
        (staging / "meta.json").write_text(json.dumps(dataset.meta, indent=2))

    source = "scikit-learn digits" if from_dir is None else f"image folder {from_dir}"
    return cut_version(settings, f"dataset from {source}", write, base=None)
