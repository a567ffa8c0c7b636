"""Depth candidates: a new residual block on the edge into a layer, `x + omega(act(alpha(x)))`.

A block enters the graph only when the growth step gives it neurons; until then it is a
candidate whose statistics are read from the edge itself (its input `x` and the gradient at `x`),
so an empty block never has to exist. Its first neurons come from the same solver as width growth
(the block's output layer has no inputs yet, so the whole desired update `-g` is its bottleneck),
and its gain per parameter is compared with every width site's: the numbers decide between
widening and deepening. Once inserted, the block's hidden layer is an ordinary width site.

For a feature map, alpha is a 3x3 conv (stride 1, padding 1) and omega a 1x1 conv; for vectors
both are linear layers. The block is built from torch.nn modules and operator.add, so it traces,
exports and serializes like any user layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from growc.graph.handlers import TensorSwap, handler_for, is_plain_conv
from growc.graph.trace import module_of

DEPTH_PREFIX = "growc_depth"
BLOCK_KERNEL = 3
BLOCK_ACTIVATIONS: dict[str, type[nn.Module]] = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "GELU": nn.GELU, "SiLU": nn.SiLU}


@dataclass(frozen=True)
class DepthSite:
    name: str  # "depth:<consumer>"
    consumer: str  # the layer whose input the new block would transform
    conv: bool
    activation: str = "ReLU"
    slope_at_zero: float = 0.5
    norm: None = None
    spatial: bool = False

    @property
    def producer(self) -> str:  # the block's input layer does not exist yet
        return ""

    @property
    def consumers(self) -> tuple[str, ...]:
        return ()

    def channels(self, root: nn.Module) -> int:
        consumer = root.get_submodule(self.consumer)
        return handler_for(consumer).in_size(consumer)

    def width(self, root: nn.Module) -> int:
        return 0

    def input_mode(self, root: nn.Module) -> str:
        return "affine"

    def params_per_neuron(self, root: nn.Module) -> int:
        d = self.channels(root)
        taps = BLOCK_KERNEL * BLOCK_KERNEL if self.conv else 1
        return d * taps + 1 + d


def find_depth_edges(gm: fx.GraphModule) -> list[DepthSite]:
    """Edges into a growable layer that carry a tensor only that layer reads."""
    edges = []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if handler_for(module) is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        if x.op == "placeholder" or len(x.users) != 1:
            continue
        conv = isinstance(module, nn.Conv2d)
        if conv and not is_plain_conv(module):
            continue
        edges.append(DepthSite(name=f"depth:{node.target}", consumer=str(node.target), conv=conv))
    return edges


def _new_name(gm: fx.GraphModule) -> str:
    index = 0
    while hasattr(gm, f"{DEPTH_PREFIX}{index}_in"):
        index += 1
    return f"{DEPTH_PREFIX}{index}"


class DepthGrowth:
    """A block inserted on an edge, its amplitude still adjustable, or the whole undone.

    `rows` (K, in_flat) and `bias` (K) are alpha's weights; `omega` (channels, K) the output
    layer's. Both sides are scaled by gamma; at gamma = 0 the block adds exactly 0.
    """

    def __init__(self, gm: fx.GraphModule, site: DepthSite, rows: Tensor, bias: Tensor, omega: Tensor) -> None:
        self.gm = gm
        self.site = site
        d, k = omega.shape
        self.prefix = prefix = _new_name(gm)
        if site.conv:
            alpha = nn.Conv2d(d, k, BLOCK_KERNEL, padding=BLOCK_KERNEL // 2)
            out = nn.Conv2d(k, d, 1, bias=False)
        else:
            alpha = nn.Linear(d, k)
            out = nn.Linear(k, d, bias=False)
        ref = gm.get_submodule(site.consumer).weight
        self.modules = {"in": alpha, "act": BLOCK_ACTIVATIONS[site.activation](), "out": out}
        for part, module in self.modules.items():
            gm.add_module(f"{prefix}_{part}", module.to(device=ref.device, dtype=ref.dtype))
        self._targets = [
            (alpha.weight, rows.reshape(alpha.weight.shape)),
            (alpha.bias, bias),
            (out.weight, omega.reshape(out.weight.shape)),
        ]
        consumer = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == site.consumer)
        self.edge = x = consumer.args[0]
        graph = gm.graph
        with graph.inserting_before(consumer):
            a = graph.call_module(f"{prefix}_in", (x,))
            h = graph.call_module(f"{prefix}_act", (a,))
            o = graph.call_module(f"{prefix}_out", (h,))
            self.sum = graph.call_function(operator.add, (x, o))
        consumer.replace_input_with(x, self.sum)
        self.consumer_node = consumer
        self.nodes = [self.sum, o, h, a]
        gm.recompile()

    @torch.no_grad()
    def set_amplitude(self, gamma: float) -> None:
        for param, value in self._targets:
            param.copy_((gamma * value).to(param))

    def undo(self) -> None:
        self.consumer_node.replace_input_with(self.sum, self.edge)
        for node in self.nodes:
            self.gm.graph.erase_node(node)
        for part in self.modules:
            delattr(self.gm, f"{self.prefix}_{part}")
        self.gm.recompile()

    @property
    def parameter_swaps(self) -> list[TensorSwap]:
        return []

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]
