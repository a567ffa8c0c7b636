"""`growc export`: checkpoint -> frozen model -> verified ONNX (+ int8) -> latency -> model cards.

Everything that can reject the input (the checkpoint, the data, the freeze check) runs before
the first file is written, and every file is written to a temporary name and renamed, so a
failed export leaves the output folder as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from growc.data import dataset_of, load_builtin
from growc.deploy.card import write_card
from growc.deploy.export import ExportResult, export_onnx
from growc.deploy.freeze import check_same_outputs, freeze
from growc.deploy.latency import Latency, measure_latency
from growc.deploy.quantize import DEFAULT_TOLERANCE, MODES, QuantizeResult, accuracy, quantize, run_onnx
from growc.deploy.standalone import generate, write_standalone
from growc.errors import CheckpointError, GrowcError, check_writable_folder
from growc.growth.checkpoint import load, read_metadata, recorded_data
from growc.userfile import beside_script, load_user_data, load_user_file

VAL_SAMPLES = 10_000  # the whole validation split of every built-in data set
CALIBRATION_SAMPLES = 512

PREPROCESSING = {
    "digits": "8x8 grayscale digit flattened row by row to 64 float32 values, each pixel (0-16) divided by 16",
    "mnist": "28x28 grayscale digit flattened row by row to 784 float32 values, each pixel (0-255) divided by 255",
    "cifar10": (
        "RGB image as float32 (3, 32, 32), pixels divided by 255, then per channel minus mean "
        "(0.4914, 0.4822, 0.4465) divided by std (0.2470, 0.2435, 0.2616)"
    ),
    "mnist1d": "float32 sequence of 40 values as produced by the mnist1d package",
}


@dataclass
class DeployResult:
    out: Path
    onnx: ExportResult
    fp32_accuracy: float | None
    params_before: int
    params_after: int
    latency: list[Latency]
    int8: QuantizeResult | None = None
    int8_latency: list[Latency] = field(default_factory=list)
    cards: list[Path] = field(default_factory=list)
    standalone: Path | None = None


def _load_data(data: str) -> tuple:
    """A built-in set (NAME or NAME:PATH), or the `data()` of a model file (a path ending in .py)."""
    if data.endswith(".py"):
        user = load_user_file(data)
        if user.data is None:
            raise GrowcError(f"{data} defines no `data()`: name a built-in set with --data instead")
        return load_user_data(user)
    return load_builtin(data)


def _load_model(checkpoint: Path):
    """The checkpoint's model; an architecture that does not rebuild is a damaged file, said so
    (the loader reports its own errors as CheckpointError, anything else would be a traceback)."""
    try:
        return load(checkpoint)
    except GrowcError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"the architecture stored in '{checkpoint}' cannot be rebuilt ({type(exc).__name__}: {exc}): "
            "the file is damaged or was written by an incompatible growc version"
        ) from None


def _take(dataset, limit: int, spread: bool = False) -> tuple[list[Tensor], Tensor | None]:
    """Up to `limit` samples of a data set as input tensors and labels: the first ones, or with
    `spread` a fixed random choice over the whole set (data files are often sorted by label, and
    int8 calibration on one class would set the wrong ranges)."""
    dataset = dataset_of(dataset)
    if spread and hasattr(dataset, "__len__") and len(dataset) > limit:
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
        dataset = Subset(dataset, chosen.sort().values.tolist())
    inputs, labels, count = [], [], 0
    for batch in DataLoader(dataset, batch_size=512, shuffle=False):
        *xs, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
        inputs.append(xs)
        labels.append(y)
        count += xs[0].shape[0]
        if count >= limit:
            break
    if not inputs:
        raise GrowcError("the data set is empty: give data with at least one sample")
    joined = [torch.cat([b[i] for b in inputs])[:limit] for i in range(len(inputs[0]))]
    label = torch.cat(labels)[:limit] if all(isinstance(y, Tensor) for y in labels) else None
    return joined, label


def _export(frozen, inputs: list[Tensor], path: Path, opset: int, slim: bool) -> ExportResult:
    """Export and check the ONNX file in a temporary folder; move it to `path` only when it is
    good, so a failed export leaves the previous file in place."""
    with tempfile.TemporaryDirectory(prefix=".growc-export-", dir=path.parent) as work:
        tmp = Path(work) / path.name
        exported = export_onnx(frozen, inputs, tmp, opset=opset, check_inputs=inputs, slim=slim)
        os.replace(tmp, path)
    exported.path = path
    return exported


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    opset: int = 18,
    int8: str = "none",
    int8_tolerance: float = DEFAULT_TOLERANCE,
    data: str | None = None,
    preprocessing: str | None = None,
    latency_repeats: int = 50,
    standalone: bool = True,
    slim: bool = True,
) -> DeployResult:
    """Freeze the checkpoint's model and write model.onnx (+ model.int8.onnx), a card beside each,
    and standalone/model.py + weights.safetensors to `out` (default: <checkpoint folder>/deploy).
    `data`: the validation/calibration data; default: the data the run was grown on, as the
    checkpoint records it (digits for checkpoints that do not).
    `slim`: simplify model.onnx with onnxslim when it is installed and the result is smaller
    with the same outputs (see `growc.deploy.slim`)."""
    checkpoint = Path(checkpoint)
    if int8 not in MODES:
        raise GrowcError(f"unknown --int8 mode '{int8}': choose none, dynamic or static")
    if int8_tolerance < 0:
        raise GrowcError(f"--int8-tolerance must be 0 or more accuracy points, got {int8_tolerance:g}")
    out = Path(out) if out is not None else checkpoint.parent / "deploy"
    meta = read_metadata(checkpoint)
    data = data or _grown_on(checkpoint) or "digits"
    # A model file's data() may import modules beside it, also lazily while samples are read.
    with beside_script(data) if data.endswith(".py") else nullcontext():
        return _deploy(
            checkpoint, out, meta, data, opset, int8, int8_tolerance, preprocessing, latency_repeats, standalone, slim
        )


def _grown_on(checkpoint: Path) -> str | None:
    """The recorded data of the run; a model file that is no longer there is said so."""
    data = recorded_data(checkpoint)
    if data is not None and data.endswith(".py") and not Path(data).is_file():
        raise GrowcError(
            f"'{checkpoint}' was grown on the data() of {data}, which is not there (run from another folder?): "
            "give the data with --data"
        )
    return data


def _deploy(
    checkpoint: Path,
    out: Path,
    meta: dict,
    data: str,
    opset: int,
    int8: str,
    int8_tolerance: float,
    preprocessing: str | None,
    latency_repeats: int,
    standalone: bool,
    slim: bool,
) -> DeployResult:
    model = _load_model(checkpoint)
    train, val = _load_data(data)
    val_inputs, val_labels = _take(val, VAL_SAMPLES)
    _check_accepts(model, val_inputs, data)
    frozen = freeze(model, example_inputs=val_inputs)
    check_same_outputs(model, frozen, val_inputs)
    if standalone:
        generate(frozen)  # raises now, before any file is written, if model.py cannot express it

    check_writable_folder(out)
    onnx_path = out / "model.onnx"
    exported = _export(frozen, val_inputs, onnx_path, opset, slim)
    fp32_accuracy = accuracy(run_onnx(onnx_path, val_inputs), val_labels)
    result = DeployResult(
        out=out,
        onnx=exported,
        fp32_accuracy=fp32_accuracy,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in frozen.parameters()),
        latency=measure_latency(frozen, onnx_path, val_inputs, repeats=latency_repeats),
    )
    text = preprocessing or PREPROCESSING.get(data.partition(":")[0], "")
    extra = meta["extra"]
    growth_report = extra.get("report") or extra.get("run", {}).get("report")
    common = {
        "checkpoint": str(checkpoint),
        "data": data,
        "onnx_max_abs_diff": exported.max_abs_diff,
        "onnx_relative_diff": exported.relative_diff,
    }
    if exported.slim is not None:
        common["onnxslim"] = exported.slim.as_json()

    def card(path: Path, accuracy: float | None, details: dict) -> Path:
        return write_card(path, frozen, val_inputs, text, accuracy, growth_report, {**common, **details})

    result.cards.append(
        card(onnx_path, fp32_accuracy, {"weights": "float32", "latency_ms": _latency_json(result.latency)})
    )
    if standalone:
        result.standalone = write_standalone(frozen, out / "standalone", example_inputs=[x[:64] for x in val_inputs])
    if int8 != "none":
        calibration, _ = _take(train, CALIBRATION_SAMPLES, spread=True)
        _quantized(result, frozen, (val_inputs, val_labels), calibration, int8, int8_tolerance, latency_repeats, card)
    return result


def _check_accepts(model: nn.Module, inputs: list[Tensor], data: str) -> None:
    """A clear error when the checkpoint's model cannot read the data's samples."""
    try:
        with torch.no_grad():
            model(*[x[:2] for x in inputs])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(str(tuple(x.shape[1:])) for x in inputs)
        raise GrowcError(
            f"the checkpoint's model does not accept --data {data} samples of shape {shapes} ({first}): "
            "give the data set it was trained on"
        ) from None


def _quantized(
    result: DeployResult,
    frozen: nn.Module,
    val: tuple[list[Tensor], Tensor],
    calibration: list[Tensor],
    int8: str,
    tolerance: float,
    latency_repeats: int,
    card: Callable[[Path, float | None, dict], Path],
) -> None:
    """The int8 file, its latency and its card (written by `card`), added to `result`."""
    val_inputs, val_labels = val
    int8_path = result.out / "model.int8.onnx"
    result.int8 = q = quantize(
        result.onnx.path, int8_path, int8, val_inputs, val_labels, calibration, tolerance=tolerance
    )
    result.int8_latency = measure_latency(frozen, int8_path, val_inputs, repeats=latency_repeats)
    details = {
        "weights": f"int8 ({int8})",
        "fp32_accuracy": q.fp32_accuracy,
        "fp32_file_bytes": q.fp32_bytes,
        "size_ratio": round(q.size_ratio, 3),
        "latency_ms": _latency_json(result.int8_latency),
    }
    result.cards.append(card(int8_path, q.int8_accuracy, details))


def _latency_json(latency: list[Latency]) -> dict[str, object]:
    rows: dict[str, object] = {
        f"batch_{r.batch}": {"onnxruntime": round(r.onnxruntime_ms, 4), "torch_eager": round(r.torch_ms, 4)}
        for r in latency
    }
    rows["torch_threads"] = torch.get_num_threads()  # onnxruntime: its default, one per core
    return rows
