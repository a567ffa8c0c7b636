"""One growth step: measure every site, decide where and how much to grow, apply it safely."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from growc.graph.handlers import handler_for
from growc.graph.incremental import IncrementalForward
from growc.graph.rewrite import NewUnits, carry_optimizer_state, uncarry_optimizer_state
from growc.graph.site import ChannelGroups, Growth, Site, conflict
from growc.growth.amplitude import NEURON_AMPLITUDES, UPDATE_FRACTIONS, line_search
from growc.growth.config import GrowthConfig
from growc.growth.kinks import choose_signs, is_kinked, signed_gains
from growc.growth.report import SiteGrowthRecord
from growc.growth.train import LossFn, batch_loss, join_batches, modes_kept
from growc.tiny.grouping import UnitGroups
from growc.tiny.input_mode import InputMode
from growc.tiny.significance import significant_neuron_count
from growc.tiny.site_solution import SiteSolution, inverses, neurons_raw_gain, solve_site
from growc.tiny.solver import Neurons
from growc.tiny.statistics import MomentAccumulator, SiteMoments, input_mean
from growc.tiny.strategies import Strategy


@dataclass
class SiteAssessment:
    site: Site
    moments: SiteMoments
    solution: SiteSolution
    significant: int
    cost: int  # parameters per added neuron
    mode: InputMode  # how the producer's input reaches new units
    unit_scale: float  # RMS pre-activation of existing units (their BatchNorm weights' RMS behind one)
    column_rms: float  # RMS norm of the consumers' existing input columns
    input_mean: torch.Tensor  # E[b'], for the running mean of new BatchNorm entries
    # Per geometry of the attached readers the units reach: (readers, their moments).
    reached_moments: list[tuple[tuple[str, ...], SiteMoments]] = field(default_factory=list)
    # The significance test of the first neuron: its held-out alignment (mean over the folds),
    # that mean's standard error, and the z it had to clear (mean > z * std_error).
    test: tuple[float, float, float] | None = None
    groups: UnitGroups | None = None  # channel groups: neurons come a level (one per group) at a time
    row_rms: float = 0.0  # RMS norm of the producer's existing weight rows (0: no such layer)

    @property
    def group_size(self) -> int:
        """Neurons that can only be added together (one per channel group, or an attention head's
        values)."""
        return self.groups.count if self.groups is not None else _unit_block(self.site)

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

    def gain_per_parameter(self, k: int) -> float:
        """First-order loss decrease per parameter of the k-th neuron (0-based): the ranking key."""
        lam2 = float(self.solution.neurons.lambdas[k]) ** 2 * self.solution.rows_per_sample
        return self.site.slope_at_zero * lam2 / self.cost


def _row_rms(model: nn.Module, site: Site) -> float:
    """RMS norm of the weight rows of the layer whose new rows a site writes (0: none)."""
    name = getattr(site, "producer", None)
    if site.adds_modules or not name:
        return 0.0
    weight = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(weight, Tensor) or weight.numel() == 0:
        return 0.0
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    return float(rows.pow(2).sum(1).mean().sqrt())


def capped_neurons(a: SiteAssessment, neurons: Neurons) -> Neurons:
    """The neurons with each new weight row no longer than the existing rows' RMS norm.

    `new_units` gives a new unit the pre-activation of a typical existing one. Where its input
    direction has little variance (a token mean, a channel that a LayerNorm left nearly constant,
    inputs of very different scales), that takes weights far larger than any existing row: up to
    sqrt(inputs / ridge) times, since the ridge floors each direction's variance at a tenth of
    the mean. Repeated over steps this compounded: on examples/digits_vit.py the output projection
    reached weights of 3e8 and the MLP's first layer 5e8 within 20 steps, which float32 still
    computed but int8 could not (8.9 and 37.9 points lost). A capped neuron keeps its direction;
    its first-order gain shrinks with it (the predicted gain is computed from these neurons).
    Behind a BatchNorm the row's scale is the norm's business and nothing is capped."""
    if a.row_rms <= 0 or a.mode is InputMode.CENTERED or neurons.count == 0:
        return neurons
    weights, _ = a.mode.decode(neurons.alpha)
    norms = weights.norm(dim=0) * a.unit_scale
    factor = torch.where(norms > a.row_rms, a.row_rms / norms.clamp_min(1e-300), torch.ones_like(norms))
    if bool((factor >= 1).all()):
        return neurons
    return dataclasses.replace(neurons, alpha=neurons.alpha * factor.to(neurons.alpha))


def assess_sites(
    model: nn.Module, sites: list[Site], accumulators: dict[str, MomentAccumulator], config: GrowthConfig
) -> list[SiteAssessment]:
    out = []
    for site in sites:
        acc = accumulators[site.name]
        if acc.rows == 0:
            continue
        mode = InputMode(site.input_mode(model))
        groups = _unit_groups(site.channel_groups(model), mode)
        cap = config.new_neuron_cap(site.width(model))
        if groups is not None:
            cap = max(groups.levels(cap), 1) * groups.count
        cap = _whole_blocks(cap, _unit_block(site))
        raw = acc.total()
        if not _finite(raw):
            continue  # a NaN/inf gradient poisoned this site's statistics: no growth there this step
        moments = mode.prepare(raw)
        shared = inverses(moments, config.ridge, groups)
        solution = solve_site(moments, max_neurons=cap, shared=shared, groups=groups)
        significance = significant_neuron_count(acc, cap, config.significance_z, mode, shared, groups)
        reached = []
        for sub in site.reached_sites():
            sub_acc = accumulators.get(sub.name)
            sub_raw = sub_acc.total() if sub_acc is not None and sub_acc.rows else None
            if sub_raw is not None and _finite(sub_raw):
                reached.append((sub.consumers, mode.prepare(sub_raw)))
        out.append(
            SiteAssessment(
                site=site,
                moments=moments,
                solution=solution,
                significant=_significant(significance.significant, solution.neurons.count, _unit_block(site)),
                cost=site.params_per_neuron(model),
                mode=mode,
                unit_scale=site.unit_scale(model, moments.s_prev),
                column_rms=site.column_scale(model, moments.s_prev),
                row_rms=_row_rms(model, site),
                input_mean=input_mean(raw)[0],
                reached_moments=reached,
                test=(
                    (significance.held_out_alignment[0], significance.std_error[0], config.significance_z)
                    if significance.held_out_alignment
                    else None
                ),
                groups=groups,
            )
        )
    return out


def _unit_block(site: Site) -> int:
    """How many units a site's neurons come in (an attention head's values: a block of them)."""
    return getattr(site, "unit_block", 1)


def _whole_blocks(count: int, block: int) -> int:
    """`count` rounded down to whole blocks, or up to one block when any neuron is there."""
    return count if block == 1 or count == 0 else max(count // block, 1) * block


def _significant(passed: int, solved: int, block: int) -> int:
    """The neurons that passed the test (no more than the solver found), in whole blocks: a
    passing first neuron brings its block, whose other units may be zero neurons
    (`whole_block_neurons`)."""
    return _whole_blocks(min(passed, solved), block)


def whole_block_neurons(neurons: Neurons, block: int) -> Neurons:
    """`neurons` made a whole number of blocks with zero neurons at the end: a head's values
    beyond the directions the solver found start at 0 (and are exact there) and learn in
    training. A gradient of rank r gives at most r directions, fewer than a head's values when
    the head is wide."""
    missing = -neurons.count % block
    if missing == 0:
        return neurons
    pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-1], missing)], dim=-1)  # noqa: E731
    return Neurons(pad(neurons.alpha), pad(neurons.omega), pad(neurons.lambdas))


def _unit_groups(groups: ChannelGroups | None, mode: InputMode) -> UnitGroups | None:
    """The graph's channel groups in the solver's terms: with AFFINE inputs each group's units
    also read the constant (their bias)."""
    if groups is None:
        return None
    read = groups.inputs_read
    if read is not None and mode.bias_rows:
        read = tuple(torch.cat([r, torch.tensor([groups.constant])]) for r in read)
    return UnitGroups(groups.count, read, groups.outputs, groups.inputs)


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
    """`allocate`, and for each site given fewer neurons than passed its test, why. Neurons that
    only come together (one per channel group) are taken together, at their mean gain."""
    items = []
    for a in assessments:
        size = a.group_size
        for first in range(0, a.significant - size + 1, size):
            gain = sum(a.gain_per_parameter(k) for k in range(first, first + size)) / size
            items.append((gain, a))
    items.sort(key=lambda item: -item[0])
    counts: dict[str, int] = {}
    chosen: list[Site] = []
    reasons: dict[str, str] = {}
    spent = 0
    for _, a in items:
        cost = a.cost * a.group_size
        if budget is not None and spent + cost > budget:
            what = "a neuron costs" if a.group_size == 1 else f"{a.group_size} neurons (one per channel group) cost"
            reasons.setdefault(
                a.site.name,
                f"over the parameter budget: {what} {cost:,} parameters and {max(budget - spent, 0):,} are left",
            )
            continue
        if a.site.name not in counts:
            other = next((o for o in chosen if conflict(a.site, o)), None)
            if other is not None:
                reasons.setdefault(
                    a.site.name,
                    f"'{other.name}' grows in this step and one of the two puts units between a layer's old "
                    "units (a concatenation or channel groups): it can grow next step",
                )
                continue
            chosen.append(a.site)
        counts[a.site.name] = counts.get(a.site.name, 0) + a.group_size
        spent += cost
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
        _no_growth(a, reasons[a.site.name])[0]
        for a in assessments
        if a.site.name in reasons and a.site.name not in given
    ]


def new_units(a: SiteAssessment, neurons: Neurons, dtype: torch.dtype) -> tuple[NewUnits, float]:
    """The neurons in the layers' terms, scaled so that at gamma = 1 a new unit is as large as a
    typical existing one (pre-activation or BatchNorm weight, and outgoing column norm). Returns
    the units and the factor from the solver's scale to gamma = 1 (for the predicted gain)."""
    # (the largest: under channel groups the neurons come group by group, not by gain)
    lambda_1 = float(neurons.lambdas.max()) if neurons.count and float(neurons.lambdas.max()) > 0 else 1.0
    omega = (neurons.omega * (a.column_rms / lambda_1)).to(dtype)
    reached = {
        reader: (w * (a.column_rms / lambda_1)).to(dtype)
        for reader, w in reached_omegas(a.reached_moments, neurons.alpha, a.moments.s_prev).items()
    }
    rows_in = [u.delta.shape[0] for u in a.solution.updates]
    alpha = neurons.alpha
    weights, bias = a.mode.decode(alpha)
    if a.mode is InputMode.CENTERED:
        # Behind a BatchNorm the unit's size is the norm's new weight; its running statistics
        # start at what the units produce (measured again on real data, `Growth.calibrate`).
        variance = ((a.moments.s_prev @ alpha) * alpha).sum(0)
        units = NewUnits(
            rows=weights.T.to(dtype),
            bias=None,
            omega=omega,
            omega_rows=rows_in,
            norm_weight=torch.full((neurons.count,), a.unit_scale, dtype=dtype),
            norm_mean=(a.input_mean.to(alpha) @ alpha).to(dtype),
            norm_var=variance.clamp_min(1e-12).to(dtype),
            reached_omega=reached,
        )
    else:
        units = NewUnits(
            rows=(weights.T * a.unit_scale).to(dtype),
            bias=None if bias is None else (bias * a.unit_scale).to(dtype),
            omega=omega,
            omega_rows=rows_in,
            reached_omega=reached,
        )
    return units, a.unit_scale * a.column_rms / lambda_1


