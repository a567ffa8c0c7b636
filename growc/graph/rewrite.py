"""Growing a site in place, and carrying optimizer state over to the grown Parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from growc.graph.candidates import WidthSite
from growc.graph.handlers import ParameterSwap, handler_for


class SiteGrowth:
    """K new neurons added to a site, whose amplitude can still be set or the whole undone.

    `alpha` is (in' [+1 bias], K): the producer's new rows; `omega` is (sum of consumers' outputs,
    K): the consumers' new columns, stacked in the site's consumer order, `omega_rows[i]` rows for
    consumer i (its output count when omega was solved; default: its current output count). The neurons enter as
    `(gamma alpha, gamma omega)`; at gamma = 0 the model computes exactly what it did before.
    """

    def __init__(
        self, root: nn.Module, site: WidthSite, alpha: Tensor, omega: Tensor, omega_rows: list[int] | None = None
    ) -> None:
        self.site = site
        self.count = alpha.shape[1]
        producer, consumers = site.modules(root)
        p_handler = handler_for(producer)
        k = self.count
        # Other sites may have grown in the same step since alpha and omega were solved: the
        # producer may have new inputs and a consumer new outputs. They connect with zeros.
        has_bias = p_handler.has_bias(producer)
        solved_in = alpha.shape[0] - int(has_bias)
        rows = alpha.new_zeros(p_handler.in_size(producer), k)
        rows[:solved_in] = alpha[:solved_in]
        self._targets = [rows.T]
        if has_bias:
            self._targets.append(alpha[solved_in])
        self.swaps: list[ParameterSwap] = p_handler.grow_out(
            producer, rows.T.new_zeros(rows.T.shape), alpha.new_zeros(k) if has_bias else None
        )
        start = 0
        for i, consumer in enumerate(consumers):
            c_handler = handler_for(consumer)
            solved_out = omega_rows[i] if omega_rows is not None else c_handler.out_size(consumer)
            cols = omega.new_zeros(c_handler.out_size(consumer), k)
            cols[:solved_out] = omega[start : start + solved_out]
            start += solved_out
            self.swaps += c_handler.grow_in(consumer, cols.new_zeros(cols.shape))
            self._targets.append(cols)

    @torch.no_grad()
    def set_amplitude(self, gamma: float) -> None:
        for swap, target in zip(self.swaps, self._targets):
            swap.new[swap.new_slice()] = (gamma * target).to(swap.new)

    def undo(self) -> None:
        for swap in reversed(self.swaps):
            swap.undo()
            _sync_sizes(swap.module)


def _sync_sizes(module: nn.Module) -> None:
    """Keep `in_features`/`out_features` equal to the weight's shape after a swap or an undo."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


def carry_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], swaps: list[ParameterSwap]) -> None:
    """Point each optimizer at the grown Parameters, keeping the old entries' state.

    State tensors shaped like the old Parameter (Adam's moments, momentum buffers) are extended
    with zeros for the new entries; scalars such as the step count are kept as they are.
    """
    for optimizer in optimizers:
        for swap in swaps:
            for group in optimizer.param_groups:
                group["params"] = [swap.new if p is swap.old else p for p in group["params"]]
            state = optimizer.state.pop(swap.old, None)
            if state is None:
                continue
            new_state = {}
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == swap.old.shape:
                    pad_shape = list(value.shape)
                    pad_shape[swap.dim] = swap.new.shape[swap.dim] - swap.old_size
                    value = torch.cat([value, value.new_zeros(pad_shape)], dim=swap.dim)
                new_state[key] = value
            optimizer.state[swap.new] = new_state
