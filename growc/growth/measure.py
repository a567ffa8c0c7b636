"""The measurement pass: every site's statistics, gathered at fixed weights.

After the training epochs of a step, `stat_samples` training samples go forward (train mode)
and backward once more, with no parameter update: gradients are taken with respect to the
layers' outputs only (no weight gradient is computed), and buffers such as BatchNorm running
statistics are put back afterwards, so the pass leaves the model exactly as it found it.

Why not read the statistics from the last training batches, which would cost nothing extra:
while the optimizer moves the weights, each step uses up the part of its batch's gradient that
the existing weights can follow, so consecutive batches' desired updates are anti-correlated.
The significance test's held-out folds then disagree with the others (held-out alignment
significantly *negative*) long before the network stops underfitting. Measured on MNIST
(MLP grown from [1, 1], docs/method.md): statistics taken during training stopped growth at
[12, 26] (95.4%, train loss 0.17, held-out z of the first fc1 neuron -7 to -12 over eight
folds), while the same test on statistics at fixed weights kept finding significant neurons down
to a training loss of 0.02.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from growc.growth.collector import StatisticsCollector
from growc.growth.train import LossFn, modes_kept, split_batch

BatchCallback = Callable[[list[Tensor], Tensor], None]


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Whatever the body's forward passes do to buffers (BatchNorm running statistics and batch
    counts), they get their values back."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def measure(
    model: nn.Module,
    collector: StatisticsCollector,
    loader: Iterable,
    loss_fn: LossFn,
    device: torch.device,
    on_batch: BatchCallback | None = None,
) -> float:
    """Feed `collector` from `loader`'s batches until it is full (or the loader ends), at fixed
    weights; `on_batch(inputs, target)` sees each batch measured. Returns the mean loss of the
    samples measured (NaN when there were none)."""
    total, count = 0.0, 0
    with modes_kept(model), buffers_kept(model), collector:
        model.train()
        for batch in loader:
            inputs, target = split_batch(batch, device)
            loss = loss_fn(model(*inputs), target)
            targets = collector.gradient_targets()
            if targets:
                # Gradients at the layers' outputs only: the hooks read them, no weight gradient.
                torch.autograd.grad(loss, targets, allow_unused=True)
            collector.accumulate(target.shape[0])
            total += float(loss.detach()) * target.shape[0]
            count += target.shape[0]
            if on_batch is not None:
                on_batch(inputs, target)
            if collector.full:
                break
    return total / count if count else float("nan")
