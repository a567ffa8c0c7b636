"""A tiny CNN on scikit-learn's digits (8x8 images): 2 and 4 channels to start with.

growc grow examples/digits_cnn.py
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from growc.data import digits


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.flatten(x, 1))


model = DigitsCNN


def data():
    """The digits as 1x8x8 images."""
    train, val = digits()
    as_images = lambda ds: TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])  # noqa: E731
    return as_images(train), as_images(val)
