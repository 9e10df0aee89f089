"""Synthetic pools for scale tests: augmented copies of a data version's images as a new version.

`flowops data synth --count N` draws N images of the base version (any pool), applies a random
shift, rotation and pixel noise to each, and adds them to the **unlabeled** pool of a new data
version (`source=synth`). Their true labels go to `answers.csv`, like every unlabeled image, so
simulated labelers and the benchmark's accuracy check can use them.

The base version's images are read where they are (`flowops.images`). The new images follow the
base version's layout: one small PNG per image under `images/synth/<folder>/<id>.png` (1,000 per
folder) in a folder version; new Parquet shards in the storage URI for a sharded version (its
existing shards untouched).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from flowops import data, images, shards, storage
from flowops.durable import atomic_write_text
from flowops.errors import InvalidInput
from flowops.settings import Settings

SHARD = 1000  # images per folder of a folder version
SHARDED_IMAGES = 2000  # images per Parquet shard of a sharded version


class SynthConfig(BaseModel):
    """How many augmented copies to make, and how strongly to augment them."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=1, le=2_000_000, description="Number of synthetic images.")
    data_version: str | None = Field(None, description="Base data version (default: latest).")
    seed: int = Field(0, description="Seed of the augmentations.")
    max_shift: float = Field(0.125, ge=0, le=0.5, description="Largest shift, share of the side.")
    max_rotation: float = Field(15.0, ge=0, le=180, description="Largest rotation in degrees.")
    noise: float = Field(8.0, ge=0, le=128, description="Std of Gaussian pixel noise (0-255 scale).")


def augment(pixels: np.ndarray, rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """One uint8 grayscale image -> a randomly shifted, rotated, noisy uint8 copy."""
    from PIL import Image

    size = pixels.shape[0]
    img = Image.fromarray(pixels, mode="L")
    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    shift = max(1, round(cfg.max_shift * size)) if cfg.max_shift > 0 else 0
    dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2)) if shift else (0, 0)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy), fillcolor=0)
    out = np.asarray(img, dtype=np.float32)
    if cfg.noise > 0:
        out = out + rng.normal(0.0, cfg.noise, size=out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _sources(version: data.DataVersion) -> tuple[list[np.ndarray], list[str]]:
    """Every image of the version that has a known label (manifest label or answers.csv)."""
    from PIL import Image

    manifest = version.manifest
    answers = {}
    if (version.root / "answers.csv").exists():
        ans = pd.read_csv(version.root / "answers.csv", dtype=str, keep_default_na=False)
        answers = dict(zip(ans["id"], ans["label"], strict=True))
    if "source" in manifest.columns:  # augment originals, not earlier synthetic copies
        originals = manifest[manifest["source"] != "synth"]
        manifest = originals if len(originals) else manifest
    label_of = {i: label or answers.get(i, "") for i, label in zip(manifest["id"], manifest["label"],
                                                                    strict=True)}
    wanted = [i for i, label in label_of.items() if label]
    pixels, labels = [], []
    for image_id, payload in images.iter_bytes(version.settings, version, wanted):
        try:
            with Image.open(io.BytesIO(payload)) as img:
                pixels.append(np.asarray(img.convert("L"), dtype=np.uint8))
        except OSError:
            continue  # a broken source image is simply not augmented
        labels.append(label_of[image_id])
    return pixels, labels


def _store_shards(store: storage.Storage, items: list[tuple[str, str, bytes]]) -> list[str]:
    """Store new images as shards (SHARDED_IMAGES each) and index them; each image's shard."""
    names, entries = [], []
    for start in range(0, len(items), SHARDED_IMAGES):
        chunk = items[start:start + SHARDED_IMAGES]
        name, payload = shards.encode_shard(chunk)
        shards.put_shard(store, name, payload)
        entries.append({"shard": name, "rows": len(chunk), "bytes": len(payload)})
        names += [name] * len(chunk)
    shards.write_index(store, entries)
    return names


def synthesize(settings: Settings, cfg: SynthConfig, on_progress=None) -> data.VersionInfo:
    """Cut a new data version whose unlabeled pool gains `cfg.count` augmented images."""
    base = data.open_version(settings, cfg.data_version)
    pixels, labels = _sources(base)
    if not pixels:
        raise InvalidInput(f"data version {base.tag} has no labeled or answered images to augment")
    rng = np.random.default_rng(cfg.seed)
    picks = rng.integers(0, len(pixels), size=cfg.count)

    sharded = shards.is_sharded(base)
    store = storage.check(settings, "data synth") if sharded else None

    def write(staging: Path) -> None:
        manifest = pd.read_csv(staging / "manifest.csv", dtype=str, keep_default_na=False)
        answers_path = staging / "answers.csv"
        answers = (pd.read_csv(answers_path, dtype=str, keep_default_na=False)
                   if answers_path.exists() else pd.DataFrame(columns=["id", "label"]))
        taken = set(manifest["id"])
        start = 0  # continue numbering after earlier synth rounds
        while f"s{start:07d}" in taken:
            start += SHARD
        rows, new_answers, pending = [], [], []
        for n, src in enumerate(picks):
            image_id = f"s{start + n:07d}"
            payload = _png(augment(pixels[src], rng, cfg))
            if sharded:
                pending.append((image_id, "synth", payload))
                rows.append((image_id, "", "", "unlabeled", "synth", ""))
            else:
                rel = f"images/synth/{(start + n) // SHARD:04d}/{image_id}.png"
                dest = staging / rel
                if n % SHARD == 0 or not dest.parent.is_dir():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(payload)
                rows.append((image_id, rel, "", "unlabeled", "synth", ""))
            new_answers.append((image_id, labels[src]))
            if on_progress and (n + 1) % 5000 == 0:
                on_progress(n + 1, cfg.count)
        added = pd.DataFrame(rows, columns=data.MANIFEST_COLUMNS)
        if sharded:
            added["shard"] = _store_shards(store, pending)
            shards.write_manifest(staging / "manifest.csv",
                                  pd.concat([manifest, added], ignore_index=True))
        else:
            data.write_manifest(staging / "manifest.csv",
                                pd.concat([manifest, added], ignore_index=True))
        merged = pd.concat([answers, pd.DataFrame(new_answers, columns=["id", "label"])])
        # New files, never edits in place: the staging files are hard links into the cache.
        atomic_write_text(answers_path, merged.to_csv(index=False))
        meta = json.loads((staging / "meta.json").read_text())
        meta["synth_images"] = int(meta.get("synth_images", 0)) + cfg.count
        atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))

    return data.cut_version(
        settings, f"synth: {cfg.count} augmented copies of {base.tag} (seed {cfg.seed})", write
    )
