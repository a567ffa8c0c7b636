"""Where new neurons come from, given a site's statistics: one small object per strategy.

Every strategy returns neurons in the solver's scale convention (`alpha` gives pre-activations of
mean square about 1, see `Neurons`; `omega` carries the magnitude), so the growth loop scales and
line-searches them
the same way whatever their origin, and comparisons between strategies are fair.
"""

from __future__ import annotations

from typing import Protocol

import torch

from growc.tiny.site_solution import SiteSolution, stacked_p
from growc.tiny.solver import Neurons, whitening
from growc.tiny.statistics import SiteMoments


class Strategy(Protocol):
    name: str
    # True: the neurons go in as proposed (amplitude 1, no sign test): they start too small
    # to change the loss (GradMax's input weights are 1e-3 of unit scale), so an amplitude
    # search could not tell them apart.
    function_preserving: bool

    def propose(self, solution: SiteSolution, moments: SiteMoments, k: int, generator: torch.Generator) -> Neurons:
        """k neurons for the site."""
        ...


class TinyStrategy:
    """The TINY neurons: the best least-squares fit of the expressivity bottleneck."""

    name = "tiny"
    function_preserving = False

    def propose(self, solution: SiteSolution, moments: SiteMoments, k: int, generator: torch.Generator) -> Neurons:
        return solution.neurons.take(k)


def _unit_preactivation(alpha: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
    energy = ((s_prev.to(alpha) @ alpha) * alpha).sum(0).clamp_min(1e-300)
    return alpha / energy.sqrt()


class RandomStrategy:
    """Random directions with the same count and magnitudes as TINY's: the control group."""

    name = "random"
    function_preserving = False

    def propose(self, solution: SiteSolution, moments: SiteMoments, k: int, generator: torch.Generator) -> Neurons:
        ref = solution.neurons.take(k)
        k = ref.count
        d_in, d_out = moments.s_prev.shape[0], solution.n_matrix.shape[1]
        device = ref.lambdas.device  # draws come from a CPU generator, so runs match across devices
        alpha = torch.randn(d_in, k, generator=generator, dtype=torch.float64).to(device)
        alpha = _unit_preactivation(alpha, moments.s_prev)
        omega = torch.randn(d_out, k, generator=generator, dtype=torch.float64).to(device)
        omega = omega / omega.norm(dim=0).clamp_min(1e-300) * ref.lambdas
        return Neurons(alpha=alpha, omega=omega, lambdas=ref.lambdas)


class GradMaxStrategy:
    """GradMax-style neurons: outgoing weights along the directions of largest gradient
    correlation E[b' g^T], incoming weights small rather than zero, so that they are not dead
    under ReLU, and accepted without an amplitude search.

    Scale: `alpha` is 1e-3 of the solver's unit scale (pre-activations of RMS 1e-3, the exact
    whitening of S'), which the loop maps to 1e-3 of the site's existing units' RMS
    pre-activation; `omega` gets the usual scale (the first neuron's column norm is the
    consumers' RMS column norm). So the function barely changes and training takes over, except
    behind a BatchNorm: there the new channels' running variance is set to their own, which
    normalizes the 1e-3 away and the units enter at full size."""

    name = "gradmax"
    function_preserving = True  # accepted as proposed: the amplitude search would see no change

    def propose(self, solution: SiteSolution, moments: SiteMoments, k: int, generator: torch.Generator) -> Neurons:
        ref = solution.neurons.take(k)
        k = ref.count
        p = stacked_p(moments)
        w = whitening(moments.s_prev).matrix
        u, sigma, vh = torch.linalg.svd(w @ p, full_matrices=False)
        k = min(k, sigma.numel())
        alpha = 1e-3 * (w.T @ u[:, :k])
        omega = -vh[:k].T * ref.lambdas[:k]
        return Neurons(alpha=alpha, omega=omega, lambdas=ref.lambdas[:k])


STRATEGIES: dict[str, type] = {s.name: s for s in (TinyStrategy, RandomStrategy, GradMaxStrategy)}


def make_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()
