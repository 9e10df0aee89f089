"""Image folders written by tests, as a user would bring them (no files checked in).

`write_colour_folder`: two classes that differ by colour only (the same luminance once converted
to grayscale, random brightness, texture and size), in the formats people have: JPEG, PNG with
alpha, WebP, an upper-case extension, one EXIF-rotated JPEG, plus a corrupt file, a truncated
JPEG, a hidden file and a stray text file, which an import must skip and report (or ignore).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Same grayscale value (ITU-R 601 luma, as PIL's "L"): 0.299 R + 0.587 G + 0.114 B = 124.
COLOURS = {"warm": (200, 100, 45), "cool": (48, 137, 254)}
FORMATS = ("jpeg", "png-alpha", "webp")


def colour_image(rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    """A textured image of one hue: random size 48-200 px, brightness, noise and a gray patch."""
    width, height = (int(v) for v in rng.integers(48, 201, size=2))
    scale = rng.uniform(0.6, 1.2)
    base = np.array(colour, dtype=np.float32) * scale
    pixels = base + rng.normal(0, 12, size=(height, width, 1)).astype(np.float32)
    y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    pixels[y0:y0 + height // 3, x0:x0 + width // 3] = 124 * scale  # neutral, same luma
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _save(img: Image.Image, path_stem: Path, fmt: str) -> Path:
    if fmt == "jpeg":
        path = path_stem.with_suffix(".jpg")
        img.save(path, format="JPEG", quality=92)
    elif fmt == "png-alpha":
        path = path_stem.with_suffix(".png")
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.new("L", img.size, 230))
        rgba.save(path, format="PNG")
    else:
        path = path_stem.with_suffix(".webp")
        img.save(path, format="WEBP", quality=90)
    return path


def write_colour_folder(root: Path, per_class: int = 12, seed: int = 0) -> dict[str, list[Path]]:
    """One sub-folder per class under `root`. Returns the readable images per class and, under
    the key "rejected", the files an import must reject (corrupt, truncated, not an image)."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        paths = [_save(colour_image(rng, colour), folder / f"{name}_{i:03d}", FORMATS[i % 3])
                 for i in range(per_class)]
        written[name] = paths
    # An upper-case extension and an EXIF-rotated JPEG (orientation 6: turn 90 degrees).
    upper = root / "warm" / "IMG_0001.JPG"
    colour_image(rng, COLOURS["warm"]).save(upper, format="JPEG")
    rotated = root / "cool" / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 120), COLOURS["cool"]).save(rotated, format="JPEG", exif=exif)
    written["warm"].append(upper)
    written["cool"].append(rotated)
    # Files to skip: a hidden image, a corrupt PNG, a truncated JPEG, a text file.
    Image.new("RGB", (50, 50), COLOURS["warm"]).save(root / "warm" / ".hidden.png")
    corrupt = root / "warm" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    buf = io.BytesIO()
    colour_image(rng, COLOURS["cool"]).save(buf, format="JPEG")
    truncated = root / "cool" / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    notes = root / "cool" / "notes.txt"
    notes.write_text("taken on a sunny day\n")
    written["rejected"] = [corrupt, truncated, notes]
    return written


def write_unlabeled_folder(root: Path, count: int = 6, seed: int = 1) -> list[Path]:
    """A flat folder of images without labels (both colours, mixed formats)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    colours = list(COLOURS.values())
    return [_save(colour_image(rng, colours[i % 2]), root / f"photo_{i:03d}", FORMATS[i % 3])
            for i in range(count)]
