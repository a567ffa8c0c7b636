"""Width sites found on the traced graph.

A width site is a hidden dimension (features of a Linear, channels of a Conv2d) produced by one
layer (`producer`) and read by one or more layers (`consumers`) through ops that act on each
unit alone: activations and dropout; a BatchNorm before the activation (it grows with the site);
and, from a conv to a linear layer, per-channel pooling and the flatten between them. Growing it
by K neurons adds K outputs to the producer, K entries to its BatchNorm, and K input units to
every consumer. Anything else on the path (an addition, a concatenation, a model output, an
unknown module) ties the dimension to something this finder does not model yet, so the layer is
reported as skipped with the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from growc.graph.elementwise import activation_name, elementwise_slope
from growc.graph.handlers import handler_for
from growc.graph.trace import module_of


@dataclass(frozen=True)
class WidthSite:
    name: str  # the producer's module path: the site is "the outputs of this layer"
    producer: str
    consumers: tuple[str, ...]
    activation: str  # the first non-linearity on the way to the consumers
    slope_at_zero: float  # its slope at 0 (1.0 when the path is linear)
    norm: str | None = None  # a BatchNorm between the producer and the activation
    spatial: bool = False  # the consumers are linear layers reading the flattened feature map
    pools: tuple[tuple, ...] = ()  # per-channel pooling on the way: ("window", k, s, p) or ("adaptive", size)

    def modules(self, root: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        return root.get_submodule(self.producer), [root.get_submodule(c) for c in self.consumers]

    def width(self, root: nn.Module) -> int:
        producer = root.get_submodule(self.producer)
        return handler_for(producer).out_size(producer)

    def spatial_size(self, root: nn.Module) -> int:
        """Features per channel in the consumers' input (H*W after pooling; 1 if not spatial)."""
        if not self.spatial:
            return 1
        consumer = root.get_submodule(self.consumers[0])
        return handler_for(consumer).in_size(consumer) // max(self.width(root), 1)

    def input_mode(self, root: nn.Module) -> str:
        """How the producer's input enters the new neurons: "centered" behind a BatchNorm (it
        removes the mean), else "affine" or "linear" as the producer has a bias or not."""
        if self.norm:
            return "centered"
        producer = root.get_submodule(self.producer)
        return "affine" if handler_for(producer).has_bias(producer) else "linear"

    def params_per_neuron(self, root: nn.Module) -> int:
        producer, consumers = self.modules(root)
        spatial = self.spatial_size(root)
        norm = 2 if self.norm and root.get_submodule(self.norm).affine else 0
        return (
            handler_for(producer).params_per_output(producer)
            + norm
            + sum(handler_for(c).params_per_input(c, spatial) for c in consumers)
        )


@dataclass
class CandidateReport:
    sites: list[WidthSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why it cannot grow)


