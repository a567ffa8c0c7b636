"""Compute cost of a model: multiply-adds per sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from growc.graph.handlers import WEIGHT_LAYERS, layer_multiply_adds


def multiply_adds(model: nn.Module, example_inputs: Sequence[Tensor]) -> int:
    """Multiply-adds of the Linear and Conv layers for one sample, counted by forward hooks."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += layer_multiply_adds(module, output)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*[x[:1] for x in example_inputs])
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return int(total)
