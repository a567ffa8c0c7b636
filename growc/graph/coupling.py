"""Coupling analysis: which tensors share a hidden dimension, so that growing it is one act.

Start from a layer's output and follow its units through the graph. Ops that act on each unit
alone (activations, dropout, BatchNorm, depthwise convs, pooling, flattening) carry them along.
An addition ties the dimension to the other operand: walking back from it finds the other
layers that write the same units (a residual stream: the stem, every block's last layer, the
downsampling shortcut). A product with another computed tensor of the units' size (a gate, as
in squeeze-excitation: `x * sigmoid(fc2(...))`) ties the layer writing that factor the same way:
it gets zero rows too, so the new units' factor is the gate's value at 0 (0.5 for a sigmoid) and
a new unit that is 0 stays 0 whatever the gate. A concatenation places the units at an offset
among other tensors'.
What reads the units (a Linear or Conv2d) is a reader. Anything else (a model output, an op
growc does not know, the model's input added to the stream) makes the group ungrowable, with
the reason in words.

The result, a `Group`, lists the nodes in graph order; `trace_values` then says, for a chosen
source layer, what each node holds at the new units: the source's new neurons (live) or zeros
(the other writers get zero rows), with the pooling and flattening on the way.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from growc.graph.attention import HeadPath, head_path
from growc.graph.elementwise import activation_name, elementwise_op, elementwise_slope
from growc.graph.handlers import handler_for, is_batchnorm, is_depthwise, is_unit_norm, unhandled_reason
from growc.graph.modes import is_mode_flag
from growc.graph.tokens import is_token_cat, map_of_tokens, selected_token, token_parameter, tokens_of_map
from growc.graph.trace import module_of

_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ADDS = {operator.add, torch.add, operator.iadd}
_MULS = {operator.mul, torch.mul, operator.imul}


class Ungrowable(Exception):
    """The group cannot grow; the message says why, in the user's terms."""


@dataclass
class Group:
    """The nodes that carry one hidden dimension, and the layers around it."""

    nodes: list[fx.Node] = field(default_factory=list)  # in graph order
    writers: list[fx.Node] = field(default_factory=list)  # layers whose outputs are the units
    readers: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (reader layer, node it reads)
    cat_slots: dict[fx.Node, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    # Tensors of the module broadcast onto the units (position embeddings added, scales
    # multiplied): (path, the value of their new entries: 0 for a term, 1 for a factor).
    broadcasts: list[tuple[str, float]] = field(default_factory=list)
    broadcast_at: dict[str, fx.Node] = field(default_factory=dict)  # path -> the op that applies it
    gates: list[fx.Node] = field(default_factory=list)  # writers of factors multiplying the units (of `writers`)
    # Feature maps laid out as tokens (`graph/tokens.py`): the swaps that make them (B, T, C),
    # and the members known to hold tokens, units last.
    token_views: list[fx.Node] = field(default_factory=list)
    tokens: set[fx.Node] = field(default_factory=set)
    heads: HeadPath | None = None  # the units are attention heads: q, k and v write them (`graph/attention.py`)


@dataclass(frozen=True)
class Value:
    """What a node of the group holds at the new units, for one choice of source."""

    live: bool  # the source's new neurons reach it (else the units are zero there)
    stage: str  # "pre" / "post" (an activation passed) / "pooled" / "flat" (flattened for a linear layer)
    pools: tuple[tuple, ...] = ()
    slopes: tuple[tuple[float, str, bool], ...] = ()  # (slope at 0, op's name, kink at 0) per non-linearity
    slot: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # layers whose units come before / after
    scale: float = 1.0  # constant factors on the way (gates at their value for zero rows)
    constant: float | None = 0.0  # the value at the new units while their neurons are 0 (None: unknown)
    stopped: str | None = None  # the product that cut the new neurons off here, if one did


def is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _POOL_MODULES)
    return (node.op == "call_function" and node.target in _POOL_FUNCTIONS) or _is_kept_global_mean(node)


def _is_kept_global_mean(node: fx.Node) -> bool:
    """x.mean((2, 3), keepdim=True): global average pooling that keeps a 1x1 map (timm's
    squeeze-excitation)."""
    dims = _mean_dims(node, keepdim=True)
    return dims is not None and {d % 4 for d in dims} == {2, 3}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def window(kernel, stride, padding=0, ceil_mode: bool = False, count_include_pad: bool = True) -> tuple:
    """A pooling window as the statistics read it (see `graph/samples.py`):
    ("window", kernel, stride, padding, ceil_mode, count_include_pad)."""
    return ("window", _pair(kernel), _pair(stride or kernel), _pair(padding), bool(ceil_mode), bool(count_include_pad))