def reached_omegas(
    reached: list[tuple[tuple[str, ...], SiteMoments]], alpha: Tensor, s_prev: Tensor
) -> dict[str, Tensor]:
    """Outgoing weights, in the solver's scale, for attached readers the chosen neurons reach:
    for each neuron the least-squares fit of the reader's desired update `-g` by the neuron's
    value there, `E[-g b'^T] alpha / alpha^T S'_r alpha` (their own weights are not updated, so
    the raw gradient, not v_perp). For the measured consumers this is the solver's omega.

    The neuron's energy at the consumers (`alpha^T S' alpha`, from `s_prev`) is a floor for the
    denominator: where the neuron is nearly 0 at a reader (its mean over tokens, say) the fit
    would otherwise give that reader columns hundreds of times its own, which one optimizer step
    turns into a loss ten times larger (seen on a pre-norm transformer's head)."""
    out = {}
    alpha = alpha.to(torch.float64)
    floor = ((s_prev.to(alpha) @ alpha) * alpha).sum(0)
    for readers, moments in reached:
        energy = torch.maximum(((moments.s_prev.to(alpha) @ alpha) * alpha).sum(0), floor).clamp_min(1e-12)
        for reader, consumer in zip(readers, moments.consumers):
            out[reader] = (-consumer.p.to(alpha).T @ alpha) / energy
    return out


