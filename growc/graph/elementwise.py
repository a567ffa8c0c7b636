"""Which graph nodes act element-wise (so a new unit passes through them on its own), and the
slope at 0 of the activations among them, used to linearize new neurons."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

# Slope at 0 used for the first-order prediction. For kinks (ReLU, LeakyReLU) the one-sided
# slopes differ and no linearization is exact: growc uses their average, and says so.
_MODULE_SLOPES: dict[type, float | None] = {
    nn.ReLU: 0.5,
    nn.ReLU6: 0.5,
    nn.Tanh: 1.0,
    nn.GELU: 0.5,
    nn.SiLU: 0.5,
    nn.Sigmoid: 0.25,
    nn.ELU: 1.0,
    nn.Softplus: 0.5,
    nn.Hardtanh: 1.0,
    nn.Mish: 0.6,
    nn.Hardswish: 0.5,
    nn.Identity: None,
    nn.Dropout: None,
    nn.Dropout1d: None,
    nn.Dropout2d: None,
    nn.AlphaDropout: None,
}

_FUNCTION_SLOPES: dict[object, float | None] = {
    F.relu: 0.5,
    torch.relu: 0.5,
    F.relu6: 0.5,
    torch.tanh: 1.0,
    F.tanh: 1.0,
    F.gelu: 0.5,
    F.silu: 0.5,
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.elu: 1.0,
    F.softplus: 0.5,
    F.mish: 0.6,
    F.hardswish: 0.5,
    F.dropout: None,
    torch.dropout: None,
}

_METHOD_SLOPES: dict[str, float | None] = {
    "relu": 0.5,
    "tanh": 1.0,
    "sigmoid": 0.25,
    "contiguous": None,
}


def elementwise_slope(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, float | None]:
    """(is element-wise on its first input, slope at 0 or None for a pass-through op)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.LeakyReLU):
            return True, (1.0 + module.negative_slope) / 2
        for kind, slope in _MODULE_SLOPES.items():
            if type(module) is kind:
                return True, slope
        return False, None
    if node.op == "call_function":
        if node.target is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return True, (1.0 + float(slope)) / 2
        if node.target in _FUNCTION_SLOPES:
            return True, _FUNCTION_SLOPES[node.target]
        if node.target in (operator.getitem,):
            return False, None
        return False, None
    if node.op == "call_method" and node.target in _METHOD_SLOPES:
        return True, _METHOD_SLOPES[str(node.target)]
    return False, None


def activation_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)
