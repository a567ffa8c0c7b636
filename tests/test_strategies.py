"""growc.tiny.site_solution, significance and strategies on synthetic sites: planted bottlenecks
are found with their rank, noise mostly is not, and each strategy's neurons have the documented
shapes, scales and directions."""

import functools

import pytest
import torch

from growc.tiny.significance import significant_neuron_count
from growc.tiny.site_solution import inverses, neurons_raw_gain, solve_site
from growc.tiny.solver import neuron_alignment
from growc.tiny.statistics import ConsumerMoments, MomentAccumulator, SiteMoments, prepare_inputs
from growc.tiny.strategies import GradMaxStrategy, RandomStrategy, TinyStrategy, make_strategy

F64 = torch.float64
D_PREV, D_IN, OUT = 8, 3, 4


def _planted(seed: int) -> torch.Tensor:
    """A of rank 2 with singular values 1 and 0.7, random directions."""
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(D_PREV, 2, generator=gen, dtype=F64))[0]
    q2 = torch.linalg.qr(torch.randn(OUT, 2, generator=gen, dtype=F64))[0]
    return q1 @ torch.diag(torch.tensor([1.0, 0.7], dtype=F64)) @ q2.T


def _site(seed: int, kind: str, batches: int = 16, rows: int = 64, shift: float = 0.0, folds: int = 4):
    """A site whose consumer reads b = [z, 1] and producer input is b' = [x, 1], x independent of z.

    kind "noise": g is pure noise. "expressible": g = z W + noise, which the consumer's own
    weights can follow. "planted": g = (x - shift) A + small noise with A of rank 2 (singular values
    1 and 0.7): the consumer cannot express it, two new neurons can."""
    planted = _planted(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    w = torch.randn(D_IN, OUT, generator=gen, dtype=F64)
    acc = MomentAccumulator(folds)
    for _ in range(batches):
        x = torch.randn(rows, D_PREV, generator=gen, dtype=F64) + shift
        z = torch.randn(rows, D_IN, generator=gen, dtype=F64)
        noise = torch.randn(rows, OUT, generator=gen, dtype=F64)
        if kind == "noise":
            g = noise
        elif kind == "expressible":
            g = z @ w + noise
        else:
            g = (x - shift) @ planted + 0.1 * noise
        ones = torch.ones(rows, 1, dtype=F64)
        acc.update(torch.cat([x, ones], 1), [(torch.cat([z, ones], 1), g)])
    return acc


@functools.cache
def _noise_counts(trials: int = 120) -> tuple[int, ...]:
    return tuple(significant_neuron_count(_site(seed, "noise"), 4).significant for seed in range(trials))


def test_noise_rarely_passes_and_never_on_average():
    """A loose guard (the documented level is in the next test): noise passes in under a third
    of the trials, and its first neuron's held-out gain averages to about 0."""
    counts = _noise_counts()
    assert sum(c > 0 for c in counts) <= len(counts) * 0.3, counts
    gains = torch.tensor(
        [significant_neuron_count(_site(seed, "noise"), 1).held_out_alignment[0] for seed in range(20)]
    )
    planted = significant_neuron_count(_site(0, "planted"), 1).held_out_alignment[0]
    assert abs(float(gains.mean())) < 3 * float(gains.std()) / len(gains) ** 0.5
    assert float(gains.abs().max()) < 0.05 * planted


@pytest.mark.xfail(
    strict=True,
    reason="the standard error treats the cross-fitted folds' gains as independent, but each fold's "
    "held-out data trains the other folds' neurons: z=2 passes pure noise in about 15% of trials",
)
def test_noise_passes_with_the_probability_the_margin_sets():
    """significance.py: "Pure noise passes this one test with the small probability the margin
    sets" (z = 2: 2.3% one-sided; docs/method.md: at least 18 of 20 trials grow nothing). Allowed
    here: 5%."""
    counts = _noise_counts()
    assert sum(c > 0 for c in counts) <= len(counts) * 0.05, counts


def test_what_the_consumer_can_express_does_not_change_the_test():
    """g = z W + noise leaves the same bottleneck as the noise alone: the same held-out gains."""
    for seed in range(3):
        noise = significant_neuron_count(_site(seed, "noise"), 4)
        expressible = significant_neuron_count(_site(seed, "expressible"), 4)
        assert expressible.significant == noise.significant
        torch.testing.assert_close(
            torch.tensor(expressible.held_out_alignment), torch.tensor(noise.held_out_alignment), rtol=1e-7, atol=1e-12
        )
        torch.testing.assert_close(
            torch.tensor(expressible.std_error), torch.tensor(noise.std_error), rtol=1e-7, atol=1e-12
        )
        total = solve_site(_site(seed, "expressible").total())
        # The consumer explains z W (energy |W|_F^2 per row): what is left is about the noise's 4.
        assert total.bottleneck == pytest.approx(OUT, rel=0.15)
        assert total.gradient_energy > total.bottleneck + 1.0


@pytest.mark.parametrize("mode", ["affine", "linear", "centered"])
@pytest.mark.parametrize("ridge", [None, 0.1])
def test_a_planted_rank_two_bottleneck_always_gives_two_neurons(mode, ridge):
    for seed in range(4):
        acc = _site(seed, "planted", shift=2.0)
        shared = None if ridge is None else inverses(prepare_inputs(acc.total(), mode), ridge)
        result = significant_neuron_count(acc, 4, mode=mode, shared=shared)
        assert result.significant == 2, (seed, result)
        assert result.held_out_alignment[0] > result.held_out_alignment[1] > 10 * abs(result.held_out_alignment[2])
        total = acc.total()
        solution = solve_site(prepare_inputs(total, mode), 4)
        # The two neurons remove the planted energy of this sample, tr(A^T Cov(x) A) (about 1.49;
        # the rest is noise, 0.01 per output). Without the constant ("linear") they fit the centered
        # target from the uncentered x: tr(A^T Cov S'^-1 Cov A), with S' = E[x x^T], less.
        planted = _planted(seed)
        cov, second = prepare_inputs(total, "centered").s_prev, prepare_inputs(total, "linear").s_prev
        expected = float(torch.trace(planted.T @ cov @ planted))
        if mode == "linear":
            linear = float(torch.trace(planted.T @ cov @ torch.linalg.solve(second, cov @ planted)))
            assert linear < expected - 0.03
            expected = linear
        assert float((solution.neurons.lambdas[:2] ** 2).sum()) == pytest.approx(expected, rel=0.03)
        assert float(solution.neurons.lambdas[2] ** 2) < 0.01
        assert solution.relative_bottleneck > 0.95  # the consumer's input z knows nothing of x


def test_affine_and_centered_inputs_fit_a_consumer_with_a_bias_alike():
    """v_perp has mean 0 when the consumer has a bias, so the constant of b' adds nothing and
    [x, 1] and x - mean(x) span the same fits: the same lambdas, the same pre-activations up to
    their mean."""
    total = _site(1, "planted", shift=3.0).total()
    affine, centered = solve_site(prepare_inputs(total, "affine")), solve_site(prepare_inputs(total, "centered"))
    torch.testing.assert_close(affine.neurons.lambdas, centered.neurons.lambdas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(affine.neurons.omega.abs(), centered.neurons.omega.abs(), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(affine.neurons.alpha[:-1].abs(), centered.neurons.alpha.abs(), rtol=1e-7, atol=1e-10)
    assert affine.bottleneck == centered.bottleneck  # the consumer side is untouched


def test_significance_needs_two_folds_and_a_positive_cap():
    acc = MomentAccumulator(folds=4)
    b_prev, b = torch.ones(10, 3, dtype=F64), torch.ones(10, 2, dtype=F64)
    acc.update(b_prev, [(b, torch.ones(10, 1, dtype=F64))])  # one usable fold only
    result = significant_neuron_count(acc, 3)
    assert (result.significant, result.held_out_alignment, result.std_error) == (0, [], [])
    planted = _site(0, "planted")
    assert significant_neuron_count(planted, 0).significant == 0
    assert significant_neuron_count(planted, 1).significant == 1  # capped by max_neurons


def test_a_bottleneck_at_one_of_two_consumers_is_found_there():
    gen = torch.Generator().manual_seed(3)
    direction = torch.linalg.qr(torch.randn(D_PREV, 1, generator=gen, dtype=F64))[0]
    acc = MomentAccumulator(folds=4)
    for _ in range(16):
        x = torch.randn(64, D_PREV, generator=gen, dtype=F64)
        ones = torch.ones(64, 1, dtype=F64)
        z1, z2 = torch.randn(64, 2, generator=gen, dtype=F64), torch.randn(64, 3, generator=gen, dtype=F64)
        g1 = z1 @ torch.ones(2, 3, dtype=F64) + 0.1 * torch.randn(64, 3, generator=gen, dtype=F64)
        g2 = (x @ direction) * torch.tensor([[1.0, -1.0]], dtype=F64) + 0.1 * torch.randn(
            64, 2, generator=gen, dtype=F64
        )
        acc.update(torch.cat([x, ones], 1), [(torch.cat([z1, ones], 1), g1), (torch.cat([z2, ones], 1), g2)])
    assert significant_neuron_count(acc, 4).significant == 1
    solution = solve_site(acc.total(), 4)
    assert solution.n_matrix.shape == (D_PREV + 1, 3 + 2)
    first = solution.neurons.omega[:, 0]
    assert float(first[3:].norm() ** 2) > 0.99 * float(first.norm() ** 2)  # the second consumer's outputs
    torch.testing.assert_close(
        first[3:] / first[3:].norm(),
        torch.tensor([1.0, -1.0], dtype=F64) / 2**0.5 * first[3:].sign()[0],
        atol=0.02,
        rtol=0,
    )
    assert float(solution.neurons.lambdas[0] ** 2) == pytest.approx(2.0, rel=0.1)  # |x.d|^2 times |(1, -1)|^2
    assert solution.bottleneck == pytest.approx(2.0 + 0.05, rel=0.1)  # the planted part plus 5 outputs' noise


def _moments(seed: int = 0, rows_per_sample: float = 1.0):
    acc = _site(seed, "planted", shift=1.0)
    m = acc.total()
    return SiteMoments(n=m.n, s_prev=m.s_prev, consumers=m.consumers, rows_per_sample=rows_per_sample)


def test_tiny_strategy_proposes_the_solvers_top_neurons():
    moments = _moments()
    full = solve_site(moments)
    strategy = make_strategy("tiny")
    assert isinstance(strategy, TinyStrategy)
    for k in (1, 2, 3):
        proposed = strategy.propose(full, moments, k, torch.Generator().manual_seed(0))
        top = solve_site(moments, k).neurons
        assert proposed.count == k
        for a, b in ((proposed.alpha, top.alpha), (proposed.omega, top.omega), (proposed.lambdas, top.lambdas)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert strategy.propose(full, moments, 100, torch.Generator()).count == full.neurons.count == OUT


def test_unknown_strategy_is_an_error_that_names_the_choices():
    assert isinstance(make_strategy("random"), RandomStrategy) and isinstance(make_strategy("gradmax"), GradMaxStrategy)
    with pytest.raises(ValueError, match="tiny, random, gradmax"):
        make_strategy("best")


def test_random_neurons_have_tinys_shapes_and_magnitudes_and_are_reproducible():
    moments = _moments()
    solution = solve_site(moments)
    strategy = RandomStrategy()
    a = strategy.propose(solution, moments, 3, torch.Generator().manual_seed(7))
    b = strategy.propose(solution, moments, 3, torch.Generator().manual_seed(7))
    c = strategy.propose(solution, moments, 3, torch.Generator().manual_seed(8))
    assert a.alpha.shape == (D_PREV + 1, 3) and a.omega.shape == (OUT, 3)
    torch.testing.assert_close(a.lambdas, solution.neurons.lambdas[:3], rtol=0, atol=0)
    torch.testing.assert_close(a.omega.norm(dim=0), a.lambdas, rtol=1e-12, atol=0)
    # The same scale convention as TINY's: unit mean-square pre-activation on the statistics.
    torch.testing.assert_close(((moments.s_prev @ a.alpha) * a.alpha).sum(0), torch.ones(3, dtype=F64))
    for t, u in ((a.alpha, b.alpha), (a.omega, b.omega)):
        torch.testing.assert_close(t, u, rtol=0, atol=0)
    assert float((a.alpha - c.alpha).abs().max()) > 0.1 and float((a.omega - c.omega).abs().max()) > 0.1
    # No better than TINY: the first TINY neuron has the largest alignment of any unit neuron with |omega| = lambda_1.
    tiny_first = float(solution.neurons.lambdas[0] ** 2)
    for seed in range(5):
        r = strategy.propose(solution, moments, 1, torch.Generator().manual_seed(seed))
        assert abs(float(neuron_alignment(r.alpha, r.omega, solution.n_matrix)[0])) < 0.95 * tiny_first
    assert strategy.propose(solution, moments, 10, torch.Generator().manual_seed(0)).count == OUT  # capped


def test_gradmax_neurons_follow_the_gradient_correlation_at_a_thousandth_of_unit_scale():
    moments = _moments(rows_per_sample=3.0)
    solution = solve_site(moments)
    strategy = make_strategy("gradmax")
    assert strategy.function_preserving
    assert not any(getattr(other, "function_preserving", False) for other in (TinyStrategy(), RandomStrategy()))
    neurons = strategy.propose(solution, moments, 2, torch.Generator())
    assert neurons.alpha.shape == (D_PREV + 1, 2) and neurons.omega.shape == (OUT, 2)
    torch.testing.assert_close(neurons.lambdas, solution.neurons.lambdas[:2], rtol=0, atol=0)
    torch.testing.assert_close(neurons.omega.norm(dim=0), neurons.lambdas, rtol=1e-12, atol=0)
    # Pre-activations of RMS 1e-3 on the statistics.
    torch.testing.assert_close(
        ((moments.s_prev @ neurons.alpha) * neurons.alpha).sum(0), torch.full((2,), 1e-6, dtype=F64)
    )
    # Directions: the top singular pairs of S'^(-1/2) P (any whitening), with the sign that lowers the loss.
    evals, evecs = torch.linalg.eigh(moments.s_prev)
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    p = moments.consumers[0].p
    u, sigma, vh = torch.linalg.svd(inv_sqrt @ p)
    for k in range(2):
        torch.testing.assert_close((neurons.omega[:, k] / neurons.lambdas[k]).abs(), vh[k].abs(), rtol=0, atol=1e-9)
    gain = neurons_raw_gain(moments, neurons.alpha, neurons.omega)
    torch.testing.assert_close(gain, 3.0 * 1e-3 * neurons.lambdas * sigma[:2], rtol=1e-9, atol=0)


def test_raw_gain_of_the_solvers_neurons_is_lambda_squared_when_the_consumer_cannot_move():
    """With M = 0 the best update is 0, v_perp = -g, and the raw gain of neuron k is lambda_k^2
    (per row; times rows per sample)."""
    gen = torch.Generator().manual_seed(5)
    n = 400
    x = torch.randn(n, D_PREV, generator=gen, dtype=F64)
    b_prev = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    b = torch.cat([x[:, :2] + 0.5 * torch.randn(n, 2, generator=gen, dtype=F64), torch.ones(n, 1, dtype=F64)], 1)
    g = x[:, 2:5] @ torch.randn(3, OUT, generator=gen, dtype=F64) + torch.randn(n, OUT, generator=gen, dtype=F64)
    g = g - b @ torch.linalg.lstsq(b, g).solution  # uncorrelated with b in sample: M = 0
    consumer = ConsumerMoments(
        s=b.T @ b / n, m=b.T @ g / n, c=b_prev.T @ b / n, p=b_prev.T @ g / n, g_sq=float((g * g).sum() / n)
    )
    assert float(consumer.m.abs().max()) < 1e-12
    moments = SiteMoments(n=n, s_prev=b_prev.T @ b_prev / n, consumers=(consumer,), rows_per_sample=4.0)
    neurons = solve_site(moments).neurons
    gain = neurons_raw_gain(moments, neurons.alpha, neurons.omega)
    torch.testing.assert_close(gain, 4.0 * neurons.lambdas**2, rtol=1e-9, atol=1e-12)
    # And it is the sample mean of <-g, omega_k alpha_k^T b'>.
    direct = -((b_prev @ neurons.alpha) * (g @ neurons.omega)).sum(0) / n
    torch.testing.assert_close(gain, 4.0 * direct, rtol=1e-9, atol=1e-12)


def test_raw_gain_differs_from_lambda_squared_by_the_best_updates_share():
    """In general sum lambda^2 is the gain beyond dW*: the raw gain (neurons alone) is
    lambda_k^2 + omega_k^T dW* C^T alpha_k, which is what the samples say."""
    gen = torch.Generator().manual_seed(6)
    n = 400
    x = torch.randn(n, D_PREV, generator=gen, dtype=F64)
    b_prev = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    b = torch.cat([x[:, :2] + 0.5 * torch.randn(n, 2, generator=gen, dtype=F64), torch.ones(n, 1, dtype=F64)], 1)
    g = x[:, :5] @ torch.randn(5, OUT, generator=gen, dtype=F64) + torch.randn(n, OUT, generator=gen, dtype=F64)
    acc = MomentAccumulator(folds=1)
    acc.update(b_prev, [(b, g)])
    moments = acc.total()
    solution = solve_site(moments)
    neurons = solution.neurons
    gain = neurons_raw_gain(moments, neurons.alpha, neurons.omega)
    direct = -((b_prev @ neurons.alpha) * (g @ neurons.omega)).sum(0) / n
    torch.testing.assert_close(gain, direct, rtol=1e-9, atol=1e-12)
    delta, c = solution.updates[0].delta, moments.consumers[0].c
    correction = ((c @ delta.T @ neurons.omega) * neurons.alpha).sum(0)  # omega_k^T dW* C^T alpha_k
    torch.testing.assert_close(gain, neurons.lambdas**2 + correction, rtol=1e-9, atol=1e-12)
    assert float((gain - neurons.lambdas**2).abs().max()) > 0.05  # a real difference here
    # The held-in alignment with N is lambda^2 exactly, which is what the significance test measures.
    torch.testing.assert_close(
        neuron_alignment(neurons.alpha, neurons.omega, solution.n_matrix), neurons.lambdas**2, rtol=1e-9, atol=1e-12
    )
