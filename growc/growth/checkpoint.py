"""Checkpoints: safetensors weights with the architecture and the run's state in the metadata.

Writes are atomic (a temporary file, then a rename), so an interrupted run always leaves the last
good checkpoint readable. Nothing is ever unpickled: the architecture is JSON (see
`growc.graph.serialize`), and the model is rebuilt from it without the user's model file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import fx, nn

from growc.errors import CheckpointError
from growc.graph.handlers import sync_sizes
from growc.graph.serialize import UnserializableModel, architecture, rebuild

FORMAT = "growc-checkpoint/1"
STATE_PREFIX = "growc_state/"  # tensors of a run's state (optimizer, random generators), not weights


def save_checkpoint(
    path: str | Path,
    graph: fx.GraphModule,
    extra: dict[str, Any] | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's weights and architecture to `path` atomically; a run's resumable state
    goes in `extra` (JSON) and `state_tensors` (stored beside the weights under their own prefix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        arch = architecture(graph)
    except UnserializableModel:
        arch = None  # loadable only together with the user's model file
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in graph.state_dict().items()}
    tensors.update(state_tensors or {})
    metadata = {"format": FORMAT, "architecture": json.dumps(arch), "extra": json.dumps(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        if path.suffix.lower() == ".onnx":
            raise CheckpointError(
                f"'{path}' is an ONNX file, not a growc checkpoint: give the run's model.safetensors "
                f"(beside it in the run's folder); to look at the ONNX file, run: growc inspect {path}"
            ) from None
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({exc}): it may be truncated or corrupted"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a safetensors file but not a growc checkpoint (no '{FORMAT}' metadata)")
    try:
        return {"architecture": json.loads(metadata["architecture"]), "extra": json.loads(metadata.get("extra", "{}"))}
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the metadata of '{path}' is damaged ({exc})") from None


def recorded_data(path: str | Path) -> str | None:
    """The data a run's checkpoint was grown on (a built-in spec such as `mnist:PATH`, or the
    model file whose data() was used); None for checkpoints written before growc recorded it."""
    data = read_metadata(path)["extra"].get("data")
    return data if isinstance(data, str) and data else None


def load(path: str | Path) -> nn.Module:
    """The model stored in a growc checkpoint, as a plain nn.Module (a GraphModule), from the
    checkpoint alone."""
    return load_with_state(path)[0]


def load_with_state(path: str | Path) -> tuple[fx.GraphModule, dict[str, torch.Tensor], dict[str, Any]]:
    """(model, the run's state tensors, the run's JSON metadata) of a checkpoint."""
    meta = read_metadata(path)
    if meta["architecture"] is None:
        raise CheckpointError(
            f"'{path}' holds weights only (its model has parts a checkpoint cannot describe): "
            "load it with the model file: growc.load_into(model, path)"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"the tensors of '{path}' cannot be read ({exc}): the file is damaged") from None
    state = {k: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    model = rebuild(meta["architecture"], weights)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights of '{path}' do not fit its architecture: {str(exc).splitlines()[0]}"
        ) from None
    return model.eval(), state, meta["extra"]


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint's weights into the user's model, resizing its layers to the stored shapes."""
    read_metadata(path)
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith(STATE_PREFIX):
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            current = getattr(owner, attr)
            if isinstance(current, nn.Parameter):
                setattr(owner, attr, nn.Parameter(value.clone(), requires_grad=current.requires_grad))
            else:
                owner.register_buffer(attr, value.clone())
        for module in model.modules():
            sync_sizes(module)  # in/out_features, channels, num_features follow the loaded shapes
    return model
