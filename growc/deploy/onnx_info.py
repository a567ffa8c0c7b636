"""What an .onnx file holds and how fast onnxruntime runs it: `growc inspect model.onnx`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from growc.deploy.latency import DEFAULT_BATCHES, median_ms
from growc.errors import ExportError

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}


@dataclass
class OnnxSummary:
    path: Path
    size_bytes: int
    opset: int
    inputs: list[tuple[str, list, str]]  # (name, shape with symbolic axes as names, element type)
    outputs: list[tuple[str, list, str]]
    parameters: int  # elements of the initializers
    ops: Counter
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch -> onnxruntime median
    card: dict | None = None  # the model card beside the file, where there is one


def _shape(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _value(value_info) -> tuple[str, list, str]:
    import onnx

    element = onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()
    return value_info.name, _shape(value_info), element


def _card_beside(path: Path) -> dict | None:
    card = path.with_name(path.name.removesuffix(".onnx") + ".card.json")
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError:
        return None


def describe_onnx(path: str | Path, batches: tuple[int, ...] = DEFAULT_BATCHES, repeats: int = 30) -> OnnxSummary:
    """Read `path` and time it under onnxruntime (CPU) at each batch size on random inputs
    (the median of `repeats` calls); raise ExportError for a file that is not a valid model."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no file at '{path}'")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf and checker errors have many types
        raise ExportError(f"'{path}' is not a valid ONNX model ({str(exc).splitlines()[0]})") from None
    initializers = {i.name for i in model.graph.initializer}
    summary = OnnxSummary(
        path=path,
        size_bytes=path.stat().st_size,
        opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        inputs=[_value(i) for i in model.graph.input if i.name not in initializers],
        outputs=[_value(o) for o in model.graph.output],
        parameters=sum(int(np.prod(i.dims)) for i in model.graph.initializer),
        ops=Counter(n.op_type for n in model.graph.node),
        card=_card_beside(path),
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    for batch in batches:
        feeds = {}
        for i in session.get_inputs():
            if i.type not in _NUMPY_TYPES:
                return summary  # inputs growc cannot make up: no timing
            shape = [
                batch if j == 0 and not isinstance(d, int) else (d if isinstance(d, int) else 1)
                for j, d in enumerate(i.shape)
            ]
            feeds[i.name] = generator.standard_normal(shape).astype(_NUMPY_TYPES[i.type])
        summary.latency_ms[batch] = median_ms(lambda feeds=feeds: session.run(None, feeds), repeats, warmup=3)
    return summary
