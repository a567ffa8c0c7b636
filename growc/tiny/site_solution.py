"""Everything the method says about one site, from its moments: the TINY proposal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from growc.tiny.grouping import UnitGroups, grouped_best_neurons, grouped_best_update
from growc.tiny.solver import (
    BestUpdate,
    Neurons,
    Whitening,
    best_neurons,
    best_update,
    bottleneck,
    projected_desired_update,
    raw_first_order_gain,
    shrunk_whitening,
    whitening,
)
from growc.tiny.statistics import SiteMoments


@dataclass(frozen=True)
class SiteSolution:
    updates: tuple[BestUpdate, ...]  # best move of each consumer's existing weights
    neurons: Neurons  # best new neurons, omega stacked over consumers' outputs
    n_matrix: Tensor  # N = E[b' v_perp^T], consumers stacked
    bottleneck: float  # E|v_perp|^2 per row, summed over consumers
    gradient_energy: float  # E|g|^2 per row, summed over consumers
    samples: int
    rows_per_sample: float = 1.0  # multiplies per-row gains into per-sample loss decreases

    @property
    def relative_bottleneck(self) -> float:
        return self.bottleneck / self.gradient_energy if self.gradient_energy > 0 else 0.0


@dataclass(frozen=True)
class Inverses:
    """The expensive part of a solve (the factorizations), reusable across folds."""

    whitening: Whitening  # of S'
    consumer_whitenings: tuple[Whitening | tuple[Whitening, ...], ...]  # of each consumer's S (per group if grouped)
    group_whitenings: tuple[Whitening, ...] | None = None  # of each group's block of S' (a grouped producer)


def _producer_whitening(s_prev: Tensor, ridge: float, has_ones: bool) -> Whitening:
    return shrunk_whitening(s_prev, ridge, has_ones) if ridge > 0 else whitening(s_prev)


def inverses(moments: SiteMoments, ridge: float = 0.0, groups: UnitGroups | None = None) -> Inverses:
    """`ridge` > 0 shrinks S' before whitening it (see `shrunk_whitening`); 0 is the exact solve.
    With `groups`, the blocks that a grouped site's solve uses are factorized instead."""
    white = _producer_whitening(moments.s_prev, ridge, moments.has_ones)
    if groups is None:
        return Inverses(white, tuple(whitening(c.s) for c in moments.consumers))
    consumers = tuple(
        whitening(c.s) if cols is None else tuple(whitening(c.s[i][:, i]) for i in cols)
        for c, cols in zip(moments.consumers, groups.inputs)
    )
    blocks = None
    if groups.prev_coords is not None:
        # (with AFFINE inputs each group's coordinates end with the constant, as the whole's do)
        blocks = tuple(
            _producer_whitening(moments.s_prev[i][:, i], ridge, moments.has_ones) for i in groups.prev_coords
        )
    return Inverses(white, consumers, blocks)


def _updates(moments: SiteMoments, shared: Inverses | None, groups: UnitGroups | None) -> tuple[BestUpdate, ...]:
    whites = shared.consumer_whitenings if shared is not None else (None,) * len(moments.consumers)
    if groups is None:
        return tuple(best_update(c.s, c.m, white=w) for c, w in zip(moments.consumers, whites))
    return tuple(
        best_update(c.s, c.m, white=w) if cols is None else grouped_best_update(c.s, c.m, cols, outputs, w)
        for c, w, cols, outputs in zip(moments.consumers, whites, groups.inputs, groups.outputs)
    )


def solve_site(
    moments: SiteMoments,
    max_neurons: int | None = None,
    shared: Inverses | None = None,
    groups: UnitGroups | None = None,
) -> SiteSolution:
    """The site's best updates, bottleneck and neurons. With `shared`, the inverses of the second
    moments are taken from there instead of being recomputed (the significance test solves the
    same site on every fold: the inverses of all the data serve each fold, only M, P and C are
    the fold's). With `groups`, the units come in channel groups (`growc.tiny.grouping`)."""
    updates = _updates(moments, shared, groups)
    n_matrix = torch.cat([projected_desired_update(c.p, c.c, u) for c, u in zip(moments.consumers, updates)], dim=1)
    if groups is None:
        neurons = best_neurons(moments.s_prev, n_matrix, max_neurons, shared.whitening if shared else None)
    else:
        sizes = [u.delta.shape[0] for u in updates]

        def whiten(i: int) -> Whitening | None:
            if shared is None:
                return None
            return shared.whitening if shared.group_whitenings is None else shared.group_whitenings[i]

        neurons = grouped_best_neurons(moments.s_prev, n_matrix, groups, sizes, max_neurons, whiten)
    return SiteSolution(
        updates=updates,
        neurons=neurons,
        n_matrix=n_matrix,
        bottleneck=sum(bottleneck(c.g_sq, u) for c, u in zip(moments.consumers, updates)),
        gradient_energy=sum(c.g_sq for c in moments.consumers),
        samples=moments.n,
        rows_per_sample=moments.rows_per_sample,
    )


def stacked_p(moments: SiteMoments) -> Tensor:
    return torch.cat([c.p.to(torch.float64) for c in moments.consumers], dim=1)


def neurons_raw_gain(moments: SiteMoments, alpha: Tensor, omega: Tensor) -> Tensor:
    """Per-neuron first-order decrease of the mean loss from adding the neurons alone (slope at 0
    excluded), per sample: a conv site sums its positions."""
    return raw_first_order_gain(alpha, omega, stacked_p(moments)) * moments.rows_per_sample
