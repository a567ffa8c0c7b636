"""ONNX export, checked by onnx.checker and against onnxruntime on real inputs."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from growc.deploy.compact import compact_file
from growc.deploy.parity import RELATIVE_TOLERANCE, Parity, compare
from growc.deploy.slim import SlimResult, slim_file
from growc.errors import ExportError

DEFAULT_OPSET = 18


@dataclass
class ExportResult:
    path: Path
    parity: Parity  # onnxruntime against torch on the check inputs
    opset: int
    input_names: list[str]
    output_names: list[str]
    slim: SlimResult | None = None  # None when slimming was not asked for

    @property
    def max_abs_diff(self) -> float:
        return self.parity.max_abs_diff

    @property
    def relative_diff(self) -> float:
        return self.parity.relative_diff


def _with_batch_of_two(inputs: list[Tensor]) -> list[Tensor]:
    """A batch of 1 would be specialized away by the exporter; 2 keeps the batch axis dynamic."""
    return [x[:2] if x.shape[0] >= 2 else torch.cat([x, x])[:2] for x in inputs]


def _ops_missing_at(model, opset: int) -> dict[str, int]:
    """Standard ops of `model` that do not exist yet at `opset`, with the opset that added them."""
    import onnx

    missing = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in missing:
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            try:
                missing[node.op_type] = onnx.defs.get_schema(node.op_type, "").since_version
            except onnx.defs.SchemaError:
                continue
    return missing


def export_onnx(
    model: nn.Module,
    example_inputs: list[Tensor],
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    check_inputs: list[Tensor] | None = None,
    slim: bool = False,
) -> ExportResult:
    """Export `model` to `path` with a dynamic batch axis, cleaned by `compact` (and simplified
    by onnxslim when `slim` and it helps); verify the file written with onnx.checker and
    onnxruntime on `check_inputs` (default: the examples). An existing file at `path` is only
    replaced by a verified export."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.onnx")
    model = model.eval().to("cpu")
    examples = _with_batch_of_two([x.detach().cpu() for x in example_inputs])
    input_names = [f"input_{i}" if len(examples) > 1 else "input" for i in range(len(examples))]
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in examples)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # its opset fallback logs tracebacks
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                tuple(examples),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=["output"],
                verbose=False,
            )
            program.save(str(tmp), external_data=False)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {first}. Try another --opset") from None
    # The exporter falls back to its own opset when it cannot convert to the one asked for.
    written_model = onnx.load(str(tmp), load_external_data=False)
    written = {o.domain: o.version for o in written_model.opset_import}.get("")
    if written is not None and written != opset:
        tmp.unlink(missing_ok=True)
        missing = _ops_missing_at(written_model, opset)
        if missing:
            needs = ", ".join(f"{op} (opset {since}+)" for op, since in missing.items())
            lowest = max(missing.values())
            raise ExportError(f"opset {opset} cannot express {needs}: use --opset {lowest} or later")
        raise ExportError(f"torch.onnx.export cannot write opset {opset} (it wrote {written}): use --opset {written}")
    inputs = [x.detach().cpu() for x in (check_inputs or example_inputs)]
    slimmed = None
    try:
        compact_file(tmp)
        if slim:
            slimmed = slim_file(tmp, [x.numpy() for x in inputs])
        onnx.checker.check_model(str(tmp), full_check=True)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(*inputs)
        got = session.run(None, {name: x.numpy() for name, x in zip(input_names, inputs)})
        parity = compare(expected, got)  # every output, in the order the exporter flattens them
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"the exported ONNX file failed its check: {str(exc).splitlines()[0]}") from None
    if not parity.within():
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"onnxruntime differs from torch ({parity.describe()}; at most {RELATIVE_TOLERANCE:.0e} is accepted): "
            "the file was not written"
        )
    os.replace(tmp, path)
    return ExportResult(
        path=path, parity=parity, opset=opset, input_names=input_names, output_names=["output"], slim=slimmed
    )
