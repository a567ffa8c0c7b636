"""growc.tiny.statistics on synthetic rows: the accumulated moments are the plain means of outer
products (whatever the batching, the folds and the flush threshold), the strided S' is the
documented unbiased estimate, and each input mode prepares b' as documented."""

import pytest
import torch

from growc.tiny import statistics
from growc.tiny.statistics import MomentAccumulator, input_mean, prepare_inputs

F64 = torch.float64


def _batches(seed: int, sizes: list[int], d_prev: int = 5, dims: tuple[tuple[int, int], ...] = ((3, 2), (4, 3))):
    """Batches of (b', [(b, g) per consumer]); b' and b end in a constant 1, like layers' inputs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, d_prev, generator=gen, dtype=F64) * torch.linspace(0.5, 2.0, d_prev, dtype=F64) + 0.7
        b_prev = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
        pairs = []
        for d_in, d_out in dims:
            b = torch.cat(
                [torch.tanh(x @ torch.randn(d_prev, d_in, generator=gen, dtype=F64)), torch.ones(n, 1, dtype=F64)], 1
            )
            g = torch.randn(n, d_out, generator=gen, dtype=F64) + x[:, :1] * b[:, :1]
            pairs.append((b, g))
        out.append((b_prev, pairs))
    return out


def _direct(batches):
    """The moments from the concatenated rows, with plain torch."""
    bp = torch.cat([b for b, _ in batches])
    n = bp.shape[0]
    consumers = []
    for i in range(len(batches[0][1])):
        b = torch.cat([pairs[i][0] for _, pairs in batches])
        g = torch.cat([pairs[i][1] for _, pairs in batches])
        consumers.append(
            dict(s=b.T @ b / n, m=b.T @ g / n, c=bp.T @ b / n, p=bp.T @ g / n, g_sq=float((g * g).sum() / n))
        )
    return n, bp.T @ bp / n, consumers


def _assert_moments(moments, batches, rtol=1e-12, atol=1e-13):
    n, s_prev, consumers = _direct(batches)
    assert moments.n == n
    assert moments.s_prev.dtype == F64
    torch.testing.assert_close(moments.s_prev, s_prev, rtol=rtol, atol=atol)
    assert len(moments.consumers) == len(consumers)
    for got, want in zip(moments.consumers, consumers):
        for name in ("s", "m", "c", "p"):
            torch.testing.assert_close(getattr(got, name), want[name], rtol=rtol, atol=atol)
        assert got.g_sq == pytest.approx(want["g_sq"], rel=rtol)


def _filled(batches, folds=4, **kwargs):
    acc = MomentAccumulator(folds=folds)
    for b_prev, pairs in batches:
        acc.update(b_prev, pairs, **kwargs)
    return acc


def test_total_is_the_mean_of_outer_products_over_all_rows():
    batches = _batches(0, [7, 13, 1, 30, 9, 4])
    acc = _filled(batches)
    total = acc.total()
    _assert_moments(total, batches)
    assert total.rows_per_sample == 1.0 and total.has_ones
    assert acc.rows == 64  # rows, over all folds
    assert [c.out_features for c in total.consumers] == [2, 3]


def test_float32_rows_give_float64_moments():
    batches = _batches(1, [40, 40, 40])
    acc = MomentAccumulator(folds=2)
    for b_prev, pairs in batches:
        acc.update(b_prev.float(), [(b.float(), g.float()) for b, g in pairs])
    total = acc.total()
    assert total.s_prev.dtype == F64 and total.consumers[1].p.dtype == F64
    _assert_moments(
        total,
        [(b.float().double(), [(x.float().double(), y.float().double()) for x, y in p]) for b, p in batches],
        rtol=1e-5,
        atol=1e-6,
    )


def test_rows_per_sample_counts_rows_per_data_sample():
    batches = _batches(2, [32, 16, 48])
    acc = MomentAccumulator(folds=2)
    for b_prev, pairs in batches:
        acc.update(b_prev, pairs, samples=b_prev.shape[0] / 8)  # a conv site: 8 positions per sample
    assert acc.total().rows_per_sample == pytest.approx(8.0)
    assert acc.fold(1).rows_per_sample == pytest.approx(8.0)
    assert acc.total().n == 96


def test_folds_are_dealt_round_robin_and_partition_the_rows():
    sizes = [5, 11, 3, 8, 20, 2, 9, 6, 1, 14]
    batches = _batches(3, sizes)
    acc = _filled(batches, folds=4)
    assert acc.fold_count == 4 and acc.usable_folds() == [0, 1, 2, 3]
    folds = [acc.fold(f) for f in range(4)]
    for f, moments in enumerate(folds):
        _assert_moments(moments, batches[f::4])  # batch i goes to fold i % 4
        rest = [batch for i, batch in enumerate(batches) if i % 4 != f]
        _assert_moments(acc.without_fold(f), rest)
    assert sum(m.n for m in folds) == sum(sizes)
    # The row-weighted mean of the folds is the total.
    total = acc.total()
    weighted = sum(m.n * m.s_prev for m in folds) / total.n
    torch.testing.assert_close(weighted, total.s_prev, rtol=1e-12, atol=1e-13)
    for i in range(2):
        for name in ("s", "m", "c", "p"):
            weighted = sum(m.n * getattr(m.consumers[i], name) for m in folds) / total.n
            torch.testing.assert_close(weighted, getattr(total.consumers[i], name), rtol=1e-12, atol=1e-13)
        assert sum(m.n * m.consumers[i].g_sq for m in folds) / total.n == pytest.approx(
            total.consumers[i].g_sq, rel=1e-12
        )


def test_empty_folds_are_skipped_and_prepared_pairs_match_the_direct_moments():
    batches = _batches(4, [10, 12, 9])  # three batches, four folds: fold 3 stays empty
    acc = _filled(batches, folds=4)
    assert acc.usable_folds() == [0, 1, 2]
    with pytest.raises(ValueError, match="no statistics"):
        acc.fold(3)
    _assert_moments(acc.without_fold(3), batches)
    pairs = acc.folds_prepared("linear")
    assert len(pairs) == 3
    for f, (rest, held) in enumerate(pairs):
        assert not rest.has_ones and not held.has_ones
        held_rows = torch.cat([b for b, _ in batches[f : f + 1]])[:, :-1]
        torch.testing.assert_close(held.s_prev, held_rows.T @ held_rows / len(held_rows), rtol=1e-12, atol=1e-13)
        rest_rows = torch.cat([b for i, (b, _) in enumerate(batches) if i != f])[:, :-1]
        torch.testing.assert_close(rest.s_prev, rest_rows.T @ rest_rows / len(rest_rows), rtol=1e-12, atol=1e-13)


def test_empty_accumulator_and_bad_fold_count_are_errors():
    with pytest.raises(ValueError):
        MomentAccumulator(folds=0)
    acc = MomentAccumulator(folds=2)
    assert acc.rows == 0 and acc.usable_folds() == []
    with pytest.raises(ValueError, match="no statistics"):
        acc.total()


@pytest.mark.parametrize("flush_rows", [1, 17, 10**9])
def test_moments_do_not_depend_on_batching_or_the_flush_threshold(monkeypatch, flush_rows):
    monkeypatch.setattr(statistics, "FLUSH_ROWS", flush_rows)
    rows = _batches(5, [120])
    b_prev, pairs = rows[0]
    # The same rows, split into batches of uneven sizes, one fold so that every split sees them all.
    cuts = [0, 1, 8, 40, 41, 77, 120]
    split = [(b_prev[a:z], [(b[a:z], g[a:z]) for b, g in pairs]) for a, z in zip(cuts, cuts[1:])]
    whole = _filled(rows, folds=1).total()
    acc = MomentAccumulator(folds=1)
    for i, (bp, prs) in enumerate(split):
        acc.update(bp, prs)
        if i == 2:
            _assert_moments(acc.total(), split[:3])  # reading mid-way flushes; later rows still add up
    parts = acc.total()
    _assert_moments(parts, rows)
    torch.testing.assert_close(parts.s_prev, whole.s_prev, rtol=1e-13, atol=1e-14)


def test_flush_threshold_batches_the_products(monkeypatch):
    """Below FLUSH_ROWS the rows wait in the buffer; reaching it forms the sums."""
    monkeypatch.setattr(statistics, "FLUSH_ROWS", 50)
    batches = _batches(6, [20, 20, 20, 5])
    fold = statistics._Sums()
    fold.add(batches[0][0], batches[0][1], 20.0)
    fold.add(batches[1][0], batches[1][1], 20.0)
    assert fold.s_prev is None and fold._pending_rows == 40
    fold.add(batches[2][0], batches[2][1], 20.0)  # 60 >= 50: flushed
    assert fold._pending_rows == 0
    bp = torch.cat([b for b, _ in batches[:3]])
    torch.testing.assert_close(fold.s_prev, bp.T @ bp, rtol=1e-12, atol=1e-12)
    fold.add(batches[3][0], batches[3][1], 5.0)
    assert fold._pending_rows == 5
    torch.testing.assert_close(fold.s_prev, bp.T @ bp, rtol=1e-12, atol=1e-12)  # not yet added


def test_prev_stride_one_is_the_exact_moment():
    batches = _batches(7, [30, 31, 7])
    default, strided = _filled(batches, folds=2), _filled(batches, folds=2, prev_stride=1)
    torch.testing.assert_close(strided.total().s_prev, default.total().s_prev, rtol=0, atol=0)
    _assert_moments(strided.total(), batches)


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_strided_s_prev_scales_every_kth_row_and_leaves_the_rest_exact(stride):
    sizes = [30, 31, 7, 1]
    batches = _batches(8, sizes)
    acc = _filled(batches, folds=1, prev_stride=stride)
    total = acc.total()
    # S' from rows 0, k, 2k, ... of each batch, each batch's sum scaled by rows / kept rows.
    expected = sum(bp[::stride].T @ bp[::stride] * (len(bp) / len(bp[::stride])) for bp, _ in batches) / sum(sizes)
    torch.testing.assert_close(total.s_prev, expected, rtol=1e-12, atol=1e-13)
    n, exact_s_prev, consumers = _direct(batches)
    assert total.n == n
    assert float((total.s_prev - exact_s_prev).abs().max()) > 1e-3  # it is an estimate, not the exact S'
    for got, want in zip(total.consumers, consumers):  # everything else uses all rows
        for name in ("s", "m", "c", "p"):
            torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("stride", [2, 4])
def test_strided_s_prev_is_unbiased_over_the_rows_offset(stride):
    """Averaged over the k cyclic shifts of the rows, the strided estimate is exactly S'."""
    ((b_prev, pairs),) = _batches(9, [stride * 9])
    estimates = []
    for shift in range(stride):
        rolled = torch.roll(b_prev, -shift, 0)
        estimates.append(_filled([(rolled, [(b, g) for b, g in pairs])], folds=1, prev_stride=stride).total().s_prev)
    exact = b_prev.T @ b_prev / len(b_prev)
    torch.testing.assert_close(sum(estimates) / stride, exact, rtol=1e-12, atol=1e-13)
    assert all(float((e - exact).abs().max()) > 1e-3 for e in estimates)


