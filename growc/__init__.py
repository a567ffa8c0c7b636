"""growc: grow neural networks from tiny to just-big-enough by their expressivity bottlenecks,
and ship the result as ONNX.

    import growc
    sites = growc.candidates_of(model)           # where the model can grow
    result = growc.grow(model, train, val, loss)  # grow it in place
    grower = growc.Grower(model, loss)            # or step by step, in your own loop
    growc.export_onnx(result.model, [x], "model.onnx")
    model = growc.load("model.safetensors")       # back, without the model's source
"""

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

__version__ = "0.1.0"

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
