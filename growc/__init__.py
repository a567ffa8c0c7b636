"""growc: grow neural networks from tiny to just-big-enough by their expressivity bottlenecks,
and ship the result as ONNX.

    import growc
    sites = growc.candidates_of(model)           # where the model can grow
    result = growc.grow(model, train, val, loss)  # grow it in place
    grower = growc.Grower(model, loss)            # or step by step, in your own loop
    growc.export_onnx(result.model, [x], "model.onnx")
    model = growc.load("model.safetensors")       # back, without the model's source
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names and the module each lives in. They are imported on first use (PEP 562), so
# `import growc.tiny.solver` or `growc --help` does not load torch.fx, onnx and the whole pipeline.
_EXPORTS = {
    "GrowcError": "growc.errors",
    "Grower": "growc.growth.stepwise",
    "GrowthConfig": "growc.growth.config",
    "GrowthResult": "growc.growth.loop",
    "candidates_of": "growc.api",
    "describe_ties": "growc.graph.candidates",
    "export_onnx": "growc.deploy.export",
    "freeze": "growc.deploy.freeze",
    "grow": "growc.growth.loop",
    "grow_file": "growc.api",
    "load": "growc.growth.checkpoint",
    "load_into": "growc.growth.checkpoint",
    "save_checkpoint": "growc.growth.checkpoint",
    "trace": "growc.graph.trace",
}

__all__ = [
    "GrowcError",
    "Grower",
    "GrowthConfig",
    "GrowthResult",
    "candidates_of",
    "describe_ties",
    "export_onnx",
    "freeze",
    "grow",
    "grow_file",
    "load",
    "load_into",
    "save_checkpoint",
    "trace",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'growc' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from growc.api import candidates_of, grow_file
    from growc.deploy.export import export_onnx
    from growc.deploy.freeze import freeze
    from growc.errors import GrowcError
    from growc.graph.candidates import describe_ties
    from growc.graph.trace import trace
    from growc.growth.checkpoint import load, load_into, save_checkpoint
    from growc.growth.config import GrowthConfig
    from growc.growth.loop import GrowthResult, grow
    from growc.growth.stepwise import Grower
