"""The one table of element-wise ops: which graph nodes act on each unit alone (so a new unit
passes through them on its own), and what growth needs to know of each.

Every op is listed once by name in `OPS`, with
  - its slope at 0, used to linearize a new neuron (for a kink, the mean of the one-sided slopes;
    None for an op that passes values through unchanged, such as dropout),
  - its value at 0 (0 for most: a unit that is 0 stays 0 through it, which growth relies on where
    tied layers get zero rows; a gate's sigmoid gives 0.5),
  - whether it has a kink at 0 (the sign of a new neuron then matters: `growth/kinks.py`).
The module classes, functions (`F.*`, `torch.*`, in-place forms) and tensor methods that compute
each op point to its name; ops with parameters (LeakyReLU's slope, ELU's alpha...) read them from
the module or the call.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class ElementwiseOp:
    slope: float | None  # at 0; None: the op passes values through unchanged
    value_at_zero: float = 0.0
    kinked: bool = False

    @property
    def zero_at_zero(self) -> bool:
        return self.value_at_zero == 0.0


OPS: dict[str, ElementwiseOp] = {
    "identity": ElementwiseOp(None),
    "dropout": ElementwiseOp(None),  # identity in eval mode, a random mask in training: unit by unit
    # a module that multiplies each sample by a factor of its own (stochastic depth), probed
    "sample_scaling": ElementwiseOp(None),
    "contiguous": ElementwiseOp(None),
    "clone": ElementwiseOp(None),
    "relu": ElementwiseOp(0.5, kinked=True),
    "relu6": ElementwiseOp(0.5, kinked=True),
    "leaky_relu": ElementwiseOp(0.505, kinked=True),  # (1 + 0.01) / 2; the call's slope when given
    "prelu": ElementwiseOp(0.625, kinked=True),  # (1 + 0.25) / 2; the module's weight when it has one
    "rrelu": ElementwiseOp((1 + (1 / 8 + 1 / 3) / 2) / 2, kinked=True),  # the mean negative slope
    "elu": ElementwiseOp(1.0),  # (1 + alpha) / 2: smooth at 0 for alpha = 1
    "celu": ElementwiseOp(1.0),
    "selu": ElementwiseOp(1.0507 * (1 + 1.6733) / 2),  # both one-sided slopes positive
    "gelu": ElementwiseOp(0.5),
    "silu": ElementwiseOp(0.5),
    "mish": ElementwiseOp(0.6),  # tanh(softplus(0)) = tanh(log 2)
    "hardswish": ElementwiseOp(0.5),
    "tanh": ElementwiseOp(1.0),
    "hardtanh": ElementwiseOp(1.0),
    "softsign": ElementwiseOp(1.0),
    "tanhshrink": ElementwiseOp(0.0),
    "hardshrink": ElementwiseOp(0.0),
    "softshrink": ElementwiseOp(0.0),
    "sigmoid": ElementwiseOp(0.25, value_at_zero=0.5),
    "hardsigmoid": ElementwiseOp(1 / 6, value_at_zero=0.5),
    "softplus": ElementwiseOp(0.5, value_at_zero=math.log(2.0)),
    "logsigmoid": ElementwiseOp(0.5, value_at_zero=-math.log(2.0)),
}

_MODULES: dict[type[nn.Module], str] = {
    nn.Identity: "identity",
    nn.Dropout: "dropout",
    nn.Dropout1d: "dropout",
    nn.Dropout2d: "dropout",
    nn.Dropout3d: "dropout",
    nn.AlphaDropout: "dropout",
    nn.FeatureAlphaDropout: "dropout",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Hardswish: "hardswish",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.Softsign: "softsign",
    nn.Tanhshrink: "tanhshrink",
    nn.Hardshrink: "hardshrink",
    nn.Softshrink: "softshrink",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Softplus: "softplus",
    nn.LogSigmoid: "logsigmoid",
}

_FUNCTIONS: dict[Callable, str] = {
    F.dropout: "dropout",
    F.dropout1d: "dropout",
    F.dropout2d: "dropout",
    F.dropout3d: "dropout",
    F.alpha_dropout: "dropout",
    F.feature_alpha_dropout: "dropout",
    torch.dropout: "dropout",
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.rrelu: "rrelu",
    F.elu: "elu",
    F.elu_: "elu",
    F.celu: "celu",
    torch.celu: "celu",
    F.selu: "selu",
    torch.selu: "selu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.softsign: "softsign",
    F.tanhshrink: "tanhshrink",
    F.hardshrink: "hardshrink",
    F.softshrink: "softshrink",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.special.expit: "sigmoid",
    F.hardsigmoid: "hardsigmoid",
    F.softplus: "softplus",
    F.logsigmoid: "logsigmoid",
}

_METHODS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "contiguous": "contiguous",
    "clone": "clone",
}


def _argument(node: fx.Node, position: int, name: str, default: float) -> float:
    value = node.args[position] if len(node.args) > position else node.kwargs.get(name, default)
    return float(value) if isinstance(value, (int, float)) else default


def _clamp(low: float, high: float) -> ElementwiseOp:
    """x clamped to [low, high] at 0: slope 1 inside, a kink where the range ends at 0."""
    if low < 0 < high:
        return ElementwiseOp(1.0)
    edge = low == 0 or high == 0
    return ElementwiseOp(0.5 if edge else 0.0, value_at_zero=min(max(0.0, low), high), kinked=edge)


#: The parameters an op's slope or value at 0 depends on: (name, position in a call, default).
_PARAMETERS: dict[str, tuple[tuple[str, int, float], ...]] = {
    "leaky_relu": (("negative_slope", 1, 0.01),),
    "elu": (("alpha", 1, 1.0),),
    "rrelu": (("lower", 1, 1 / 8), ("upper", 2, 1 / 3)),
    "hardtanh": (("min_val", 1, -1.0), ("max_val", 2, 1.0)),
    "softplus": (("beta", 1, 1.0),),
    "prelu": (("weight", 1, 0.25),),  # its one slope, a Parameter
}


def _with_parameters(name: str, op: ElementwiseOp, p: dict[str, float]) -> ElementwiseOp:
    """The table's op with its parameters' effect on the slope or the value at 0."""
    if name == "leaky_relu":
        return replace(op, slope=(1.0 + p["negative_slope"]) / 2)
    if name == "prelu":
        return replace(op, slope=(1.0 + p["weight"]) / 2)
    if name == "elu":
        return replace(op, slope=(1.0 + p["alpha"]) / 2)
    if name == "rrelu":  # in eval mode the negative slope is the mean of its range
        return replace(op, slope=(1.0 + (p["lower"] + p["upper"]) / 2) / 2)
    if name == "hardtanh":
        return _clamp(p["min_val"], p["max_val"])
    if name == "softplus":
        return replace(op, value_at_zero=math.log(2.0) / p["beta"])
    return op


def _module_parameter(module: nn.Module, name: str) -> float:
    value = getattr(module, name)
    return float(value.detach().mean()) if isinstance(value, torch.Tensor) else float(value)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The table's name for the op `node` computes, if it is an element-wise one growc knows."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        kind = _MODULES.get(type(module))
        if kind == "prelu" and module.weight.numel() != 1:
            return None  # one slope per channel: a parameter of the units' size, not listed
        if kind is None and scales_each_sample(module):
            return "sample_scaling"
        return kind
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_PROBE_SHAPES = ((4, 6, 5, 5), (4, 5, 6), (4, 6))  # feature maps, tokens, vectors


def scales_each_sample(module: nn.Module) -> bool:
    """Whether a module of the user's, called whole, multiplies each sample by a factor of its own
    that does not depend on the sample's values, in training and in eval mode: stochastic depth
    (torchvision's StochasticDepth, timm's DropPath), which the graph calls whole because it
    reads `self.training`. Then each unit passes through it alone, and a unit that is 0 stays 0.

    Probed, since its forward is not in the graph: without Parameters or buffers, on random
    inputs of three ranks, with the same random draws for two different inputs, the outputs
    must be the inputs times the same per-sample factors (at least one rank must give outputs
    of the input's shape, and every such rank must pass). The
    random generator's state is restored afterwards."""
    if module in _PROBED:
        return _PROBED[module]
    known = type(module).__module__.startswith("torch.")
    answer = not known and not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    if answer:
        answer = _probe(module)
    _PROBED[module] = answer
    return answer


def _probe(module: nn.Module) -> bool:
    generator = torch.Generator().manual_seed(0)
    was_training = module.training
    ran = False
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for training in (True, False):
                module.train(training)
                for shape in _PROBE_SHAPES:
                    inputs = [torch.randn(shape, generator=generator) for _ in range(2)]
                    factors = []
                    for x in inputs:
                        torch.manual_seed(1)
                        try:
                            y = module(x)
                        except Exception:  # noqa: BLE001 - a shape it does not take: try another
                            break
                        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                            break  # (a per-sample factor shaped for feature maps broadcasts other ranks wrongly)
                        flat_x, flat_y = x.reshape(shape[0], -1), y.reshape(shape[0], -1)
                        factor = (flat_x * flat_y).sum(1) / flat_x.pow(2).sum(1)
                        if not torch.allclose(flat_y, factor[:, None] * flat_x, rtol=1e-5, atol=1e-6):
                            return False
                        factors.append(factor)
                    else:
                        if not torch.allclose(factors[0], factors[1], rtol=1e-5, atol=1e-6):
                            return False
                        ran = True
    finally:
        module.train(was_training)
    return ran


def elementwise_op(gm: fx.GraphModule, node: fx.Node) -> ElementwiseOp | None:
    """The op with its slope at 0 for this very call (its parameters read), or None."""
    name = op_name(gm, node)
    if name is None:
        return None
    op, parameters = OPS[name], _PARAMETERS.get(name, ())
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return _with_parameters(name, op, {p: _module_parameter(module, p) for p, _, _ in parameters})
    if node.op == "call_function":
        return _with_parameters(name, op, {p: _argument(node, i, p, d) for p, i, d in parameters})
    return op


def elementwise_slope(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, float | None]:
    """(is element-wise on its first input, slope at 0 or None for a pass-through op)."""
    op = elementwise_op(gm, node)
    return (False, None) if op is None else (True, op.slope)


def activation_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The op as the user wrote it: the module's class, the function's or the method's name."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)
