"""Forward passes of a traced graph on fixed inputs that recompute only what changed.

The amplitude line search evaluates the same few hundred samples again and again while one site
changes: its consumers' weights (the best update), then its writers' new rows and readers' new
columns at each amplitude. Everything upstream of the site computes the same values every time.
`IncrementalForward` keeps those values from one evaluation to the next and reruns only the
nodes that read a changed layer or a changed value.

What counts as changed is measured, not declared: at every evaluation each layer's parameters,
buffers and plain attributes (a LayerNorm's `eps`, say) are compared with a copy taken when its
node last ran, and a node whose layer differs in any bit (or is another object) runs again, with
everything downstream of it. A change to the graph itself (its generated code) drops every value.
So growth code need not say what it touched, and a value kept is the value a forward would give.

In-place operations are run out of place (`relu_` as `relu`, `+=` as `+`, modules with
`inplace=True` with it off for the call): the numbers are the same, and a kept value can no
longer be overwritten by a later node. That holds where no node reads an in-place call's input
after the call (`h = relu_(h)`, torchvision's `out += identity`); a graph where one does
(`h.add_(1)` and then `h` read again), or with an in-place call that has no out-of-place form,
is not reused at all: every evaluation is a plain forward.

Memory: the kept values are bounded by `budget_bytes` (tensors sharing storage count once);
where they do not all fit, the latest nodes are kept, since they save the most recomputation
for a site deep in the network.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

#: `x += y` and friends, traced as operator.i*: their out-of-place forms.
_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
    operator.imatmul: operator.matmul,
}

_PLAIN = (int, float, bool, str, type(None))


class _NotReusable(Exception):
    """The graph holds an in-place call with no out-of-place form."""


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's attributes that are plain values (ints, floats, shapes...), which its forward
    may read: `eps`, `num_heads`, `stride`..."""
    out = {}
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            out[name] = value
    return out


