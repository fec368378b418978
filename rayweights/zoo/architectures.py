"""Zoo member architectures: a small registry of constructors (DiT style).

``build(name, in_shape, num_classes, **kw)`` returns a fresh ``nn.Module``.  Sizes follow
p-diff Tab. 3b (MLP-3, ConvNet-3) scaled to the input; ``resnet_small`` has BN in every block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        ARCHITECTURES[name] = fn
        return fn
    return deco


def build(name: str, in_shape: tuple[int, ...], num_classes: int, **kw) -> nn.Module:
    if name not in ARCHITECTURES:
        raise KeyError(f"architecture: unknown {name!r} (registered: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name](in_shape=tuple(in_shape), num_classes=num_classes, **kw)


@register("mlp3")
def mlp3(in_shape, num_classes, hidden: int = 32):
    """p-diff MLP-3: three linear layers with BN on the hidden ones."""
    d = 1
    for s in in_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


@register("convnet3")
def convnet3(in_shape, num_classes, width: int = 16):
    """p-diff ConvNet-3: three conv+BN+ReLU layers, global pooling, linear head."""
    c = in_shape[0] if len(in_shape) == 3 else 1
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@register("resnet_small")
def resnet_small(in_shape, num_classes, width: int = 16, blocks: int = 2):
    c = in_shape[0] if len(in_shape) == 3 else 1
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         *[_Block(width) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
