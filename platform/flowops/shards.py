"""Images stored once, immutably, as Parquet shards in the storage URI; a data version is a small
manifest over them.

Layout under the storage URI (see flowops.storage):

    images/<sha256>.parquet        a shard: id, source (the original relative path or URI), bytes
                                   (the original encoded file), sha256 (of those bytes); a few
                                   thousand images. Its name is the SHA-256 of the file, so a shard
                                   is never rewritten and every read can verify it.
    images/index/<sha256>.csv      a shard index: shard, rows, bytes, one file per import, itself
                                   named by its content (several importers never overwrite each
                                   other's entries)

A sharded data version's `data/` folder (DVC-versioned as every version is) holds only
`manifest.csv` (the usual columns plus `shard`; `path` is empty), meta.json (`layout: shards`),
answers.csv and errors.csv: a label snapshot rewrites that manifest and nothing else, so cutting
one costs the same at 10^3 and 10^7 images.

Reading a shard checks its SHA-256 against its name: a damaged shard is named and the version
refused (StorageUnavailable, exit 5), never silently read. `read_version` opens a version as a Ray
Dataset whose tasks read the shards straight from the storage URI on whichever node they run.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from flowops import data
from flowops.durable import atomic_write_text
from flowops.errors import InvalidInput
from flowops.settings import Settings
from flowops.storage import Storage, StorageUnavailable

IMAGES = "images"
INDEX = f"{IMAGES}/index"
MANIFEST_COLUMNS = [*data.MANIFEST_COLUMNS, "shard"]
INDEX_COLUMNS = ["shard", "rows", "bytes"]
LAYOUT = "shards"  # meta.json's `layout` of a sharded version
READ_COLUMNS = ("id", "label", "split", "bytes")


def shard_path(shard: str) -> str:
    return f"{IMAGES}/{shard}.parquet"


# Writing shards --------------------------------------------------------------------------------


def encode_shard(rows: list[tuple[str, str, bytes]]) -> tuple[str, bytes]:
    """(name, Parquet bytes) of a shard of (id, source, bytes) rows. The same rows give the same
    bytes, hence the same name: an interrupted import finds what it already wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "source": pa.array([r[1] for r in rows], pa.string()),
        "bytes": pa.array([r[2] for r in rows], pa.binary()),
        "sha256": pa.array([hashlib.sha256(r[2]).hexdigest() for r in rows], pa.string()),
    })
    buf = io.BytesIO()
    # Encoded images do not compress: only the small columns are.
    pq.write_table(table, buf, compression={"id": "zstd", "source": "zstd", "bytes": "none",
                                            "sha256": "zstd"})
    payload = buf.getvalue()
    return hashlib.sha256(payload).hexdigest(), payload


def put_shard(storage: Storage, name: str, payload: bytes) -> bool:
    """Store a shard unless a shard of that name (hence those bytes) is there. True if written."""
    if storage.size(shard_path(name)) == len(payload):
        return False
    storage.write_bytes(shard_path(name), payload)
    return True


def write_index(storage: Storage, entries: list[dict[str, Any]]) -> str:
    """Record shards (shard, rows, bytes) in a new index file named by its content."""
    text = pd.DataFrame(entries, columns=INDEX_COLUMNS).to_csv(index=False)
    name = hashlib.sha256(text.encode()).hexdigest()
    storage.write_bytes(f"{INDEX}/{name}.csv", text.encode())
    return name


def read_index(storage: Storage) -> pd.DataFrame:
    """Every shard recorded by any import: shard, rows, bytes (one row per shard)."""
    frames = [pd.read_csv(io.BytesIO(storage.read_bytes(rel)), dtype={"shard": str})
              for rel in storage.list(INDEX) if rel.endswith(".csv")]
    if not frames:
        return pd.DataFrame(columns=INDEX_COLUMNS)
    return pd.concat(frames).drop_duplicates("shard").reset_index(drop=True)


# Reading shards --------------------------------------------------------------------------------


