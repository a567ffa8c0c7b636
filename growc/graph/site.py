"""What every growth site offers the growth step, whatever its kind.

Two kinds implement it: a `WidthSite` (a hidden dimension that takes more units, `candidates.py`)
and a `DepthSite` (an edge where a new residual block can go, `depth.py`). The growth step and the
statistics collector hold a `Site` and never ask which kind it is: each question they have (which
tensors to record, how the rows are read, what a neuron costs, how new units are built in and
taken back) is a method here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from growc.graph.handlers import TensorSwap
    from growc.graph.rewrite import NewUnits

InputModeName = Literal["affine", "linear", "centered"]


@dataclass
class Taps:
    """The tensors a site's statistics are read from, by module path: the input of `inputs`, the
    gradient at the output of `output_grads` and the gradient at the input of `input_grads`."""

    inputs: set[str] = field(default_factory=set)
    output_grads: set[str] = field(default_factory=set)
    input_grads: set[str] = field(default_factory=set)


@dataclass
class Recorded:
    """What the hooks of one forward and backward pass kept, by module path (see `Taps`)."""

    inputs: dict[str, Tensor]
    output_grads: dict[str, Tensor]
    input_grads: dict[str, Tensor]


@dataclass
class PositionSampler:
    """Conv sites on big maps keep `positions` random output positions per sample (the same for
    the whole batch) instead of every position."""

    positions: int
    generator: torch.Generator


@dataclass
class Rows:
    """One batch's samples of a site: `b_prev` (n, in_flat + 1) what a new unit reads, `pairs`
    one (b, g) per consumer, `samples` the data samples they stand for (scaled where only some
    positions were read), `sampled`: already at sampled positions (no further subsampling)."""

    b_prev: Tensor
    pairs: list[tuple[Tensor, Tensor]]
    samples: float
    sampled: bool = False


@dataclass(frozen=True)
class ChannelGroups:
    """A site's units in `count` channel groups (grouped convs), in the coordinates of its
    statistics: `inputs_read[i]` the coordinates of the producer's flattened input that group i's
    units read (None: all, a dense producer); per consumer, `outputs[c][i]` the outputs group i's
    units feed and `inputs[c][i]` the coordinates of the consumer's own rows (with its bias
    column) that those outputs read (None for a dense consumer)."""

    count: int
    inputs_read: tuple[Tensor, ...] | None
    outputs: tuple[tuple[Tensor, ...] | None, ...]
    inputs: tuple[tuple[Tensor, ...] | None, ...]
    constant: int  # the coordinate of the constant 1 after the producer's inputs


class Growth(Protocol):
    """A site's new units built into the model, their amplitude still adjustable."""

    def set_amplitude(self, gamma: float) -> None: ...

    def undo(self) -> None: ...

    @property
    def parameter_swaps(self) -> list[TensorSwap]:
        """Existing Parameters replaced by larger ones (their optimizer state is carried over)."""
        ...

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of modules that did not exist before (they need an optimizer group)."""
        ...

    def calibrate(self, run_eval: Callable[[], None]) -> None:
        """Measure what the new units need from real data (`run_eval` runs the model once in
        eval mode on the line-search samples), before any amplitude is tried."""
        ...


class Site(Protocol):
    name: str
    activation: str  # the first non-linearity the new units go through
    slope_at_zero: float  # its slope at 0

    @property
    def consumers(self) -> tuple[str, ...]:
        """Existing layers whose inputs are in the statistics: they get the solver's best update
        and the new units' outgoing weights (none for a new block: its output layer is new)."""
        ...

    @property
    def readers(self) -> tuple[str, ...]:
        """Existing layers whose input dimension grows with the site."""
        ...

    @property
    def layers(self) -> tuple[str, ...]:
        """Every existing module the site's growth changes."""
        ...

    @property
    def inserts_between(self) -> tuple[str, ...]:
        """Readers where new units go between old ones (a concatenation with more after)."""
        ...

    @property
    def adds_modules(self) -> bool:
        """Growing it puts new modules into the graph (a new block): the graph is traced again."""
        ...

    @property
    def kinked(self) -> bool:
        """Its activation has a kink at 0 (the ReLU family, `graph/elementwise.py`)."""
        ...

    @property
    def sign_testable(self) -> bool:
        """Whether the sign test under a kinked activation applies (it replays the producer)."""
        ...

    def width(self, root: nn.Module) -> int: ...

    def params_per_neuron(self, root: nn.Module) -> int: ...

    def input_mode(self, root: nn.Module) -> InputModeName:
        """How the new units read their input: see `growc.tiny.input_mode.InputMode`."""
        ...

    def channel_groups(self, root: nn.Module) -> ChannelGroups | None:
        """How the units split into channel groups in the statistics' terms (None: they do not)."""
        ...

    def reached_sites(self) -> list[Site]:
        """Sites measured alongside for their statistics only (readers of other geometries)."""
        ...

    def taps(self) -> Taps: ...

    def rows(
        self, root: nn.Module, recorded: Recorded, batch_size: int, sampler: PositionSampler | None
    ) -> Rows | None:
        """This batch's rows, or None where the batch did not reach the site."""
        ...

    def waits_for(self, widened: set[str]) -> str | None:
        """Why the site cannot grow in a step where `widened` layers' inputs already grew (None:
        it can)."""
        ...

    def unit_scale(self, root: nn.Module, s_prev: Tensor) -> float:
        """How large an existing unit is where new units enter (see `growth.step.new_units`)."""
        ...

    def column_scale(self, root: nn.Module, s_prev: Tensor) -> float:
        """How large a new unit's outgoing weights are at gamma = 1."""
        ...

    def grow(self, root: nn.Module, units: NewUnits) -> Growth: ...


def conflict(a: Site, b: Site) -> bool:
    """Two sites that cannot grow in the same step: one puts units between a layer's old inputs
    (a concatenation), which the other's statistics, taken before, would not line up with."""
    return bool(set(a.inserts_between) & set(b.layers) or set(b.inserts_between) & set(a.layers))
