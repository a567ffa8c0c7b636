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

from builtins import getattr as getattr

class GrownModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _attach(self, 'embed', nn.Linear(in_features=4, out_features=26, bias=True))
        _attach(self, 'norm1', nn.LayerNorm(normalized_shape=(26,), eps=3.076923076923077e-06, elementwise_affine=True, bias=True))
        _attach(self, 'q', nn.Linear(in_features=26, out_features=8, bias=True))
        _attach(self, 'k', nn.Linear(in_features=26, out_features=8, bias=True))
        _attach(self, 'v', nn.Linear(in_features=26, out_features=8, bias=True))
        _attach(self, 'proj', nn.Linear(in_features=8, out_features=26, bias=True))
        _attach(self, 'norm2', nn.LayerNorm(normalized_shape=(26,), eps=3.076923076923077e-06, elementwise_affine=True, bias=True))
        _attach(self, 'fc1', nn.Linear(in_features=26, out_features=47, bias=True))
        _attach(self, 'fc2', nn.Linear(in_features=47, out_features=26, bias=True))
        _attach(self, 'norm', nn.LayerNorm(normalized_shape=(26,), eps=3.076923076923077e-06, elementwise_affine=True, bias=True))
        _attach(self, 'head', nn.Linear(in_features=26, out_features=10, bias=True))
        _attach_buffer(self, 'position', torch.empty((16, 26), dtype=torch.float32))

    def forward(self, x):
        getattr_1 = x.shape
        getitem = getattr_1[0]
        getitem_1 = getattr_1[1]
        getitem_2 = getattr_1[2];  getattr_1 = getitem_2 = None
        embed = self.embed(x);  x = None
        position = self.position
        add = embed + position;  embed = position = None
        norm1 = self.norm1(add)
        q = self.q(norm1)
        view = q.view(getitem, getitem_1, 2, -1);  q = None
        transpose = view.transpose(1, 2);  view = None
        k = self.k(norm1)
        view_1 = k.view(getitem, getitem_1, 2, -1);  k = None
        transpose_1 = view_1.transpose(1, 2);  view_1 = None
        v = self.v(norm1);  norm1 = None
        view_2 = v.view(getitem, getitem_1, 2, -1);  v = None
        transpose_2 = view_2.transpose(1, 2);  view_2 = None
        scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(transpose, transpose_1, transpose_2);  transpose = transpose_1 = transpose_2 = None
        transpose_3 = scaled_dot_product_attention.transpose(1, 2);  scaled_dot_product_attention = None
        reshape = transpose_3.reshape(getitem, getitem_1, -1);  transpose_3 = getitem = getitem_1 = None
        proj = self.proj(reshape);  reshape = None
        add_1 = add + proj;  add = proj = None
        norm2 = self.norm2(add_1)
        fc1 = self.fc1(norm2);  norm2 = None
        gelu = torch._C._nn.gelu(fc1);  fc1 = None
        fc2 = self.fc2(gelu);  gelu = None
        add_2 = add_1 + fc2;  add_1 = fc2 = None
        norm = self.norm(add_2);  add_2 = None
        mean = norm.mean(-2);  norm = None
        head = self.head(mean);  mean = None
        return head


def load_model(folder: str | Path | None = None) -> GrownModel:
    """The model with its weights, in eval mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    model = GrownModel()
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval()