def pool_spec(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """The pooling's geometry: a `window(...)`, or ("adaptive", output size). Max pooling is read
    as the average over the same windows (padding not counted); what that cannot express
    (dilated windows, a divisor override) stops the site with the reason."""
    if _is_kept_global_mean(node):
        return ("adaptive", (1, 1))
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return _adaptive(node, m.output_size)
        settings = {name: getattr(m, name) for name in ("kernel_size", "stride", "padding", "ceil_mode")}
        settings["dilation"] = getattr(m, "dilation", 1)
        settings["count_include_pad"] = getattr(m, "count_include_pad", False)
        settings["divisor_override"] = getattr(m, "divisor_override", None)
    else:
        if node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            return _adaptive(node, node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
        is_max = node.target is F.max_pool2d
        names = (
            ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            if is_max
            else ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        )
        defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
        defaults.update({"count_include_pad": not is_max, "divisor_override": None})
        settings = {
            n: node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(n, defaults.get(n))
            for i, n in enumerate(names)
        }
        settings.setdefault("dilation", 1)
        settings.setdefault("divisor_override", None)
        settings.setdefault("count_include_pad", False)
    if any(isinstance(v, fx.Node) for v in settings.values()):
        raise Ungrowable(f"the pooling '{node.name}' takes its window from a computed value")
    if _pair(settings["dilation"]) != (1, 1):
        raise Ungrowable(f"the pooling '{node.name}' is dilated, which growc's statistics cannot follow")
    if settings["divisor_override"] is not None:
        raise Ungrowable(f"the pooling '{node.name}' overrides its divisor, which growc's statistics cannot follow")
    return window(
        settings["kernel_size"],
        settings["stride"],
        settings["padding"],
        settings["ceil_mode"],
        settings["count_include_pad"],
    )


def _adaptive(node: fx.Node, size) -> tuple:
    size = _pair(size)
    if any(not isinstance(v, int) for v in size):
        raise Ungrowable(
            f"the adaptive pooling '{node.name}' keeps a dimension as it is (None), which growc cannot follow"
        )
    return ("adaptive", size)


def _mean_dims(node: fx.Node, keepdim: bool = False) -> tuple[int, ...] | None:
    """The dimensions `x.mean(dims)` / `torch.mean(x, dims)` averages, removing them (or, with
    `keepdim`, keeping them with size 1); None for any other op (or the other keepdim, or
    dimensions not given as integers)."""
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    kept = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if (
        kept is not keepdim
        or not isinstance(dims, (tuple, list))
        or not dims
        or not all(isinstance(d, int) for d in dims)
    ):
        return None
    return tuple(dims)


def is_global_mean(node: fx.Node) -> bool:
    """x.mean((2, 3)) or torch.mean(x, (-2, -1)): global average pooling and flattening in one."""
    dims = _mean_dims(node)
    return dims is not None and {d % 4 for d in dims} == {2, 3}


def is_token_mean(node: fx.Node) -> bool:
    """x.mean(-2) or torch.mean(x, dim=(-3, -2)): an average over dimensions before the last,
    counted from the end (a sequence's tokens). Vector units, the last dimension, pass unchanged;
    a feature map's channels would not (its sites refuse it, `candidates._site_from`)."""
    dims = _mean_dims(node)
    return dims is not None and all(d < -1 for d in dims)


def is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Flattening (B, C, ...) to (B, features), channel-major: what a linear layer after convs reads."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1 and len(node.args) <= 2
    if node.op == "call_method" and node.target in ("view", "reshape"):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return len(dims) == 2 and dims[1] == -1
    return False


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MULS) or (
        node.op == "call_method" and node.target in ("mul", "mul_")
    )


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat)


def _cat_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = list(node.args) + list(node.kwargs.values())
    flat = []
    for a in args:
        flat += [x for x in a if isinstance(x, fx.Node)] if isinstance(a, (list, tuple)) else [a]
    return [a for a in flat if isinstance(a, fx.Node) and not is_mode_flag(a)]


def _is_size_of(arg: fx.Node, node: fx.Node) -> bool:
    """x.size(0) / x.shape[0] / x.dim(): a size read from `node`, not a tensor."""
    if arg.op == "call_method" and arg.target in ("size", "dim"):
        return arg.args[:1] == (node,)
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[0], fx.Node):
        return _is_size_of(arg.args[0], node)
    return arg.op == "call_function" and arg.target is getattr and arg.args[:1] == (node,)


