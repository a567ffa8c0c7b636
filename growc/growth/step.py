"""One growth step: measure every site, decide where and how much to grow, apply it safely."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from growc.graph.candidates import WidthSite
from growc.graph.depth import DepthGrowth, DepthSite
from growc.graph.handlers import handler_for
from growc.graph.rewrite import NewUnits, SiteGrowth, carry_optimizer_state, uncarry_optimizer_state
from growc.growth.amplitude import NEURON_AMPLITUDES, UPDATE_FRACTIONS, line_search
from growc.growth.config import GrowthConfig
from growc.growth.kinks import choose_signs, is_kinked, signed_gains
from growc.growth.report import SiteGrowthRecord
from growc.growth.train import LossFn, batch_loss, modes_kept
from growc.tiny.significance import significant_neuron_count
from growc.tiny.site_solution import SiteSolution, inverses, neurons_raw_gain, solve_site
from growc.tiny.solver import Neurons
from growc.tiny.statistics import MomentAccumulator, SiteMoments, input_mean, prepare_inputs
from growc.tiny.strategies import Strategy

Site = WidthSite | DepthSite


@dataclass
class SiteAssessment:
    site: Site
    moments: SiteMoments
    solution: SiteSolution
    significant: int
    cost: int  # parameters per added neuron
    mode: str  # how the producer's input reaches new units (see prepare_inputs)
    unit_scale: float  # RMS pre-activation of existing units (their BatchNorm weights' RMS behind one)
    column_rms: float  # RMS norm of the consumers' existing input columns
    input_mean: torch.Tensor  # E[b'], for the running mean of new BatchNorm entries
    # Per geometry of the attached readers the units reach: (readers, their moments).
    reached: list[tuple[tuple[str, ...], SiteMoments]] = field(default_factory=list)
    # The significance test of the first neuron: its held-out alignment (mean over the folds),
    # that mean's standard error, and the z it had to clear (mean > z * std_error).
    test: tuple[float, float, float] | None = None

    def summary(self) -> dict[str, float | int]:
        """What the method says about the site, in numbers: its expressivity bottleneck (absolute
        and relative to the gradient energy), the best neuron's first-order gain, and how many
        neurons pass the significance test."""
        return {
            "bottleneck": self.solution.bottleneck,
            "relative": self.solution.relative_bottleneck,
            "best_gain": float(self.solution.neurons.lambdas[0] ** 2) if self.solution.neurons.count else 0.0,
            "significant": self.significant,
            **(
                {"held_out_alignment": self.test[0], "held_out_std_error": self.test[1], "z": self.test[2]}
                if self.test is not None
                else {}
            ),
        }

    def value(self, k: int) -> float:
        """First-order loss decrease per parameter of the k-th neuron (0-based): the ranking key."""
        lam2 = float(self.solution.neurons.lambdas[k]) ** 2 * self.solution.rows_per_sample
        return self.site.slope_at_zero * lam2 / self.cost


def assess_sites(
    model: nn.Module, sites: list[Site], accumulators: dict[str, MomentAccumulator], config: GrowthConfig
) -> list[SiteAssessment]:
    out = []
    for site in sites:
        acc = accumulators[site.name]
        if acc.samples == 0:
            continue
        cap = config.new_neuron_cap(site.width(model))
        mode = site.input_mode(model)
        raw = acc.total()
        if not _finite(raw):
            continue  # a NaN/inf gradient poisoned this site's statistics: no growth there this step
        moments = prepare_inputs(raw, mode)
        shared = inverses(moments, config.ridge)
        solution = solve_site(moments, max_neurons=cap, shared=shared)
        significance = significant_neuron_count(acc, cap, config.significance_z, mode, shared)
        reached = []
        for sub in site.reached_sites() if isinstance(site, WidthSite) else []:
            sub_acc = accumulators.get(sub.name)
            sub_raw = sub_acc.total() if sub_acc is not None and sub_acc.samples else None
            if sub_raw is not None and _finite(sub_raw):
                reached.append((sub.consumers, prepare_inputs(sub_raw, mode)))
        out.append(
            SiteAssessment(
                site=site,
                moments=moments,
                solution=solution,
                significant=min(significance.significant, solution.neurons.count),
                cost=site.params_per_neuron(model),
                mode=mode,
                unit_scale=_unit_scale(model, site, moments),
                column_rms=_column_scale(model, site, moments),
                input_mean=input_mean(raw)[0],
                reached=reached,
                test=(
                    (significance.mean_gain[0], significance.std_error[0], config.significance_z)
                    if significance.mean_gain
                    else None
                ),
            )
        )
    return out


def _finite(moments: SiteMoments) -> bool:
    tensors = [moments.s_prev] + [t for c in moments.consumers for t in (c.s, c.m, c.c, c.p)]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and all(math.isfinite(c.g_sq) for c in moments.consumers)


def allocate(assessments: list[SiteAssessment], budget: int | None) -> dict[str, int]:
    """Greedy by gain per parameter across all sites: several sites can grow in one step, and the
    parameter budget goes where each parameter buys the most first-order loss decrease."""
    return allocate_with_reasons(assessments, budget)[0]


def allocate_with_reasons(
    assessments: list[SiteAssessment], budget: int | None
) -> tuple[dict[str, int], dict[str, str]]:
    """`allocate`, and for each site given fewer neurons than passed its test, why."""
    items = [(a.value(k), a) for a in assessments for k in range(a.significant)]
    items.sort(key=lambda item: -item[0])
    counts: dict[str, int] = {}
    chosen: list[Site] = []
    reasons: dict[str, str] = {}
    spent = 0
    for _, a in items:
        if budget is not None and spent + a.cost > budget:
            reasons.setdefault(
                a.site.name,
                f"over the parameter budget: a neuron costs {a.cost:,} parameters and {max(budget - spent, 0):,} are left",
            )
            continue
        if a.site.name not in counts:
            other = next((o for o in chosen if _conflict(a.site, o)), None)
            if other is not None:
                reasons.setdefault(
                    a.site.name,
                    f"'{other.name}' grows in this step and one of the two puts units between a layer's old "
                    "inputs (a concatenation): it can grow next step",
                )
                continue
            chosen.append(a.site)
        counts[a.site.name] = counts.get(a.site.name, 0) + 1
        spent += a.cost
    return counts, reasons


def not_allocated_records(
    assessments: list[SiteAssessment], reasons: dict[str, str], grown: list[SiteGrowthRecord]
) -> list[SiteGrowthRecord]:
    """A record, with the reason, for each site that had significant neurons and was given none;
    the sites of `grown` that were given fewer than significant get the reason too."""
    for record in grown:
        if record.reason is None and record.site in reasons and record.neurons < record.significant:
            record.reason = reasons[record.site]
    given = {record.site for record in grown}
    return [
        _no_growth(a, 0.0, 0.0, 0.0, None, reasons[a.site.name])[0]
        for a in assessments
        if a.site.name in reasons and a.site.name not in given
    ]


def _conflict(a: Site, b: Site) -> bool:
    """Two sites that cannot grow in the same step: one puts units between a layer's old inputs
    (a concatenation), which the other's statistics, taken before, would not line up with."""
    if isinstance(a, DepthSite) or isinstance(b, DepthSite):
        return False
    return bool(set(a.inserts_between) & set(b.layers) or set(b.inserts_between) & set(a.layers))