@dataclass
class LineSearchBatch:
    inputs: list[Tensor]
    target: Tensor
    loss_fn: LossFn
    #: Samples per forward pass (None: all at once); the loss is the sample-weighted mean of the
    #: chunks' losses, which for a mean-reduced loss is the loss of the whole batch. At the
    #: training batch size the search needs no more activation memory than training does, and a
    #: conv net's forward is cheaper per sample (CIFAR's 16-32-64 CNN, CPU, in isolation: 4 x 128
    #: samples in 84 ms against 129 ms for 512 at once).
    chunk: int | None = None
    #: Values kept between evaluations of a traced model: a site's search reruns only what its
    #: changes reach (graph/incremental.py). None: every evaluation is a whole forward.
    reuse: IncrementalForward | None = field(default_factory=IncrementalForward)

    def _chunks(self) -> list[tuple[list[Tensor], Tensor]]:
        count = self.target.shape[0]
        chunk = min(self.chunk or count, count)
        parts = [slice(start, start + chunk) for start in range(0, count, chunk)]
        return [([x[part] for x in self.inputs], self.target[part]) for part in parts]

    def loss(self, model: nn.Module) -> float:
        chunks = self._chunks()
        if self.reuse is not None and isinstance(model, fx.GraphModule):
            with modes_kept(model):
                model.eval()
                outputs = self.reuse.outputs(model, [inputs for inputs, _ in chunks])
            losses = [float(self.loss_fn(out, target)) for out, (_, target) in zip(outputs, chunks)]
        else:
            losses = [batch_loss(model, inputs, target, self.loss_fn) for inputs, target in chunks]
        if len(chunks) == 1:
            return losses[0]
        sizes = [target.shape[0] for _, target in chunks]
        return sum(loss * size for loss, size in zip(losses, sizes)) / sum(sizes)

    @torch.no_grad()
    def run_eval(self, model: nn.Module) -> None:
        """One forward pass in eval mode (no running statistics move, no dropout)."""
        with modes_kept(model):
            model.eval()(*self.inputs)

    @classmethod
    def from_batches(cls, batches: list[tuple[list[Tensor], Tensor]], samples: int, loss_fn: LossFn) -> LineSearchBatch:
        """The first `samples` samples of (inputs, target) batches, joined; the loss is taken
        chunk by chunk at the first batch's size (the loader's batch size)."""
        return cls(*join_batches(batches, samples), loss_fn, chunk=batches[0][1].shape[0])


