"""Ordinary training and evaluation over `(*inputs, target)` batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from growc.errors import GrowcError

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever the body does to train/eval modes, every submodule gets its own flag back (a
    user may keep some layers in eval mode, e.g. frozen batch norms, inside a training model)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def split_batch(batch, device: torch.device | None) -> tuple[list[Tensor], Tensor]:
    *inputs, target = batch
    if device is None:
        return list(inputs), target
    return [x.to(device) for x in inputs], target.to(device)


def join_batches(parts: list[tuple[list[Tensor], Tensor]], limit: int) -> tuple[list[Tensor], Tensor]:
    """The first `limit` samples of (inputs, target) batches, joined into one batch."""
    inputs = [torch.cat([p[0][i] for p in parts])[:limit] for i in range(len(parts[0][0]))]
    return inputs, torch.cat([p[1] for p in parts])[:limit]


def first_samples(
    loader: Iterable, limit: int, device: torch.device | None = None, what: str = "the data"
) -> tuple[list[Tensor], Tensor]:
    """The first `limit` samples of a loader of (*inputs, target) batches (all, if it has fewer),
    on `device` (None: where the loader puts them)."""
    return join_batches(first_batches(loader, limit, device, what), limit)


def first_batches(
    loader: Iterable, limit: int, device: torch.device | None = None, what: str = "the data"
) -> list[tuple[list[Tensor], Tensor]]:
    """A loader's first batches, as (inputs, target), up to `limit` samples in all (or more: the
    last batch is whole)."""
    parts: list[tuple[list[Tensor], Tensor]] = []
    count = 0
    for batch in loader:
        inputs, target = split_batch(batch, device)
        parts.append((inputs, target))
        count += target.shape[0]
        if count >= limit:
            break
    if not parts:
        raise GrowcError(f"{what} is empty: give at least one batch of samples")
    return parts


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}': choose {' or '.join(OPTIMIZERS)}")


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    after_backward: Callable[[int, int], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_batches: int | None = None,
) -> float:
    """One pass over `loader` (its first `max_batches` batches, when given); returns the mean
    training loss. `after_backward(batch_index, batch_size)` runs between backward and the
    optimizer step."""
    model.train()
    total, count = 0.0, 0
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        inputs, target = split_batch(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(*inputs), target)
        loss.backward()
        if after_backward is not None:
            after_backward(index, target.shape[0])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * target.shape[0]
        count += target.shape[0]
    return total / max(count, 1)


def is_classification(output: Tensor, target: Tensor) -> bool:
    return output.dim() == 2 and target.dim() == 1 and not target.is_floating_point()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: LossFn, device: torch.device) -> tuple[float, float | None]:
    """Mean loss and accuracy (None when the task is not classification); the modes are kept."""
    total, correct, count = 0.0, 0, 0
    classification = True
    with modes_kept(model):
        model.eval()
        for batch in loader:
            inputs, target = split_batch(batch, device)
            output = model(*inputs)
            total += float(loss_fn(output, target)) * target.shape[0]
            count += target.shape[0]
            if is_classification(output, target):
                correct += int((output.argmax(1) == target).sum())
            else:
                classification = False
    return total / max(count, 1), (correct / max(count, 1) if classification else None)


@torch.no_grad()
def batch_loss(model: nn.Module, inputs: list[Tensor], target: Tensor, loss_fn: LossFn) -> float:
    """The loss in eval mode (no dropout: comparable across calls); the modes are kept."""
    with modes_kept(model):
        return float(loss_fn(model.eval()(*inputs), target))
