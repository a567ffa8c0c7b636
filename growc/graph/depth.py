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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from growc.graph.handlers import TensorSwap, handler_for, is_feature_map_layer
from growc.graph.samples import patches_at, rows_at, sample_positions, with_ones
from growc.graph.site import PositionSampler, Recorded, Rows, Taps
from growc.graph.trace import module_of

if TYPE_CHECKING:
    from growc.graph.rewrite import NewUnits

DEPTH_PREFIX = "growc_depth"
BLOCK_KERNEL = 3
BLOCK_ACTIVATIONS: dict[str, type[nn.Module]] = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "GELU": nn.GELU, "SiLU": nn.SiLU}


@dataclass(frozen=True)
class DepthSite:
    """The edge into `consumer`, where a new residual block can go (see `growc.graph.site.Site`).
    No existing layer reads or writes the block's units: it has no consumers and no readers, and
    its growth adds modules to the graph."""

    name: str  # "depth:<consumer>"
    consumer: str  # the layer whose input the new block would transform
    conv: bool
    activation: str = "ReLU"
    slope_at_zero: float = 0.5

    consumers: ClassVar[tuple[str, ...]] = ()
    readers: ClassVar[tuple[str, ...]] = ()
    layers: ClassVar[tuple[str, ...]] = ()  # the block is new: no existing module changes
    inserts_between: ClassVar[tuple[str, ...]] = ()
    adds_modules: ClassVar[bool] = True
    # The sign test replays a producer's inputs; the block's input layer does not exist yet.
    sign_testable: ClassVar[bool] = False
    kinked: ClassVar[bool] = False

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

    def channel_groups(self, root: nn.Module) -> None:
        return None  # a new block's hidden units feed its own output layer: no channel groups

    def reached_sites(self) -> list:
        return []

    def taps(self) -> Taps:
        return Taps(inputs={self.consumer}, input_grads={self.consumer})

    def rows(
        self, root: nn.Module, recorded: Recorded, batch_size: int, sampler: PositionSampler | None
    ) -> Rows | None:
        """b' is what the block's input layer would read (3x3 patches of the map, or the vector)
        and the block's output layer has no inputs yet, so b is empty and its whole desired
        update is -g at the edge."""
        x, grad = recorded.inputs.get(self.consumer), recorded.input_grads.get(self.consumer)
        if x is None or grad is None:
            return None
        chosen = sample_positions(grad, sampler.positions, sampler.generator) if self.conv and sampler else None
        if chosen is not None:
            rows, cols, share = chosen
            pad = BLOCK_KERNEL // 2
            b_prev = patches_at(x, (BLOCK_KERNEL,) * 2, (1, 1), (pad, pad), (1, 1), rows, cols)
            g = rows_at(grad, rows, cols) * batch_size
            empty = b_prev.new_zeros(b_prev.shape[0], 0)
            return Rows(with_ones(b_prev), [(empty, g)], batch_size * share, sampled=True)
        if self.conv:
            patches = F.unfold(x, BLOCK_KERNEL, padding=BLOCK_KERNEL // 2)
            b_prev = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            g = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
        else:
            b_prev = x.reshape(-1, x.shape[-1])
            g = grad.reshape(-1, grad.shape[-1])
        return Rows(with_ones(b_prev), [(b_prev.new_zeros(b_prev.shape[0], 0), g * batch_size)], batch_size)

    def waits_for(self, widened: set[str]) -> str | None:
        if self.consumer in widened:
            return f"the width of '{self.consumer}' changed in this step: a block there waits a step"
        return None

    def unit_scale(self, root: nn.Module, s_prev: Tensor) -> float:
        return 1.0  # the block's units are pre-activations of unit size

    def column_scale(self, root: nn.Module, s_prev: Tensor) -> float:
        """The RMS of the edge's values: at gamma = 1 the block adds a term as large as its input."""
        rms = float(torch.diagonal(s_prev)[:-1].clamp_min(0).mean().sqrt())
        return rms or 1.0

    def grow(self, root: nn.Module, units: NewUnits) -> DepthGrowth:
        return DepthGrowth(root, self, units.rows, units.bias, units.omega)


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
        edges.append(
            DepthSite(name=f"depth:{node.target}", consumer=str(node.target), conv=is_feature_map_layer(module))
        )
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

    def calibrate(self, run_eval: Callable[[], None]) -> None:
        """Nothing to measure: the block has no normalization."""