@dataclass
class BestUpdate:
    """The consumers' best update as applied: its size, its predicted gain, how to take it back."""

    loss: float  # the line-search batch's loss with the update applied
    fraction: float = 0.0
    predicted: float = 0.0
    restore: Callable[[], None] | None = None


@torch.no_grad()
def _apply_best_update(model: nn.Module, a: SiteAssessment, batch: LineSearchBatch, loss_before: float) -> BestUpdate:
    """Line search on the size of the consumers' best update (`loss_before`: the loss without it)."""
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

    best, loss, _ = line_search(loss_at, UPDATE_FRACTIONS, known={0.0: loss_before})
    set_fraction(best)
    predicted = 0.0
    for w, u in zip(originals, a.solution.updates):
        norm = float(u.delta.norm())
        if norm > 0 and u.delta.shape[1] == w.shape[1]:
            predicted += best * float(w.norm()) / norm * u.first_order_gain * a.solution.rows_per_sample
    return BestUpdate(loss, best, predicted, functools.partial(set_fraction, 0.0))


@dataclass
class StepContext:
    """What the growth of every site in one step shares."""

    model: nn.Module
    strategy: Strategy
    optimizers: list[torch.optim.Optimizer]
    batch: LineSearchBatch  # the real loss that amplitudes and signs are chosen on
    config: GrowthConfig
    generator: torch.Generator  # the strategy's randomness