def test_strided_s_prev_converges_to_the_exact_one_on_iid_rows():
    gen = torch.Generator().manual_seed(10)
    acc_exact, acc_strided = MomentAccumulator(folds=1), MomentAccumulator(folds=1)
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=F64)
    chol = torch.linalg.cholesky(cov)
    for _ in range(40):
        x = torch.randn(200, 3, generator=gen, dtype=F64) @ chol.T + torch.tensor([1.0, -1.0, 0.0], dtype=F64)
        bp = torch.cat([x, torch.ones(200, 1, dtype=F64)], 1)
        pair = [(bp[:, :2], torch.randn(200, 1, generator=gen, dtype=F64))]
        acc_exact.update(bp, pair)
        acc_strided.update(bp, pair, prev_stride=4)
    exact, strided = acc_exact.total().s_prev, acc_strided.total().s_prev
    # 2000 kept rows: the standard error of each entry is a few 1e-2.
    assert float((strided - exact).abs().max()) < 0.15
    assert float(strided[-1, -1]) == pytest.approx(1.0, abs=1e-12)  # the constant is estimated exactly


def _padded_site(seed: int, shift: float = 0.0):
    """Rows of b' = [x * e, e] with e the indicator of the new unit's existence (0 in padding)."""
    gen = torch.Generator().manual_seed(seed)
    n = 60
    e = (torch.arange(n) % 5 != 0).to(F64)  # every fifth row is padding
    x = (torch.randn(n, 3, generator=gen, dtype=F64) * torch.tensor([1.0, 3.0, 0.2], dtype=F64) + 2.0 + shift) * e[
        :, None
    ]
    b_prev = torch.cat([x, e[:, None]], 1)
    b = torch.cat([torch.randn(n, 2, generator=gen, dtype=F64), torch.ones(n, 1, dtype=F64)], 1)
    g = torch.randn(n, 3, generator=gen, dtype=F64) + x[:, 1:2]
    acc = MomentAccumulator(folds=2)
    for lo in range(0, n, 20):
        acc.update(b_prev[lo : lo + 20], [(b[lo : lo + 20], g[lo : lo + 20])])
    return acc.total(), x, e, b, g


