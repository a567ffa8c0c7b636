"""Loading the user's MODEL.py: `model`, and optionally `data` and `loss`.

Contract (also in the README):
  model  an nn.Module, or a callable with no arguments that returns one (a class, a function)
  data   optional: a callable with no arguments returning (train, val), each a Dataset or a
         DataLoader whose items are (*inputs, target)
  loss   optional: (output, target) -> scalar; default: cross-entropy for integer targets, MSE else
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growc.errors import GrowcError


def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for integer class targets, mean squared error for anything else."""
    if not target.is_floating_point():
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target.reshape(output.shape) if target.numel() == output.numel() else target)


@dataclass
class UserFile:
    path: Path
    module: ModuleType
    model: nn.Module
    data: Callable[[], tuple] | None
    loss: Callable[[Tensor, Tensor], Tensor]


def _where(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" at line {frames[-1].lineno}" if frames else ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_user_file(path: str | Path) -> UserFile:
    path = Path(path)
    if not path.is_file():
        raise GrowcError(f"no model file at '{path}': give the path of a Python file that defines `model`")
    name = f"growc_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise GrowcError(f"'{path}' is not a Python file: give a .py file that defines `model`")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise GrowcError(
            f"{path} raised {_describe(exc)}{_where(exc, path)} while loading: fix the file and retry"
        ) from None

    if not hasattr(module, "model"):
        raise GrowcError(f"{path} defines no `model`: add `model = MyNet()` or a function `def model(): ...`")
    candidate = module.model
    if not isinstance(candidate, nn.Module):
        if not callable(candidate):
            raise GrowcError(
                f"`model` in {path} is a {type(candidate).__name__}: make it an nn.Module or a callable that returns one"
            )
        try:
            candidate = candidate()
        except Exception as exc:
            raise GrowcError(
                f"`model()` in {path} raised {_describe(exc)}{_where(exc, path)}: fix it and retry"
            ) from None
        if not isinstance(candidate, nn.Module):
            raise GrowcError(f"`model()` in {path} returned a {type(candidate).__name__}, not an nn.Module")

    data = getattr(module, "data", None)
    if data is not None and not callable(data):
        raise GrowcError(f"`data` in {path} must be a function returning (train, val)")
    loss = getattr(module, "loss", None) or default_loss
    if not callable(loss):
        raise GrowcError(f"`loss` in {path} must be a function (output, target) -> scalar")
    return UserFile(path=path, module=module, model=candidate, data=data, loss=loss)


def load_user_data(user: UserFile) -> tuple:
    try:
        result = user.data()
    except Exception as exc:
        raise GrowcError(f"`data()` in {user.path} raised {_describe(exc)}{_where(exc, user.path)}") from None
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise GrowcError(f"`data()` in {user.path} must return (train, val), got {type(result).__name__}")
    return tuple(result)


def check_model_takes_data(model: nn.Module, loader, loss: Callable, device: torch.device) -> None:
    """Run one batch through the model and the loss so a mismatch is one clear sentence, now."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise GrowcError("the training data is empty: give at least one sample") from None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise GrowcError("each data item must be (*inputs, target): got a single tensor")
    *inputs, target = batch
    shapes = ", ".join(str(tuple(x.shape[1:])) for x in inputs)
    try:
        with torch.no_grad():
            output = model.to(device)(*[x.to(device) for x in inputs])
    except Exception as exc:
        raise GrowcError(
            f"the model cannot take the data's inputs (each of shape {shapes}): {_describe(exc)}. "
            "Make the model's first layer match the data, or pick other data (--data)"
        ) from None
    try:
        value = loss(output, target.to(device))
    except Exception as exc:
        raise GrowcError(
            f"the loss cannot compare the model's output {tuple(output.shape)} with the targets "
            f"{tuple(target.shape)}: {_describe(exc)}. Make the last layer's width match the targets"
        ) from None
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise GrowcError("the loss must return a scalar tensor")