def grow_site(ctx: StepContext, a: SiteAssessment, count: int) -> tuple[SiteGrowthRecord, Callable[[], None]]:
    """Apply the best update and `count` new neurons at one site, with one amplitude chosen by a
    line search on the real loss (0: none is added). Returns the record and a function that takes
    the whole change back."""
    model, batch = ctx.model, ctx.batch
    loss_before = batch.loss(model)
    update = BestUpdate(loss_before)
    if ctx.config.update_existing and a.site.consumers:
        update = _apply_best_update(model, a, batch, loss_before)
    neurons, reason = _proposed_neurons(ctx, a, count)
    neurons = capped_neurons(a, neurons)
    if neurons.count == 0:
        reason = reason or f"the strategy proposed no neuron ({count} asked)"
        return _no_growth(a, reason, loss_before - update.loss, update)
    units, scale = new_units(a, neurons, next(model.parameters()).dtype)
    growth = a.site.grow(model, units)
    growth.calibrate(functools.partial(batch.run_eval, model))
    # Amplitude 0 is the model as it was (growth is exact there): its loss is the update's.
    gamma, refused, loss_after = _chosen_amplitude(ctx, growth, update.loss)
    predicted = update.predicted
    if gamma == 0.0:
        growth.undo()
        growth, reason = None, refused
    else:
        _carry_optimizer_state(ctx.optimizers, growth)
        raw = float(neurons_raw_gain(a.moments, neurons.alpha, neurons.omega).sum())
        predicted += a.site.slope_at_zero * gamma**2 * scale * raw
    record = SiteGrowthRecord(
        site=a.site.name,
        neurons=neurons.count if growth is not None else 0,
        predicted_gain=predicted,
        observed_gain=loss_before - loss_after,
        gamma=gamma,
        update_fraction=update.fraction,
        significant=a.significant,
        reason=reason,
    )
    return record, functools.partial(_undo, ctx.optimizers, growth, update)


def _proposed_neurons(ctx: StepContext, a: SiteAssessment, count: int) -> tuple[Neurons, str | None]:
    """The strategy's neurons; under a kinked activation each takes its better sign and those that
    help with neither are dropped (the reason says so)."""
    if a.groups is not None:  # whole levels: one neuron per channel group
        count = max(a.groups.levels(count), 1) * a.groups.count
    count = _whole_blocks(count, _unit_block(a.site))
    neurons = whole_block_neurons(
        ctx.strategy.propose(a.solution, a.moments, count, ctx.generator), _unit_block(a.site)
    )
    if a.groups is not None:  # the strategies propose dense neurons; each unit keeps to its group
        neurons = a.groups.restrict(neurons, [u.delta.shape[0] for u in a.solution.updates])
    if not is_kinked(a.site) or ctx.strategy.function_preserving:
        return neurons, None
    rows = [u.delta.shape[0] for u in a.solution.updates]
    batch = ctx.batch
    gains = signed_gains(
        ctx.model, a.site, neurons, a.mode, a.input_mean, rows, batch.inputs, batch.target, batch.loss_fn
    )
    proposed = neurons.count
    neurons = choose_signs(gains, neurons, a.group_size)
    if neurons.count == proposed:
        return neurons, None
    return neurons, (
        f"the sign test kept {neurons.count} of {proposed} neurons: under the kink at 0 neither sign "
        "of the others lowered the line-search loss"
        + (" (their channel groups' neurons together)" if a.group_size > 1 else "")
    )


