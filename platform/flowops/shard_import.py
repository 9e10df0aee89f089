"""`flowops data import` and `flowops data migrate`: images into Parquet shards, as a new version.

An import reads a folder or a bucket prefix laid out as an image folder (one sub-folder per class;
an optional second source of unlabeled images), decodes every file once to check it (through
data_import, as `data init --from` does), and writes the files' original bytes into shards in the
storage URI (flowops.shards), a few thousand per shard. A file that does not decode goes to the
version's errors.csv with its path and the reason, never fails the import.

Resumable: the files are cut into shards in a fixed order, so the same files make the same shard,
with the same content hash for a name. Each finished shard is appended to a journal in the home
folder (`imports/<key>.jsonl`, fsynced); a rerun after an interrupt skips the shards the journal
lists and, for one written but not yet journaled, finds it in storage by its name. The version is
cut (data.cut_version: git tag + DVC) only once every shard is stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flowops import data, data_import, data_repo, shards, storage
from flowops.durable import append_jsonl, read_jsonl
from flowops.errors import InvalidInput
from flowops.settings import Settings

SHARD_IMAGES = 2000
SHARD_BYTES = 128 * 2**20  # a shard is built in memory before it is stored
READ_THREADS = 8  # reading and decoding release the GIL; object stores like parallel GETs

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclass
class _File:
    id: str
    source: str  # path relative to the source root (the shard's `source`)
    fs: Any  # the pyarrow filesystem it is read from
    path: str  # its path there
    shown: str  # its path or URI in messages and the errors report
    size: int
    label: str  # its class; "" in the unlabeled pool


@dataclass
class ImportResult:
    """What an import or a migration did."""

    version: str
    images: int
    shards: int
    written: int  # shards stored by this run
    reused: int  # shards found done (journal) or already in storage
    rejected: int
    counts: dict[str, int]
    storage: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Import -----------------------------------------------------------------------------------------


def import_images(
    settings: Settings, source: str, *, unlabeled: str | None = None, name: str | None = None,
    holdout_fraction: float = 0.2, unlabeled_fraction: float = 0.0, seed: int = 0,
    image_size: int | None = None, images_per_shard: int = SHARD_IMAGES,
    progress: Progress | None = None,
) -> ImportResult:
    """Import an image folder (a local folder or a filesystem URI such as s3://bucket/prefix) into
    shards as a new sharded data version."""
    _check_options(holdout_fraction, unlabeled_fraction, image_size, images_per_shard)
    store = storage.check(settings, "data import")
    data_repo.check_remote(settings, "data import")
    suffixes = data_import.readable_suffixes()
    rejected: list[tuple[str, str]] = []
    fs, root, shown = _open_source(settings, source, "source")
    labeled = _walk(fs, root, shown, suffixes, rejected, classes=True)
    _check_classes(labeled, shown, "")
    pool: list[_File] = []
    if unlabeled is not None:
        ufs, uroot, ushown = _open_source(settings, unlabeled, "--unlabeled")
        pool = _walk(ufs, uroot, ushown, suffixes, rejected, classes=False)
    files = _with_ids(labeled, pool, seed)

    key = hashlib.sha256(json.dumps([store.uri, images_per_shard, [
        (f.id, f.path, f.size) for f in files]]).encode()).hexdigest()[:20]
    journal = settings.home / "imports" / f"{key}.jsonl"
    done = _store_shards(store, files, images_per_shard, journal, rejected, progress, decode=True)
    accepted = {img[0]: (img, record["shard"]) for record in done for img in record["images"]}
    ok_labeled = [f for f in labeled if f.id in accepted]
    _check_classes(ok_labeled, shown, "readable ")
    split_of = data_import.split_indices([f.label for f in ok_labeled], holdout_fraction,
                                         unlabeled_fraction, seed)
    rows, answers = [], []
    for i, f in enumerate(ok_labeled):
        split = split_of[i]
        if split == "unlabeled":
            answers.append({"id": f.id, "label": f.label})
        rows.append(_row(f.id, "" if split == "unlabeled" else f.label, split,
                         accepted[f.id][1]))
    rows += [_row(f.id, "", "unlabeled", accepted[f.id][1]) for f in pool if f.id in accepted]
    probes = [data_import.Probe(bool(img[1]), img[2], img[3]) for img, _ in accepted.values()]
    meta = {"name": data_import.dataset_name(name, Path(root)),
            "classes": sorted({f.label for f in labeled}),
            **data_import.facts(probes, image_size), "rejected": len(rejected), "source": shown,
            "layout": shards.LAYOUT, "storage": store.display}
    if unlabeled is not None:
        meta["unlabeled_source"] = ushown
    manifest = pd.DataFrame(rows, columns=shards.MANIFEST_COLUMNS)
    info = _cut(settings, f"dataset imported from {shown} into shards", manifest, meta,
                {"answers.csv": pd.DataFrame(answers, columns=["id", "label"]),
                 data.ERRORS_FILE: pd.DataFrame(rejected, columns=["path", "reason"])}, store, done)
    journal.unlink(missing_ok=True)
    return _result(info, len(manifest), done, len(rejected), store)


def _check_options(holdout: float, unlabeled: float, image_size: int | None, per_shard: int) -> None:
    if not 0 < holdout < 0.9:
        raise InvalidInput(f"--holdout-fraction {holdout} is outside (0, 0.9)")
    if not 0 <= unlabeled < 0.95:
        raise InvalidInput(f"--unlabeled-fraction {unlabeled} is outside [0, 0.95)")
    if image_size is not None and not 4 <= image_size <= 512:
        raise InvalidInput(f"--image-size {image_size} is outside 4-512")
    if not 1 <= per_shard <= 100_000:
        raise InvalidInput(f"--images-per-shard {per_shard} is outside 1-100000")


def _open_source(settings: Settings, source: str, what: str) -> tuple[Any, str, str]:
    """(filesystem, root, the root as shown in messages) of a folder or a filesystem URI."""
    if "://" not in source:
        path = Path(source).expanduser().resolve()
        if not path.is_dir():
            raise InvalidInput(f"{what} {source}: not a folder")
        source = str(path)
    try:
        fs, root = storage.filesystem_for(source, settings.storage_endpoint_url)
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"{what} {storage.mask(source)}: not a folder or filesystem URI: "
                           f"{exc}") from None
    return fs, root, storage.mask(source).rstrip("/")


def _walk(fs: Any, root: str, shown: str, suffixes: set[str], rejected: list[tuple[str, str]],
          *, classes: bool) -> list[_File]:
    """The image files under `root` in path order (hidden files and folders ignored). With
    `classes`, a file's class is its first folder below the root."""
    from pyarrow import fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        raise InvalidInput(f"{shown}: no such folder or prefix") from None
    except OSError as exc:
        raise storage.StorageUnavailable(f"data import: {shown} cannot be listed: "
                                         f"{str(exc).splitlines()[0][:300]}") from None
    found = []
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = info.path[len(root):].lstrip("/")
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        suffix = Path(rel).suffix.lower()
        if classes and len(parts) == 1:
            if suffix in suffixes:
                rejected.append((f"{shown}/{rel}", "outside the class sub-folders"))
            continue
        if suffix not in suffixes:
            rejected.append((f"{shown}/{rel}", f"not an image file type ({suffix or 'no extension'})"))
            continue
        found.append(_File("", rel, fs, info.path, f"{shown}/{rel}", int(info.size or 0),
                           parts[0] if classes else ""))
    return found


def _check_classes(files: list[_File], shown: str, readable: str) -> None:
    per_class = Counter(f.label for f in files)
    if len(per_class) < 2:
        raise InvalidInput(f"{shown}: expected an image-folder layout (one sub-folder per class, at "
                           f"least 2) with {readable}images, found {len(per_class)} class(es)")
    too_few = sorted(c for c, n in per_class.items() if n < data_import.MIN_PER_CLASS)
    if too_few:
        raise InvalidInput(f"{shown}: every class needs at least {data_import.MIN_PER_CLASS} "
                           f"{readable}images; too few in: "
                           f"{', '.join(f'{c} ({per_class[c]})' for c in too_few)}")


def _with_ids(labeled: list[_File], pool: list[_File], seed: int) -> list[_File]:
    """Ids in a seeded random order, so that an id never hints at the class of a hidden label."""
    import numpy as np

    width = max(6, len(str(len(labeled) + len(pool))))
    order = np.random.default_rng(seed).permutation(len(labeled))
    for f, n in zip(labeled, order, strict=True):
        f.id = f"u{int(n):0{width}d}"
    for i, f in enumerate(pool):
        f.id = f"u{len(labeled) + i:0{width}d}"
    return labeled + pool


# Shards: the resumable part ---------------------------------------------------------------------


def _chunks(files: list[_File], per_shard: int) -> list[list[_File]]:
    """Files in their fixed order, cut at `per_shard` images or SHARD_BYTES."""
    chunks: list[list[_File]] = [[]]
    size = 0
    for f in files:
        if chunks[-1] and (len(chunks[-1]) >= per_shard or size + f.size > SHARD_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(f)
        size += f.size
    return [c for c in chunks if c]


def _store_shards(store: storage.Storage, files: list[_File], per_shard: int,
                  journal: Path, rejected: list[tuple[str, str]], progress: Progress | None, *,
                  decode: bool) -> list[dict[str, Any]]:
    """Every chunk of `files` as a stored shard; the journal records (chunk, shard, images with
    sha256 and the probe, rejected files) of each. Returns the records, journaled ones included."""
    chunks = _chunks(files, per_shard)
    records = {r["chunk"]: r for r in read_jsonl(journal) if r.get("chunk", -1) < len(chunks)}
    for record in records.values():
        record["reused"] = True
    total, done = len(files), sum(len(chunks[k]) for k in records)
    if progress:
        progress(done, total)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for k, chunk in enumerate(chunks):
            if k in records:
                continue
            loaded = pool.map(lambda f: _load(f, decode), chunk)
            rows, images, bad = [], [], []
            for f, (payload, probe) in zip(chunk, loaded, strict=True):
                if isinstance(probe, str):
                    bad.append([f.shown, probe])
                    continue
                rows.append((f.id, f.source, payload))
                images.append([f.id, int(probe.colour), probe.width, probe.height])
            record: dict[str, Any] = {"chunk": k, "shard": None, "rows": len(rows), "bytes": 0,
                                      "images": images, "rejected": bad}
            if rows:
                name, blob = shards.encode_shard(rows)
                record["reused"] = not shards.put_shard(store, name, blob)
                record.update(shard=name, bytes=len(blob))
            append_jsonl(journal, record)
            records[k] = record
            done += len(chunk)
            if progress:
                progress(done, total)
    ordered = [records[k] for k in sorted(records)]
    for record in ordered:
        rejected += [tuple(r) for r in record["rejected"]]
    return [r for r in ordered if r["shard"]]


def _load(f: _File, decode: bool) -> tuple[bytes, Any]:
    """A file's bytes and its probe (or the reason it is rejected)."""
    try:
        with f.fs.open_input_stream(f.path) as stream:
            payload = stream.read()
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        return b"", f"cannot read: {type(exc).__name__}"
    if not decode:
        return payload, data_import.Probe(False, 0, 0)
    return payload, data_import.probe(io.BytesIO(payload))


# The version ------------------------------------------------------------------------------------


def _row(image_id: str, label: str, split: str, shard: str) -> dict[str, str]:
    return {"id": image_id, "path": "", "label": label, "split": split, "source": "folder",
            "label_source": "original" if label else "", "shard": shard}


def _cut(settings: Settings, message: str, manifest: pd.DataFrame, meta: dict[str, Any],
         extra: dict[str, pd.DataFrame], store: storage.Storage,
         records: list[dict[str, Any]]) -> data.VersionInfo:
    """Record the shards in the index, then cut the version: manifest, meta.json and the extra
    CSV files replace the `data/` folder (git tag + DVC push)."""
    shards.write_index(store, [{"shard": r["shard"], "rows": r["rows"], "bytes": r["bytes"]}
                               for r in records])

    def write(staging: Path) -> None:
        for old in staging.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        shards.write_manifest(staging / "manifest.csv", manifest)
        for file_name, frame in extra.items():
            frame.to_csv(staging / file_name, index=False)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))

    return data.cut_version(settings, message, write, base=None)