class _Snapshot:
    """What a stateful node read when it last ran: its object, and a copy of its tensors and
    plain attributes, to compare with what it would read now."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        if isinstance(obj, nn.Module):
            self.tensors = [(t, t.detach().clone()) for t in (*obj.parameters(), *obj.buffers())]
            self.attributes = {name: _plain_attributes(m) for name, m in obj.named_modules(remove_duplicate=False)}
        elif isinstance(obj, Tensor):
            self.tensors, self.attributes = [(obj, obj.detach().clone())], {}
        else:
            self.tensors, self.attributes = [], {"": obj}

    def unchanged(self, obj: Any) -> bool:
        if obj is not self.obj:
            return False
        if isinstance(obj, nn.Module):
            now = [*obj.parameters(), *obj.buffers()]
            if len(now) != len(self.tensors) or any(t is not old for t, (old, _) in zip(now, self.tensors)):
                return False
            attributes = {name: _plain_attributes(m) for name, m in obj.named_modules(remove_duplicate=False)}
            if attributes != self.attributes:
                return False
        elif not isinstance(obj, Tensor):
            try:
                return bool(obj == self.attributes[""])
            except Exception:  # an object without a plain equality: take it as changed
                return False
        return all(
            t.shape == copy.shape and t.dtype == copy.dtype and torch.equal(t.detach(), copy)
            for t, copy in self.tensors
        )


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _nbytes(values: Sequence[Any], seen: set[int]) -> int:
    """Bytes of the storages behind `values` not already in `seen` (which it extends)."""
    total = 0
    for value in values:
        for t in _tensors_in(value):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


class IncrementalForward:
    """Outputs of one GraphModule on the same chunks of inputs, evaluated again and again while
    some of its layers change (see the module's docstring)."""

    def __init__(self, budget_bytes: int = 256 * 2**20) -> None:
        self.budget_bytes = budget_bytes
        self._key: tuple | None = None
        self._snapshots: dict[fx.Node, _Snapshot] = {}
        self._kept: list[dict[fx.Node, Any]] = []  # per chunk: node -> value, in graph order
        self._storable: set[fx.Node] | None = None  # None until the first evaluation chose them
        self._plain = False  # the graph cannot be reused: every evaluation is a plain forward
        self.reused_nodes = 0  # node evaluations skipped, over this object's life
        self.run_nodes = 0

    def outputs(self, gm: fx.GraphModule, chunks: Sequence[Sequence[Tensor]]) -> list[Any]:
        """The graph's output for each chunk of inputs, as `gm(*chunk)` computes it in the
        modes the modules are in now. The chunks must be the same tensors at every call."""
        inputs = tuple((t.data_ptr(), tuple(t.shape)) for chunk in chunks for t in _tensors_in(list(chunk)))
        key = (id(gm), id(gm.graph), gm.code, inputs)
        if key != self._key or len(chunks) != len(self._kept):
            self._reset(key, len(chunks))
        if self._plain:
            with torch.no_grad():
                return [gm(*chunk) for chunk in chunks]
        nodes = list(gm.graph.nodes)
        if not self._snapshots and not _mutations_follow_the_data(gm, nodes):
            self._plain = True
            return self.outputs(gm, chunks)
        changed = self._changed(gm, nodes)
        try:
            with torch.no_grad():
                results = [self._run(gm, nodes, changed, i, chunk) for i, chunk in enumerate(chunks)]
        except _NotReusable:
            self._reset(key, len(chunks))
            self._plain = True
            return self.outputs(gm, chunks)
        for node in changed:
            if node.op in ("call_module", "get_attr"):
                self._snapshots[node] = _Snapshot(_fetch(gm, node.target))
        if self._storable is None:
            self._storable = set().union(*(kept.keys() for kept in self._kept))
        return results

    def _reset(self, key: tuple, chunks: int) -> None:
        self._key = key
        self._snapshots = {}
        self._kept = [{} for _ in range(chunks)]
        self._seen: list[set[int]] = [set() for _ in range(chunks)]  # per chunk: storages counted
        self._bytes = [0] * chunks
        self._storable = None
        self._plain = False

    def _changed(self, gm: fx.GraphModule, nodes: list[fx.Node]) -> set[fx.Node]:
        """Nodes whose value may differ from the kept one: those reading a changed layer or
        attribute, and everything downstream of them."""
        changed: set[fx.Node] = set()
        for node in nodes:
            if node.op in ("call_module", "get_attr"):
                snapshot = self._snapshots.get(node)
                if snapshot is None or not snapshot.unchanged(_fetch(gm, node.target)):
                    changed.add(node)
                    continue
            if any(arg in changed for arg in node.all_input_nodes):
                changed.add(node)
        return changed

    def _run(self, gm: fx.GraphModule, nodes: list[fx.Node], changed: set[fx.Node], index: int, chunk) -> Any:
        kept = self._kept[index]
        available = {n for n in kept if n not in changed}
        needed: set[fx.Node] = set()
        stack = [nodes[-1]]
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                if node not in available:
                    stack.extend(node.all_input_nodes)
        env: dict[fx.Node, Any] = {}
        placeholders = iter(chunk)
        for node in nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders, None)
            elif node not in needed:
                continue
            elif node in available:
                env[node] = kept[node]
                self.reused_nodes += 1
            elif node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                env[node] = _run_node(gm, node, env)
                self.run_nodes += 1
                self._keep(index, node, env[node])
        raise RuntimeError("the graph has no output node")

    def _keep(self, index: int, node: fx.Node, value: Any) -> None:
        """Keep a value just computed. In the first evaluation every tensor value is kept, the
        earliest dropped once a chunk's share of the budget is spent; later, the same nodes."""
        if node.op == "get_attr" or not _tensors_in(value):
            return
        kept = self._kept[index]
        if self._storable is not None:
            if node in self._storable:
                kept[node] = value
            return
        kept[node] = value
        share = self.budget_bytes // max(len(self._kept), 1)
        seen = self._seen[index]
        self._bytes[index] += _nbytes([value], seen)
        while kept and self._bytes[index] > share:
            del kept[next(iter(kept))]  # dicts keep insertion order: the earliest node
            seen.clear()
            self._bytes[index] = _nbytes(list(kept.values()), seen)


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` writes into its first argument (as far as the graph shows)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", None) is True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return False


def _mutations_follow_the_data(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """Whether running every in-place call out of place gives the same values: no node reads
    an in-place call's input after the call (it would see the written values in a forward)."""
    order = {node: i for i, node in enumerate(nodes)}
    for node in nodes:
        if not _in_place(gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if any(order[user] > order[node] for user in node.args[0].users if user is not node):
            return False
    return True


def _run_node(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """One node, as the generated forward runs it, but out of place."""
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = dict(fx.node.map_arg(node.kwargs, lambda n: env[n]))
    if node.op == "get_attr":
        return _fetch(gm, node.target)
    if kwargs.get("inplace") is True:
        kwargs["inplace"] = False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            try:
                return module(*args, **kwargs)
            finally:
                module.inplace = True
        return module(*args, **kwargs)
    if node.op == "call_function":
        target = _INPLACE_OPERATORS.get(node.target, node.target)
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            if target is getattr(torch, name, None) or target is getattr(nn.functional, name, None):
                target = getattr(torch, name[:-1], None) or getattr(nn.functional, name[:-1], None)
            if target is None:
                raise _NotReusable
        return target(*args, **kwargs)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__"):
            if not callable(getattr(Tensor, name[:-1], None)):
                raise _NotReusable
            name = name[:-1]
        return getattr(args[0], name)(*args[1:], **kwargs)
    raise RuntimeError(f"unexpected node {node.op} {node.target}")
