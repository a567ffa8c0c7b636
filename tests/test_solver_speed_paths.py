"""The Cholesky fast path of the whitening against the eigen-decomposition (the reference)."""

import pytest
import torch

from growc.tiny.solver import best_neurons, best_update, pseudo_inverse, shrunk_whitening, whitening


def _moment(seed: int, d: int, rank: int, dead: int = 0, spread: float = 0.0) -> torch.Tensor:
    """E[x x^T] of `rank`-dimensional data in `d` coordinates, `dead` of them all-zero, the
    coordinates' scales spread over `spread` decades, and a constant last coordinate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, d - 1, generator=g, dtype=torch.float64
    )
    x = torch.relu(x + 0.3) if rank >= d else x  # full rank: activation-like, with a nonzero mean
    x = x * torch.logspace(-spread, spread, d - 1, dtype=torch.float64)
    x[:, :dead] = 0.0
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return x.T @ x / x.shape[0]


def _eigh_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the eigen path ran on a positive definite matrix")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)


CASES = [
    pytest.param(0, 40, 40, 0, 0.0, id="full-rank"),
    pytest.param(1, 60, 60, 3, 3.0, id="dead-units-and-scales"),
    pytest.param(2, 50, 12, 0, 0.0, id="rank-deficient"),
    pytest.param(3, 30, 30, 0, 6.0, id="twelve-decades"),
    pytest.param(4, 200, 200, 5, 1.0, id="wide"),
]


@pytest.mark.parametrize(("seed", "d", "rank", "dead", "spread"), CASES)
def test_pseudo_inverse_matches_the_eigen_path(seed, d, rank, dead, spread):
    s = _moment(seed, d, rank, dead, spread)
    fast, reference = whitening(s), whitening(s, force_eigh=True)
    assert fast.rank == reference.rank
    assert torch.isfinite(fast.matrix).all()
    torch.testing.assert_close(fast.matrix.T @ fast.matrix, reference.matrix.T @ reference.matrix, rtol=1e-7, atol=0.0)
    torch.testing.assert_close(pseudo_inverse(s), pseudo_inverse(s, force_eigh=True), rtol=1e-7, atol=0.0)


@pytest.mark.parametrize(("seed", "d", "rank", "dead", "spread"), CASES)
def test_neurons_match_the_eigen_path(seed, d, rank, dead, spread):
    s = _moment(seed, d, rank, dead, spread)
    g = torch.Generator().manual_seed(seed + 100)
    n = s @ torch.randn(d, 5, generator=g, dtype=torch.float64) + 1e-3 * torch.randn(d, 5, generator=g)
    for white_fast, white_ref in (
        (whitening(s), whitening(s, force_eigh=True)),
        (shrunk_whitening(s, 0.1, True), shrunk_whitening(s, 0.1, True, force_eigh=True)),
        (shrunk_whitening(s, 0.1, False), shrunk_whitening(s, 0.1, False, force_eigh=True)),
    ):
        fast = best_neurons(s, n, 4, white_fast)
        ref = best_neurons(s, n, 4, white_ref)
        assert fast.count == ref.count
        torch.testing.assert_close(fast.lambdas, ref.lambdas, rtol=1e-7, atol=0.0)
        # Each neuron up to its sign (arbitrary in an SVD): compare alpha_k omega_k^T.
        for k in range(fast.count):
            torch.testing.assert_close(
                torch.outer(fast.alpha[:, k], fast.omega[:, k]),
                torch.outer(ref.alpha[:, k], ref.omega[:, k]),
                rtol=1e-6,
                atol=1e-9 * float(ref.omega.abs().max() * ref.alpha.abs().max()),
            )
        for t in (fast.alpha, fast.omega, fast.lambdas):
            assert torch.isfinite(t).all()


@pytest.mark.parametrize(("seed", "d", "rank", "dead", "spread"), CASES)
def test_best_update_from_a_whitening_matches_the_eigen_pseudo_inverse(seed, d, rank, dead, spread):
    s = _moment(seed, d, rank, dead, spread)
    m = s @ torch.randn(d, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = best_update(s, m, s_pinv=pseudo_inverse(s, force_eigh=True))
    # Compared on unit-scaled inputs (delta times each input's RMS): what the update does to the
    # output, the same whatever the units of the inputs.
    rms = torch.diagonal(s).clamp_min(0).sqrt()
    expected = reference.delta * rms
    for fast in (best_update(s, m), best_update(s, m, white=whitening(s))):
        torch.testing.assert_close(fast.delta * rms, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
        assert fast.first_order_gain == pytest.approx(reference.first_order_gain, rel=1e-9)


def test_positive_definite_matrices_skip_the_eigen_decomposition(monkeypatch):
    s = _moment(5, 80, 80, 2, 2.0)
    _eigh_forbidden(monkeypatch)
    assert whitening(s).rank == 78  # the two dead units are dropped, the rest is full rank
    assert shrunk_whitening(s, 0.1, True).rank == 78 + 2  # shrunk: every coordinate kept
    assert torch.isfinite(pseudo_inverse(s)).all()


def test_singular_matrices_fall_back_to_the_eigen_path(monkeypatch):
    s = _moment(6, 50, 12)
    calls = []
    original = torch.linalg.eigh

    def counting(a):
        calls.append(a.shape[0])
        return original(a)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    white = whitening(s)
    assert calls, "a rank-12 matrix of size 50 must take the eigen path"
    assert white.rank == 13  # the data's 12 dimensions and the constant
    assert torch.isfinite(white.matrix).all()


def test_degenerate_inputs_give_no_nan_on_either_path():
    for s in (torch.zeros(4, 4), torch.ones(5, 5), torch.eye(3) * 1e-300, torch.diag(torch.tensor([1.0, 0.0, -1e-18]))):
        for force in (False, True):
            white = whitening(s, force_eigh=force)
            assert torch.isfinite(white.matrix).all()
            assert torch.isfinite(pseudo_inverse(s, force_eigh=force)).all()
            assert torch.isfinite(shrunk_whitening(s, 0.1, True, force_eigh=force).matrix).all()
    assert whitening(torch.ones(5, 5)).rank == 1
    assert whitening(torch.zeros(4, 4)).rank == 0