def _column_scale(model: nn.Module, site: Site, moments: SiteMoments) -> float:
    """How large a new unit's outgoing weights are at gamma = 1: the consumers' RMS column norm;
    for a new block, the RMS of the edge's values, so that the block adds a term as large as its
    input."""
    if isinstance(site, DepthSite):
        rms = float(torch.diagonal(moments.s_prev)[:-1].clamp_min(0).mean().sqrt())
        return rms or 1.0
    return _rms_column_norm([model.get_submodule(c) for c in site.consumers])


def _unit_scale(model: nn.Module, site: Site, moments: SiteMoments) -> float:
    """How large an existing unit is where new units will enter: behind a BatchNorm, the RMS of
    its weights; else the RMS pre-activation of the producer's units on the statistics (1 for a
    new block: unit pre-activations)."""
    if isinstance(site, DepthSite):
        return 1.0
    if site.norm is not None:
        norm = model.get_submodule(site.norm)
        if norm.weight is None or norm.weight.numel() == 0:
            return 1.0
        return float(norm.weight.detach().double().pow(2).mean().sqrt()) or 1.0
    producer = model.get_submodule(site.producer)
    w = handler_for(producer).weight_matrix(producer).to(torch.float64).cpu()
    if w.shape[0] == 0:
        return 1.0
    energy = ((w @ moments.s_prev.cpu()) * w).sum(1).mean()
    return float(energy.clamp_min(0).sqrt()) or 1.0


