"""int8 ONNX files with onnxruntime.quantization, accepted only if they stay accurate.

`dynamic` quantizes the weights and computes activation scales at run time: no calibration,
best for Linear-heavy models. `static` writes QDQ pairs with activation ranges measured on
training samples (calibration): faster, needs representative data. Both use per-channel weight
scales (a per-tensor scale is set by the largest weight of the layer and rounds a narrow
layer's small output channels away). `static` keeps the model's outputs in float: int8 logits
have 256 levels over the whole output range and flip the argmax between close classes (on the
digits models that rounding was 90% of the int8 error). The int8 file is first written to a
temporary path and only renamed into place when its accuracy on the validation data is within
the tolerance of the fp32 file's; when it is not, the first layer, then the first and the last,
are kept in float (the most sensitive ones) before giving up, and the result says which.
Weights are quantized to 7 bits first, so that the file scores the same on CPUs whose int8
kernels saturate (x86 without VNNI) as on the machine that checked it; 8-bit weights are tried
next, before any layer is kept in float (the card's `weight_bits` says which was written).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from growc.deploy.compact import compact_file
from growc.errors import GrowcError

MODES = ("none", "dynamic", "static")
DEFAULT_TOLERANCE = 0.5  # accuracy points
CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 64
#: Weights in 7 bits come first. On x86 CPUs without VNNI (AVX2, and AVX-512 before Cascade
#: Lake), onnxruntime multiplies uint8 activations by int8 weights with an instruction that
#: saturates sums of pairs at 16 bits (255 * 127 * 2 > 32767); 7-bit weights keep every pair in
#: range, so the file scores the same on every CPU (`growc export` checks accuracy on this
#: machine; the device may be another). 8 bits are more precise, and exact on other CPUs.
WEIGHT_BITS = (7, 8)
LAYER_OPS = ("Conv", "Gemm", "MatMul")  # the ops with weights that int8 quantizes
INT8_LAYER_OPS = ("ConvInteger", "MatMulInteger")  # what dynamic quantization turns them into


class QuantizationError(GrowcError):
    """The int8 model could not be made or lost too much accuracy."""


@dataclass
class QuantizeResult:
    path: Path
    mode: str
    fp32_accuracy: float | None  # fraction in [0, 1]; None when the outputs are not class scores
    int8_accuracy: float | None
    fp32_bytes: int
    int8_bytes: int
    float_layers: list[str] = field(default_factory=list)  # kept in float to stay within tolerance
    weight_bits: int | None = None  # 7 or 8 (None: no int8 weights in the file)

    @property
    def size_ratio(self) -> float:
        return self.fp32_bytes / self.int8_bytes


def _session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: x for i, x in zip(session.get_inputs(), inputs)}


def run_onnx(path: str | Path, inputs: Sequence[Tensor | np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The first output of the ONNX file on `inputs`, in batches."""
    session = _session(path)
    arrays = [x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x) for x in inputs]
    parts = [
        session.run(None, _feeds(session, [a[i : i + batch_size] for a in arrays]))[0]
        for i in range(0, len(arrays[0]), batch_size)
    ]
    return np.concatenate(parts)


def accuracy(outputs: np.ndarray, labels: Tensor | np.ndarray | None) -> float | None:
    """Top-1 accuracy when `outputs` are (N, classes) scores and `labels` integer classes."""
    if labels is None:
        return None
    labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if outputs.ndim != 2 or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return None
    return float((outputs.argmax(axis=1) == labels).mean())


def _calibration_reader(input_names: list[str], inputs: Sequence[np.ndarray]):
    """Feeds training samples to the static quantizer, in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    batches = [
        {name: x[i : i + CALIBRATION_BATCH] for name, x in zip(input_names, inputs)}
        for i in range(0, len(inputs[0]), CALIBRATION_BATCH)
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

        def rewind(self) -> None:
            self.batches = iter(batches)

    return Reader()


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization gives advice on the root logger and through warnings."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _preprocess(src: Path, dst: Path) -> Path:
    """Shape inference and graph optimizations that make quantization cover more ops; the
    original file is used when they fail (they are an optimization, not a requirement)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception:
        return src


def _name_nodes(src: Path, dst: Path) -> list[tuple[str, str]]:
    """Give every node a unique name (compacted files have none, and the quantizer excludes
    nodes by name); returns the (name, op type) of the layers with weights, in graph order."""
    import onnx

    model = onnx.load(str(src))
    weights = {i.name for i in model.graph.initializer}
    layers = []
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}_{node.op_type}"
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in weights:
            layers.append((node.name, node.op_type))
    onnx.save(model, str(dst))
    return layers


