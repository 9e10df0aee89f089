"""Train a small residual CNN on a folder of colour images, on one device.

    python examples/shapes/train.py DIR [--epochs 10] [--size 32]

DIR holds one sub-folder of images per class (any format Pillow reads). This is an ordinary
single-GPU PyTorch script, as written before FlowOps: `task.py` beside it reuses `Net`,
`train_one_epoch` and the image settings to run the same training distributed, tracked and
registered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SIZE = 32  # images are resized to SIZE x SIZE
MEAN = (0.485, 0.456, 0.406)  # per-channel normalisation (ImageNet's)
STD = (0.229, 0.224, 0.225)
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class Block(nn.Module):
    """Two 3x3 convolutions with a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class Net(nn.Module):
    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            Block(width, width), Block(width, 2 * width, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def load_image(path: Path, size: int = SIZE) -> np.ndarray:
    """An image file -> (3, size, size) float32, normalised."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (MEAN, STD))
    return (arr - mean) / std


def load_folder(root: Path, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every readable image under root/<class>/ -> (images, labels, class names)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in SUFFIXES or path.name.startswith("."):
                continue
            try:
                images.append(load_image(path, size))
            except OSError as exc:  # a corrupt or truncated file: skip it
                print(f"skipping {path}: {exc}")
                continue
            labels.append(index)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), classes


def train_one_epoch(model, loader, optimizer, device) -> tuple[float, int]:
    """One pass over the loader (random left-right flips); returns (mean loss, images seen)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        flip = torch.rand(len(xb), device=device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
        seen += len(yb)
    return total / max(seen, 1), seen


@torch.no_grad()
def accuracy(model, x, y, device) -> float:
    model.eval()
    return (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--out", type=Path, default=Path("model.pt"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, classes = load_folder(args.folder, args.size)
    order = torch.randperm(len(x))
    n_val = max(1, len(x) // 5)
    val, fit = order[:n_val], order[n_val:]
    loader = DataLoader(TensorDataset(x[fit], y[fit]), batch_size=args.batch_size, shuffle=True)
    model = Net(len(classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        loss, _ = train_one_epoch(model, loader, optimizer, device)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, "
              f"val accuracy {accuracy(model, x[val], y[val], device):.3f}")
    torch.save({"model": model.state_dict(), "classes": classes}, args.out)
    print(f"saved {args.out} ({len(classes)} classes: {', '.join(classes)})")


if __name__ == "__main__":
    main()
