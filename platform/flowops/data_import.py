"""The images of a new dataset: the default digits, or a user's image folder taken as it is.

A user's folder keeps its original files: every one is decoded once to check it, and its bytes
are copied unchanged (no re-encoding, no grayscale, no resize; EXIF orientation stays in the
file), so colour and full resolution survive and the task's preprocessing decides at read time
how an image becomes a tensor. A file that does not decode is skipped and reported with the
reason, never fatal. The facts a task needs as defaults (classes, channels, a typical size, the
dataset's name) go to the version's meta.json.

Labels are never hidden unless asked: class sub-folders go to train and holdout (stratified,
seeded); the unlabeled pool comes from a folder of images without labels (`unlabeled_dir`) or,
deliberately, from `unlabeled_fraction` of the labeled training images (their labels are kept
aside in answers.csv for simulated labelers, as the digits default does for the demo).
"""

from __future__ import annotations

import io
import os
import re
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flowops.errors import InvalidInput

MIN_PER_CLASS = 5
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees


@dataclass
class Item:
    """One image of the new version. `hidden`: a true label kept aside (answers.csv)."""

    id: str
    label: str
    split: str
    source: str
    suffix: str
    data: bytes | None = None  # generated images
    path: Path | None = None  # a user's file, copied unchanged

    @property
    def hidden(self) -> bool:
        return self.split == "unlabeled" and bool(self.label)


@dataclass
class Dataset:
    items: list[Item]
    meta: dict[str, Any]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class Probe:
    colour: bool
    width: int
    height: int


def split_indices(labels: list[str], holdout_fraction: float, unlabeled_fraction: float,
                  seed: int) -> dict[int, str]:
    """Stratified, seeded: index -> train | holdout | unlabeled (labels hidden)."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    try:
        rest, holdout = train_test_split(idx, test_size=holdout_fraction, random_state=seed,
                                         stratify=labels)
        unlabeled: list[int] = []
        if unlabeled_fraction > 0:
            rest, unlabeled = train_test_split(rest, test_size=unlabeled_fraction,
                                               random_state=seed,
                                               stratify=[labels[i] for i in rest])
    except ValueError as exc:  # too few images per class for the asked shares
        raise InvalidInput(f"cannot split {len(labels)} images into stratified pools: {exc}") \
            from None
    return ({i: "holdout" for i in holdout} | {i: "train" for i in rest}
            | {i: "unlabeled" for i in unlabeled})


def digits(unlabeled_fraction: float, holdout_fraction: float, seed: int) -> Dataset:
    """scikit-learn's digits as 8x8 grayscale PNGs (the default dataset the demo relies on)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    loaded = load_digits()
    pixels = np.clip(np.round(loaded.images * (255.0 / 16.0)), 0, 255).astype("uint8")
    labels = [str(t) for t in loaded.target]
    split_of = split_indices(labels, holdout_fraction, unlabeled_fraction, seed)
    items = []
    for i, label in enumerate(labels):
        buf = io.BytesIO()
        Image.fromarray(pixels[i], mode="L").save(buf, format="PNG")
        items.append(Item(f"d{i:05d}", label, split_of[i], "sklearn-digits", ".png",
                          data=buf.getvalue()))
    meta = {"classes": [str(c) for c in range(10)], "image_size": 8, "channels": 1,
            "source": "sklearn-digits", "name": "digits"}
    return Dataset(items, meta)


def dataset_name(name: str | None, root: Path) -> str:
    """The name given (checked: it becomes part of the model's name), else the folder's name."""
    if name is not None:
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidInput(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most "
                               f"63, starting with a letter or digit)")
        return name
    slug = re.sub(r"[^a-z0-9_.]+", "-", root.name.lower()).strip("-._")[:63]
    return slug or "images"