_REARRANGING = {"view", "reshape", "transpose", "permute", "unflatten", "movedim", "chunk", "split", "narrow", "unbind"}


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _rearranges(node: fx.Node) -> bool:
    """A view, reshape, transpose, permute or split of the tensor (not a flatten for a linear
    layer, which `is_flatten` recognizes first)."""
    return node.op in ("call_method", "call_function") and _op_name(node) in _REARRANGING


def _feeds_attention(node: fx.Node, hops: int = 3) -> bool:
    """`node` reaches `F.scaled_dot_product_attention` or a matmul within a few ops (the
    rearrangement into heads before it)."""
    if hops == 0:
        return False
    for user in node.users:
        if user.op == "call_function" and user.target in (
            F.scaled_dot_product_attention,
            torch.matmul,
            operator.matmul,
        ):
            return True
        if _feeds_attention(user, hops - 1):
            return True
    return False


def _only_input(user: fx.Node, node: fx.Node) -> bool:
    """`node` is the op's first input and no other tensor enters it."""
    if user.args[:1] != (node,):
        return False
    return all(a is node or _is_size_of(a, node) for a in _tensor_args(user))


def _carries_units(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that maps each unit to itself, alone: an element-wise op, a BatchNorm, a depthwise
    conv; or a LayerNorm / RMSNorm across them, which growth keeps exact (`UnitNormHandler`)."""
    module = module_of(gm, node)
    return is_batchnorm(module) or is_depthwise(module) or is_unit_norm(module) or elementwise_slope(gm, node)[0]


class _Walk:
    """Collects the group containing `start`'s output (see the module's docstring)."""

    def __init__(self, gm: fx.GraphModule, start: fx.Node) -> None:
        self.gm = gm
        self.group = Group(writers=[start])
        self.members: set[fx.Node] = {start}
        self.todo = [start]

    def run(self) -> Group:
        while self.todo:
            node = self.todo.pop()
            for user in list(node.users):
                self._visit(node, user)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        self.group.nodes = sorted(self.members, key=order.__getitem__)
        self.group.writers.sort(key=order.__getitem__)
        self.group.readers.sort(key=lambda r: order[r[0]])
        return self.group

    def _add_member(self, node: fx.Node) -> None:
        if node not in self.members:
            self.members.add(node)
            self.todo.append(node)

    def _visit(self, node: fx.Node, user: fx.Node) -> None:
        if self._visit_tokens(node, user):
            return
        self._visit_units(node, user)
        if node in self.group.tokens and user in self.members:
            self.group.tokens.add(user)

    def _visit_tokens(self, node: fx.Node, user: fx.Node) -> bool:
        """The token patterns of `graph/tokens.py` and the heads of `graph/attention.py`; False
        where `user` is none of them."""
        heads = head_path(node) if node.op == "call_module" and node in self.group.writers else None
        if heads is not None and self.group.heads is None:
            # New heads: rows of q, k and v (one head's values each), columns of the output projection.
            self.group.heads = heads
            for projection in (heads.q, heads.k, heads.v):
                if projection not in self.members:
                    self.members.add(projection)
                    self.group.writers.append(projection)
            self.members.update(heads.nodes)
            self._add_member(heads.joined)
            return True
        views = tokens_of_map(node)
        if views is not None and user is views[0]:  # a feature map laid out as tokens
            flat, swap = views
            self.members.add(flat)
            self._add_member(swap)
            self.group.tokens.add(swap)
            self.group.token_views.append(swap)
            return True
        if node in self.group.tokens and is_token_cat(user):  # a class token joins the sequence
            self._token_cat(user, arrived_from=node)
            return True
        if selected_token(user) is not None:
            if node not in self.group.tokens:
                raise Ungrowable(
                    f"'{user.name}' indexes these units' tensor and growc cannot tell whether it selects a token "
                    "or units"
                )
            self._add_member(user)  # one token of each sample: (B, D), units last
            return True
        return False

    def _token_cat(self, cat: fx.Node, arrived_from: fx.Node | None = None) -> None:
        """A concatenation along the tokens: every part writes the same units (a class token
        Parameter grows with the units like a position term)."""
        for part in cat.args[0] if cat.args else cat.kwargs.get("tensors", ()):
            if part is arrived_from or part in self.members:
                continue
            parameter = token_parameter(part)
            if parameter is not None:
                if len(parameter.users) > 1:
                    raise Ungrowable(
                        f"the tensor '{parameter.target}' concatenated in '{cat.name}' is also used elsewhere"
                    )
                self.group.broadcasts.append((str(parameter.target), 0.0))
                self.group.broadcast_at[str(parameter.target)] = cat
            else:
                self._pull_writer(part, cat, verb="concatenated with")
                self.group.tokens.add(part)
        self.group.tokens.add(cat)
        self._add_member(cat)

    def _visit_units(self, node: fx.Node, user: fx.Node) -> None:
        if user.op == "output":
            raise Ungrowable(f"'{node.name}' is a model output, whose size is fixed")
        if _is_size_of(user, node):
            return
        if _is_add(user):
            if node in self.group.cat_slots or any(n in self.group.cat_slots for n in self._upstream(node)):
                raise Ungrowable(f"'{user.name}' adds to units that were concatenated with others")
            for other in _tensor_args(user):
                if other is not node and other not in self.members:
                    self._pull_writer(other, user)
            self._add_member(user)
            return
        if _is_cat(user):
            self._enter_cat(node, user)
            return
        if _is_mul(user):
            others = [a for a in _tensor_args(user) if a is not node]
            computed = [a for a in others if a.op != "get_attr" and a not in self.members]
            concatenated = node in self.group.cat_slots or any(n in self.group.cat_slots for n in self._upstream(node))
            if computed and concatenated:  # the factor's writer would get its new rows at the end, not the offset
                raise Ungrowable(
                    f"'{user.name}' multiplies units that were concatenated with others by a computed factor"
                )
            for factor in others:  # a computed factor: a gate, whose writer grows with the units
                if factor.op != "get_attr" and factor not in self.members:
                    self._pull_writer(factor, user, verb="multiplied by")
            others = [a for a in others if a.op == "get_attr"]
            self.group.broadcasts += [
                (str(a.target), 1.0) for a in others if (str(a.target), 1.0) not in self.group.broadcasts
            ]
            self.group.broadcast_at.update({str(a.target): user for a in others})
            self._add_member(user)
            return
        if not _only_input(user, node):
            self._refuse_rearranging(user)
            raise Ungrowable(f"'{user.name}' combines it with another tensor in a way growc cannot widen")
        module = module_of(self.gm, user)
        if handler_for(module) is not None:
            if (user, node) not in self.group.readers:
                self.group.readers.append((user, node))
            return
        if (
            _carries_units(self.gm, user)
            or is_pool(self.gm, user)
            or is_flatten(self.gm, user)
            or is_global_mean(user)
            or is_token_mean(user)
        ):
            self._add_member(user)
            return
        why = unhandled_reason(module)
        if why is not None:
            raise Ungrowable(f"it is read by '{user.name}', which growc cannot widen: {why}")
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            how = (
                "in groups"
                if isinstance(module, nn.GroupNorm)
                else "over more than their last dimension, or without a weight"
            )
            raise Ungrowable(
                f"the {type(module).__name__} '{user.name}' normalizes across these units {how}: a new unit would "
                "change every old unit's output, so growth could not start from the same function"
            )
        self._refuse_rearranging(user)
        what = f"the {type(module).__name__} '{user.name}'" if module is not None else f"'{user.name}'"
        raise Ungrowable(f"its units go through {what}, which growc cannot widen")

    @staticmethod
    def _refuse_rearranging(user: fx.Node) -> None:
        if _rearranges(user) and _feeds_attention(user):
            raise Ungrowable(
                f"'{user.name}' ({_op_name(user)}) splits its units into attention heads, which growc does not grow "
                "yet (a new head's best values depend on its attention pattern)"
            )
        if _rearranges(user):
            raise Ungrowable(
                f"'{user.name}' ({_op_name(user)}) rearranges its units (into attention heads or channel "
                "groups, say), which growc cannot follow yet"
            )

    def _upstream(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in _tensor_args(node) if a in self.members]

    def _pull_writer(self, operand: fx.Node, add: fx.Node, verb: str = "added to") -> None:
        """Walk back from an addition's other operand, or a product's other factor, to the layer
        that writes it (a writer: it gets zero rows). A factor may go through ops that are not 0 at
        0 (a gate's sigmoid); a term may not (the new units would not be the source's alone)."""
        gate = verb == "multiplied by"
        node = operand
        while node not in self.members:
            module = module_of(self.gm, node)
            if handler_for(module) is not None:
                self._check_width(node, add, verb)
                self.group.writers.append(node)
                if gate:
                    self.group.gates.append(node)
                break
            if map_of_tokens(node) is not None and not gate:  # tokens laid out from a feature map
                self.members.add(node.args[0])
                self._add_member(node)
                self.group.tokens.add(node)
                self.group.token_views.append(node)
                node = map_of_tokens(node)
                continue
            if is_token_cat(node) and not gate and any(map_of_tokens(p) is not None for p in node.args[0]):
                self._token_cat(node)
                return
            if _is_add(node):  # a sum of several writers (and perhaps the stream itself)
                self._add_member(node)
                for other in _tensor_args(node):
                    if other not in self.members:
                        self._pull_writer(other, add, verb)
                return
            if node.op == "placeholder":
                raise Ungrowable(f"the model input '{node.name}' is {verb} it in '{add.name}': its size is fixed")
            if node.op == "get_attr" and gate:
                raise Ungrowable(f"the tensor '{node.target}' is {verb} it in '{add.name}' through other ops")
            if node.op == "get_attr":  # a position embedding or bias: grows with zeros
                if len(node.users) > 1:
                    raise Ungrowable(f"the tensor '{node.target}' added to it in '{add.name}' is also used elsewhere")
                self.group.broadcasts.append((str(node.target), 0.0))
                self.group.broadcast_at[str(node.target)] = add
                return
            if _is_mul(node):  # a layer scale (x + gamma * f(x)), a gate (x + f(x) * sigmoid(g(...)))
                params = [a for a in _tensor_args(node) if a.op == "get_attr"]
                rest = [a for a in _tensor_args(node) if a.op != "get_attr"]
                self.group.broadcasts += [(str(a.target), 1.0) for a in params]
                self.group.broadcast_at.update({str(a.target): node for a in params})
                self._add_member(node)
                if len(rest) == 1:
                    node = rest[0]
                    continue
                for factor in rest:  # each factor's writer gets zero rows: their product is 0 at the units
                    if factor not in self.members:
                        self._pull_writer(factor, node, verb="multiplied by")
                return
            op = elementwise_op(self.gm, node)
            # Not zero at zero (a sigmoid): a writer's zero rows would not give zero units through it.
            if not _carries_units(self.gm, node) or (op is not None and not op.zero_at_zero and not gate):
                raise Ungrowable(f"'{node.name}' is {verb} it in '{add.name}' and growc cannot tell what writes it")
            self._add_member(node)
            node = node.args[0]
            if not isinstance(node, fx.Node):
                raise Ungrowable(f"'{operand.name}' is {verb} it in '{add.name}' and is not a layer's output")
        self._add_member(node)

    def _check_width(self, writer: fx.Node, at: fx.Node, verb: str) -> None:
        """A writer tied by an addition or a product must write as many units as the group's
        first layer: a narrower one (a one-channel attention map) is broadcast over the units."""
        start, module = self.group.writers[0], module_of(self.gm, writer)
        width = handler_for(module_of(self.gm, start)).out_size(module_of(self.gm, start))
        if handler_for(module).out_size(module) != width:
            raise Ungrowable(
                f"'{writer.name}' writes {handler_for(module).out_size(module)} values that are {verb} "
                f"{width} units in '{at.name}' (broadcast), which growc cannot widen"
            )

    def _enter_cat(self, node: fx.Node, cat: fx.Node) -> None:
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
        if _cat_dim(cat) not in (1, -1, -3):
            raise Ungrowable(f"'{cat.name}' concatenates along dimension {_cat_dim(cat)}, not the units'")
        if sum(p is node for p in parts) != 1 or any(p in self.members and p is not node for p in parts):
            raise Ungrowable(f"'{cat.name}' concatenates these units more than once")
        if node in self.group.cat_slots or any(n in self.group.cat_slots for n in self._upstream(node)):
            raise Ungrowable(f"'{cat.name}' concatenates units that were already concatenated")
        index = list(parts).index(node)
        before = tuple(w for p in parts[:index] for w in self._widths_of(p, cat))
        after = tuple(w for p in parts[index + 1 :] for w in self._widths_of(p, cat))
        self.group.cat_slots[cat] = (before, after)
        self._add_member(cat)

    def _widths_of(self, node: fx.Node, cat: fx.Node) -> tuple[str, ...]:
        """The layers whose outputs make up `node`'s units (their widths give the offsets)."""
        while True:
            module = module_of(self.gm, node)
            if handler_for(module) is not None:
                return (str(node.target),)
            if _is_cat(node):
                return tuple(w for p in node.args[0] for w in self._widths_of(p, cat))
            # Pooling keeps the channels (DenseNet's stem and transitions feed its concatenations).
            carries = _carries_units(self.gm, node) or is_pool(self.gm, node)
            if not carries or not node.args or not isinstance(node.args[0], fx.Node):
                raise Ungrowable(f"'{cat.name}' concatenates it with '{node.name}', whose width growc cannot follow")
            node = node.args[0]


