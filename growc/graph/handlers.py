"""One handler per growable layer type: how to read its samples and how to widen it.

Supporting a new layer type means adding one handler here. Widening keeps the module object and
swaps its Parameters (so user references and the traced graph stay valid); every swap is returned
as a `ParameterSwap` so the caller can carry optimizer state over or undo it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ParameterSwap:
    module: nn.Module
    attr: str
    old: nn.Parameter
    new: nn.Parameter
    dim: int  # the dimension that grew
    old_size: int

    def new_slice(self) -> tuple[slice, ...]:
        index = [slice(None)] * self.new.dim()
        index[self.dim] = slice(self.old_size, None)
        return tuple(index)

    def undo(self) -> None:
        setattr(self.module, self.attr, self.old)


def _extend(module: nn.Module, attr: str, extra: Tensor, dim: int) -> ParameterSwap:
    old = getattr(module, attr)
    data = torch.cat([old.detach(), extra.to(dtype=old.dtype, device=old.device)], dim=dim)
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    setattr(module, attr, new)
    return ParameterSwap(module, attr, old, new, dim, old.shape[dim])


class LayerHandler(ABC):
    """Interface: a layer `a = W b` whose inputs and outputs can grow."""

    @abstractmethod
    def in_size(self, layer: nn.Module) -> int: ...

    @abstractmethod
    def out_size(self, layer: nn.Module) -> int: ...

    def has_bias(self, layer: nn.Module) -> bool:
        return getattr(layer, "bias", None) is not None

    @abstractmethod
    def input_samples(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The layer's input as rows `b` (bias 1 appended when the layer has a bias)."""
        ...

    @abstractmethod
    def output_samples(self, layer: nn.Module, g: Tensor) -> Tensor:
        """A tensor shaped like the layer's output, as rows matching `input_samples`."""
        ...

    @abstractmethod
    def grow_out(self, layer: nn.Module, weight_rows: Tensor, bias: Tensor | None) -> list[ParameterSwap]: ...

    @abstractmethod
    def grow_in(self, layer: nn.Module, weight_cols: Tensor) -> list[ParameterSwap]: ...

    @abstractmethod
    def weight_matrix(self, layer: nn.Module) -> Tensor:
        """`W` as (out, in [+1 for bias]), the matrix that `input_samples` rows multiply."""
        ...

    @abstractmethod
    def add_to_weight_matrix(self, layer: nn.Module, delta: Tensor) -> None: ...

    def params_per_output(self, layer: nn.Module) -> int:
        return self.in_size(layer) + int(self.has_bias(layer))

    def params_per_input(self, layer: nn.Module) -> int:
        return self.out_size(layer)


class LinearHandler(LayerHandler):
    def in_size(self, layer: nn.Linear) -> int:
        return layer.in_features

    def out_size(self, layer: nn.Linear) -> int:
        return layer.out_features

    def input_samples(self, layer: nn.Linear, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if layer.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def output_samples(self, layer: nn.Linear, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])

    def grow_out(self, layer: nn.Linear, weight_rows: Tensor, bias: Tensor | None) -> list[ParameterSwap]:
        swaps = [_extend(layer, "weight", weight_rows, 0)]
        if layer.bias is not None:
            extra = bias if bias is not None else weight_rows.new_zeros(weight_rows.shape[0])
            swaps.append(_extend(layer, "bias", extra, 0))
        layer.out_features = layer.weight.shape[0]
        return swaps

    def grow_in(self, layer: nn.Linear, weight_cols: Tensor) -> list[ParameterSwap]:
        swaps = [_extend(layer, "weight", weight_cols, 1)]
        layer.in_features = layer.weight.shape[1]
        return swaps

    def weight_matrix(self, layer: nn.Linear) -> Tensor:
        w = layer.weight.detach()
        if layer.bias is not None:
            w = torch.cat([w, layer.bias.detach()[:, None]], dim=1)
        return w

    @torch.no_grad()
    def add_to_weight_matrix(self, layer: nn.Linear, delta: Tensor) -> None:
        delta = delta.to(layer.weight)
        layer.weight.add_(delta[:, : layer.in_features])
        if layer.bias is not None:
            layer.bias.add_(delta[:, layer.in_features])


_HANDLERS: dict[type, LayerHandler] = {nn.Linear: LinearHandler()}


def handler_for(module: nn.Module | None) -> LayerHandler | None:
    if module is None:
        return None
    return _HANDLERS.get(type(module))
