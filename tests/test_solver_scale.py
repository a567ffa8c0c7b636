"""What the solver's scale convention promises (growc.tiny.solver.Neurons), with and without the
ridge, checked on samples rather than on the algebra."""

import pytest
import torch

from growc.tiny.solver import best_neurons, shrunk_whitening, whitening


def _samples(n: int = 400, d: int = 6, out: int = 5):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 2.0, 0.1, 3.0, 1.0, 0.5], dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 1.0
    b = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # the constant coordinate last
    v = torch.randn(n, out, generator=g, dtype=torch.float64) + 2 * x[:, :1] - x[:, 3:4]
    return b, v


def _reduction(v: torch.Tensor, fit: torch.Tensor) -> float:
    return float((v**2).sum(1).mean() - ((v - fit) ** 2).sum(1).mean())


@pytest.mark.parametrize("ridge", [0.0, 0.1, 1.0])
def test_each_neuron_reduces_the_bottleneck_as_documented(ridge):
    b, v = _samples()
    s, n = b.T @ b / len(b), b.T @ v / len(b)
    white = shrunk_whitening(s, ridge, has_ones=True) if ridge else whitening(s)
    neurons = best_neurons(s, n, None, white)
    assert neurons.count == v.shape[1]
    pre = b @ neurons.alpha  # (samples, K)
    q = (pre**2).mean(0)
    if ridge == 0:
        torch.testing.assert_close(q, torch.ones_like(q))
    else:
        assert bool((q < 1).all())
    expected = neurons.lambdas**2 * (2 - q)
    for k in range(neurons.count):
        fit = pre[:, k : k + 1] * neurons.omega[:, k][None]
        assert _reduction(v, fit) == pytest.approx(float(expected[k]), rel=1e-9)
    assert _reduction(v, pre @ neurons.omega.T) == pytest.approx(float(expected.sum()), rel=1e-9)


def test_gradmax_units_start_at_a_thousandth_of_the_existing_ones():
    """GradMax's incoming weights: pre-activations of RMS 1e-3 of the site's existing units'."""
    import torch.nn.functional as F
    from torch import nn

    import growc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    config = growc.GrowthConfig(strategy="gradmax", stat_samples=512, folds=2, update_existing=False)
    grower = growc.Grower(model, F.cross_entropy, config)
    grower.measure([(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)])
    old_rms = float((grower.model.get_submodule("0")(x).detach() ** 2).mean().sqrt())
    (record,) = grower.grow(grower.candidates.sites[0].name, neurons=2)
    assert record.neurons == 2 and record.gamma == 1.0
    new = grower.model.get_submodule("0")(x)[:, 4:].detach()
    assert float((new**2).mean(0).sqrt().mean()) == pytest.approx(1e-3 * old_rms, rel=0.05)