def image_folder(root: Path, *, unlabeled_dir: Path | None = None, name: str | None = None,
                 unlabeled_fraction: float = 0.0, holdout_fraction: float = 0.2, seed: int = 0,
                 image_size: int | None = None) -> Dataset:
    """A user's folder: one sub-folder per class (any depth below it); hidden files ignored."""
    if not root.is_dir():
        raise InvalidInput(f"--from {root}: not a folder")
    if unlabeled_dir is not None and not unlabeled_dir.is_dir():
        raise InvalidInput(f"--unlabeled {unlabeled_dir}: not a folder")
    name = dataset_name(name, root)
    class_dirs = sorted(p for p in root.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p != unlabeled_dir)
    if len(class_dirs) < 2:
        raise InvalidInput(
            f"--from {root}: expected an image-folder layout (one sub-folder per class, at least 2), "
            f"found {len(class_dirs)} sub-folder(s)"
        )
    suffixes = readable_suffixes()
    rejected = [(str(p), "outside the class sub-folders") for p in sorted(root.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes]
    labeled, probes = [], []
    for class_dir in class_dirs:
        for path, found in _read_folder(class_dir, suffixes, rejected):
            labeled.append((path, class_dir.name))
            probes.append(found)
    if not labeled:
        raise InvalidInput(f"--from {root}: no readable image ({_rejected_summary(rejected)})")
    per_class = Counter(label for _, label in labeled)
    too_few = [d.name for d in class_dirs if per_class[d.name] < MIN_PER_CLASS]
    if too_few:
        raise InvalidInput(
            f"--from {root}: every class needs at least {MIN_PER_CLASS} readable images; too few "
            f"in: {', '.join(f'{c} ({per_class[c]})' for c in too_few)}"
        )
    pool = []
    if unlabeled_dir is not None:
        pool_rejected: list[tuple[str, str]] = []
        pool = _read_folder(unlabeled_dir, suffixes, pool_rejected)
        if not pool:
            raise InvalidInput(f"--unlabeled {unlabeled_dir}: no readable image "
                               f"({_rejected_summary(pool_rejected)})")
        rejected += pool_rejected
        probes += [found for _, found in pool]

    split_of = split_indices([label for _, label in labeled], holdout_fraction,
                             unlabeled_fraction, seed)
    # Ids in a seeded random order, so that an id never hints at the class of a hidden label.
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(labeled))
    items = [Item(f"u{int(n):06d}", label, split_of[i], "folder", path.suffix.lower(), path=path)
             for i, ((path, label), n) in enumerate(zip(labeled, order, strict=True))]
    items += [Item(f"u{len(labeled) + i:06d}", "", "unlabeled", "folder", path.suffix.lower(),
                   path=path) for i, (path, _) in enumerate(pool)]
    meta = {"name": name, "classes": [d.name for d in class_dirs], **facts(probes, image_size),
            "rejected": len(rejected), "source": str(root)}
    if unlabeled_dir is not None:
        meta["unlabeled_source"] = str(unlabeled_dir)
    return Dataset(items, meta, rejected)


def readable_suffixes() -> set[str]:
    """File extensions of every format this Pillow can open (upper case accepted too)."""
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _read_folder(folder: Path, suffixes: set[str],
                 rejected: list[tuple[str, str]]) -> list[tuple[Path, Probe]]:
    """The images under `folder` that decode, in path order; the others go to `rejected`."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    candidates = []
    for path in paths:
        if path.suffix.lower() in suffixes:
            candidates.append(path)
        else:
            rejected.append((str(path), f"not an image file type ({path.suffix or 'no extension'})"))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probes = list(pool.map(probe, candidates))  # decoding releases the GIL
    found = []
    for path, result in zip(candidates, probes, strict=True):
        if isinstance(result, str):
            rejected.append((str(path), result))
        else:
            found.append((path, result))
    return found


def probe(path: Path | IO[bytes]) -> Probe | str:
    """Decode one file (a path or an open binary file) fully: a truncated or corrupt file fails
    here; the reason if it fails."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            return Probe(_is_colour(img), width, height)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: not a usable image
        text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # an open file's repr
        return f"cannot decode: {type(exc).__name__}: {text}".splitlines()[0]


def _is_colour(img: Any) -> bool:
    """Colour (3 channels) unless the mode is grayscale or the palette holds only grays."""
    if img.mode in ("P", "PA"):
        palette = img.getpalette() or []
        return any(len({*palette[i:i + 3]}) > 1 for i in range(0, len(palette), 3))
    return img.mode not in GRAY_MODES


def facts(probes: list[Probe], image_size: int | None) -> dict[str, Any]:
    """channels, the median height and width, and `image_size`: a default model input side (the
    median short side clipped to 8-224) unless one is given."""
    median_height = int(statistics.median(p.height for p in probes))
    median_width = int(statistics.median(p.width for p in probes))
    short = int(statistics.median(min(p.width, p.height) for p in probes))
    return {"channels": 3 if any(p.colour for p in probes) else 1,
            "image_size": image_size or min(max(short, 8), 224),
            "median_height": median_height, "median_width": median_width}


def _rejected_summary(rejected: list[tuple[str, str]]) -> str:
    if not rejected:
        return "no image files found"
    path, reason = rejected[0]
    return f"{len(rejected)} file(s) rejected, e.g. {path}: {reason}"
