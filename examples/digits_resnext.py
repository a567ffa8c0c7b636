"""A small ResNeXt on scikit-learn's digits (8x8 images): a 4-channel stem and two bottleneck
blocks whose 3x3 convs are grouped (4 groups of 2 channels to start with).

growc grow examples/digits_resnext.py

Every group of a grouped conv grows alike: new channels go at the end of each group, so the
convs keep their `groups` (see docs/method.md, "Channel groups").
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from growc.data import digits


class Bottleneck(nn.Module):
    def __init__(self, channels: int, width: int, groups: int, stride: int = 1) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Conv2d(channels, channels, 1, stride=stride, bias=False) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.reduce(x)))
        h = F.relu(self.bn2(self.grouped(h)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(skip + self.bn3(self.expand(h)))


class DigitsResNeXt(nn.Module):
    def __init__(self, channels: int = 4, width: int = 8, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block1 = Bottleneck(channels, width, groups)
        self.block2 = Bottleneck(channels, width, groups, stride=2)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(x.mean((2, 3)))


model = DigitsResNeXt


def data():
    """The digits as 1x8x8 images."""
    train, val = digits()
    as_images = lambda ds: TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])  # noqa: E731
    return as_images(train), as_images(val)