def test_affine_mode_keeps_the_moments():
    moments = _padded_site(11)[0]
    assert prepare_inputs(moments, "affine") is moments


def test_linear_mode_drops_the_constant_column():
    moments, x, _, b, g = _padded_site(12)
    n = len(x)
    linear = prepare_inputs(moments, "linear")
    assert not linear.has_ones and linear.n == moments.n
    torch.testing.assert_close(linear.s_prev, x.T @ x / n, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(linear.consumers[0].c, x.T @ b / n, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(linear.consumers[0].p, x.T @ g / n, rtol=1e-12, atol=1e-13)
    assert linear.consumers[0].s is moments.consumers[0].s and linear.consumers[0].g_sq == moments.consumers[0].g_sq


def test_centered_mode_centers_b_prev_over_the_rows_where_the_unit_exists():
    moments, x, e, b, g = _padded_site(13)
    n = len(x)
    mean = x[e > 0].mean(0)
    centered_rows = (x - mean) * e[:, None]  # padding rows stay 0
    centered = prepare_inputs(moments, "centered")
    assert not centered.has_ones and centered.s_prev.shape == (3, 3)
    torch.testing.assert_close(centered.s_prev, centered_rows.T @ centered_rows / n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(centered.consumers[0].c, centered_rows.T @ b / n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(centered.consumers[0].p, centered_rows.T @ g / n, rtol=1e-10, atol=1e-12)
    assert centered.consumers[0].m is moments.consumers[0].m
    # input_mean: E[b'] over the rows where the unit exists, and the fraction of such rows.
    got_mean, fraction = input_mean(moments)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-13)
    assert fraction == pytest.approx(0.8, rel=1e-12)


def test_centered_mode_ignores_a_shift_of_the_inputs():
    """Behind a BatchNorm the unit's mean cannot matter: shifting b' where the unit exists
    changes nothing once centered (while the linear moments do change)."""
    base = _padded_site(14)[0]
    shifted = _padded_site(14, shift=5.0)[0]
    a, z = prepare_inputs(base, "centered"), prepare_inputs(shifted, "centered")
    torch.testing.assert_close(a.s_prev, z.s_prev, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(a.consumers[0].c, z.consumers[0].c, rtol=1e-9, atol=1e-11)
    # g moves with x by a constant where the unit exists: the centered b' is orthogonal to that.
    torch.testing.assert_close(a.consumers[0].p, z.consumers[0].p, rtol=1e-9, atol=1e-11)
    assert float((prepare_inputs(base, "linear").s_prev - prepare_inputs(shifted, "linear").s_prev).abs().max()) > 1.0
    torch.testing.assert_close(input_mean(shifted)[0] - input_mean(base)[0], torch.full((3,), 5.0, dtype=F64))


def test_unknown_input_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown input mode"):
        prepare_inputs(_padded_site(15)[0], "bias")


def test_fold_sums_summed_over_processes_give_the_moments_of_all_rows():
    """What distributed training does: per fold, add the processes' sums and set them back."""
    batches = _batches(16, [9, 4, 12, 7, 3, 10, 8, 5])
    first, second = _filled(batches[:4], folds=2, samples=2.0), _filled(batches[4:], folds=2, samples=3.0)
    merged = MomentAccumulator(folds=2)
    for f in range(2):
        rows_a, samples_a, sums_a = first.fold_sums(f)
        rows_b, samples_b, sums_b = second.fold_sums(f)
        assert len(sums_a) == 1 + 5 * 2
        merged.set_fold_sums(f, rows_a + rows_b, samples_a + samples_b, [a + b for a, b in zip(sums_a, sums_b)])
    _assert_moments(merged.total(), batches)
    assert merged.total().rows_per_sample == pytest.approx(58 / (4 * 2.0 + 4 * 3.0))  # rows / samples
    # Fold 0 holds batches 0, 2 of each process.
    _assert_moments(merged.fold(0), [batches[i] for i in (0, 2, 4, 6)])
    merged.set_fold_sums(1, 0, 0, None)
    assert merged.usable_folds() == [0] and merged.fold_sums(1) == (0, 0, None)
    with pytest.raises(ValueError, match="five sums per consumer"):
        merged.set_fold_sums(0, 1, 1, sums_a[:3])
