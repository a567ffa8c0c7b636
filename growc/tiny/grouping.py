"""Sites whose units come in channel groups (grouped convs): the TINY problem per group.

A grouped conv is the dense conv whose weight is block-diagonal (`GroupedConv2dHandler`), so a
grouped site's moments are those of the dense layers, and a new unit of group i is a dense neuron
with zeros outside its group: it reads only group i's inputs where the producer is grouped
(its `alpha` lives on those coordinates of `b'`), and feeds only group i's outputs where a
consumer is grouped (its `omega` lives on those rows). The best such neurons are the solution of
each group's own problem, the sub-blocks of `S'` and `N` on the group's coordinates and rows: the
groups' problems are independent, and each is the ordinary one (`best_neurons`). A grouped
consumer's best update is likewise block-diagonal, one least-squares problem per group.

Every group gets the same number L of new units (the conv's groups must stay equal), so the
neurons come level by level: level l holds the l-th best neuron of every group, unit
`l * groups + i` in group i (`handlers.group_of_unit`). In dense terms they are ordinary neurons,
so the first-order gains, the significance test and the amplitude search take them as they are.

Pure tensors in and out, like `solver.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from growc.tiny.solver import BestUpdate, Neurons, Whitening, best_neurons, best_update, whitening


@dataclass(frozen=True)
class UnitGroups:
    """How a site's units split into `count` groups, in the coordinates of its statistics.

    `prev_coords[i]`: the coordinates of `b'` that group i's units read (None: all of them, a
    dense producer). Per consumer, `outputs[c][i]`: the outputs group i's units feed, and
    `inputs[c][i]`: the coordinates of the consumer's own `b` that those outputs read (None for a
    dense consumer: every unit feeds every output)."""

    count: int
    prev_coords: tuple[Tensor, ...] | None
    outputs: tuple[tuple[Tensor, ...] | None, ...]
    inputs: tuple[tuple[Tensor, ...] | None, ...]

    def consumer_rows(self, group: int, sizes: list[int]) -> Tensor:
        """The rows of the consumers' stacked outputs (`sizes` per consumer) that group `group`
        feeds."""
        rows, start = [], 0
        for size, outputs in zip(sizes, self.outputs):
            rows.append(start + (torch.arange(size) if outputs is None else outputs[group]))
            start += size
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)

    def levels(self, count: int) -> int:
        """Whole levels (one new unit per group) within `count` units."""
        return count // self.count

    def restrict(self, neurons: Neurons, sizes: list[int]) -> Neurons:
        """Neurons of any origin (random ones, say) made to respect the groups: each unit's
        `alpha` and `omega` are zeroed outside its group's coordinates and rows, then rescaled
        to their former norms (the strategies' scale convention)."""
        alpha, omega = neurons.alpha.clone(), neurons.omega.clone()
        for unit in range(neurons.count):
            group = unit % self.count
            if self.prev_coords is not None:
                alpha[:, unit] = _kept_norm(alpha[:, unit], self.prev_coords[group])
            omega[:, unit] = _kept_norm(omega[:, unit], self.consumer_rows(group, sizes))
        return Neurons(alpha, omega, neurons.lambdas)


def _kept_norm(column: Tensor, keep: Tensor) -> Tensor:
    out = torch.zeros_like(column)
    out[keep] = column[keep]
    norm = float(out.norm())
    return out * (float(column.norm()) / norm) if norm > 0 else out


def _block(matrix: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return matrix[rows.to(matrix.device)][:, cols.to(matrix.device)]


def grouped_best_update(
    s: Tensor, m: Tensor, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...], whitenings: tuple | None = None
) -> BestUpdate:
    """A grouped consumer's best update, block-diagonal in dense terms: group i's outputs move
    within group i's inputs only (`whitenings[i]`: of that block of S, when known)."""
    delta = torch.zeros(m.shape[1], m.shape[0], dtype=torch.float64, device=m.device)
    gain = 0.0
    for i, (cols, rows) in enumerate(zip(inputs, outputs)):
        white = whitenings[i] if whitenings is not None else None
        update = best_update(_block(s, cols, cols), m[cols.to(m.device)][:, rows.to(m.device)], white=white)
        delta[rows[:, None].to(m.device), cols[None, :].to(m.device)] = update.delta
        gain += update.first_order_gain
    return BestUpdate(delta=delta, first_order_gain=gain)


def grouped_best_neurons(
    s_prev: Tensor,
    n: Tensor,
    groups: UnitGroups,
    sizes: list[int],
    max_neurons: int | None,
    whiten: Callable[[int], Whitening | None],
) -> Neurons:
    """The best neurons of every group, level by level (see the module's docstring); as many
    levels as every group can fill. `whiten(i)`: the whitening of group i's block of `S'`
    (None: computed here)."""
    levels = None if max_neurons is None else groups.levels(max_neurons)
    d, out = s_prev.shape[0], n.shape[1]
    dense = groups.prev_coords is None  # every group reads all of b': one S', one whitening
    common = (whiten(0) or whitening(s_prev)) if dense else None
    solved = []
    for i in range(groups.count):
        rows = groups.consumer_rows(i, sizes)
        if dense:
            coords = torch.arange(d)
            part = best_neurons(s_prev, n[:, rows.to(n.device)], levels, common)
        else:
            coords = groups.prev_coords[i]
            part = best_neurons(_block(s_prev, coords, coords), _block(n, coords, rows), levels, whiten(i))
        solved.append((coords, rows, part))
    count = min(part.count for _, _, part in solved)
    alpha = torch.zeros(d, count * groups.count, dtype=torch.float64, device=n.device)
    omega = torch.zeros(out, count * groups.count, dtype=torch.float64, device=n.device)
    lambdas = torch.zeros(count * groups.count, dtype=torch.float64, device=n.device)
    for i, (coords, rows, part) in enumerate(solved):
        units = torch.arange(count, device=n.device) * groups.count + i
        alpha[coords.to(n.device)[:, None], units[None, :]] = part.alpha[:, :count].to(alpha)
        omega[rows.to(n.device)[:, None], units[None, :]] = part.omega[:, :count].to(omega)
        lambdas[units] = part.lambdas[:count].to(lambdas)
    return Neurons(alpha=alpha, omega=omega, lambdas=lambdas)