def _result(info: data.VersionInfo, images: int, records: list[dict[str, Any]], rejected: int,
            store: storage.Storage) -> ImportResult:
    reused = sum(1 for r in records if r.get("reused"))
    return ImportResult(version=info.id, images=images, shards=len(records),
                        written=len(records) - reused, reused=reused, rejected=rejected,
                        counts=info.counts, storage=store.display)


# Migrate a folder version -----------------------------------------------------------------------


def migrate_version(settings: Settings, version: str | None = None, *,
                    images_per_shard: int = SHARD_IMAGES,
                    progress: Progress | None = None) -> ImportResult:
    """A folder data version's images into shards, as a new version with the same ids, labels,
    splits and side files (answers, pseudo-labels, errors). Resumable as an import is."""
    from pyarrow import fs as pafs

    _check_options(0.2, 0.0, None, images_per_shard)
    store = storage.check(settings, "data migrate")
    data_repo.check_remote(settings, "data migrate")
    opened = data.open_version(settings, version)
    if shards.is_sharded(opened):
        raise InvalidInput(f"data version {opened.tag} is already stored as shards")
    root = opened.root
    manifest = opened.manifest
    local = pafs.LocalFileSystem()
    files = [_File(r.id, r.path, local, str(root / r.path), r.path, 0, r.label)
             for r in manifest.itertuples()]
    journal = settings.home / "imports" / f"migrate-{opened.tag}-{images_per_shard}.jsonl"
    rejected: list[tuple[str, str]] = []
    done = _store_shards(store, files, images_per_shard, journal, rejected, progress, decode=False)
    if rejected:
        raise InvalidInput(f"data version {opened.tag} lacks {len(rejected)} image file(s), "
                           f"e.g. {rejected[0][0]}: {rejected[0][1]}")
    shard_of = {img[0]: record["shard"] for record in done for img in record["images"]}
    migrated = manifest.assign(path="", shard=manifest["id"].map(shard_of))
    extra = {p.name: pd.read_csv(p, dtype=str, keep_default_na=False)
             for p in sorted(root.glob("*.csv")) if p.name != "manifest.csv"}
    meta = {**opened.meta, "layout": shards.LAYOUT, "storage": store.display}
    info = _cut(settings, f"{opened.tag} migrated to shards", migrated, meta, extra, store, done)
    journal.unlink(missing_ok=True)
    return _result(info, len(migrated), done, 0, store)
