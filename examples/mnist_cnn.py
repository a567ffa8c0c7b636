"""A small CNN on MNIST (1x28x28 images), grown from 2 and 4 channels:
Conv-BN-ReLU-pool (28 -> 14), Conv-ReLU-pool (14 -> 7), flatten, Linear.

MNIST is not bundled: `data()` below reads the .npz named by the MNIST_NPZ environment variable
(x_train, y_train, x_test, y_test as uint8 28x28 images, see docs/data.md), by default
../shared/data/mnist.npz beside this repository. The validation set is the 10,000 test images.

growc grow examples/mnist_cnn.py --batch-size 128 --steps 8 --final-epochs 4
growc export exported_models/mnist_cnn/model.safetensors --int8 static --data examples/mnist_cnn.py
"""

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from growc.data import mnist

MNIST_NPZ = os.environ.get(
    "MNIST_NPZ", str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist.npz")
)


class MnistCNN(nn.Module):
    def __init__(self, channels: tuple[int, int] = (2, 4)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(channels[1] * 7 * 7, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.flatten(x, 1))


model = MnistCNN


def data():
    """MNIST through growc.data.mnist (784 values in [0, 1]) as 1x28x28 images. The file is sorted
    by label; training batches are shuffled anyway, but the training set is put in a fixed random
    order so that the first samples (what `growc export --int8 static` calibrates on) hold every digit."""
    train, val = mnist(path=MNIST_NPZ)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    as_images = lambda ds, idx=slice(None): TensorDataset(ds.tensors[0][idx].view(-1, 1, 28, 28), ds.tensors[1][idx])  # noqa: E731
    return as_images(train, order), as_images(val)
