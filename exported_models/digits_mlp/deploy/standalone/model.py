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
        _attach(self, 'fc1', nn.Linear(in_features=64, out_features=41, bias=True))
        _attach(self, 'act', nn.ReLU(inplace=False))
        _attach(self, 'fc2', nn.Linear(in_features=41, out_features=26, bias=True))
        _attach(self, 'out', nn.Linear(in_features=26, out_features=10, bias=True))

    def forward(self, x):
        fc1 = self.fc1(x);  x = None
        act = self.act(fc1);  fc1 = None
        fc2 = self.fc2(act);  act = None
        act_1 = self.act(fc2);  fc2 = None
        out = self.out(act_1);  act_1 = None
        return out


def load_model(folder: str | Path | None = None) -> GrownModel:
    """The model with its weights, in eval mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    model = GrownModel()
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval()
