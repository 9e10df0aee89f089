"""Write a demo folder of colour images: shapes whose class is their colour, not their form.

    python examples/shapes/make_images.py /tmp/shapes [--per-class 60] [--unlabeled 40]

Writes DIR/labeled/<orange|blue>/ and DIR/unlabeled/. Circles, squares and triangles of random
size and place on a gray background, as JPEG, PNG or WebP of 48-200 px. The two colours have the
same brightness in grayscale (0.299 R + 0.587 G + 0.114 B = 124), as does the background, so only
a model that sees colour can tell the classes apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"orange": (200, 100, 45), "blue": (48, 137, 254)}
GRAY = (124, 124, 124)
FORMATS = (".jpg", ".png", ".webp")


def shape_image(rng: np.random.Generator, colour: tuple[int, int, int]) -> Image.Image:
    width, height = (int(v) for v in rng.integers(48, 201, size=2))
    img = Image.new("RGB", (width, height), GRAY)
    side = int(min(width, height) * rng.uniform(0.4, 0.8))
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    kind = rng.integers(3)
    draw = ImageDraw.Draw(img)
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    noisy = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.1)
    noisy += rng.normal(0, 10, size=(height, width, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write(folder: Path, name: str, img: Image.Image, i: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}_{i:04d}{FORMATS[i % len(FORMATS)]}", quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--unlabeled", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for name, colour in COLOURS.items():
        for i in range(args.per_class):
            write(args.out / "labeled" / name, name, shape_image(rng, colour), i)
    colours = list(COLOURS.values())
    for i in range(args.unlabeled):
        write(args.out / "unlabeled", "photo", shape_image(rng, colours[i % 2]), i)
    print(f"wrote {args.out}/labeled ({args.per_class} per class) and {args.out}/unlabeled "
          f"({args.unlabeled} images)")


if __name__ == "__main__":
    main()
