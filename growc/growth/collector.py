"""Gathers every site's moments with hooks during ordinary training batches.

Forward hooks keep each involved layer's input, a tensor hook on each consumer's output keeps
the gradient that backpropagation computes anyway; after `loss.backward()` the training loop calls
`accumulate`, which turns them into moments (a few matrix products) and drops the tensors. No
extra forward or backward pass is run.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from growc.graph.candidates import WidthSite
from growc.graph.handlers import handler_for
from growc.tiny.statistics import MomentAccumulator


class StatisticsCollector:
    def __init__(self, root: nn.Module, sites: list[WidthSite], folds: int = 4, max_samples: int | None = None) -> None:
        self.root = root
        self.sites = list(sites)
        self.max_samples = max_samples
        self.accumulators = {s.name: MomentAccumulator(folds) for s in self.sites}
        self._inputs: dict[str, Tensor] = {}
        self._grads: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._consumer_names = {c for s in self.sites for c in s.consumers}
        self._names = {s.producer for s in self.sites} | self._consumer_names

    @property
    def samples(self) -> int:
        return min((a.samples for a in self.accumulators.values()), default=0)

    @property
    def full(self) -> bool:
        return self.max_samples is not None and self.samples >= self.max_samples

    def __enter__(self) -> StatisticsCollector:
        for name in self._names:
            module = self.root.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._grads.clear()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self.full or not output.requires_grad:
                return
            self._inputs[name] = inputs[0].detach()
            if name in self._consumer_names:
                output.register_hook(lambda g: self._grads.__setitem__(name, g.detach()))

        return hook

    def accumulate(self, batch_size: int) -> None:
        """Turn the batch just back-propagated into moments.

        Gradients are multiplied by `batch_size`: training losses are means over the batch, and
        the method wants each sample's gradient of its own loss.
        """
        if self.full or not self._inputs:
            self._inputs.clear()
            self._grads.clear()
            return
        for site in self.sites:
            producer = self.root.get_submodule(site.producer)
            if site.producer not in self._inputs or any(c not in self._grads for c in site.consumers):
                continue
            b_prev = handler_for(producer).input_samples(producer, self._inputs[site.producer])
            pairs = []
            for c_name in site.consumers:
                consumer = self.root.get_submodule(c_name)
                handler = handler_for(consumer)
                b = handler.input_samples(consumer, self._inputs[c_name])
                g = handler.output_samples(consumer, self._grads[c_name]) * batch_size
                pairs.append((b, g))
            self.accumulators[site.name].update(b_prev, pairs)
        self._inputs.clear()
        self._grads.clear()
