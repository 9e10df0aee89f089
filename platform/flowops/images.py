"""A data version's images, whatever its layout, as every workload reads them.

Training, pseudo-labeling, drift, data checks and evaluation all open images here, so none of
them cares whether a version keeps its images as Parquet shards in the storage URI (read by Ray
tasks straight from the store on whichever node they run) or as files in a folder version (read
once by the driver, which has the version's files, and handed to Ray through the object store:
a worker never opens a path on the head's disk).

    ds = images.dataset(settings, version, version.rows("train", labeled=True))
    # a ray.data.Dataset of (id, label, split, bytes)
    for image_id, payload in images.iter_bytes(settings, version, ids):  # no Ray
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from flowops import data, shards, storage
from flowops.errors import InvalidInput
from flowops.settings import Settings

COLUMNS = ("id", "label", "split", "bytes")
FOLDER_BLOCK_ROWS = 1000  # images per block of a folder version (one object-store block each)


def select(version: data.DataVersion, splits: Iterable[str] | None = None, *,
           labeled: bool = False) -> pd.DataFrame:
    """The manifest rows of some splits (None: all), only labeled ones if asked."""
    rows = version.manifest
    if splits is not None:
        rows = rows[rows["split"].isin(list(splits))]
    return rows[rows["label"] != ""] if labeled else rows


def dataset(settings: Settings, version: data.DataVersion, rows: pd.DataFrame | None = None) -> Any:
    """`rows` of the version's manifest (default: all; their `label` column may be replaced, e.g.
    by pseudo-labels) as a Ray Dataset of (id, label, split, bytes), in no guaranteed order."""
    import ray

    rows = version.manifest if rows is None else rows
    if rows.empty:
        raise InvalidInput(f"data version {version.tag}: no image selected to read")
    unknown = set(rows["id"]) - set(version.manifest["id"])
    if unknown:
        raise InvalidInput(f"image(s) {sorted(unknown)[:3]} are not in data version {version.tag}")
    if shards.is_sharded(version):
        if "shard" not in rows.columns:
            rows = rows.merge(version.manifest[["id", "shard"]], on="id", how="left")
        return shards.read_rows(rows, storage.open_storage(settings, "read images"))
    return ray.data.from_arrow(list(_folder_blocks(version, rows)))


def _folder_blocks(version: data.DataVersion, rows: pd.DataFrame) -> Iterator[Any]:
    """pyarrow tables of a folder version's files, read on this (the driver's) node."""
    import pyarrow as pa

    if "path" not in rows.columns or (rows["path"] == "").any():
        rows = rows.drop(columns=["path"], errors="ignore").merge(
            version.manifest[["id", "path"]], on="id", how="left")
    root = version.root
    for start in range(0, len(rows), FOLDER_BLOCK_ROWS):
        chunk = rows.iloc[start:start + FOLDER_BLOCK_ROWS]
        yield pa.table({"id": pa.array(chunk["id"].tolist(), pa.string()),
                        "label": pa.array(chunk["label"].tolist(), pa.string()),
                        "split": pa.array(chunk["split"].tolist(), pa.string()),
                        "bytes": pa.array([_read_file(root, p) for p in chunk["path"]], pa.binary())})


def _read_file(root: Path, rel: str) -> bytes:
    try:
        return (root / rel).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"image file {rel} of the data version cannot be read: "
                           f"{exc.strerror or exc}") from None


def iter_bytes(settings: Settings, version: data.DataVersion, ids: Iterable[str]
               ) -> Iterator[tuple[str, bytes]]:
    """(id, original bytes) of the asked images without Ray: each shard read and verified once,
    or the folder version's files."""
    if shards.is_sharded(version):
        yield from shards.iter_images(version, ids, storage.open_storage(settings, "read images"))
        return
    wanted = version.manifest[version.manifest["id"].isin(set(ids))]
    root = version.root
    for image_id, rel in zip(wanted["id"], wanted["path"], strict=True):
        yield image_id, _read_file(root, rel)
