"""Under ReLU, each new neuron's sign is the one whose measured gain is larger."""

import torch
import torch.nn.functional as F
from torch import nn

from growc.data import digits
from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.kinks import choose_signs, signed_gains
from growc.growth.step import assess_sites


def test_sign_choice_keeps_the_better_half_of_the_linear_gain():
    train, _ = digits()
    x, y = train.tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 10))
    sites = find_width_sites(trace(model)).sites
    collector = StatisticsCollector(model, sites)
    with collector:
        F.cross_entropy(model(x), y).backward()
        collector.accumulate(len(y))
    for a in assess_sites(model, sites, collector.accumulators, GrowthConfig(ridge=0.0)):
        neurons = a.solution.neurons
        rows = [u.delta.shape[0] for u in a.solution.updates]
        gains = signed_gains(model, a.site, neurons, a.mode, a.input_mean, rows, [x], y, F.cross_entropy)
        # relu(z) - relu(-z) = z: the two signs' gains add up to the linear gain omega^T E[-g b'^T] alpha.
        linear = -((a.moments.consumers[0].p.T @ neurons.alpha) * neurons.omega).sum(0)
        torch.testing.assert_close(gains[:, 0] + gains[:, 1], linear, rtol=1e-4, atol=1e-9)
        chosen = choose_signs(gains, neurons)
        assert chosen.count == int((gains.max(1).values > 0).sum())
        # The kept sign has at least half of a positive linear gain.
        assert (gains.max(1).values >= linear / 2 - 1e-9).all()
