"""The model card: a JSON file beside each .onnx that says what the file expects and delivers."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import growc
from growc.deploy.quantize import float_layers, weight_bits
from growc.graph.flops import multiply_adds


def card_path(onnx_path: str | Path) -> Path:
    """model.onnx -> model.card.json, model.int8.onnx -> model.int8.card.json."""
    return Path(onnx_path).with_suffix(".card.json")


@torch.no_grad()
def onnx_signature(onnx_path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (a string for a dynamic axis) and dtypes of the file's inputs and outputs."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": str(tensor_dtype_to_np_dtype(tensor.elem_type))}

    return {
        "inputs": [describe(v) for v in graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in graph.output],
    }


def opset_of(onnx_path: str | Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def growth_summary(report: dict | None) -> dict[str, Any] | None:
    """The growth run in a few numbers, from the report stored in the checkpoint's metadata."""
    if not report or not isinstance(report, dict):
        return None
    steps = report.get("steps") or []
    final = report.get("final") or {}
    added: dict[str, int] = {}
    for step in steps:
        for grown in step.get("grown") or []:
            added[grown["site"]] = added.get(grown["site"], 0) + int(grown.get("neurons", 0))
    return {
        "steps": len(steps),
        "strategy": (report.get("config") or {}).get("strategy"),
        "initial_params": final.get("initial_params", steps[0]["params"] if steps else None),
        "final_params": final.get(
            "final_params", (steps[-1].get("params_after") or steps[-1]["params"]) if steps else None
        ),
        "initial_widths": steps[0].get("widths") if steps else None,
        "final_widths": final.get("widths", steps[-1].get("widths") if steps else None),
        "neurons_added": added,
        "final_val_accuracy": final.get("final_val_accuracy"),
        "stop_reason": report.get("stop_reason") or None,
    }


def write_card(
    onnx_path: str | Path,
    model: nn.Module,
    example_inputs: Sequence[Tensor],
    preprocessing: str,
    accuracy: float | None,
    growth_report: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the card of `onnx_path` (atomically) and return its path."""
    onnx_path = Path(onnx_path)
    macs = multiply_adds(model, example_inputs)
    card = {
        "file": onnx_path.name,
        **onnx_signature(onnx_path),
        "preprocessing": preprocessing,
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
        "multiply_adds_per_sample": macs,
        "flops_per_sample": 2 * macs,
        "file_bytes": onnx_path.stat().st_size,
        "opset": opset_of(onnx_path),
        "growc_version": growc.__version__,
        "growth": growth_summary(growth_report),
        **(extra or {}),
    }
    kept_float = float_layers(onnx_path)
    if kept_float is not None:  # an int8 file: the layers it keeps in float to stay accurate
        card["float_layers"] = kept_float
        card["weight_bits"] = weight_bits(onnx_path)  # 7: the same scores on every CPU
    path = card_path(onnx_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