def new_units(a: SiteAssessment, neurons: Neurons, dtype: torch.dtype) -> tuple[NewUnits, float]:
    """The neurons in the layers' terms, scaled so that at gamma = 1 a new unit is as large as a
    typical existing one (pre-activation or BatchNorm weight, and outgoing column norm). Returns
    the units and the factor from the solver's scale to gamma = 1 (for the predicted gain)."""
    lambda_1 = float(neurons.lambdas[0]) if neurons.count and float(neurons.lambdas[0]) > 0 else 1.0
    omega = (neurons.omega * (a.column_rms / lambda_1)).to(dtype)
    reached = {
        reader: (w * (a.column_rms / lambda_1)).to(dtype)
        for reader, w in reached_omegas(a.reached, neurons.alpha).items()
    }
    rows_in = [u.delta.shape[0] for u in a.solution.updates]
    alpha = neurons.alpha
    if a.mode == "centered":
        variance = ((a.moments.s_prev @ alpha) * alpha).sum(0)
        units = NewUnits(
            rows=alpha.T.to(dtype),
            bias=None,
            omega=omega,
            omega_rows=rows_in,
            norm_weight=torch.full((neurons.count,), a.unit_scale, dtype=dtype),
            norm_mean=(a.input_mean.to(alpha) @ alpha).to(dtype),
            norm_var=variance.clamp_min(1e-12).to(dtype),
            reached_omega=reached,
        )
    elif a.mode == "affine":
        units = NewUnits(
            rows=(alpha[:-1].T * a.unit_scale).to(dtype),
            bias=(alpha[-1] * a.unit_scale).to(dtype),
            omega=omega,
            omega_rows=rows_in,
            reached_omega=reached,
        )
    else:
        units = NewUnits(
            rows=(alpha.T * a.unit_scale).to(dtype), bias=None, omega=omega, omega_rows=rows_in, reached_omega=reached
        )
    return units, a.unit_scale * a.column_rms / lambda_1


def reached_omegas(reached: list[tuple[tuple[str, ...], SiteMoments]], alpha: Tensor) -> dict[str, Tensor]:
    """Outgoing weights, in the solver's scale, for attached readers the chosen neurons reach:
    for each neuron the least-squares fit of the reader's desired update `-g` by the neuron's
    value there, `E[-g b'^T] alpha / alpha^T S'_r alpha` (their own weights are not updated, so
    the raw gradient, not v_perp). For the measured consumers this is the solver's omega."""
    out = {}
    alpha = alpha.to(torch.float64)
    for readers, moments in reached:
        energy = ((moments.s_prev.to(alpha) @ alpha) * alpha).sum(0).clamp_min(1e-12)
        for reader, consumer in zip(readers, moments.consumers):
            out[reader] = (-consumer.p.to(alpha).T @ alpha) / energy
    return out


def _rms_column_norm(consumers: list[nn.Module]) -> float:
    total, columns = 0.0, 0
    for c in consumers:
        h = handler_for(c)
        w = h.weight_matrix(c)[:, : h.in_size(c)]
        total += float((w.double() ** 2).sum())
        columns = max(columns, w.shape[1])
    return math.sqrt(total / columns) if columns and total > 0 else 1.0


@dataclass
class LineSearchBatch:
    inputs: list[Tensor]
    target: Tensor
    loss_fn: LossFn

    def loss(self, model: nn.Module) -> float:
        return batch_loss(model, self.inputs, self.target, self.loss_fn)

    @classmethod
    def from_batches(cls, batches: list[tuple[list[Tensor], Tensor]], samples: int, loss_fn: LossFn) -> LineSearchBatch:
        """The first `samples` samples of (inputs, target) batches, joined."""
        inputs = [torch.cat([b[0][i] for b in batches])[:samples] for i in range(len(batches[0][0]))]
        return cls(inputs, torch.cat([b[1] for b in batches])[:samples], loss_fn)


