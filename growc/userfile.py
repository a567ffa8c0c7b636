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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

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


_beside_depth: dict[str, int] = {}  # folder -> how many `beside_script` spans hold it open


@contextmanager
def beside_script(path: str | Path) -> Iterator[None]:
    """For the span of the block, the script's folder comes first on sys.path, as under
    `python MODEL.py`, so `import _data` finds the module beside it, at import time and when
    `data()` or `loss` import lazily during a run. Spans nest; the outermost one restores
    sys.path. (Modules already imported stay in sys.modules, as in any Python process.)"""
    folder = str(Path(path).resolve().parent)
    outermost = _beside_depth.get(folder, 0) == 0
    if outermost:
        sys.path.insert(0, folder)
    _beside_depth[folder] = _beside_depth.get(folder, 0) + 1
    try:
        yield
    finally:
        _beside_depth[folder] -= 1
        if outermost:
            del _beside_depth[folder]
            if folder in sys.path:
                sys.path.remove(folder)


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
        with beside_script(path):
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
            with beside_script(path):
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
        with beside_script(user.path):
            result = user.data()
    except Exception as exc:
        raise GrowcError(f"`data()` in {user.path} raised {_describe(exc)}{_where(exc, user.path)}") from None
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise GrowcError(f"`data()` in {user.path} must return (train, val), got {type(result).__name__}")
    for role, part in zip(("train", "val"), result):
        if not _is_data(part):
            raise GrowcError(
                f"`data()` in {user.path} returned a {type(part).__name__} as its {role} part: it must return "
                "(train, val), each a Dataset or a DataLoader, e.g. (TensorDataset(x, y), TensorDataset(x_val, y_val))"
            )
    return tuple(result)


def _is_data(part: object) -> bool:
    """A Dataset, a DataLoader, or anything indexable a DataLoader takes (a list of samples);
    not a string, which is indexable too."""
    if isinstance(part, (Dataset, DataLoader)):
        return True
    return hasattr(part, "__getitem__") and not isinstance(part, (str, bytes, dict))


def check_model_takes_data(model: nn.Module, loader, loss: Callable, device: torch.device) -> Tensor:
    """Run one batch through the model and the loss so a mismatch is one clear sentence, now;
    returns the model's output on that batch."""
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
    return output


def known_labels(data) -> Tensor | None:
    """The integer labels of a data set when it holds them as one tensor (TensorDataset, or a
    `targets` attribute as torchvision's sets have); None when they would have to be read sample by sample."""
    data = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(data, TensorDataset):
        labels = data.tensors[-1]
    else:
        labels = getattr(data, "targets", None)
        labels = torch.as_tensor(labels) if isinstance(labels, (list, Tensor)) else None
    if labels is None or labels.is_floating_point() or labels.dim() != 1 or labels.numel() == 0:
        return None
    return labels


def extra_outputs_warning(output: Tensor, train, val) -> str | None:
    """A sentence when a classifier's head has more outputs than the data has classes (those
    outputs are never a target: the head is likely sized for another data set)."""
    if output.dim() != 2:
        return None
    label_sets = [labels for labels in (known_labels(train), known_labels(val)) if labels is not None]
    if not label_sets:
        return None
    classes = int(max(int(labels.max()) for labels in label_sets)) + 1
    outputs = output.shape[1]
    if outputs <= classes:
        return None
    return (
        f"the model has {outputs} outputs but the data has {classes} classes (labels 0-{classes - 1}): "
        f"outputs {classes}-{outputs - 1} are never a target; make the last layer {classes} wide if that is not meant"
    )
