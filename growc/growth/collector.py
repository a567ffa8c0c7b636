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

from growc.graph.candidates import WidthSite
from growc.graph.depth import DepthSite
from growc.graph.samples import consumer_rows, depth_rows, producer_rows, sampled_conv_rows
from growc.tiny.statistics import MomentAccumulator

#: Producer inputs at least this wide have S' estimated from every 4th row (see MomentAccumulator).
WIDE_INPUT = 256


def _prev_stride(b_prev: Tensor) -> int:
    return 4 if b_prev.shape[1] >= WIDE_INPUT else 1


class StatisticsCollector:
    def __init__(
        self,
        root: nn.Module,
        sites: list[WidthSite | DepthSite],
        folds: int = 4,
        max_samples: int | None = None,
        rows_per_sample: int | None = 64,
        seed: int = 0,
    ) -> None:
        self.root = root
        # Each width site's reached readers of other geometries are measured as sites of their own.
        self.sites = [*sites, *(sub for s in sites if isinstance(s, WidthSite) for sub in s.reached_sites())]
        self.max_samples = max_samples
        self.accumulators = {s.name: MomentAccumulator(folds) for s in self.sites}
        self._inputs: dict[str, Tensor] = {}
        self._grads: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._seen = 0
        self._width = [s for s in self.sites if isinstance(s, WidthSite)]
        self._depth = [s for s in self.sites if isinstance(s, DepthSite)]
        self._consumer_names = {c for s in self._width for c in s.consumers}
        self._edge_names = {s.consumer for s in self._depth}  # layers whose input gradient is kept
        self._names = {s.producer for s in self._width} | self._consumer_names | self._edge_names
        self._input_grads: dict[str, Tensor] = {}
        self._targets: list[Tensor] = []  # the tensors whose gradients the hooks read
        # A conv site has a row per output position; past `rows_per_sample` per sample a random
        # subset of positions is kept (the moments are means over rows: still unbiased), which
        # bounds the cost of a step by the number of samples, not the feature maps' size.
        self.rows_per_sample = rows_per_sample
        self._generator = torch.Generator().manual_seed(seed)

    def _sampled(self, site, grads: dict[str, Tensor], batch_size: int) -> bool:
        """Conv sites on big maps: rows at a few random positions, read without unfolding the
        whole maps. False where the full rows are needed (or cheap)."""
        if self.rows_per_sample is None:
            return False
        rows = sampled_conv_rows(
            site, self.root, self._inputs, grads, batch_size, self.rows_per_sample, self._generator
        )
        if rows is None:
            return False
        b_prev, pairs, samples = rows
        self.accumulators[site.name].update(b_prev, pairs, samples, _prev_stride(b_prev))
        return True

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
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self.full or not output.requires_grad:
                return
            self._inputs[name] = inputs[0].detach()
            if name in self._consumer_names:
                output.register_hook(lambda g: self._grads.__setitem__(name, g.detach()))
                self._targets.append(output)
            if name in self._edge_names and inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: self._input_grads.__setitem__(name, g.detach()))
                self._targets.append(inputs[0])

        return hook

    def gradient_targets(self) -> list[Tensor]:
        """The tensors of the last forward pass whose gradients the hooks read: a backward pass
        to these alone feeds `accumulate`."""
        return list(self._targets)

    def _clear(self) -> None:
        self._inputs.clear()
        self._grads.clear()
        self._input_grads.clear()
        self._targets.clear()

    def accumulate(self, batch_size: int) -> None:
        """Turn the batch just back-propagated into moments.

        Gradients are multiplied by `batch_size`: training losses are means over the batch, and
        the method wants each sample's gradient of its own loss.
        """
        if self.full or not self._inputs:
            self._clear()
            return
        grads = {**self._grads, **{f"input:{k}": v for k, v in self._input_grads.items()}}
        for site in self._width:
            if site.producer not in self._inputs or any(c not in self._grads for c in site.consumers):
                continue
            if self._sampled(site, grads, batch_size):
                continue
            b_prev = producer_rows(site, self.root, self._inputs[site.producer])
            pairs = [consumer_rows(self.root, c, self._inputs[c], self._grads[c], batch_size) for c in site.consumers]
            self._update(site.name, b_prev, pairs, batch_size)
        for site in self._depth:
            if site.consumer in self._input_grads and not self._sampled(site, grads, batch_size):
                x, g = self._inputs[site.consumer], self._input_grads[site.consumer]
                self._update(site.name, *depth_rows(site, x, g, batch_size), batch_size)
        self._seen += batch_size
        self._clear()
