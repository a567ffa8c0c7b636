"""Gathers every site's moments with hooks on forward and backward passes.

Forward hooks keep each involved layer's input, a tensor hook on each consumer's output keeps
the gradient that backpropagation computes; after the backward pass the caller (the measurement
pass, `growc.growth.measure`) calls `accumulate`, which turns them into moments (a few matrix
products) and drops the tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from growc.graph.site import PositionSampler, Recorded, Site
from growc.tiny.statistics import MomentAccumulator

#: Producer inputs at least this wide have S' estimated from every 4th row (see MomentAccumulator).
WIDE_INPUT = 256


def _prev_stride(b_prev: Tensor) -> int:
    return 4 if b_prev.shape[1] >= WIDE_INPUT else 1


class StatisticsCollector:
    def __init__(
        self,
        root: nn.Module,
        sites: list[Site],
        folds: int = 4,
        max_samples: int | None = None,
        rows_per_sample: int | None = 64,
        seed: int = 0,
    ) -> None:
        self.root = root
        # Each site's reached readers of other geometries are measured as sites of their own; new
        # blocks' edges are read last (the order in which positions are drawn is part of a run).
        measured = [*sites, *(sub for s in sites for sub in s.reached_sites())]
        self.sites = sorted(measured, key=lambda s: s.adds_modules)
        self.max_samples = max_samples
        self.accumulators = {s.name: MomentAccumulator(folds) for s in self.sites}
        self._recorded = Recorded({}, {}, {})
        self._handles: list[RemovableHandle] = []
        self._seen = 0
        taps = [s.taps() for s in self.sites]
        self._output_grads = set().union(*(t.output_grads for t in taps))
        self._input_grads = set().union(*(t.input_grads for t in taps))
        self._names = set().union(*(t.inputs for t in taps)) | self._output_grads | self._input_grads
        self._targets: list[Tensor] = []  # the tensors whose gradients the hooks read
        # A conv site has a row per output position; past `rows_per_sample` per sample a random
        # subset of positions is kept (the moments are means over rows: still unbiased), which
        # bounds the cost of a step by the number of samples, not the feature maps' size.
        self.rows_per_sample = rows_per_sample
        self._generator = torch.Generator().manual_seed(seed)
        self._sampler = None if rows_per_sample is None else PositionSampler(rows_per_sample, self._generator)

    def _update(self, name: str, b_prev: Tensor, pairs: list[tuple[Tensor, Tensor]], batch_size: int) -> None:
        rows = b_prev.shape[0]
        samples: float = batch_size
        if self.rows_per_sample is not None and rows > batch_size * self.rows_per_sample:
            keep = batch_size * self.rows_per_sample
            index = torch.randperm(rows, generator=self._generator)[:keep].to(b_prev.device)
            b_prev, pairs = b_prev[index], [(b[index], g[index]) for b, g in pairs]
            samples = batch_size * keep / rows  # rows per sample stays the true positions per sample
        self.accumulators[name].update(b_prev, pairs, samples, _prev_stride(b_prev))

    @property
    def samples(self) -> int:
        """Data samples (not rows: a conv site has one row per position) seen so far."""
        return self._seen

    @property
    def full(self) -> bool:
        return self.max_samples is not None and self._seen >= self.max_samples

    def __enter__(self) -> StatisticsCollector:
        for name in self._names:
            module = self.root.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._clear()

    def _forward_hook(self, name: str):
        recorded = self._recorded

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self.full or not output.requires_grad:
                return
            recorded.inputs[name] = inputs[0].detach()
            if name in self._output_grads:
                output.register_hook(lambda g: recorded.output_grads.__setitem__(name, g.detach()))
                self._targets.append(output)
            if name in self._input_grads and inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: recorded.input_grads.__setitem__(name, g.detach()))
                self._targets.append(inputs[0])

        return hook

    def gradient_targets(self) -> list[Tensor]:
        """The tensors of the last forward pass whose gradients the hooks read: a backward pass
        to these alone feeds `accumulate`."""
        return list(self._targets)

    def _clear(self) -> None:
        self._recorded.inputs.clear()
        self._recorded.output_grads.clear()
        self._recorded.input_grads.clear()
        self._targets.clear()

    def accumulate(self, batch_size: int) -> None:
        """Turn the batch just back-propagated into moments.

        Gradients are multiplied by `batch_size`: training losses are means over the batch, and
        the method wants each sample's gradient of its own loss.
        """
        if self.full or not self._recorded.inputs:
            self._clear()
            return
        for site in self.sites:
            rows = site.rows(self.root, self._recorded, batch_size, self._sampler)
            if rows is None:
                continue
            if rows.sampled:
                self.accumulators[site.name].update(rows.b_prev, rows.pairs, rows.samples, _prev_stride(rows.b_prev))
            else:
                self._update(site.name, rows.b_prev, rows.pairs, batch_size)
        self._seen += batch_size
        self._clear()
