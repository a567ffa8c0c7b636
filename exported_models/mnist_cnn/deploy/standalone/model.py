"""GrownModel: an inference model exported by growc 0.1.0.

Needs only torch and safetensors:

    model = load_model()  # reads weights.safetensors beside this file
    outputs = model(inputs)
"""

from __future__ import annotations

import math  # noqa: F401
import operator  # noqa: F401
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

inf = float("inf")
nan = float("nan")
NoneType = type(None)
device = torch.device


def _owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    return owner, leaf


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, leaf = _owner(root, path)
    owner.add_module(leaf, module)


def _attach_buffer(root: nn.Module, path: str, tensor: torch.Tensor) -> None:
    owner, leaf = _owner(root, path)
    owner.register_buffer(leaf, tensor)


class GrownModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _attach(self, 'conv1', nn.Conv2d(in_channels=1, out_channels=4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'pool', nn.MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, return_indices=False, ceil_mode=False))
        _attach(self, 'conv2', nn.Conv2d(in_channels=4, out_channels=10, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'head', nn.Linear(in_features=490, out_features=10, bias=True))

    def forward(self, x):
        conv1 = self.conv1(x);  x = None
        relu = torch.relu(conv1);  conv1 = None
        pool = self.pool(relu);  relu = None
        conv2 = self.conv2(pool);  pool = None
        relu_1 = torch.relu(conv2);  conv2 = None
        pool_1 = self.pool(relu_1);  relu_1 = None
        flatten = torch.flatten(pool_1, 1);  pool_1 = None
        head = self.head(flatten);  flatten = None
        return head


def load_model(folder: str | Path | None = None) -> GrownModel:
    """The model with its weights, in eval mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    model = GrownModel()
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval()
