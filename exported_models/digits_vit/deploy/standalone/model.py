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
        _attach(self, 'patches', nn.Conv2d(in_channels=1, out_channels=94, kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), groups=1, bias=True, padding_mode='zeros'))
        _attach(self, 'norm1', nn.LayerNorm(normalized_shape=(94,), eps=8.510638297872345e-07, elementwise_affine=True, bias=True))
        _attach(self, 'attention.q', nn.Linear(in_features=94, out_features=32, bias=True))
        _attach(self, 'attention.k', nn.Linear(in_features=94, out_features=32, bias=True))
        _attach(self, 'attention.v', nn.Linear(in_features=94, out_features=32, bias=True))
        _attach(self, 'attention.out_proj', nn.Linear(in_features=32, out_features=94, bias=True))
        _attach(self, 'norm2', nn.LayerNorm(normalized_shape=(94,), eps=8.510638297872345e-07, elementwise_affine=True, bias=True))
        _attach(self, 'mlp.0', nn.Linear(in_features=94, out_features=143, bias=True))
        _attach(self, 'mlp.1', nn.GELU(approximate='none'))
        _attach(self, 'mlp.2', nn.Linear(in_features=143, out_features=94, bias=True))
        _attach(self, 'norm', nn.LayerNorm(normalized_shape=(94,), eps=8.510638297872345e-07, elementwise_affine=True, bias=True))
        _attach(self, 'head', nn.Linear(in_features=94, out_features=10, bias=True))
        _attach_buffer(self, 'class_token', torch.empty((1, 1, 94), dtype=torch.float32))
        _attach_buffer(self, 'position', torch.empty((1, 17, 94), dtype=torch.float32))

    def forward(self, x):
        getattr_1 = x.shape
        getitem = getattr_1[0];  getattr_1 = None
        view = x.view(getitem, 1, 8, 8);  x = None
        patches = self.patches(view);  view = None
        flatten = patches.flatten(2);  patches = None
        permute = flatten.permute(0, 2, 1);  flatten = None
        class_token = self.class_token
        expand = class_token.expand(getitem, -1, -1);  class_token = getitem = None
        cat = torch.cat([expand, permute], dim = 1);  expand = permute = None
        position = self.position
        add = cat + position;  cat = position = None
        norm1 = self.norm1(add)
        size = norm1.size(0)
        size_1 = norm1.size(1)
        size_2 = norm1.size(1)
        attention_q = self.attention.q(norm1)
        view_1 = attention_q.view(size, size_1, -1, 4);  attention_q = None
        transpose = view_1.transpose(1, 2);  view_1 = None
        attention_k = self.attention.k(norm1)
        view_2 = attention_k.view(size, size_2, -1, 4);  attention_k = None
        transpose_1 = view_2.transpose(1, 2);  view_2 = None
        attention_v = self.attention.v(norm1);  norm1 = None
        view_3 = attention_v.view(size, size_2, -1, 4);  attention_v = size_2 = None
        transpose_2 = view_3.transpose(1, 2);  view_3 = None
        scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(transpose, transpose_1, transpose_2, attn_mask = None, is_causal = False);  transpose = transpose_1 = transpose_2 = None
        transpose_3 = scaled_dot_product_attention.transpose(1, 2);  scaled_dot_product_attention = None
        reshape_1 = transpose_3.reshape(size, size_1, -1);  transpose_3 = size = size_1 = None
        attention_out_proj = self.attention.out_proj(reshape_1);  reshape_1 = None
        add_1 = add + attention_out_proj;  add = attention_out_proj = None
        norm2 = self.norm2(add_1)
        mlp_0 = getattr(self.mlp, "0")(norm2);  norm2 = None
        mlp_1 = getattr(self.mlp, "1")(mlp_0);  mlp_0 = None
        mlp_2 = getattr(self.mlp, "2")(mlp_1);  mlp_1 = None
        add_2 = add_1 + mlp_2;  add_1 = mlp_2 = None
        norm = self.norm(add_2);  add_2 = None
        getitem_1 = norm[(slice(None, None, None), 0)];  norm = None
        head = self.head(getitem_1);  getitem_1 = None
        return head


def load_model(folder: str | Path | None = None) -> GrownModel:
    """The model with its weights, in eval mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    model = GrownModel()
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval()