def find_group(gm: fx.GraphModule, start: fx.Node) -> Group:
    """The group that `start`'s outputs belong to; raises Ungrowable with the reason."""
    return _Walk(gm, start).run()


def trace_values(gm: fx.GraphModule, group: Group, source: fx.Node) -> dict[fx.Node, Value]:
    """What each node of the group holds at the new units when `source` gets the new neurons and
    the other writers zero rows: in graph order, each node from the group nodes it reads."""
    values: dict[fx.Node, Value] = {}
    for node in group.nodes:
        if node in group.writers:
            values[node] = Value(live=node is source, stage="pre")
            continue
        inputs = [values[a] for a in _tensor_args(node) if a in values]
        live = [v for v in inputs if v.live]
        if _is_mul(node) and len(inputs) > 1:
            values[node] = _product(node, inputs)
            continue
        base = live[0] if live else inputs[0]
        values[node] = _through(gm, node, base, bool(live), group)
    return values


def _product(node: fx.Node, factors: list[Value]) -> Value:
    """A product of the group's tensors (units times a gate, or `h * sigmoid(h)`). To first order
    in the new neurons it is the one factor that is 0 while they are 0, times the others' values
    there (the product rule); the neurons get through when exactly one factor moves with them and
    the others have known non-zero values."""
    known = [v.constant for v in factors]
    constant = None if any(c is None for c in known) else math.prod(known)
    live = [v for v in factors if v.live]
    if not live:
        return replace(factors[0], constant=constant)
    moving = [i for i, v in enumerate(factors) if v.live and v.constant == 0.0]
    others = [v.constant for i, v in enumerate(factors) if moving and i != moving[0]]
    if len(moving) != 1 or any(c is None or c == 0.0 for c in others):
        return replace(live[0], live=False, constant=constant, stopped=node.name)
    chosen = factors[moving[0]]
    return replace(chosen, scale=chosen.scale * math.prod(others), constant=constant)