def _choices(layers: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    """(weight bits, layers kept in float), tried in turn: every layer int8 in 7 bits, then in 8,
    then the first layer in float, then the first and the last (7 bits); never every layer in
    float (that file would be the fp32 one under another name)."""
    names = [name for name, _ in layers]
    choices: list[tuple[int, list[str]]] = [(bits, []) for bits in WEIGHT_BITS]
    for kept in (names[:1], names[:1] + names[-1:]):
        kept = list(dict.fromkeys(kept))
        if (WEIGHT_BITS[0], kept) not in choices and len(kept) < len(names):
            choices.append((WEIGHT_BITS[0], kept))
    return choices


def _quantize_to(
    source: Path, out: Path, mode: str, calibration: Sequence[np.ndarray], keep_float: list[str], bits: int
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if mode == "dynamic":
        # Dynamic quantization first rewrites each Gemm as MatMul (+ Add) named `<gemm>_MatMul`.
        excluded = keep_float + [f"{name}_MatMul" for name in keep_float]
        quantize_dynamic(
            str(source),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=bits == 7,
            nodes_to_exclude=excluded,
        )
    else:
        _quantize_static(source, out, calibration, keep_float, bits)
        _float_outputs(out)
    # The quantizer's names, metadata and zero bias zero-points are a third of a small int8 file.
    compact_file(out)


def _quantize_static(
    source: Path, out: Path, calibration: Sequence[np.ndarray], keep_float: list[str], bits: int
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = [i.name for i in _session(source).get_inputs()]
    reader = _calibration_reader(names, calibration)
    quantize_static(
        str(source),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=bits == 7,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep_float,
    )


def _float_outputs(path: Path) -> None:
    """Remove the QuantizeLinear -> DequantizeLinear pair in front of each graph output, so the
    last layer writes its float result directly (onnxruntime's QGemm and QLinearConv kernels
    then output float)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    outputs = {o.name for o in graph.output}
    producer = {name: node for node in graph.node for name in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dropped = []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or readers.get(q.output[0]) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or readers.get(q.input[0]) != 1 or q.input[0] in outputs:
            continue
        source.output[list(source.output).index(q.input[0])] = dq.output[0]
        dropped += [q, dq]
    for node in dropped:
        graph.node.remove(node)
    onnx.save(model, str(path))


def float_layers(path: str | Path) -> list[str] | None:
    """The layers with weights that an int8 file still computes in float, as 'Gemm 3 of 3';
    None when no layer of the file is int8."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name: i.data_type for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    layers = [
        n
        for n in graph.node
        if n.op_type in INT8_LAYER_OPS
        or (n.op_type in LAYER_OPS and len(n.input) > 1 and (n.input[1] in weights or n.input[1] in dequantized))
    ]
    kept = [
        f"{n.op_type} {i} of {len(layers)}"
        for i, n in enumerate(layers, 1)
        if n.op_type in LAYER_OPS and weights.get(n.input[1]) == onnx.TensorProto.FLOAT
    ]
    return kept if len(kept) < len(layers) else None


def weight_bits(path: str | Path) -> int | None:
    """7 when every int8 weight tensor of the ONNX file lies within [-64, 64] (what 7-bit
    quantization writes), 8 otherwise; None when it holds no int8 weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    largest = [
        int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and int(np.prod(t.dims)) > 1
    ]
    if not largest:
        return None
    return 7 if max(largest) <= 64 else 8


def _points_lost(fp32_acc: float | None, int8_acc: float | None) -> float:
    if fp32_acc is None or int8_acc is None:
        return 0.0
    return (fp32_acc - int8_acc) * 100


def _attempt(
    source: Path,
    tmp: Path,
    mode: str,
    calibration: Sequence[np.ndarray],
    keep_float: list[str],
    bits: int,
    val_inputs: Sequence[Tensor],
) -> np.ndarray:
    """Quantize `source` to `tmp` with `bits`-bit weights, keeping `keep_float` in float; its
    outputs on `val_inputs`."""
    try:
        with _quiet():
            _quantize_to(source, tmp, mode, calibration, keep_float, bits)
        return run_onnx(tmp, val_inputs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(
            f"onnxruntime could not quantize the model ({mode}): {first}. Keep the fp32 file or try the other --int8 mode"
        ) from None


def quantize(
    fp32_path: str | Path,
    int8_path: str | Path,
    mode: str,
    val_inputs: Sequence[Tensor],
    val_labels: Tensor | None,
    calibration_inputs: Sequence[Tensor] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> QuantizeResult:
    """Write the int8 version of `fp32_path` to `int8_path` if it loses at most `tolerance`
    accuracy points on the validation data, keeping the first (then also the last) layer in
    float when that is what it takes; otherwise raise and leave `int8_path` as it was."""
    if mode not in ("dynamic", "static"):
        raise QuantizationError(f"unknown int8 mode '{mode}': choose none, dynamic or static")
    if mode == "static" and not calibration_inputs:
        raise QuantizationError("static int8 needs calibration samples: give training data, or use --int8 dynamic")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    calibration = [x[:CALIBRATION_SAMPLES].detach().cpu().numpy() for x in (calibration_inputs or [])]
    fp32_acc = accuracy(run_onnx(fp32_path, val_inputs), val_labels)
    with tempfile.TemporaryDirectory(prefix=".growc-int8-", dir=int8_path.parent) as work_dir:
        work = Path(work_dir)
        tmp = work / "int8.onnx"
        with _quiet():
            source = _preprocess(fp32_path, work / "pre.onnx")
        layers = _name_nodes(source, work / "named.onnx")
        tried, keep_float = [], []
        for bits, keep_float in _choices(layers):
            int8_acc = accuracy(
                _attempt(work / "named.onnx", tmp, mode, calibration, keep_float, bits, val_inputs), val_labels
            )
            tried.append(int8_acc)
            if _points_lost(fp32_acc, int8_acc) <= tolerance:
                break
        else:
            best = max(a for a in tried if a is not None)
            kept = {0: "", 1: ", even keeping the first layer in float"}.get(
                len(keep_float), ", even keeping the first and last layers in float"
            )
            raise QuantizationError(
                f"int8 ({mode}) accuracy {best:.2%} is {_points_lost(fp32_acc, best):.2f} points below fp32 "
                f"{fp32_acc:.2%} at best{kept} (tolerance {tolerance:g}): {int8_path.name} was not written; "
                "try the other --int8 mode or a larger --int8-tolerance"
            )
        kept_float = float_layers(tmp) or []
        written_bits = weight_bits(tmp)
        os.replace(tmp, int8_path)
    return QuantizeResult(
        path=int8_path,
        mode=mode,
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        fp32_bytes=fp32_path.stat().st_size,
        int8_bytes=int8_path.stat().st_size,
        float_layers=kept_float,
        weight_bits=written_bits,
    )
