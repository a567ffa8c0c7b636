"""Width sites found on the traced graph.

A width site is a hidden dimension produced by one layer (`producer`) and read by one or more
layers (`consumers`) through element-wise ops only (activations, dropout). Growing it by K
neurons adds K outputs to the producer and K inputs to every consumer. Anything else on the path
(an addition, a reshape, a model output, an unknown module) ties the dimension to something this
finder does not yet model, so the site is reported as skipped with the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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

    def modules(self, root: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        return root.get_submodule(self.producer), [root.get_submodule(c) for c in self.consumers]

    def width(self, root: nn.Module) -> int:
        producer = root.get_submodule(self.producer)
        return handler_for(producer).out_size(producer)

    def params_per_neuron(self, root: nn.Module) -> int:
        producer, consumers = self.modules(root)
        return handler_for(producer).params_per_output(producer) + sum(
            handler_for(c).params_per_input(c) for c in consumers
        )


@dataclass
class CandidateReport:
    sites: list[WidthSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why it cannot grow)


def _follow(gm: fx.GraphModule, start: fx.Node) -> tuple[list[fx.Node], list[float], str | None]:
    """Consumers reached from `start` through element-wise ops, the activation slopes met on
    the way, and the reason the path is not a plain site (None when it is)."""
    consumers: list[fx.Node] = []
    slopes: list[tuple[float, str]] = []
    frontier, seen = [start], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return [], [], "its output is a model output"
            if user.args[:1] != (node,) or any(
                isinstance(a, fx.Node) for a in list(user.args[1:]) + list(user.kwargs.values())
            ):
                return [], [], f"its output is combined with another tensor in '{user.name}'"
            if handler_for(module_of(gm, user)) is not None:
                consumers.append(user)
                continue
            is_elementwise, slope = elementwise_slope(gm, user)
            if not is_elementwise:
                return [], [], f"its output goes through '{user.name}', which growc cannot widen yet"
            if slope is not None:
                slopes.append((slope, activation_name(gm, user)))
            frontier.append(user)
    if not consumers:
        return [], [], "no layer reads its output"
    return consumers, slopes, None


def find_width_sites(gm: fx.GraphModule) -> CandidateReport:
    report = CandidateReport()
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if handler_for(module) is None:
            continue
        name = str(node.target)
        if calls[name] > 1:
            report.skipped.append((name, "the layer is called more than once (shared weights)"))
            continue
        consumers, slopes, reason = _follow(gm, node)
        if reason is None:
            shared = [str(c.target) for c in consumers if calls[str(c.target)] > 1]
            if shared:
                reason = f"its reader '{shared[0]}' is called more than once (shared weights)"
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        # With several activations on the way the first one decides the linearization.
        slope, act = slopes[0] if slopes else (1.0, "identity")
        report.sites.append(
            WidthSite(
                name=name,
                producer=name,
                consumers=tuple(str(c.target) for c in consumers),
                activation=act,
                slope_at_zero=slope,
            )
        )
    return report
