"""The TINY solver: best update, expressivity bottleneck and best new neurons.

Pure tensors in, pure tensors out; nothing here knows about graphs or modules.
All solves run in float64 whatever the statistics' dtype (they are small matrices),
and never return NaN: singular second moments are handled by a pseudo-inverse whose
eigenvalue floor is relative to the largest eigenvalue, after a diagonal (Jacobi)
rescaling, so that rescaling any input coordinate leaves the answer unchanged.

Speed: that pseudo-inverse is the inverse whenever no eigenvalue falls under the floor, and
then a Cholesky factorization gives it for a small part of the cost of an eigen-decomposition
(40x or more at the width of a conv's unfolded input, C_in * k^2 + 1). So the whitening first
proves that case, by factorizing the matrix shifted down by twice the floor times a bound on
its largest eigenvalue (success means every eigenvalue is above the floor), and then whitens
with the inverse Cholesky factor; the eigen-decomposition runs only when the proof fails (a
singular or nearly singular matrix). Both give the same answers to float64 rounding: a
whitening is only defined up to a rotation of its rows, which cancels in `W^T W` and in the
neurons (the sign of each neuron, arbitrary in an SVD, aside). The ridge-shrunk whitening of
the producer's input (`shrunk_whitening`, the default) always takes the Cholesky path at the
usual ridge. `force_eigh=True` runs the eigen path (the reference, for tests and benchmarks).

Notation (see docs/method.md):
  b   consumer input (bias 1 appended),   g  per-sample gradient at the consumer output
  b'  producer input (bias 1 appended)
  S  = E[b b^T]   M = E[b g^T]   S' = E[b' b'^T]   P = E[b' g^T]   C = E[b' b^T]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Eigenvalues below this fraction of the largest one are treated as zero.
RELATIVE_EIGEN_FLOOR = 1e-7


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


@dataclass(frozen=True)
class Whitening:
    """`W` such that `W b'` has identity second moment on the span of the data.

    `matrix` is (r, d): r is the numerical rank of S'. `W^T W` is a pseudo-inverse of S'.
    """

    matrix: Tensor

    @property
    def rank(self) -> int:
        return self.matrix.shape[0]


def _eigenvalue_bound(a: Tensor) -> float:
    """An upper bound on the largest eigenvalue of a symmetric matrix: its Frobenius norm or its
    largest absolute row sum, whichever is smaller."""
    return min(float(torch.linalg.matrix_norm(a)), float(a.abs().sum(1).max()))


def _certified_inverse_factor(a: Tensor, floor: float) -> Tensor | None:
    """`L^-1` with `a = L L^T`, when every eigenvalue of the symmetric `a` is proven to exceed
    `floor` times the largest (so the eigen path would keep them all and its pseudo-inverse is
    the inverse); None when that cannot be shown."""
    top = _eigenvalue_bound(a)
    if not 0 < top < float("inf"):
        return None
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    # A Cholesky of a - t I succeeds only if lambda_min > t, up to rounding (d * 1e-16 * top)
    # far below t; the factor 2 keeps that margin.
    _, shifted_info = torch.linalg.cholesky_ex(a - (2 * floor * top) * eye)
    if int(shifted_info) != 0:
        return None
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
    return inverse if bool(torch.isfinite(inverse).all()) else None


def _eigen_inverse_root(a: Tensor, floor: float) -> Tensor:
    """`Lambda^-1/2 V^T` over the eigenvalues of `a` above `floor` times the largest: (r, d)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(a)
    top = eigenvalues.max().clamp_min(0.0)
    keep = eigenvalues > floor * top if top > 0 else torch.zeros_like(eigenvalues, dtype=torch.bool)
    return (eigenvectors[:, keep] / eigenvalues[keep].sqrt()).T


def _inverse_root(a: Tensor, floor: float, force_eigh: bool) -> Tensor:
    """A matrix `W` (r, d) with `W^T W` the floored pseudo-inverse of the symmetric PSD `a`:
    the inverse Cholesky factor where it is proven to give the same, else the eigen path."""
    inverse = None if force_eigh else _certified_inverse_factor(a, floor)
    return inverse if inverse is not None else _eigen_inverse_root(a, floor)


