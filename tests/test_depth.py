"""New residual blocks on edges: exact at insertion, predicted by the same first-order theory,
chosen by the growth loop when the numbers say so."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from growc.graph.depth import DepthGrowth, DepthSite, find_depth_edges
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import assess_sites, new_units
from growc.tiny.site_solution import neurons_raw_gain


def _data(n=1500, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, (torch.sin(2 * x[:, :3]).sum(1) > 0).long() + 2 * (x[:, 3] * x[:, 4] > 0)


def test_depth_edges_and_exact_insertion():
    torch.manual_seed(0)
    gm = trace(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double())
    edges = find_depth_edges(gm)
    assert [e.consumer for e in edges] == ["2"]  # the raw input edge carries no gradient
    x, y = _data()
    before = gm(x).detach()
    site = DepthSite(name="depth:2", consumer="2", conv=False, activation="Tanh", slope_at_zero=1.0)
    block = DepthGrowth(
        gm,
        site,
        torch.randn(3, 5, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
        torch.randn(5, 3, dtype=torch.float64),
    )
    block.set_amplitude(0.0)
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    assert any(n.target is operator.add for n in gm.graph.nodes)
    block.set_amplitude(0.3)
    assert not torch.allclose(gm(x), before)
    block.undo()
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    assert not any(n.target is operator.add for n in gm.graph.nodes)


def _first_order_ratio(model, x, y, site) -> float:
    gm = trace(model)
    collector = StatisticsCollector(gm, [site])
    with collector:
        F.cross_entropy(gm(x), y).backward()
        collector.accumulate(len(y))
    (a,) = assess_sites(gm, [site], collector.accumulators, GrowthConfig())
    neurons = a.solution.neurons.take(3)
    units, scale = new_units(a, neurons, x.dtype)
    predicted = site.slope_at_zero * scale * float(neurons_raw_gain(a.moments, neurons.alpha, neurons.omega).sum())
    with torch.no_grad():
        base = float(F.cross_entropy(gm(x), y))
        block = DepthGrowth(gm, site, units.rows, units.bias, units.omega)
        gamma = 1e-3
        block.set_amplitude(gamma)
        observed = (base - float(F.cross_entropy(gm(x), y))) / gamma**2
    return observed / predicted


def test_depth_first_order_gain_matches_for_vectors_and_feature_maps():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = _data()
    site = DepthSite(name="depth:2", consumer="2", conv=False, activation="Tanh", slope_at_zero=1.0)
    assert abs(_first_order_ratio(mlp, x, y, site) - 1) < 0.1

    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(72, 4)
    ).double()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(400, 1, 6, 6, generator=g, dtype=torch.float64)
    labels = (images[:, 0, 1:4, 1:4].sum((1, 2)) > 0).long() + 2 * (images[:, 0, 3:, 3:].mean((1, 2)) > 0)
    site = DepthSite(name="depth:2", consumer="2", conv=True, activation="Tanh", slope_at_zero=1.0)
    assert abs(_first_order_ratio(cnn, images, labels, site) - 1) < 0.1
