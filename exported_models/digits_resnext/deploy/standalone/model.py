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
        _attach(self, 'stem', nn.Conv2d(in_channels=1, out_channels=15, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'block1.reduce', nn.Conv2d(in_channels=15, out_channels=20, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'block1.grouped', nn.Conv2d(in_channels=20, out_channels=120, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4, bias=True, padding_mode='zeros'))
        _attach(self, 'block1.expand', nn.Conv2d(in_channels=120, out_channels=15, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'block2.reduce', nn.Conv2d(in_channels=15, out_channels=84, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'block2.grouped', nn.Conv2d(in_channels=84, out_channels=188, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=4, bias=True, padding_mode='zeros'))
        _attach(self, 'block2.shortcut', nn.Conv2d(in_channels=15, out_channels=64, kernel_size=(1, 1), stride=(2, 2), padding=(0, 0), dilation=(1, 1), groups=1, bias=False, padding_mode='zeros'))
        _attach(self, 'block2.expand', nn.Conv2d(in_channels=188, out_channels=64, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'head', nn.Linear(in_features=64, out_features=10, bias=True))

    def forward(self, x):
        stem = self.stem(x);  x = None
        relu = torch.nn.functional.relu(stem, inplace = False);  stem = None
        block1_reduce = self.block1.reduce(relu)
        relu_1 = torch.nn.functional.relu(block1_reduce, inplace = False);  block1_reduce = None
        block1_grouped = self.block1.grouped(relu_1);  relu_1 = None
        relu_2 = torch.nn.functional.relu(block1_grouped, inplace = False);  block1_grouped = None
        block1_expand = self.block1.expand(relu_2);  relu_2 = None
        add = relu + block1_expand;  relu = block1_expand = None
        relu_3 = torch.nn.functional.relu(add, inplace = False);  add = None
        block2_reduce = self.block2.reduce(relu_3)
        relu_4 = torch.nn.functional.relu(block2_reduce, inplace = False);  block2_reduce = None
        block2_grouped = self.block2.grouped(relu_4);  relu_4 = None
        relu_5 = torch.nn.functional.relu(block2_grouped, inplace = False);  block2_grouped = None
        block2_shortcut = self.block2.shortcut(relu_3);  relu_3 = None
        block2_expand = self.block2.expand(relu_5);  relu_5 = None
        add_1 = block2_shortcut + block2_expand;  block2_shortcut = block2_expand = None
        relu_6 = torch.nn.functional.relu(add_1, inplace = False);  add_1 = None
        mean = relu_6.mean((2, 3));  relu_6 = None
        head = self.head(mean);  mean = None
        return head


def load_model(folder: str | Path | None = None) -> GrownModel:
    """The model with its weights, in eval mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    model = GrownModel()
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval()
