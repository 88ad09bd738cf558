"""Plain torch networks and the name -> constructor registry."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """The Dahan & Levy nets: conv(20, 5x5) – conv(50, 5x5) – fc(50) – BN – fc(classes).

    Each conv is followed by ReLU and 2x2 max-pooling (LeNet shape). ``mnist_cnn``: input
    ``[N, 1, 28, 28]``; ``cifar_cnn`` (their CIFAR-10 net, Fig. 3): ``[N, 3, 32, 32]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((image_size - 4) // 2 - 4) // 2  # two (5x5 conv, 2x2 pool) stages
        self.fc1 = nn.Linear(50 * side * side, 50)
        self.bn = nn.BatchNorm1d(50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.bn(self.fc1(x.flatten(1))))
        return self.fc2(x)


class MLP(nn.Module):
    """Flatten – fc(hidden) – ReLU – fc(classes): the small, fast net for offline runs."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR): 3x3 stem, no max-pool, 4 stages of 2 basic blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_cnn(num_classes: int = 10) -> SmallCNN:
    return SmallCNN(num_classes, in_channels=3, image_size=32)


NETS: dict[str, Callable[..., nn.Module]] = {"mnist_cnn": SmallCNN, "cifar_cnn": cifar_cnn, "resnet18": ResNet18, "mlp": MLP}


def build_net(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """The registered net ``name`` (see ``NETS``) with ``num_classes`` outputs."""
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; choose one of {sorted(NETS)}")
    return NETS[name](num_classes=num_classes, **kwargs)