@torch.no_grad()
def measure_new_norm_statistics(model: nn.Module, site: WidthSite, growth: SiteGrowth, batch: LineSearchBatch) -> None:
    """Give the new channels of the BatchNorm after the producer the running statistics of what
    they actually produce on the line-search samples. The solver's estimate comes from rows
    aligned with the consumers' outputs (pooled windows averaged, a few positions sampled), which
    can be far from what the BatchNorm sees at every position: 0.77 against 21 for a stem conv
    feeding a max pool. The new rows are not scaled by the amplitude behind a BatchNorm, so the
    statistics hold for every amplitude the line search tries."""
    producer = model.get_submodule(site.producer)
    new = slice(handler_for(producer).out_size(producer) - growth.count, None)
    seen: list[Tensor] = []

    def keep_new_channels(module: nn.Module, args: tuple, output: Tensor) -> None:
        seen.append(output[:, new].detach().transpose(0, 1).reshape(growth.count, -1).double())

    growth.set_amplitude(0.0)  # writes the new rows (unscaled behind the norm); the function is unchanged
    hook = producer.register_forward_hook(keep_new_channels)
    try:
        with modes_kept(model):
            model.eval()(*batch.inputs)  # eval: no running statistics move, no dropout
    finally:
        hook.remove()
    if not seen or seen[0].shape[1] < 2:
        return
    values = seen[0]
    growth.set_norm_statistics(values.mean(1), values.var(1).clamp_min(1e-12))  # unbiased, as BatchNorm keeps it


@torch.no_grad()
def _apply_best_update(model: nn.Module, a: SiteAssessment, batch: LineSearchBatch) -> tuple[float, float, Callable]:
    """Line search on the size of the consumers' best update; returns (fraction, predicted gain,
    a function that takes the update back)."""
    consumers = [model.get_submodule(c) for c in a.site.consumers]
    originals = [handler_for(c).weight_matrix(c).clone() for c in consumers]
    units = []
    for w, u in zip(originals, a.solution.updates):
        norm = float(u.delta.norm())
        unit = torch.zeros_like(w)
        # A consumer may have gained outputs earlier in this step: they get no update. One that
        # gained inputs between its old ones (a concatenation) gets none at all.
        if norm > 0 and u.delta.shape[1] == w.shape[1]:
            rows = u.delta.shape[0]
            unit[:rows] = u.delta.to(w) * (float(w[:rows].norm()) / norm)
        units.append(unit)

    def set_fraction(f: float) -> None:
        for c, w, unit in zip(consumers, originals, units):
            h = handler_for(c)
            h.add_to_weight_matrix(c, w + f * unit - h.weight_matrix(c))

    def loss_at(f: float) -> float:
        set_fraction(f)
        return batch.loss(model)

    best, _, _ = line_search(loss_at, UPDATE_FRACTIONS)
    set_fraction(best)
    restore = functools.partial(set_fraction, 0.0)
    predicted = 0.0
    for w, u in zip(originals, a.solution.updates):
        norm = float(u.delta.norm())
        if norm > 0 and u.delta.shape[1] == w.shape[1]:
            predicted += best * float(w.norm()) / norm * u.first_order_gain * a.solution.rows_per_sample
    return best, predicted, restore