def whitening(second_moment: Tensor, floor: float = RELATIVE_EIGEN_FLOOR, force_eigh: bool = False) -> Whitening:
    """Inverse square root of a PSD second moment, restricted to its numerical range."""
    s = _f64(second_moment)
    if s.shape[0] == 0:  # a layer with no inputs yet (a new block's output layer)
        return Whitening(matrix=s.new_zeros(0, 0))
    s = 0.5 * (s + s.T)
    diag = torch.diagonal(s).clamp_min(0.0)
    # Jacobi rescaling: coordinates of any scale are treated alike; all-zero ones are dropped.
    support = diag > 0
    if not bool(support.any()):
        return Whitening(matrix=s.new_zeros(0, s.shape[0]))
    scale = diag[support].rsqrt()
    s_tilde = scale[:, None] * s[support][:, support] * scale[None, :]
    root = _inverse_root(s_tilde, floor, force_eigh)
    matrix = s.new_zeros(root.shape[0], s.shape[0])
    matrix[:, support] = root * scale[None, :]
    return Whitening(matrix=matrix)


def shrunk_whitening(
    second_moment: Tensor,
    ridge: float,
    has_ones: bool,
    floor: float = RELATIVE_EIGEN_FLOOR,
    force_eigh: bool = False,
) -> Whitening:
    """Whitening of a shrunk second moment, for estimates from few samples in many dimensions.

    The covariance gets `ridge` times its mean variance added on the diagonal (Ledoit-Wolf-style
    shrinkage towards a multiple of the identity), which keeps directions of tiny variance (an
    image's border pixels) from being blown up into noise. With `has_ones` the last coordinate is
    the constant 1 (1 where the unit exists): it is handled exactly, apart from the covariance of
    the centered others, so that neither the mean nor the units of the inputs matter.
    """
    s = _f64(second_moment)
    s = 0.5 * (s + s.T)
    if ridge <= 0 or s.shape[0] == 0:
        return whitening(s, floor, force_eigh)
    if has_ones:
        a, e = s[:-1, -1], float(s[-1, -1])
        if e <= 0:
            return whitening(s, floor, force_eigh)
        mean = a / e
        cov = s[:-1, :-1] - torch.outer(a, a) / e
    else:
        cov = s
    level = float(torch.diagonal(cov).clamp_min(0).mean())
    if level <= 0:
        return whitening(s, floor, force_eigh)
    shrunk = cov + ridge * level * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    inner = _inverse_root(shrunk, floor, force_eigh)  # (r, d)
    if not has_ones:
        return Whitening(matrix=inner)
    top = torch.cat([inner, -(inner @ mean)[:, None]], dim=1)  # whitens x - mean
    last = torch.zeros(1, s.shape[0], dtype=s.dtype, device=s.device)
    last[0, -1] = e**-0.5  # the constant, on its own
    return Whitening(matrix=torch.cat([top, last], dim=0))


def pseudo_inverse(second_moment: Tensor, floor: float = RELATIVE_EIGEN_FLOOR, force_eigh: bool = False) -> Tensor:
    w = whitening(second_moment, floor, force_eigh).matrix
    return w.T @ w


@dataclass(frozen=True)
class BestUpdate:
    """Least-squares move of a consumer's weights towards the desired update `-g`."""

    delta: Tensor  # (out, in): dW* = -M^T S^+
    first_order_gain: float  # tr(M^T S^+ M): decrease of E|v|^2, and d/d eps of -L at dW*


def best_update(s: Tensor, m: Tensor, s_pinv: Tensor | None = None, white: Whitening | None = None) -> BestUpdate:
    """`s_pinv` (S^+) or `white` (a whitening of S) may be given when already known (the same S
    for several M). With a whitening, S^+ M is computed as W^T (W M), never forming S^+."""
    m64 = _f64(m)
    if s_pinv is not None:
        s_pinv_m = s_pinv @ m64
    else:
        w = (whitening(s) if white is None else white).matrix
        s_pinv_m = w.T @ (w @ m64)
    gain = float((m64 * s_pinv_m).sum())
    return BestUpdate(delta=-s_pinv_m.T, first_order_gain=max(gain, 0.0))


