"""Tracing the user's model with torch.fx.

The traced GraphModule shares its submodules with the user's model: growth swaps Parameters on
those shared module objects, so the user's model, the graph and `state_dict` stay one model.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from growc.errors import TraceError
from growc.graph.attention import split_attention_modules
from growc.graph.handlers import add_mirror, owner_of
from growc.graph.modes import is_mode_flag, mode_faithful_graph
from growc.graph.tokens import flatten_patch_maps


class GrowcTracer(fx.Tracer):
    """An fx tracer that also keeps the modules the user names as opaque leaves."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.failed_in: str | None = None  # the innermost submodule being traced when tracing failed

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        # An attention module that `split_attention_modules` left whole is opaque.
        if isinstance(m, nn.MultiheadAttention):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    """The last frame of the traceback that is not inside torch or growc: the user's line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/growc/" not in path:
            return f"{frame.filename}:{frame.lineno}: {frame.line}"
    return "unknown location"


def _numeric_padding(model: nn.Module) -> None:
    """`padding="same"` / `"valid"` on a zero-padded Conv2d, written as the numbers it stands for
    where they are symmetric (odd kernels): the conv computes exactly what it did, and growth,
    whose samples are unfolded patches, reads the numbers. An even kernel's "same" pads one side
    more than the other and is left as it is (growc then leaves that conv intact, with the reason)."""
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or not isinstance(module.padding, str) or module.padding_mode != "zeros":
            continue
        if module.padding == "valid":
            module.padding = (0, 0)
        elif all(k % 2 == 1 for k in module.kernel_size):
            module.padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))


def trace(
    model: nn.Module,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace `model`, faithful to it in training and in eval mode (see
    `graph/modes.py`); raise a TraceError that names the user's line on failure. Convs with
    `padding="same"` or `"valid"` get the numbers instead, where that computes the same
    (`_numeric_padding`), and each `nn.MultiheadAttention` it can write out becomes a
    `SplitAttention` (`graph/attention.py`), in `model` too."""
    tracer = GrowcTracer(leaf_modules)
    _numeric_padding(model)
    split_attention_modules(model)

    def trace_with_leaves(leaves: set[str]) -> fx.Graph:
        nonlocal tracer
        tracer = GrowcTracer(leaves)
        return tracer.trace(model, concrete_args=concrete_args)

    try:
        graph, _ = mode_faithful_graph(model, trace_with_leaves, set(leaf_modules))
    except TraceError:
        raise
    except Exception as exc:  # fx raises many types; all mean the same thing to the user
        where = _user_frame(exc)
        if tracer.failed_in:
            way_out = (
                f"Keep the submodule '{tracer.failed_in}' opaque with --leaf {tracer.failed_in} "
                f"(leaf_modules=['{tracer.failed_in}'] in Python): growth then happens around it"
            )
        else:
            way_out = (
                "The line is in the model's own forward: move it into a submodule and keep that "
                "opaque with --leaf NAME (leaf_modules=[...] in Python)"
            )
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} at {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). {way_out}, or fix the input that "
            "drives it with --concrete NAME=VALUE (concrete_args={...} in Python)."
        ) from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _mirror_copied_attributes(gm, model)
    lift_functional_layers(gm, model)
    flatten_patch_maps(gm, model)
    return gm


def _mirror_copied_attributes(gm: fx.GraphModule, model: nn.Module) -> None:
    """The graph holds its own reference to each tensor read by get_attr whose owner it did not
    share with the user's model (the root's, typically): growth there must reach the user's."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or is_mode_flag(node):
            continue
        mine, attr = owner_of(gm, str(node.target))
        try:
            theirs, _ = owner_of(model, str(node.target))
        except AttributeError:
            continue
        if mine is not theirs and getattr(theirs, attr, None) is getattr(mine, attr, None):
            add_mirror(mine, attr, theirs, attr)


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _own_parameter(gm: fx.GraphModule, node: Any) -> nn.Parameter | None:
    """The Parameter a get_attr node reads, when nothing else in the graph reads it."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return None
    value = gm.get_parameter(str(node.target)) if "." in str(node.target) else getattr(gm, str(node.target), None)
    return value if isinstance(value, nn.Parameter) else None


def _layer_for_call(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """An nn.Linear / nn.Conv2d holding the Parameters that `F.linear(x, w, b)` or
    `F.conv2d(x, w, b, ...)` reads from the module, or None when the call is not of that form."""
    weight = _own_parameter(gm, _argument(node, 1, "weight", None))
    bias_node = _argument(node, 2, "bias", None)
    bias = _own_parameter(gm, bias_node)
    if weight is None or (bias_node is not None and bias is None):
        return None
    if node.target is F.linear and weight.dim() == 2:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    elif node.target is F.conv2d and weight.dim() == 4:
        settings = [
            _argument(node, i, key, default)
            for i, key, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))
        ]
        if any(isinstance(v, (fx.Node, str)) for v in settings):
            return None
        stride, padding, dilation, groups = settings
        layer = nn.Conv2d(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride,
            padding,
            dilation,
            groups,
            bias=bias is not None,
            device="meta",
        )
    else:
        return None
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def lift_functional_layers(gm: fx.GraphModule, model: nn.Module | None = None) -> list[str]:
    """Turn `F.linear(x, self.w, self.b)` / `F.conv2d(x, self.w, ...)` on the module's own
    Parameters into nn.Linear / nn.Conv2d layers holding those same Parameters, so that they
    can be measured and widened like any layer. The layer is named after the weight
    (`w` -> `w_linear`) and lives in the traced graph (like inserted blocks); growing it grows
    the Parameters of `model` (the user's module) too. Returns the new layers' names."""
    lifted = []
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.linear, F.conv2d):
            continue
        layer = _layer_for_call(gm, node)
        if layer is None:
            continue
        readers = [a for a in (_argument(node, 1, "weight", None), _argument(node, 2, "bias", None)) if a is not None]
        base = str(readers[0].target).replace(".", "_") + ("_linear" if node.target is F.linear else "_conv")
        name, suffix = base, 1
        while hasattr(gm, name):
            name, suffix = f"{base}{suffix}", suffix + 1
        gm.add_submodule(name, layer)
        if model is not None:
            for part, reader in zip(("weight", "bias"), readers):
                owner, attr = owner_of(model, str(reader.target))
                add_mirror(layer, part, owner, attr)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for reader in readers:
            gm.graph.erase_node(reader)
            owner, _, attr = str(reader.target).rpartition(".")
            if not any(u == owner or u.startswith(owner + ".") for u in used if owner):
                delattr(gm.get_submodule(owner) if owner else gm, attr)  # the graph's copy, not the user's
        lifted.append(name)
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def same_outputs(a: Any, b: Any, atol: float = 1e-5) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.allclose(a, b, atol=atol, rtol=1e-5)
    if isinstance(a, (tuple, list)):
        return all(same_outputs(x, y, atol) for x, y in zip(a, b))
    return a == b
