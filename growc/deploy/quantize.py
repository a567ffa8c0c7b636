"""int8 ONNX files with onnxruntime.quantization, accepted only if they stay accurate.

`dynamic` quantizes the weights and computes activation scales at run time: no calibration,
best for Linear-heavy models. `static` writes QDQ pairs with per-channel weight scales and
activation ranges measured on training samples (calibration): faster, needs representative
data. Either way the int8 file is first written to a temporary path and only renamed into place
when its accuracy on the validation data is within the tolerance of the fp32 file's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from growc.deploy.compact import compact_file
from growc.errors import GrowcError

MODES = ("none", "dynamic", "static")
DEFAULT_TOLERANCE = 0.5  # accuracy points
CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 64


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


def _quantize_to(fp32: Path, out: Path, mode: str, calibration: Sequence[np.ndarray], work: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _preprocess(fp32, work / "pre.onnx")
    if mode == "dynamic":
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)
    else:
        _quantize_static(source, out, calibration)
    # The quantizer's names, metadata and zero bias zero-points are a third of a small int8 file.
    compact_file(out)


def _quantize_static(source: Path, out: Path, calibration: Sequence[np.ndarray]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = [i.name for i in _session(source).get_inputs()]
    reader = _calibration_reader(names, calibration)
    quantize_static(
        str(source),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )


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
    accuracy points on the validation data; otherwise raise and leave `int8_path` as it was."""
    if mode not in ("dynamic", "static"):
        raise QuantizationError(f"unknown int8 mode '{mode}': choose none, dynamic or static")
    if mode == "static" and not calibration_inputs:
        raise QuantizationError("static int8 needs calibration samples: give training data, or use --int8 dynamic")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    calibration = [x[:CALIBRATION_SAMPLES].detach().cpu().numpy() for x in (calibration_inputs or [])]
    with tempfile.TemporaryDirectory(prefix=".growc-int8-", dir=int8_path.parent) as work_dir:
        work = Path(work_dir)
        tmp = work / "int8.onnx"
        try:
            with _quiet():
                _quantize_to(fp32_path, tmp, mode, calibration, work)
            int8_outputs = run_onnx(tmp, val_inputs)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QuantizationError(
                f"onnxruntime could not quantize the model ({mode}): {first}. Keep the fp32 file or try the other --int8 mode"
            ) from None
        fp32_acc = accuracy(run_onnx(fp32_path, val_inputs), val_labels)
        int8_acc = accuracy(int8_outputs, val_labels)
        if fp32_acc is not None and int8_acc is not None and (fp32_acc - int8_acc) * 100 > tolerance:
            raise QuantizationError(
                f"int8 ({mode}) accuracy {int8_acc:.2%} is {(fp32_acc - int8_acc) * 100:.2f} points below fp32 "
                f"{fp32_acc:.2%} (tolerance {tolerance:g}): {int8_path.name} was not written; "
                "try the other --int8 mode or a larger --int8-tolerance"
            )
        os.replace(tmp, int8_path)
    return QuantizeResult(
        path=int8_path,
        mode=mode,
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        fp32_bytes=fp32_path.stat().st_size,
        int8_bytes=int8_path.stat().st_size,
    )