def grow_site(
    model: nn.Module,
    a: SiteAssessment,
    count: int,
    strategy: Strategy,
    optimizers: list[torch.optim.Optimizer],
    batch: LineSearchBatch,
    config: GrowthConfig,
    generator: torch.Generator,
) -> tuple[SiteGrowthRecord, Callable[[], None]]:
    """Apply the best update and `count` new neurons at one site, each with its amplitude chosen
    by a line search on the real loss. Neurons whose best amplitude is 0 are not added. Returns
    the record and a function that takes the whole change back."""
    loss_before = batch.loss(model)
    depth = isinstance(a.site, DepthSite)
    fraction, predicted, restore_update = 0.0, 0.0, None
    if config.update_existing and not depth:
        fraction, predicted, restore_update = _apply_best_update(model, a, batch)

    neurons = strategy.propose(a.solution, a.moments, count, generator)
    reason = None  # why fewer neurons than asked went in, when that happens
    if is_kinked(a.site) and not getattr(strategy, "function_preserving", False):
        rows = [u.delta.shape[0] for u in a.solution.updates]
        gains = signed_gains(
            model, a.site, neurons, a.mode, a.input_mean, rows, batch.inputs, batch.target, batch.loss_fn
        )
        proposed = neurons.count
        neurons = choose_signs(gains, neurons)
        if neurons.count < proposed:
            reason = (
                f"the sign test kept {neurons.count} of {proposed} neurons: under the kink at 0 neither sign "
                "of the others lowered the line-search loss"
            )
    if neurons.count == 0:
        reason = reason or f"the strategy proposed no neuron ({count} asked)"
        return _no_growth(a, loss_before - batch.loss(model), predicted, fraction, restore_update, reason)
    dtype = next(model.parameters()).dtype
    units, scale = new_units(a, neurons, dtype)
    if depth:
        growth = DepthGrowth(model, a.site, units.rows, units.bias, units.omega)
    else:
        growth = SiteGrowth(model, a.site, units)
        if a.site.norm is not None:
            measure_new_norm_statistics(model, a.site, growth, batch)

    if getattr(strategy, "function_preserving", False):
        gamma = 1.0
        growth.set_amplitude(gamma)
    else:

        def loss_at(g: float) -> float:
            growth.set_amplitude(g)
            return batch.loss(model)

        gamma, _, losses = line_search(loss_at, NEURON_AMPLITUDES)
    added = neurons.count
    if gamma == 0.0:
        growth.undo()
        added = 0
        tried = [g for g in losses if g > 0]
        best = min(tried, key=lambda g: losses[g]) if tried else None
        reason = (
            f"the line search kept amplitude 0: every amplitude tried raised the line-search loss "
            f"(the least, {best:g}, gave {losses[best]:.4g} against {losses[0.0]:.4g} at 0)"
            if best is not None and 0.0 in losses
            else "the line search kept amplitude 0"
        )
    else:
        growth.set_amplitude(gamma)
        carry_optimizer_state(optimizers, growth.parameter_swaps)
        if depth:
            for optimizer in optimizers:
                optimizer.add_param_group({**_group_settings(optimizer), "params": growth.new_parameters()})
        raw = float(neurons_raw_gain(a.moments, neurons.alpha, neurons.omega).sum())
        predicted += a.site.slope_at_zero * gamma**2 * scale * raw
    record = SiteGrowthRecord(
        site=a.site.name,
        neurons=added,
        predicted_gain=predicted,
        observed_gain=loss_before - batch.loss(model),
        gamma=gamma,
        update_fraction=fraction,
        significant=a.significant,
        reason=reason,
    )

    def undo() -> None:
        if added:
            uncarry_optimizer_state(optimizers, growth.parameter_swaps)
            if depth:
                for optimizer in optimizers:
                    optimizer.param_groups.pop()
            growth.undo()
        if restore_update is not None:
            restore_update()

    return record, undo


def grow_allocated(
    model: nn.Module,
    assessments: list[SiteAssessment],
    counts: dict[str, int],
    strategy: Strategy,
    optimizers: list[torch.optim.Optimizer],
    batch: LineSearchBatch,
    config: GrowthConfig,
    generator: torch.Generator,
) -> tuple[list[SiteGrowthRecord], list[Callable[[], None]], bool]:
    """Grow every site that `counts` gives neurons, best first; returns the records, a function
    per site that takes its change back, and whether a block was inserted (the graph changed).

    Width first, then new blocks; a block on an edge whose width just changed waits a step (its
    statistics were taken at the old width)."""
    widened: set[str] = set()  # layers whose input dimension grew in this step
    records, undos, blocks = [], [], False
    order = sorted(assessments, key=lambda a: (isinstance(a.site, DepthSite), -a.value(0) if a.significant else 0.0))
    for a in order:
        if counts.get(a.site.name, 0) == 0:
            continue
        if isinstance(a.site, DepthSite) and a.site.consumer in widened:
            reason = f"the width of '{a.site.consumer}' changed in this step: a block there waits a step"
            records.append(_no_growth(a, 0.0, 0.0, 0.0, None, reason)[0])
            continue
        record, undo = grow_site(model, a, counts[a.site.name], strategy, optimizers, batch, config, generator)
        records.append(record)
        undos.append(undo)
        if record.neurons:
            widened.update(a.site.readers if isinstance(a.site, WidthSite) else ())
            blocks |= isinstance(a.site, DepthSite)
    return records, undos, blocks


def _no_growth(
    a: SiteAssessment, observed: float, predicted: float, fraction: float, restore_update, reason: str | None = None
) -> tuple:
    record = SiteGrowthRecord(
        site=a.site.name,
        neurons=0,
        predicted_gain=predicted,
        observed_gain=observed,
        gamma=0.0,
        update_fraction=fraction,
        significant=a.significant,
        reason=reason,
    )
    return record, (restore_update or (lambda: None))


def _group_settings(optimizer: torch.optim.Optimizer) -> dict:
    """A new block's parameters train with the same settings as the model's first group."""
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