def read_shard(storage: Storage, shard: str, ids: Iterable[str] | None = None,
               columns: Iterable[str] = ("id", "source", "bytes", "sha256")) -> Any:
    """A shard's rows (those of `ids` only, when given) as a pyarrow Table, after checking the
    file's SHA-256 against its name."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rel = shard_path(shard)
    try:
        payload = storage.read_bytes(rel)
    except FileNotFoundError:
        raise StorageUnavailable(f"shard {storage.url(rel)} is missing: the version is refused") \
            from None
    except OSError as exc:
        raise StorageUnavailable(f"shard {storage.url(rel)} cannot be read: {exc}") from None
    if hashlib.sha256(payload).hexdigest() != shard:
        raise StorageUnavailable(f"shard {storage.url(rel)} fails its checksum (its SHA-256 is not "
                                 f"its name): the version is refused")
    table = pq.read_table(pa.BufferReader(payload), columns=list(columns))
    if ids is not None:
        table = table.filter(pc.is_in(table["id"], value_set=pa.array(list(ids), pa.string())))
    return table


def iter_images(version: data.DataVersion, ids: Iterable[str], storage: Storage,
                ) -> Iterator[tuple[str, bytes]]:
    """(id, original bytes) of the asked images, each shard read (and verified) once."""
    wanted = version.manifest[version.manifest["id"].isin(set(ids))]
    for shard, group in wanted.groupby("shard", sort=True):
        table = read_shard(storage, str(shard), group["id"], columns=("id", "bytes"))
        yield from zip(table["id"].to_pylist(), table["bytes"].to_pylist(), strict=True)


def verify_version(version: data.DataVersion, storage: Storage, threads: int = 8) -> int:
    """Read every shard of a version and check its SHA-256; the number of shards checked."""
    names = sorted(set(version.manifest["shard"]))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda s: read_shard(storage, s, columns=("id",)), names))
    return len(names)


def read_version(version: data.DataVersion, storage: Storage, *, splits: Iterable[str] | None = None,
                 labeled: bool = False) -> Any:
    """The version's images as a Ray Dataset of (id, label, split, bytes), streamed.

    One read task per shard, run on whichever node Ray picks: it reads the shard from the storage
    URI (never the driver's disk), verifies it, keeps the version's ids and joins their labels.
    Only the shards the version (or the asked splits) references are read."""
    rows = version.manifest
    if splits is not None:
        rows = rows[rows["split"].isin(list(splits))]
    if labeled:
        rows = rows[rows["label"] != ""]
    if rows.empty:
        raise InvalidInput(f"data version {version.tag} has no image to read for splits "
                           f"{sorted(splits) if splits is not None else 'all'}")
    return read_rows(rows, storage)


def read_rows(rows: pd.DataFrame, storage: Storage) -> Any:
    """Manifest rows (id, label, split, shard; any labels, e.g. pseudo-labels) as a Ray Dataset of
    (id, label, split, bytes): one read task per shard, on whichever node Ray picks."""
    import ray

    tasks = [{"shard": str(shard), "ids": group["id"].tolist(), "labels": group["label"].tolist(),
              "splits": group["split"].tolist()} for shard, group in rows.groupby("shard", sort=True)]
    reader = _ShardReader(storage)
    return ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
        reader, batch_size=1, batch_format="pyarrow")


class _ShardReader:
    """A Ray Data map: one task item (a shard and the version's rows in it) -> those images."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        item = batch.to_pylist()[0]
        table = read_shard(self.storage, item["shard"], item["ids"], columns=("id", "bytes"))
        order = {image: i for i, image in enumerate(item["ids"])}
        at = [order[i] for i in table["id"].to_pylist()]
        if len(at) != len(order):
            missing = sorted(set(order) - set(table["id"].to_pylist()))[:3]
            raise StorageUnavailable(f"shard {self.storage.url(shard_path(item['shard']))} lacks "
                                     f"image(s) {missing} of the version: the version is refused")
        return pa.table({"id": table["id"],
                         "label": pa.array([item["labels"][i] for i in at], pa.string()),
                         "split": pa.array([item["splits"][i] for i in at], pa.string()),
                         "bytes": table["bytes"]})


# Manifests (the data version) ------------------------------------------------------------------


def is_sharded(version: data.DataVersion) -> bool:
    return version.meta.get("layout") == LAYOUT


def open_manifest(settings: Settings, version: str | None = None) -> data.DataVersion:
    """A sharded data version (None/'latest' = the newest); a folder version is a clear error."""
    opened = data.open_version(settings, version)
    if not is_sharded(opened) or "shard" not in opened.manifest.columns:
        raise InvalidInput(f"data version {opened.tag} keeps its images as files, not shards: "
                           f"convert it with `flowops data migrate {opened.tag}`")
    return opened


def write_manifest(path: Path, manifest: pd.DataFrame) -> None:
    """Write a sharded version's manifest.csv (every row names its shard)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise InvalidInput(f"manifest lacks column(s) {missing}; expected {MANIFEST_COLUMNS}")
    if (manifest["shard"] == "").any():
        raise InvalidInput(f"{int((manifest['shard'] == '').sum())} manifest row(s) name no shard")
    data.write_manifest(path, manifest)


def check_shards_present(manifest: pd.DataFrame, storage: Storage) -> None:
    """Every shard a manifest names exists with the size its index recorded (cheap: metadata
    only, so a cut stays flat in dataset size); the full checksum is checked on every read."""
    index = read_index(storage).set_index("shard")["bytes"].to_dict()
    for shard in sorted(set(manifest["shard"])):
        size = storage.size(shard_path(shard))
        if size is None:
            raise StorageUnavailable(f"shard {storage.url(shard_path(shard))} is missing: "
                                     f"nothing cut")
        if shard in index and int(index[shard]) != size:
            raise StorageUnavailable(f"shard {storage.url(shard_path(shard))} has {size} bytes, "
                                     f"its index says {index[shard]}: nothing cut")


def apply_labels(chosen: dict[str, str], storage: Storage) -> Callable[[Path], None]:
    """cut_version's edit for a sharded version: labeled images move to train (label_source
    human) in the manifest; their answers and pseudo-labels are dropped. No image is touched."""

    def apply(staging: Path) -> None:
        meta = json.loads((staging / "meta.json").read_text())
        if meta.get("layout") != LAYOUT:
            raise InvalidInput("the latest data version keeps its images as files, not shards: "
                               "convert it with `flowops data migrate`")
        classes = [str(c) for c in meta["classes"]]
        manifest = pd.read_csv(staging / "manifest.csv", dtype=str, keep_default_na=False)
        known = set(manifest["id"])
        unknown = [i for i in chosen if i not in known]
        if unknown:
            raise InvalidInput(f"labeled image(s) not in the data version: {unknown[:5]}")
        bad = sorted({label for label in chosen.values() if label not in classes})
        if bad:
            raise InvalidInput(f"label(s) {bad} are not classes: {classes}")
        labels = manifest["id"].map(chosen)
        hit = labels.notna() & (manifest["split"] != "holdout")  # never relabel the evaluation set
        manifest.loc[hit, "label"] = labels[hit]
        manifest.loc[hit, "split"] = "train"
        manifest.loc[hit, "label_source"] = "human"
        check_shards_present(manifest, storage)
        write_manifest(staging / "manifest.csv", manifest)
        for name in ("answers.csv", "pseudo_labels.csv"):
            path = staging / name
            if path.exists():
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
                atomic_write_text(path, frame[~frame["id"].isin(list(chosen))].to_csv(index=False))

    return apply


def cut_labels(settings: Settings, chosen: dict[str, str], message: str,
               storage: Storage) -> data.VersionInfo:
    """A label snapshot of the latest (sharded) version: a new version whose manifest carries the
    labels; the shards are not read, copied or rewritten."""
    return data.cut_version(settings, message, apply_labels(chosen, storage))