def _chosen_amplitude(ctx: StepContext, growth: Growth, loss_at_zero: float) -> tuple[float, str | None, float]:
    """The amplitude the new units keep, set on them; with 0, why; and the line-search loss there."""
    if ctx.strategy.function_preserving:
        growth.set_amplitude(1.0)
        return 1.0, None, ctx.batch.loss(ctx.model)

    def loss_at(g: float) -> float:
        growth.set_amplitude(g)
        return ctx.batch.loss(ctx.model)

    gamma, loss, losses = line_search(loss_at, NEURON_AMPLITUDES, known={0.0: loss_at_zero})
    growth.set_amplitude(gamma)
    if gamma != 0.0:
        return gamma, None, loss
    tried = [g for g in losses if g > 0]
    best = min(tried, key=lambda g: losses[g]) if tried else None
    if best is None or 0.0 not in losses:
        return 0.0, "the line search kept amplitude 0", loss
    return (
        0.0,
        (
            f"the line search kept amplitude 0: every amplitude tried raised the line-search loss "
            f"(the least, {best:g}, gave {losses[best]:.4g} against {losses[0.0]:.4g} at 0)"
        ),
        loss,
    )


def _carry_optimizer_state(optimizers: list[torch.optim.Optimizer], growth: Growth) -> None:
    """Grown Parameters keep their optimizer state; a new block's train in a group of their own."""
    carry_optimizer_state(optimizers, growth.parameter_swaps)
    new = growth.new_parameters()
    if new:
        for optimizer in optimizers:
            optimizer.add_param_group({**_group_settings(optimizer), "params": new})


def _undo(optimizers: list[torch.optim.Optimizer], growth: Growth | None, update: BestUpdate) -> None:
    if growth is not None:
        uncarry_optimizer_state(optimizers, growth.parameter_swaps)
        if growth.new_parameters():
            for optimizer in optimizers:
                optimizer.param_groups.pop()
        growth.undo()
    if update.restore is not None:
        update.restore()


def grow_allocated(
    ctx: StepContext, assessments: list[SiteAssessment], counts: dict[str, int]
) -> tuple[list[SiteGrowthRecord], list[Callable[[], None]], bool]:
    """Grow every site that `counts` gives neurons, best first; returns the records, a function
    per site that takes its change back, and whether modules were added (the graph changed).

    Widening first, then new blocks; a site that must wait for this step's widening (a block on
    an edge whose width just changed: its statistics were taken at the old width) says why."""
    widened: set[str] = set()  # layers whose input dimension grew in this step
    records, undos, blocks = [], [], False
    order = sorted(assessments, key=lambda a: (a.site.adds_modules, -a.gain_per_parameter(0) if a.significant else 0.0))
    for a in order:
        if counts.get(a.site.name, 0) == 0:
            continue
        wait = a.site.waits_for(widened)
        if wait is not None:
            records.append(_no_growth(a, wait)[0])
            continue
        record, undo = grow_site(ctx, a, counts[a.site.name])
        records.append(record)
        undos.append(undo)
        if record.neurons:
            widened.update(a.site.readers)
            blocks |= a.site.adds_modules
    return records, undos, blocks


def _no_growth(
    a: SiteAssessment, reason: str | None, observed: float = 0.0, update: BestUpdate | None = None
) -> tuple[SiteGrowthRecord, Callable[[], None]]:
    record = SiteGrowthRecord(
        site=a.site.name,
        neurons=0,
        predicted_gain=update.predicted if update else 0.0,
        observed_gain=observed,
        gamma=0.0,
        update_fraction=update.fraction if update else 0.0,
        significant=a.significant,
        reason=reason,
    )
    return record, (update.restore if update and update.restore else (lambda: None))


def _group_settings(optimizer: torch.optim.Optimizer) -> dict:
    """A new block's parameters train with the same settings as the model's first group."""
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