def _through(gm: fx.GraphModule, node: fx.Node, v: Value, live: bool, group: Group) -> Value:
    """The value after `node`, given the value `v` it reads."""
    stage, pools, slopes, slot = v.stage, v.pools, v.slopes, v.slot
    module = module_of(gm, node)
    if node in group.cat_slots:
        slot = group.cat_slots[node]
    elif is_pool(gm, node):
        if stage == "flat":
            raise Ungrowable(f"'{node.name}' pools a flattened tensor")
        pools = (*pools, pool_spec(gm, node))
        stage = "pooled"
    elif is_global_mean(node):
        pools, stage = (*pools, ("adaptive", (1, 1))), "flat"
    elif is_token_mean(node):
        pools = (*pools, ("mean", _mean_dims(node)))  # its readers see one row per sample, not per token
    elif group.heads is not None and node is group.heads.attention:
        # A new head with zero query rows attends uniformly: its values' mean over the keys.
        pools = (*pools, ("keys mean",))
    elif selected_token(node) is not None:
        pools = (*pools, ("select", 1, selected_token(node)[1]))  # one row per sample: that token's
    elif is_flatten(gm, node):
        stage = "flat"
    elif is_depthwise(module):
        if module.stride != (1, 1):
            pools = (*pools, window(1, module.stride))  # its centre tap subsamples
    elif not _is_add(node) and not is_batchnorm(module):
        op = elementwise_op(gm, node)
        if op is not None and op.slope is not None:
            slopes = (*slopes, (op.slope, activation_name(gm, node), op.kinked))
            stage = "post" if stage == "pre" else stage
        if op is not None and op.slope is not None:  # a zero unit through a sigmoid is 0.5
            constant = op.value_at_zero if v.constant == 0.0 else None
            return Value(live, stage, pools, slopes, slot, v.scale, constant)
    return Value(live=live, stage=stage, pools=pools, slopes=slopes, slot=slot, scale=v.scale, constant=v.constant)
