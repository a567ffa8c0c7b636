"""The architecture of a traced model as JSON, and back: no pickle, no user code needed.

Every node of the fx graph is written with its op, target and arguments; every module it calls
is written as its torch.nn class name with the constructor arguments read back from its
attributes. Loading resolves targets only inside an allow-list of namespaces (torch, operator,
math) and modules only from `torch.nn`, so a checkpoint can never run arbitrary code.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from growc.errors import CheckpointError
from growc.graph.modes import is_mode_flag

_NAMESPACES = {
    "torch",
    "torch.nn.functional",
    "torch.functional",
    "torch.special",
    "operator",
    "_operator",
    "math",
    "builtins",
}
#: The builtins a traced forward may call (x.shape is getattr(x, "shape")); shared with deploy/standalone.py.
TRACED_BUILTINS = {"getattr", "len", "int", "float"}


class UnserializableModel(CheckpointError):
    """The graph uses a module or function that the architecture JSON cannot name."""


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", None)
    if fn is getattr(torch, str(name), None):
        module = "torch"
    elif fn is getattr(torch.nn.functional, str(name), None):
        module = "torch.nn.functional"
    elif fn is getattr(operator, str(name), None):
        module = "operator"
    elif module.startswith("torch._C"):  # a C binding: its public name in torch.special, if any
        public = next((attr for attr in dir(torch.special) if getattr(torch.special, attr) is fn), None)
        if public is not None:
            module, name = "torch.special", public
    if module not in _NAMESPACES or name is None or (module == "builtins" and name not in TRACED_BUILTINS):
        raise UnserializableModel(f"the graph calls {module}.{name}, which a checkpoint cannot name")
    return f"{module}:{name}"


def _resolve_function(name: str) -> Any:
    module, _, attr = name.partition(":")
    if module not in _NAMESPACES or (module == "builtins" and attr not in TRACED_BUILTINS):
        raise CheckpointError(f"the checkpoint names a function outside torch/operator/math: {name}")
    namespace = {"builtins": builtins, "math": math, "_operator": operator}.get(module) or importlib.import_module(
        module
    )
    if not hasattr(namespace, attr):
        raise CheckpointError(f"the checkpoint names {name}, which this torch does not have")
    return getattr(namespace, attr)


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            return {"float": str(value)}
        return value
    raise UnserializableModel(f"a graph argument of type {type(value).__name__} cannot be written to a checkpoint")


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if "node" in value:
        return nodes[value["node"]]
    if "tuple" in value:
        return tuple(_decode(v, nodes) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v, nodes) for k, v in value["dict"].items()}
    if "slice" in value:
        return slice(*(_decode(v, nodes) for v in value["slice"]))
    if "dtype" in value:
        return getattr(torch, value["dtype"])
    if "device" in value:
        return torch.device(value["device"])
    if "ellipsis" in value:
        return Ellipsis
    if "float" in value:
        return float(value["float"])
    raise CheckpointError(f"unknown value in the checkpoint's graph: {value}")


_SPECIAL_ARGS = {
    "bias": lambda m: (
        getattr(m, "bias", None) is not None if not isinstance(m, nn.MultiheadAttention) else m.in_proj_bias is not None
    ),
    "add_bias_kv": lambda m: m.bias_k is not None,
}


def module_spec(module: nn.Module) -> dict:
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        raise UnserializableModel(f"module type {cls.__name__} is not a torch.nn module")
    kwargs = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in _SPECIAL_ARGS:
            kwargs[name] = _SPECIAL_ARGS[name](module)
        elif hasattr(module, name):
            kwargs[name] = _encode(getattr(module, name))
    return {"type": cls.__name__, "kwargs": kwargs}


def build_module(spec: dict) -> nn.Module:
    cls = getattr(nn, spec["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"the checkpoint names module type {spec['type']}, which torch.nn does not have")
    kwargs = {k: _decode(v, {}) for k, v in spec["kwargs"].items()}
    return cls(**kwargs)


def architecture(gm: fx.GraphModule) -> dict:
    """The graph and its modules as plain JSON-able data."""
    nodes, modules, attrs = [], {}, []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            modules[str(target)] = module_spec(gm.get_submodule(str(target)))
        elif node.op == "call_function":
            target = _function_name(target)
        elif node.op == "get_attr" and not is_mode_flag(node):  # the mode flag is every module's own
            attrs.append(str(target))
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "target": str(target),
                "args": _encode(node.args),
                "kwargs": _encode(dict(node.kwargs)),
            }
        )
    return {"format": 1, "class_name": type(gm).__name__, "nodes": nodes, "modules": modules, "attributes": attrs}


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(leaf, module)


def rebuild(arch: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A GraphModule with the architecture's structure; weights still to be loaded."""
    root = nn.Module()
    for path, spec in arch["modules"].items():
        _set_module(root, path, build_module(spec))
    for path in arch.get("attributes", []):
        *parents, leaf = path.split(".")
        owner = root.get_submodule(".".join(parents)) if parents else root
        if path not in tensors:
            raise CheckpointError(f"the checkpoint lacks the tensor '{path}' that its graph reads")
        owner.register_buffer(leaf, torch.empty_like(tensors[path]))
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in arch["nodes"]:
        op, target = spec["op"], spec["target"]
        if op == "call_function":
            target = _resolve_function(target)
        args = _decode(spec["args"], nodes)
        kwargs = _decode(spec["kwargs"], nodes)
        if op == "output":
            nodes[spec["name"]] = graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), kwargs, name=spec["name"])
        nodes[spec["name"]] = node
    gm = fx.GraphModule(root, graph, arch.get("class_name", "GrownModel"))
    return gm
