"""Tracing the user's model with torch.fx.

The traced GraphModule shares its submodules with the user's model: growth swaps Parameters on
those shared module objects, so the user's model, the graph and `state_dict` stay one model.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from growc.errors import TraceError


class GrowcTracer(fx.Tracer):
    """An fx tracer that also keeps the modules the user names as opaque leaves."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        # Attention is opaque: growth happens around it, never inside it.
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


def trace(
    model: nn.Module,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace `model`; raise a TraceError that names the user's line on failure."""
    tracer = GrowcTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean the same thing to the user
        where = _user_frame(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} at {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Mark the submodule that contains "
            "this line as opaque with --leaf NAME (leaf_modules=[...] in Python), or fix the "
            "value that drives it with concrete_args."
        ) from None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


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
