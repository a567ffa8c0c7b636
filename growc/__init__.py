"""growc: grow neural networks from tiny to just-big-enough by their expressivity bottlenecks,
and ship the result as ONNX.

    import growc
    sites = growc.candidates_of(model)           # where the model can grow
    result = growc.grow(model, train, val, loss)  # grow it in place
    growc.export_onnx(result.model, [x], "model.onnx")
    model = growc.load("model.safetensors")       # back, without the model's source
"""

from growc.api import candidates_of, grow_file
from growc.deploy.export import export_onnx
from growc.errors import GrowcError
from growc.graph.trace import trace
from growc.growth.checkpoint import load, load_into, save_checkpoint
from growc.growth.config import GrowthConfig
from growc.growth.loop import GrowthResult, grow

__version__ = "0.1.0"

__all__ = [
    "GrowcError",
    "GrowthConfig",
    "GrowthResult",
    "candidates_of",
    "export_onnx",
    "grow",
    "grow_file",
    "load",
    "load_into",
    "save_checkpoint",
    "trace",
]