_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _POOL_MODULES)
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool_spec(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """The pooling's window as ("window", kernel, stride, padding) or ("adaptive", output size)."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return ("adaptive", _pair(m.output_size))
        return ("window", _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding))
    args, kwargs = node.args, node.kwargs
    if node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return ("adaptive", _pair(args[1] if len(args) > 1 else kwargs["output_size"]))
    kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
    stride = (args[2] if len(args) > 2 else kwargs.get("stride")) or kernel
    padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
    return ("window", _pair(kernel), _pair(stride), _pair(padding))


def _is_global_mean(node: fx.Node) -> bool:
    """x.mean((2, 3)) or torch.mean(x, (-2, -1)): global average pooling and flattening in one."""
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return not keepdim and isinstance(dims, (tuple, list)) and {d % 4 for d in dims} == {2, 3}


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Flattening (B, C, ...) to (B, features), channel-major: what a linear layer after convs reads."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1 and len(node.args) <= 2
    if node.op == "call_method" and node.target == "flatten":
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1 and len(node.args) <= 2
    if node.op == "call_method" and node.target in ("view", "reshape"):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return len(dims) == 2 and dims[1] == -1
    return False


def _only_input(user: fx.Node, node: fx.Node, allow_size_args: bool = False) -> bool:
    """`node` is the op's first input and no other tensor enters it."""
    if user.args[:1] != (node,):
        return False
    others = [a for a in list(user.args[1:]) + list(user.kwargs.values()) if isinstance(a, fx.Node)]
    if allow_size_args:  # x.view(x.size(0), -1): the other node is a size, not a tensor
        others = [a for a in others if not (a.op in ("call_method", "call_function") and a.args[:1] == (node,))]
        others = [a for a in others if a.op != "call_function" or a.target is not getattr]
    return not others


def _follow(gm: fx.GraphModule, start: fx.Node, conv: bool) -> tuple[dict, str | None]:
    """Walk from the producer to its consumers; returns what was found and the reason the path is
    not a plain site (None when it is)."""
    found = {"consumers": [], "slopes": [], "norm": None, "spatial": False, "pools": []}
    # Each frontier entry: (node, stage) with stage "pre" (before any activation), "post",
    # "pooled" (per-channel pooling seen) or "flat" (flattened for a linear layer).
    frontier, seen = [(start, "pre")], set()
    while frontier:
        node, stage = frontier.pop()
        for user in list(node.users):
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return found, "its output is a model output"
            flatten = conv and stage != "flat" and _is_flatten(gm, user)
            if not _only_input(user, node, allow_size_args=flatten):
                return found, f"its output is combined with another tensor in '{user.name}'"
            module = module_of(gm, user)
            if handler_for(module) is not None:
                if conv and isinstance(module, nn.Linear) and stage != "flat":
                    return found, f"'{user.name}' reads the feature map without flattening it"
                if not conv and not isinstance(module, nn.Linear):
                    return found, f"'{user.name}' reads a vector as a feature map"
                found["consumers"].append(user)
                found["spatial"] = stage == "flat"
                continue
            if isinstance(module, _BATCHNORMS):
                if stage != "pre" or found["norm"] is not None:
                    return found, f"the BatchNorm '{user.name}' comes after the activation"
                found["norm"] = str(user.target)
                frontier.append((user, stage))
                continue
            if conv and stage in ("pre", "post", "pooled") and _is_pool(gm, user):
                if len(node.users) > 1:
                    return found, f"its output is read both through the pooling '{user.name}' and another way"
                found["pools"].append(_pool_spec(gm, user))
                frontier.append((user, "pooled"))
                continue
            if flatten:
                frontier.append((user, "flat"))
                continue
            if conv and stage != "flat" and _is_global_mean(user):
                found["pools"].append(("adaptive", (1, 1)))
                frontier.append((user, "flat"))
                continue
            is_elementwise, slope = elementwise_slope(gm, user)
            if not is_elementwise:
                return found, f"its output goes through '{user.name}', which growc cannot widen yet"
            if slope is not None:
                found["slopes"].append((slope, activation_name(gm, user)))
                stage = "post" if stage == "pre" else stage
            frontier.append((user, stage))
    if not found["consumers"]:
        return found, "no layer reads its output"
    return found, None


def _same_geometry(modules: list[nn.Module]) -> bool:
    if len(modules) < 2 or not all(isinstance(m, nn.Conv2d) for m in modules):
        return True
    keys = {(m.kernel_size, m.stride, m.padding, m.dilation) for m in modules}
    return len(keys) == 1


def find_width_sites(gm: fx.GraphModule) -> CandidateReport:
    report = CandidateReport()
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if module is None:
            continue
        if handler_for(module) is None:
            if isinstance(module, nn.Conv2d):
                report.skipped.append(
                    (str(node.target), "grouped, depthwise or non-zero-padded convs are not grown yet")
                )
            continue
        name = str(node.target)
        if calls[name] > 1:
            report.skipped.append((name, "the layer is called more than once (shared weights)"))
            continue
        found, reason = _follow(gm, node, conv=isinstance(module, nn.Conv2d))
        consumers = [str(c.target) for c in found["consumers"]]
        if reason is None and any(calls[c] > 1 for c in consumers):
            reason = "a layer that reads it is called more than once (shared weights)"
        if reason is None and found["norm"] and calls[found["norm"]] > 1:
            reason = "its BatchNorm is called more than once"
        if reason is None and not _same_geometry([gm.get_submodule(c) for c in consumers]):
            reason = "its readers are convolutions of different geometry"
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        # With several activations on the way the first one decides the linearization.
        slope, act = found["slopes"][0] if found["slopes"] else (1.0, "identity")
        report.sites.append(
            WidthSite(
                name=name,
                producer=name,
                consumers=tuple(consumers),
                activation=act,
                slope_at_zero=slope,
                norm=found["norm"],
                spatial=found["spatial"],
                pools=tuple(found["pools"]),
            )
        )
    return report
