"""The solver against closed forms and torch.linalg.lstsq, on random small problems."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from growc.tiny.solver import (
    best_neurons,
    best_update,
    bottleneck,
    neuron_fit_gain,
    projected_desired_update,
    whitening,
)


@pytest.fixture(autouse=True)
def _float64():
    """These checks are about the math, so they run in float64; the default is restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem(seed: int, n: int, d_prev: int, d: int, out: int):
    g = torch.Generator().manual_seed(seed)
    b_prev = torch.randn(n, d_prev, generator=g)
    b = torch.tanh(b_prev @ torch.randn(d_prev, d, generator=g))
    grad = torch.randn(n, out, generator=g) + b_prev[:, :1] * b[:, -1:]
    return b_prev, b, grad


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(30, 200), d=st.integers(1, 8), out=st.integers(1, 6))
def test_best_update_is_the_least_squares_solution(seed, n, d, out):
    b_prev, b, grad = _problem(seed, n, 5, d, out)
    update = best_update(b.T @ b / n, b.T @ grad / n)
    expected = torch.linalg.lstsq(b, -grad).solution.T  # argmin |-g - dW b|
    torch.testing.assert_close(update.delta @ b.T, expected @ b.T, rtol=1e-6, atol=1e-8)
    residual = -grad - b @ update.delta.T
    # The first-order gain is what the update removes from E|g|^2.
    torch.testing.assert_close(
        (residual**2).sum() / n, torch.tensor(bottleneck(float((grad**2).sum() / n), update)), rtol=1e-6, atol=1e-10
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d_prev=st.integers(2, 9), out=st.integers(1, 6), k=st.integers(1, 6))
def test_neurons_solve_the_reduced_rank_least_squares_problem(seed, d_prev, out, k):
    n = 150
    b_prev, b, grad = _problem(seed, n, d_prev, 4, out)
    update = best_update(b.T @ b / n, b.T @ grad / n)
    v_perp = -grad - b @ update.delta.T
    n_matrix = projected_desired_update(b_prev.T @ grad / n, b_prev.T @ b / n, update)
    torch.testing.assert_close(n_matrix, b_prev.T @ v_perp / n)

    neurons = best_neurons(b_prev.T @ b_prev / n, n_matrix, max_neurons=k)
    fit = b_prev @ neurons.alpha @ neurons.omega.T
    lam2 = (neurons.lambdas**2).sum()
    # E<v_perp, Omega A^T b'> = sum lambda^2 and E|v_perp - fit|^2 = E|v_perp|^2 - sum lambda^2.
    torch.testing.assert_close((v_perp * fit).sum() / n, lam2, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(((v_perp - fit) ** 2).sum() / n, (v_perp**2).sum() / n - lam2, rtol=1e-6, atol=1e-10)
    # Pre-activations of the new neurons have unit mean square.
    torch.testing.assert_close(((b_prev @ neurons.alpha) ** 2).mean(0), torch.ones(neurons.count))
    # Optimality: the best rank-k fit of v_perp from b' (orthonormal basis + truncated SVD).
    q, _ = torch.linalg.qr(b_prev)
    sv = torch.linalg.svdvals(q.T @ v_perp)
    best_rank_k = (sv[:k] ** 2).sum() / n
    torch.testing.assert_close(lam2, best_rank_k, rtol=1e-6, atol=1e-10)
    # Each neuron's gain in the per-neuron formula is its lambda^2.
    torch.testing.assert_close(
        neuron_fit_gain(neurons.alpha, neurons.omega, b_prev.T @ b_prev / n, n_matrix), neurons.lambdas**2
    )


def test_whitening_is_invariant_to_rescaling_coordinates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    x = torch.cat([x, torch.ones(500, 1)], dim=1)  # a bias column, as layers append
    v = torch.randn(500, 3, generator=g) + x[:, :2] @ torch.randn(2, 3, generator=g)
    a = best_neurons(x.T @ x / 500, x.T @ v / 500)
    scale = torch.tensor([1e-3, 1e-3, 1e3, 1.0, 1e-3, 1e2, 1.0])
    xs = x * scale
    b = best_neurons(xs.T @ xs / 500, xs.T @ v / 500)
    torch.testing.assert_close(a.lambdas, b.lambdas, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close((x @ a.alpha).abs(), (xs @ b.alpha).abs(), rtol=1e-5, atol=1e-8)


def test_singular_statistics_never_produce_nan():
    g = torch.Generator().manual_seed(1)
    # Fewer samples than dimensions, a dead (all-zero) unit and a constant input.
    x = torch.randn(5, 12, generator=g)
    x[:, 3] = 0.0
    x[:, 4] = 1.0
    grad = torch.randn(5, 4, generator=g)
    s = x.T @ x / 5
    update = best_update(s, x.T @ grad / 5)
    neurons = best_neurons(s, projected_desired_update(x.T @ grad / 5, s, update))
    for t in (update.delta, neurons.alpha, neurons.omega, neurons.lambdas):
        assert torch.isfinite(t).all()
    # With as many parameters as samples the best update explains the whole desired update.
    assert bottleneck(float((grad**2).sum() / 5), update) < 1e-8
    # Entirely zero statistics: no neurons, no NaN.
    empty = best_neurons(torch.zeros(4, 4), torch.zeros(4, 2))
    assert empty.count == 0
    assert whitening(torch.zeros(3, 3)).rank == 0
    assert torch.isfinite(best_update(torch.zeros(3, 3), torch.zeros(3, 2)).delta).all()


def test_float32_statistics_are_solved_in_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 8, generator=g)
    x = x @ torch.diag(torch.logspace(-3, 0, 8))  # badly conditioned
    v = torch.randn(400, 2, generator=g)
    s32, n32 = (x.T @ x / 400).float(), (x.T @ v / 400).float()
    neurons = best_neurons(s32, n32)
    assert neurons.alpha.dtype == torch.float64
    ref = best_neurons(x.T @ x / 400, x.T @ v / 400)
    torch.testing.assert_close(neurons.lambdas, ref.lambdas, rtol=1e-3, atol=1e-6)
