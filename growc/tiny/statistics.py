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

from growc.tiny.input_mode import InputMode


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
    """Means over rows. A conv site has one row per output position: `rows_per_sample` turns
    a mean over rows into the per-sample sums that a sample's loss sees."""

    n: int  # rows
    s_prev: Tensor  # E[b' b'^T]  (in', in')
    consumers: tuple[ConsumerMoments, ...]
    rows_per_sample: float = 1.0
    has_ones: bool = True  # the last coordinate of b' is the constant (see InputMode)

    def with_prev(self, s_prev: Tensor, c: list[Tensor], p: list[Tensor], has_ones: bool) -> SiteMoments:
        consumers = tuple(
            ConsumerMoments(s=k.s, m=k.m, c=ci, p=pi, g_sq=k.g_sq) for k, ci, pi in zip(self.consumers, c, p)
        )
        return SiteMoments(
            n=self.n, s_prev=s_prev, consumers=consumers, rows_per_sample=self.rows_per_sample, has_ones=has_ones
        )


def prepare_inputs(moments: SiteMoments, mode: str) -> SiteMoments:
    """Adapt the moments to how the producer's input reaches the new units (see `InputMode`)."""
    return InputMode(mode).prepare(moments)


def input_mean(moments: SiteMoments) -> tuple[Tensor, float]:
    """(E[b'] over the rows where the new unit exists, the fraction of such rows)."""
    e = float(moments.s_prev[-1, -1])
    return moments.s_prev[:-1, -1] / max(e, 1e-300), e


#: Rows a fold buffers before its matrix products: a few large products cost far less than one
#: small product (and float64 conversion) per batch, and the sums are the same.
FLUSH_ROWS = 2048


class _Sums:
    """Running sums for one fold. Batches are buffered and summed `FLUSH_ROWS` rows at a time;
    every reader of the sums (`_mean`, `fold_sums`) flushes first."""

    def __init__(self) -> None:
        self.n = 0
        self.samples = 0.0
        self.s_prev: Tensor | None = None
        self.consumers: list[list[Tensor]] = []  # per consumer: [s, m, c, p, g_sq]
        self._pending: list[tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]] = []
        self._pending_rows = 0

    def add(self, b_prev: Tensor, pairs: list[tuple[Tensor, Tensor]], samples: float, prev_stride: int = 1) -> None:
        bp = b_prev.detach()
        sub = bp[::prev_stride]
        # S' from every k-th row, scaled: an unbiased sum at 1/k the cost. Rows scaled by
        # sqrt(rows / kept) make sub^T sub that sum, so buffered batches share one product.
        sub = sub * (bp.shape[0] / max(sub.shape[0], 1)) ** 0.5
        self._pending.append((bp, sub, [(b.detach(), g.detach()) for b, g in pairs]))
        self._pending_rows += bp.shape[0]
        self.n += bp.shape[0]
        self.samples += samples
        if self._pending_rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        bp = torch.cat([bp for bp, _, _ in pending])
        sub = torch.cat([sub for _, sub, _ in pending])
        terms = [sub.T @ sub]
        for i in range(len(pending[0][2])):
            b = torch.cat([pairs[i][0] for _, _, pairs in pending])
            g = torch.cat([pairs[i][1] for _, _, pairs in pending])
            terms += [b.T @ b, b.T @ g, bp.T @ b, bp.T @ g, (g * g).sum().reshape(())]
        terms = [t.to(torch.float64) for t in terms]
        if self.s_prev is None:
            self.s_prev = terms[0]
            self.consumers = [terms[1 + 5 * i : 6 + 5 * i] for i in range(len(pending[0][2]))]
        else:
            self.s_prev += terms[0]
            for i, sums in enumerate(self.consumers):
                for j in range(5):
                    sums[j] += terms[1 + 5 * i + j]


def _mean(parts: list[_Sums]) -> SiteMoments:
    parts = [p for p in parts if p.n > 0]
    for part in parts:
        part.flush()
    if not parts:
        raise ValueError("no statistics were gathered for this site")
    n = sum(p.n for p in parts)
    samples = sum(p.samples for p in parts)
    s_prev = sum(p.s_prev for p in parts) / n
    consumers = []
    for i in range(len(parts[0].consumers)):
        s, m, c, p, g_sq = (sum(part.consumers[i][j] for part in parts) / n for j in range(5))
        consumers.append(ConsumerMoments(s=s, m=m, c=c, p=p, g_sq=float(g_sq)))
    return SiteMoments(n=n, s_prev=s_prev, consumers=tuple(consumers), rows_per_sample=n / max(samples, 1))


class MomentAccumulator:
    """Accumulates a site's moments over batches, dealt into `folds` folds."""

    def __init__(self, folds: int = 4) -> None:
        if folds < 1:
            raise ValueError("folds must be at least 1")
        self._folds = [_Sums() for _ in range(folds)]
        self._batches = 0

    @property
    def rows(self) -> int:
        """Rows accumulated over all folds (a conv site has several per data sample)."""
        return sum(f.n for f in self._folds)

    @property
    def fold_count(self) -> int:
        return len(self._folds)

    def update(
        self, b_prev: Tensor, pairs: list[tuple[Tensor, Tensor]], samples: float | None = None, prev_stride: int = 1
    ) -> None:
        """Add one batch: `b_prev` (n, in'), and per consumer `(b (n, in), g (n, out))`; the rows
        come from `samples` data samples (default: one row each). With `prev_stride` k, S' is
        estimated from every k-th row: for a wide input (MNIST's 785) it is the costliest
        product by far, and the one that needs the fewest samples (it is also shrunk before use)."""
        self._folds[self._batches % len(self._folds)].add(b_prev, pairs, samples or b_prev.shape[0], prev_stride)
        self._batches += 1

    def total(self) -> SiteMoments:
        return _mean(self._folds)

    def fold(self, index: int) -> SiteMoments:
        return _mean([self._folds[index]])

    def folds_prepared(self, mode: str) -> list[tuple[SiteMoments, SiteMoments]]:
        """(moments without fold f, moments of fold f) for each non-empty fold, adapted to `mode`."""
        return [
            (prepare_inputs(self.without_fold(f), mode), prepare_inputs(self.fold(f), mode))
            for f in self.usable_folds()
        ]

    def without_fold(self, index: int) -> SiteMoments:
        return _mean([f for i, f in enumerate(self._folds) if i != index])

    def usable_folds(self) -> list[int]:
        return [i for i, f in enumerate(self._folds) if f.n > 0]

    def fold_sums(self, index: int) -> tuple[int, int, list[Tensor] | None]:
        """(rows, samples, running sums) of fold `index`; the sums in a fixed order (S', then per
        consumer S, M, C, P, |g|^2), None while the fold is empty. What processes add up."""
        fold = self._folds[index]
        fold.flush()
        if fold.s_prev is None:
            return fold.n, fold.samples, None
        return fold.n, fold.samples, [fold.s_prev, *(t for sums in fold.consumers for t in sums)]

    def set_fold_sums(self, index: int, rows: int, samples: int, sums: list[Tensor] | None) -> None:
        """Replace fold `index` by the given sums (in `fold_sums`' order), e.g. summed over processes."""
        fold = self._folds[index]
        fold.flush()
        fold.n, fold.samples = rows, samples
        if sums is None:
            fold.s_prev, fold.consumers = None, []
            return
        if (len(sums) - 1) % 5:
            raise ValueError("sums must be S' followed by five sums per consumer")
        fold.s_prev = sums[0]
        fold.consumers = [list(sums[1 + 5 * i : 6 + 5 * i]) for i in range((len(sums) - 1) // 5)]
