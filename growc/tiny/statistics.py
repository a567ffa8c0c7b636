"""Second moments of a site, accumulated batch by batch in float64, split in folds.

A site has one producer input `b'` and one or more consumers, each with its input `b` and the
per-sample gradient `g` at its output. Everything the solver needs is a mean of outer products
of these, so memory is the size of the moments, never of the data. Batches are dealt round-robin
into folds so that the significance test can hold some of them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConsumerMoments:
    s: Tensor  # E[b b^T]        (in, in)
    m: Tensor  # E[b g^T]        (in, out)
    c: Tensor  # E[b' b^T]       (in', in)
    p: Tensor  # E[b' g^T]       (in', out)
    g_sq: float  # E|g|^2

    @property
    def out_features(self) -> int:
        return self.m.shape[1]


@dataclass(frozen=True)
class SiteMoments:
    n: int
    s_prev: Tensor  # E[b' b'^T]  (in', in')
    consumers: tuple[ConsumerMoments, ...]


class _Sums:
    """Running sums for one fold."""

    def __init__(self) -> None:
        self.n = 0
        self.s_prev: Tensor | None = None
        self.consumers: list[list[Tensor]] = []  # per consumer: [s, m, c, p, g_sq]

    def add(self, b_prev: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> None:
        bp = b_prev.detach()
        terms = [bp.T @ bp]
        for b, g in pairs:
            b, g = b.detach(), g.detach()
            terms += [b.T @ b, b.T @ g, bp.T @ b, bp.T @ g, (g * g).sum().reshape(())]
        terms = [t.to(torch.float64) for t in terms]
        if self.s_prev is None:
            self.s_prev = terms[0]
            self.consumers = [terms[1 + 5 * i : 6 + 5 * i] for i in range(len(pairs))]
        else:
            self.s_prev += terms[0]
            for i, sums in enumerate(self.consumers):
                for j in range(5):
                    sums[j] += terms[1 + 5 * i + j]
        self.n += bp.shape[0]


def _mean(parts: list[_Sums]) -> SiteMoments:
    parts = [p for p in parts if p.n > 0]
    if not parts:
        raise ValueError("no statistics were gathered for this site")
    n = sum(p.n for p in parts)
    s_prev = sum(p.s_prev for p in parts) / n
    consumers = []
    for i in range(len(parts[0].consumers)):
        s, m, c, p, g_sq = (sum(part.consumers[i][j] for part in parts) / n for j in range(5))
        consumers.append(ConsumerMoments(s=s, m=m, c=c, p=p, g_sq=float(g_sq)))
    return SiteMoments(n=n, s_prev=s_prev, consumers=tuple(consumers))


class MomentAccumulator:
    """Accumulates a site's moments over batches, dealt into `folds` folds."""

    def __init__(self, folds: int = 4) -> None:
        if folds < 1:
            raise ValueError("folds must be at least 1")
        self._folds = [_Sums() for _ in range(folds)]
        self._batches = 0

    @property
    def samples(self) -> int:
        return sum(f.n for f in self._folds)

    @property
    def fold_count(self) -> int:
        return len(self._folds)

    def update(self, b_prev: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Add one batch: `b_prev` (n, in'), and per consumer `(b (n, in), g (n, out))`."""
        self._folds[self._batches % len(self._folds)].add(b_prev, pairs)
        self._batches += 1

    def total(self) -> SiteMoments:
        return _mean(self._folds)

    def fold(self, index: int) -> SiteMoments:
        return _mean([self._folds[index]])

    def without_fold(self, index: int) -> SiteMoments:
        return _mean([f for i, f in enumerate(self._folds) if i != index])

    def usable_folds(self) -> list[int]:
        return [i for i, f in enumerate(self._folds) if f.n > 0]
