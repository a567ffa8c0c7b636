"""How a site's new units read their input: the one convention, encoded and decoded here.

The raw statistics of a site always carry a last column of `b'` that is 1 where the new unit
exists at a sample (0 in a consumer's zero padding). What a new unit's input weights `alpha`
mean depends on where the units enter:
  - AFFINE: the producer has a bias. `b'` keeps the column; alpha's last entry is the bias.
  - LINEAR: no bias. The column is dropped.
  - CENTERED: behind a BatchNorm, which removes each unit's mean. `b'` is centered (its mean
    over the rows where the unit exists) and the column dropped; a bias would be removed anyway.
The graph decides which applies to a site (`Site.input_mode`); `prepare` and `encode_rows` encode
the statistics and sample rows that way, `decode` turns a neuron back into weights and a bias.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from growc.tiny.statistics import SiteMoments


class InputMode(str, Enum):
    AFFINE = "affine"
    LINEAR = "linear"
    CENTERED = "centered"

    @classmethod
    def _missing_(cls, value: object) -> InputMode:
        raise ValueError(f"unknown input mode {value!r}: one of {', '.join(m.value for m in cls)}")

    @property
    def bias_rows(self) -> int:
        """Entries of alpha beyond the producer's inputs (the bias)."""
        return 1 if self is InputMode.AFFINE else 0

    def prepare(self, moments: SiteMoments) -> SiteMoments:
        """The raw moments as the new units see their input."""
        s, cs, ps = moments.s_prev, [k.c for k in moments.consumers], [k.p for k in moments.consumers]
        if self is InputMode.AFFINE:
            return moments
        if self is InputMode.LINEAR:
            return moments.with_prev(s[:-1, :-1], [c[:-1] for c in cs], [p[:-1] for p in ps], has_ones=False)
        a, e = s[:-1, -1], s[-1, -1].clamp_min(1e-300)
        m = a / e
        s_c = s[:-1, :-1] - torch.outer(a, a) / e
        return moments.with_prev(
            s_c,
            [c[:-1] - torch.outer(m, c[-1]) for c in cs],
            [p[:-1] - torch.outer(m, p[-1]) for p in ps],
            has_ones=False,
        )

    def encode_rows(self, rows: Tensor, alpha_rows: int, mean: Tensor) -> Tensor:
        """Raw sample rows `b'` (with the trailing column) as the new units read them, keeping
        the first inputs that `alpha_rows` entries of alpha cover (the producer may have gained
        inputs since the neurons were solved); `mean`: E[b'] for CENTERED."""
        inputs, ones = rows[:, : alpha_rows - self.bias_rows], rows[:, -1:]
        if self is InputMode.AFFINE:
            return torch.cat([inputs, ones], dim=1)
        if self is InputMode.LINEAR:
            return inputs
        return inputs - ones * mean.to(rows)[None, :]

    def decode(self, alpha: Tensor) -> tuple[Tensor, Tensor | None]:
        """Neurons' alpha (inputs [+ bias], K) as producer weights (inputs, K) and biases (K)."""
        if self is InputMode.AFFINE:
            return alpha[:-1], alpha[-1]
        return alpha, None
