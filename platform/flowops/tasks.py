"""Built-in vision tasks for teams without their own model code yet, in plain PyTorch.

- `small_cnn`: two conv blocks and a two-layer head (the digits default).
- `resnet`: a ResNet-style classifier (basic residual blocks, batch norm, global pooling) with a
  configurable input size, channels, width and depth.

Both take `weights=<file>` (a state_dict saved with torch.save) to start from; layers whose
shapes differ (a new head for other classes) keep their fresh initialisation. Starting from a
registered model is `flowops train --init-from models:/<name>@production`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from flowops.image_model import Preprocess
from flowops.task import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Two conv blocks (the feature extractor) and a two-layer head."""

    def __init__(self, n_classes: int, channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(8 * width, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, n_classes)
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (drift detection)."""
        return self.head[:-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

class ResNet(nn.Module):
    """Stem, stages of basic blocks (width doubling, stride 2 from the second), pooled head."""

    def __init__(self, n_classes: int, channels: int = 3, width: int = 32,
                 depth: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        layers = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
        for i, blocks in enumerate(depth):
            cout = width * 2**i
            for j in range(blocks):
                layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_classes)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.head(self.features(x))


def _build(kind: str, weights: str | None, classes: list[str], **kwargs):
    model = (SmallCNN if kind == "small_cnn" else ResNet)(len(classes), **kwargs)
    if weights:
        load_matching(model, weights)
    return model


def load_matching(model, weights: str) -> list[str]:
    """Copy the tensors of a saved state_dict whose names and shapes match; returns those skipped."""
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    saved = saved.get("model", saved) if isinstance(saved, dict) else saved
    own = model.state_dict()
    usable = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def small_cnn(channels: int = 1, size: int = 8, width: int = 32, resize: str = "resize",
              weights: str | None = None) -> Task:
    """The small CNN; pixels scaled to [0, 1], no normalisation (the digits default)."""
    return Task(
        build_model=partial(_build, "small_cnn", weights, channels=channels, width=width),
        preprocess=Preprocess(size=size, channels=channels, resize=resize),
        head="head",
    )


def resnet(channels: int = 3, size: int = 64, width: int = 32, depth: list[int] | None = None,
           resize: str = "resize", weights: str | None = None, augment: bool = True) -> Task:
    """A ResNet-style classifier, ImageNet normalisation for RGB, random flips when training."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
    return Task(
        build_model=partial(_build, "resnet", weights, channels=channels, width=width,
                            depth=tuple(depth or (2, 2, 2))),
        preprocess=Preprocess(size=size, channels=channels, resize=resize, mean=mean, std=std),
        augment=flip if augment else None,
        head="head",
    )


def flip(batch):
    """Mirror a random half of a batch left-right (on the batch's device)."""
    mask = torch.rand(batch.shape[0], device=batch.device) < 0.5
    return torch.where(mask[:, None, None, None], batch.flip(-1), batch)


# Backbones from the optional `vision` extra ---------------------------------------------------------


def torchvision_model(arch: str = "resnet18", size: int = 224, weights: str | None = None,
                      resize: str = "center_crop") -> Task:
    """A torchvision classification network (`pip install 'flowops-platform[vision]'`) with a new
    head for the classes. `weights`: a state_dict file of the network (e.g. ImageNet weights saved
    beforehand; nothing is downloaded at run time); the head keeps its fresh initialisation."""
    models = _optional("torchvision", "torchvision_model").models

    def build(classes: list[str]):
        try:
            model = models.get_model(arch, weights=None, num_classes=len(classes))
        except ValueError as exc:
            raise ValueError(f"torchvision has no model {arch!r}: {exc}") from None
        if weights:
            load_matching(model, weights)
        return model

    return Task(build_model=build, preprocess=Preprocess(size=size, channels=3, resize=resize,
                                                         mean=IMAGENET_MEAN, std=IMAGENET_STD))


def timm_model(name: str = "resnet18", size: int = 224, channels: int = 3, weights: str | None = None,
               resize: str = "center_crop") -> Task:
    """A timm network (`pip install 'flowops-platform[vision]'`) with a new head for the classes;
    drift features are its pooled pre-logits. `weights`: a state_dict file (no download)."""
    timm = _optional("timm", "timm_model")

    def build(classes: list[str]):
        model = timm.create_model(name, pretrained=False, num_classes=len(classes), in_chans=channels)
        if weights:
            load_matching(model, weights)
        return model

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
    return Task(build_model=build,
                preprocess=Preprocess(size=size, channels=channels, resize=resize, mean=mean, std=std),
                embed=lambda model, x: model.forward_head(model.forward_features(x), pre_logits=True))


def _optional(module: str, task: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"needs {module} ({exc}); install the vision extra: "
                         f"pip install 'flowops-platform[vision]'") from None