@dataclass(frozen=True)
class Neurons:
    """Best K new neurons for a site, in decreasing order of gain.

    Scale convention: `omega[:, k] = lambda_k v_k` (the `v_k` orthonormal) and `alpha[:, k]`
    gives the new unit a pre-activation of mean square `q_k = alpha_k^T S' alpha_k` on the
    statistics batch. Any other split `(c alpha, omega / c)` is equivalent.

    With the exact whitening of S' (`ridge` 0), `q_k = 1`, the linear part of the new neurons,
    `omega alpha^T b'`, is the least-squares fit of `v_perp`, and neuron k reduces E|v_perp|^2 by
    exactly `lambda_k^2`. With a ridge (the default; see `shrunk_whitening`) the whitening is that
    of S' plus the ridge, so the fit is a ridge regression: `q_k <= 1`, and neuron k reduces
    E|v_perp|^2 by `lambda_k^2 (2 - q_k)`, between `lambda_k^2` and `2 lambda_k^2` (its own best
    scale would give `lambda_k^2 / q_k`). The reductions of several neurons add up either way:
    the cross terms vanish because the `v_k` are orthonormal.
    """

    alpha: Tensor  # (in', K)
    omega: Tensor  # (out, K)
    lambdas: Tensor  # (K,)

    @property
    def count(self) -> int:
        return self.lambdas.numel()

    def take(self, k: int) -> Neurons:
        return Neurons(self.alpha[:, :k], self.omega[:, :k], self.lambdas[:k])


def projected_desired_update(p: Tensor, c: Tensor, update: BestUpdate) -> Tensor:
    """N = E[b' v_perp^T] with v_perp = -g - dW* b, from moments only: N = -P - C dW*^T."""
    return -_f64(p) - _f64(c) @ update.delta.T


def best_neurons(s_prev: Tensor, n: Tensor, max_neurons: int | None = None, white: Whitening | None = None) -> Neurons:
    """SVD of S'^(-1/2) N: the neurons that best fit v_perp from the producer's input b'.
    `white` may be given when the whitening of S' is already known."""
    w = whitening(s_prev) if white is None else white
    z = w.matrix @ _f64(n)  # (r, out)
    if z.numel() == 0:
        empty = torch.zeros(s_prev.shape[0], 0, dtype=torch.float64)
        return Neurons(empty, torch.zeros(n.shape[1], 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    u, sigma, vh = torch.linalg.svd(z, full_matrices=False)
    # Singular values are only meaningful down to the numerics of the solve.
    keep = sigma > sigma.max() * 1e-9 if sigma.numel() else sigma > 0
    k = int(keep.sum())
    if max_neurons is not None:
        k = min(k, max_neurons)
    alpha = w.matrix.T @ u[:, :k]
    omega = vh[:k].T * sigma[:k]
    return Neurons(alpha=alpha, omega=omega, lambdas=sigma[:k])


def bottleneck(g_sq: float, update: BestUpdate) -> float:
    """E|v_perp|^2 = E|g|^2 - tr(M^T S^+ M): what no move of the consumer's weights can do."""
    return max(g_sq - update.first_order_gain, 0.0)


def neuron_fit_gain(alpha: Tensor, omega: Tensor, s_prev: Tensor, n: Tensor) -> Tensor:
    """Per-neuron decrease of E|v_perp - omega_k alpha_k^T b'|^2 under given moments.

    `2 omega_k^T N^T alpha_k - |omega_k|^2 alpha_k^T S' alpha_k`.
    """
    a, o = _f64(alpha), _f64(omega)
    cross = ((_f64(n).T @ a) * o).sum(0)
    energy = (o * o).sum(0) * ((_f64(s_prev) @ a) * a).sum(0)
    return 2 * cross - energy


def neuron_alignment(alpha: Tensor, omega: Tensor, n: Tensor) -> Tensor:
    """Per-neuron `E<v_perp, omega_k alpha_k^T b'>` = `omega_k^T N^T alpha_k` under given moments.

    Positive when the neuron's direction helps; at its best amplitude a neuron then reduces the
    bottleneck by alignment^2 / energy. Measured on held-out moments it tests a direction for
    signal, leaving its size to the amplitude search.
    """
    return ((_f64(n).T @ _f64(alpha)) * _f64(omega)).sum(0)


def raw_first_order_gain(alpha: Tensor, omega: Tensor, p: Tensor) -> Tensor:
    """Per-neuron first-order decrease of the loss from adding `omega alpha^T b'` alone.

    `omega_k^T E[-g b'^T] alpha_k` (times the activation's slope at 0, applied by the caller).
    It uses the raw gradient, not v_perp: this is what adding the neurons without dW* does.
    """
    return -((_f64(p).T @ _f64(alpha)) * _f64(omega)).sum(0)
