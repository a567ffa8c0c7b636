"""Keeping the traced graph faithful to the module's mode (train / eval).

torch.fx records one run of `forward`. Where that run reads `self.training` (stochastic depth,
a BatchNorm written by hand, dropout called as a function), the value read at trace time is
frozen into the graph: a graph traced in training mode would keep dropping paths in eval mode
and in the exported ONNX file. So the model is traced in both modes and the two graphs are
compared node by node. Where they differ:

- inside a submodule, that submodule becomes a leaf of the graph: it is called as a whole and
  reads its own `self.training` at every call (its Parameters still grow where growc knows the
  module's type, a BatchNorm subclass for example);
- in the root's own forward, a constant that is True in the training graph and False in the
  eval graph becomes a read of the graph's own `training` flag; any other difference there is
  an error that says where the branch is and how to move it into a submodule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from growc.errors import TraceError

#: The graph's own attribute a root-level `self.training` read becomes (every nn.Module has it).
MODE_FLAG = "training"


def is_mode_flag(node: fx.Node) -> bool:
    """A read of the graph's mode: a flag, not a tensor (no units flow through it, nothing to save)."""
    return node.op == "get_attr" and node.target == MODE_FLAG


@contextmanager
def modules_in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Every module of `model` in `training` mode for the block; each one's own mode after it."""
    before = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, mode in before:
            module.training = mode


@dataclass(frozen=True)
class Difference:
    owner: str | None  # the innermost submodule whose forward made the differing node; None: the root
    node: fx.Node  # the node of the training graph where the graphs part
    # The arguments (positions, or keyword names) that are True in training and False in eval,
    # when the nodes differ in nothing else.
    flags: tuple[int | str, ...] = ()


def _owner(node: fx.Node | None) -> str | None:
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return path or None


def _encode(value: Any) -> Any:
    """An argument as something comparable across the two graphs (nodes by name)."""
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_encode(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _encode(v)) for k, v in value.items()))
    return ("value", type(value).__name__, repr(value))


def _signature(node: fx.Node) -> tuple:
    return node.op, str(node.target), _encode(node.args), _encode(node.kwargs)


def _flag_positions(train_node: fx.Node, eval_node: fx.Node) -> tuple[int | str, ...] | None:
    """The arguments (positions or keywords) that are True in one node and False in the other,
    when the nodes differ in nothing else; None otherwise."""
    a, b = train_node, eval_node
    if (a.op, a.target, len(a.args), a.kwargs.keys()) != (b.op, b.target, len(b.args), b.kwargs.keys()):
        return None
    pairs = [
        *((i, x, y) for i, (x, y) in enumerate(zip(a.args, b.args))),
        *((k, a.kwargs[k], b.kwargs[k]) for k in a.kwargs),
    ]
    flags = []
    for key, x, y in pairs:
        if x is True and y is False:
            flags.append(key)
        elif _encode(x) != _encode(y):
            return None
    return tuple(flags) or None


def differences(train_graph: fx.Graph, eval_graph: fx.Graph) -> list[Difference]:
    """Where the two traces part: every flag-only difference, and the first other one."""
    found = []
    train_nodes, eval_nodes = list(train_graph.nodes), list(eval_graph.nodes)
    for a, b in zip(train_nodes, eval_nodes):
        if _signature(a) == _signature(b):
            continue
        flags = _flag_positions(a, b)
        found.append(Difference(owner=_owner(a) or _owner(b), node=a, flags=flags or ()))
        if flags is None:
            return found  # after a structural difference the node names no longer line up
    if len(train_nodes) != len(eval_nodes):
        longer = train_nodes if len(train_nodes) > len(eval_nodes) else eval_nodes
        extra = longer[min(len(train_nodes), len(eval_nodes)) - 1]
        found.append(Difference(owner=_owner(extra), node=extra))
    return found


def mode_faithful_graph(
    model: nn.Module, trace_with_leaves: Callable[[set[str]], fx.Graph], leaves: set[str]
) -> tuple[fx.Graph, set[str]]:
    """The training-mode graph of `model` that also computes its eval mode, and the leaves that
    took: `trace_with_leaves(leaves)` traces with those module paths kept whole."""
    leaves = set(leaves)
    for _ in range(64):  # each round makes at least one more module a leaf
        with modules_in_mode(model, True):
            train_graph = trace_with_leaves(leaves)
        with modules_in_mode(model, False):
            eval_graph = trace_with_leaves(leaves)
        found = differences(train_graph, eval_graph)
        new_leaves = {d.owner for d in found if d.owner is not None and d.owner not in leaves}
        if new_leaves:
            leaves |= new_leaves
            continue
        for d in found:
            if d.owner is not None or not d.flags:
                raise TraceError(
                    f"{type(model).__name__}'s own forward branches on self.training (the graphs of the two "
                    f"modes part at '{d.node.name}'): growc keeps one graph for both, so move that branch into "
                    "a submodule, which growc then calls as a whole in either mode"
                )
        _read_mode_flags(train_graph, [d for d in found if d.flags])
        return train_graph, leaves
    raise TraceError(f"{type(model).__name__} behaves differently in train and eval mode in too many places")


def _read_mode_flags(graph: fx.Graph, found: list[Difference]) -> None:
    """Replace the frozen True of the root's own `self.training` reads by the graph's flag."""
    if not found:
        return
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        flag = graph.get_attr(MODE_FLAG)
    for d in found:
        d.node.args = tuple(flag if i in d.flags else a for i, a in enumerate(d.node.args))
        d.node.kwargs = {k: flag if k in d.flags else v for k, v in d.node.kwargs.items()}
