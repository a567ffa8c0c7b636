"""Growing a site in place, and carrying optimizer state over to the grown Parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from growc.graph.handlers import (
    BATCHNORM,
    Place,
    TensorSwap,
    channel_handler_for,
    extend,
    handler_for,
    owner_of,
    sync_sizes,
)

if TYPE_CHECKING:
    from growc.graph.candidates import WidthSite


@dataclass
class NewUnits:
    """K new units of a site, in the layers' own terms.

    `rows` (K, in_flat) and `bias` (K) are the producer's new weights; `omega` (sum of consumer
    outputs, K) their outgoing weights, `omega_rows[i]` of them for consumer i (its output count
    when solved). Behind a BatchNorm, the unit's amplitude is the BatchNorm's new weight
    `norm_weight`, whose running statistics start at `norm_mean`/`norm_var` (the new channels'
    actual statistics), and the producer rows are not scaled.
    """

    rows: Tensor
    bias: Tensor | None
    omega: Tensor
    omega_rows: list[int]
    norm_weight: Tensor | None = None
    norm_mean: Tensor | None = None
    norm_var: Tensor | None = None
    reached_omega: dict[str, Tensor] | None = None  # attached readers' outgoing weights (else 0)

    @property
    def count(self) -> int:
        return self.rows.shape[0]


def _mean_rows(layer: nn.Module, count: int, flat_in: int) -> tuple[Tensor, Tensor | None]:
    """`count` copies of the mean of a layer's output rows (weights padded with zeros to
    `flat_in` inputs, and the mean bias, None without one): outputs at the mean of its units."""
    handler = handler_for(layer)
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    rows = w.new_zeros(count, flat_in)
    rows[:, : w.shape[1]] = w.mean(0)
    bias = layer.bias.detach().mean().expand(count).clone() if handler.has_bias(layer) else None
    return rows, bias


def _no_larger_than_its_columns(omega: Tensor, reader: nn.Module, spatial: int) -> Tensor:
    """Fitted outgoing weights (out, K) for an attached reader, each column no larger than the
    RMS of the reader's own columns: the fit divides by the neuron's energy at the reader, which
    can be far smaller than at the consumers (a mean over tokens of a direction that varies
    along them), and one optimizer step on columns hundreds of times their neighbours'
    multiplied the loss ten times (docs/method.md)."""
    handler = handler_for(reader)
    units = handler.in_size(reader) // max(spatial, 1)
    if units == 0:
        return omega
    level = handler.unit_columns(reader, units, spatial).double().norm(dim=1).pow(2).mean().sqrt()
    norms = omega.double().norm(dim=0).clamp_min(1e-30)
    return omega * (level / norms).clamp(max=1.0).to(omega)


def _features(at: Place, spatial: int) -> Place:
    """A place among a reader's units as a place among its input features (`spatial` per unit:
    a linear layer reading a flattened feature map, unit by unit)."""
    if at is None or spatial == 1:
        return at
    if isinstance(at, Tensor):
        return (at[:, None] * spatial + torch.arange(spatial)).flatten()
    return at * spatial


class SiteGrowth:
    """New units added to a site, whose amplitude can still be set, or the whole undone.

    The units enter scaled by `gamma` on both sides (the producer's rows, or the BatchNorm's
    weight, and the consumers' columns): at gamma = 0 the model computes exactly what it did
    before, in train and in eval mode. Tied layers get units that keep it so at every gamma:
    the other writers zero rows, carriers pass-through entries, the attached readers zero columns.
    """

    def __init__(self, root: nn.Module, site: WidthSite, units: NewUnits) -> None:
        self.site = site
        self.count = k = units.count
        if k % site.unit_block:
            raise ValueError(f"{k} new units for '{site.name}', whose units come in blocks of {site.unit_block}")
        self._producer = producer = root.get_submodule(site.producer)
        p_handler = handler_for(producer)
        # Where each layer takes the new units, read before anything grows (offsets, positions in
        # channel groups and the features per channel depend on the current widths).
        places = {r: (site.place(root, r, k), site.spatial_size(root, r)) for r in site.readers}
        entries_at = {
            name: site.place(root, name, k)
            for name in (site.producer, *site.writers, *site.writer_norms, *site.carriers, *dict(site.broadcasts))
        }
        if site.norm is not None:
            entries_at[site.norm] = entries_at[site.producer]
        broadcast_dims = {path: site.broadcast_dim(root, path) for path, _ in site.broadcasts}
        # Other sites may have grown in the same step since the units were solved: the producer
        # may have new inputs and a consumer new outputs. Those connect with zeros.
        flat_in = p_handler.in_size(producer) * p_handler.taps(producer)
        rows = units.rows.new_zeros(k, flat_in)
        rows[:, : units.rows.shape[1]] = units.rows
        bias = units.bias if units.bias is not None else units.rows.new_zeros(k)
        behind_norm = site.norm is not None
        self.swaps: list[TensorSwap] = []
        self._targets: list[tuple[TensorSwap, Tensor, bool, Tensor | None]] = []  # (swap, value, scaled, base)

        # Through a LayerNorm the new units start at the mean of the old ones (see
        # `UnitNormHandler`): every writer's new rows are the mean of its rows, the neurons on top.
        mean_rows, mean_bias = _mean_rows(producer, k, flat_in) if site.centred else (None, None)
        swaps = p_handler.grow_out(producer, rows.new_zeros(rows.shape), rows.new_zeros(k), entries_at[site.producer])
        self._new_channels = swaps[0].positions
        rows = p_handler.output_block(producer, rows)  # in the weight's terms (one group's inputs, say)
        self._add(swaps[0], rows, scaled=not behind_norm, base=mean_rows)
        if len(swaps) > 1:
            self._add(swaps[1], bias, scaled=not behind_norm, base=mean_bias)
        self._norm_module = root.get_submodule(site.norm) if behind_norm else None
        if behind_norm:
            norm = root.get_submodule(site.norm)
            mean = units.norm_mean if units.norm_mean is not None else rows.new_zeros(k)
            var = units.norm_var if units.norm_var is not None else rows.new_ones(k)
            for swap in BATCHNORM.grow(norm, k, mean, var, at=entries_at[site.norm]):
                if swap.attr == "weight":
                    weight = units.norm_weight if units.norm_weight is not None else rows.new_ones(k)
                    self._add(swap, weight, scaled=True)
                else:
                    self.swaps.append(swap)  # bias stays 0; running stats are set once
        self._grow_tied(root, k, units.rows, entries_at)
        for path, fill in site.broadcasts:
            dim = broadcast_dims[path]
            if dim is not None:
                module, attr = owner_of(root, path)
                tensor = getattr(module, attr)
                shape = list(tensor.shape)
                shape[dim] = k
                entries = rows.new_full(shape, fill)
                if site.centred:  # a term added to units at their mean: its own mean (see _mean_rows)
                    entries = tensor.detach().mean(dim, keepdim=True).expand(shape).to(rows)
                self.swaps.append(extend(module, attr, entries, dim, entries_at[path]))
        start = 0
        for name, solved in zip(site.consumers, units.omega_rows):
            consumer = root.get_submodule(name)
            c_handler = handler_for(consumer)
            omega = units.omega.new_zeros(c_handler.out_size(consumer), k)
            omega[:solved] = units.omega[start : start + solved]
            start += solved
            self._add(*self._grow_reader(consumer, omega, places[name]), scaled=True)
        for name in site.attached:
            attached = root.get_submodule(name)
            omega = units.omega.new_zeros(handler_for(attached).out_size(attached), k)
            fitted = (units.reached_omega or {}).get(name)
            if fitted is None:
                self.swaps.append(self._grow_reader(attached, omega, places[name])[0])
                continue
            # (outputs gained earlier in this step stay 0)
            omega[: fitted.shape[0]] = _no_larger_than_its_columns(fitted, attached, places[name][1])
            self._add(*self._grow_reader(attached, omega, places[name]), scaled=True)

    def _grow_tied(self, root: nn.Module, k: int, ref: Tensor, entries_at: dict[str, Place]) -> None:
        """The other writers (zero rows), their BatchNorms and the carriers (pass-through entries,
        at the units' offset where a concatenation put them among others)."""
        zeros = ref.new_zeros(k)
        for name in self.site.writers:
            writer = root.get_submodule(name)
            handler = handler_for(writer)
            flat_in = handler.in_size(writer) * handler.taps(writer)
            rows, bias = _mean_rows(writer, k, flat_in) if self.site.centred else (ref.new_zeros(k, flat_in), zeros)
            if name in self.site.seeded:  # as large as its own rows, so that training moves it
                spread = writer.weight.detach().std().clamp_min(1e-3)
                rows = torch.randn(k, flat_in, dtype=ref.dtype, device=ref.device) * spread.to(ref)
            self.swaps += handler.grow_out(
                writer, rows.to(ref), None if bias is None else bias.to(ref), entries_at[name]
            )
        for name in (*self.site.writer_norms, *self.site.carriers):
            module = root.get_submodule(name)
            self.swaps += channel_handler_for(module).grow_pass_through(module, k, entries_at.get(name))

    @staticmethod
    def _grow_reader(reader: nn.Module, omega: Tensor, place: tuple[Place, int]) -> tuple[TensorSwap, Tensor]:
        """Give `reader` K new inputs at its place (zeros for now); returns the swap and the
        block of outgoing weights `omega` stands for."""
        at, spatial = place
        handler = handler_for(reader)
        block = handler.input_block(reader, omega, spatial)
        (swap,) = handler.grow_in(reader, torch.zeros_like(block), _features(at, spatial))
        return swap, block

    def _add(self, swap: TensorSwap, value: Tensor, scaled: bool, base: Tensor | None = None) -> None:
        """`swap`'s new entries hold `base + gamma * value` (`value` alone where not scaled)."""
        self.swaps.append(swap)
        self._targets.append((swap, value, scaled, base))

    @torch.no_grad()
    def set_norm_statistics(self, mean: Tensor, var: Tensor) -> None:
        """The running statistics of the new entries of the BatchNorm right after the producer."""
        for swap in self.swaps:
            if swap.attr in ("running_mean", "running_var") and swap.module is self._norm_module:
                swap.set_new(mean if swap.attr == "running_mean" else var)

    @torch.no_grad()
    def set_amplitude(self, gamma: float) -> None:
        for swap, value, scaled, base in self._targets:
            entries = gamma * value if scaled else value
            if base is not None:
                entries = entries + base.reshape(entries.shape).to(entries)
            swap.set_new(entries)

    def undo(self) -> None:
        for swap in reversed(self.swaps):
            swap.undo()
            sync_sizes(swap.module)

    @property
    def parameter_swaps(self) -> list[TensorSwap]:
        return [s for s in self.swaps if s.is_parameter]

    def new_parameters(self) -> list[nn.Parameter]:
        return []  # every grown tensor replaces an existing one (see parameter_swaps)

    @torch.no_grad()
    def calibrate(self, run_eval: Callable[[], None]) -> None:
        """Give the new channels of the BatchNorm after the producer the running statistics of
        what they actually produce on the line-search samples. The solver's estimate comes from
        rows aligned with the consumers' outputs (pooled windows averaged, a few positions
        sampled), which can be far from what the BatchNorm sees at every position: 0.77 against
        21 for a stem conv feeding a max pool. The new rows are not scaled by the amplitude behind
        a BatchNorm, so the statistics hold for every amplitude the line search tries."""
        if self._norm_module is None:
            return
        seen: list[Tensor] = []

        def keep_new_channels(module: nn.Module, args: tuple, output: Tensor) -> None:
            new = output.index_select(1, self._new_channels.to(output.device))
            seen.append(new.detach().transpose(0, 1).reshape(self.count, -1).double())

        self.set_amplitude(0.0)  # writes the new rows (unscaled behind the norm); the function is unchanged
        hook = self._producer.register_forward_hook(keep_new_channels)
        try:
            run_eval()  # eval: no running statistics move, no dropout
        finally:
            hook.remove()
        if not seen or seen[0].shape[1] < 2:
            return
        values = seen[0]
        self.set_norm_statistics(values.mean(1), values.var(1).clamp_min(1e-12))  # unbiased, as BatchNorm keeps it


_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # Adam, AdamW, AMSGrad


def carry_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], swaps: list[TensorSwap]) -> None:
    """Point each optimizer at the grown Parameters, keeping the old entries' state.

    State tensors shaped like the old Parameter (Adam's moments, momentum buffers) are extended
    with zeros for the new entries; scalars such as the step count are kept as they are. Adam's
    second moments are the exception: their new entries start at the old entries' mean. The
    step count is shared, so Adam no longer corrects the bias of fresh moments: from a zero
    second moment, a new weight's early steps would be normalized by its first few squared
    gradients alone (up to ~3x the learning rate), not by a scale like its neighbours'.
    """
    for optimizer in optimizers:
        for swap in swaps:
            if not swap.is_parameter:
                continue
            for group in optimizer.param_groups:
                group["params"] = [swap.new if p is swap.old else p for p in group["params"]]
            state = optimizer.state.pop(swap.old, None)
            if state is None:
                continue
            new_state = {}
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == swap.old.shape:
                    fill = float(value.mean()) if key in _SECOND_MOMENTS and value.numel() else 0.0
                    value = swap.widen(value, fill)
                new_state[key] = value
            optimizer.state[swap.new] = new_state


def uncarry_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], swaps: list[TensorSwap]) -> None:
    """Undo `carry_optimizer_state`: the old Parameters back in the optimizers, their state cut back."""
    for optimizer in optimizers:
        for swap in reversed(swaps):
            if not swap.is_parameter:
                continue
            for group in optimizer.param_groups:
                group["params"] = [swap.old if p is swap.new else p for p in group["params"]]
            state = optimizer.state.pop(swap.new, None)
            if state is None:
                continue
            optimizer.state[swap.old] = {
                k: swap.narrow(v) if isinstance(v, Tensor) and v.shape == swap.new.shape else v
                for k, v in state.items()
            }
