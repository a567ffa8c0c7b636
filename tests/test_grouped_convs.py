"""Grouped convs (ResNeXt, RegNet): a grouped conv is its block-diagonal dense conv, each channel
group solves its own TINY problem, every group grows alike, and the first-order predictions
hold as for dense sites."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growc.graph.candidates import find_width_sites
from growc.graph.handlers import grouped_positions, handler_for
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import assess_sites, new_units
from growc.tiny.grouping import UnitGroups, grouped_best_neurons
from growc.tiny.site_solution import neurons_raw_gain
from growc.tiny.solver import best_neurons, neuron_fit_gain


def test_a_grouped_conv_is_its_block_diagonal_dense_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 3, padding=1, groups=3).double()
    handler = handler_for(conv)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w = handler.weight_matrix(conv)
    rows = handler.input_rows(conv, x) @ w[:, :-1].T + w[:, -1]
    torch.testing.assert_close(rows, handler.output_rows(conv, conv(x)))
    # Off the diagonal blocks it is zero, and an update there is ignored; on them it lands.
    assert (w[:3, 18:54] == 0).all() and (w[3:6, :18] == 0).all()
    delta = torch.randn_like(w)
    before = w.clone()
    handler.add_to_weight_matrix(conv, delta)
    mask = before != 0
    mask[:, -1] = True
    torch.testing.assert_close(handler.weight_matrix(conv), before + delta * mask)


def test_each_group_gets_its_own_best_neurons_and_keeps_to_them():
    """The neurons of a grouped producer and a grouped consumer: each unit reads only its group's
    inputs and feeds only its group's outputs, and neuron (level l, group i) is the l-th best
    neuron of group i's own problem, reducing the dense bottleneck by exactly lambda^2."""
    g = torch.Generator().manual_seed(0)
    groups, per_in, per_out = 3, 4, 2
    d, out = groups * per_in + 1, groups * per_out
    x = torch.randn(500, d, generator=g, dtype=torch.float64)
    x[:, -1] = 1.0
    s_prev = x.T @ x / 500
    n = torch.randn(d, out, generator=g, dtype=torch.float64)
    coords = tuple(
        torch.cat([torch.arange(i * per_in, (i + 1) * per_in), torch.tensor([d - 1])]) for i in range(groups)
    )
    outputs = tuple(torch.arange(i * per_out, (i + 1) * per_out) for i in range(groups))
    spec = UnitGroups(groups, coords, (outputs,), (None,))
    neurons = grouped_best_neurons(s_prev, n, spec, [out], max_neurons=6, whiten=lambda i: None)
    assert neurons.count == 6  # two levels of three groups
    for unit in range(neurons.count):
        group = unit % groups
        outside_in = torch.ones(d, dtype=torch.bool)
        outside_in[coords[group]] = False
        outside_out = torch.ones(out, dtype=torch.bool)
        outside_out[outputs[group]] = False
        assert (neurons.alpha[outside_in, unit] == 0).all() and (neurons.omega[outside_out, unit] == 0).all()
        own = best_neurons(s_prev[coords[group]][:, coords[group]], n[coords[group]][:, outputs[group]])
        torch.testing.assert_close(neurons.lambdas[unit], own.lambdas[unit // groups])
    gains = neuron_fit_gain(neurons.alpha, neurons.omega, s_prev, n)
    torch.testing.assert_close(gains, neurons.lambdas**2)


def test_new_units_go_at_the_end_of_each_group():
    assert grouped_positions(6, 3, 6).tolist() == [2, 6, 10, 3, 7, 11]
    with pytest.raises(ValueError, match="evenly"):
        grouped_positions(6, 3, 4)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(6, 3, 1),
        nn.Flatten(),
        nn.Linear(192, 4),
    ).double()


def _data(n=300):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    y = (x[:, 0, 2:5, 2:5].sum((1, 2)) * x[:, 1, 4:7, 1:4].sum((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0)
    return x, y


def _assessed(model, producer, x, y):
    site = next(s for s in find_width_sites(trace(model)).sites if s.producer == producer)
    collector = StatisticsCollector(model, [site], folds=1)
    with collector:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        collector.accumulate(x.shape[0])
    (a,) = assess_sites(model, [site], collector.accumulators, GrowthConfig())
    return a


@pytest.mark.parametrize("producer", ["0", "2"], ids=["grouped consumer", "grouped producer"])
def test_grouped_sites_first_order_gains_match_the_observed_decrease(producer):
    model = _model()
    x, y = _data()
    a = _assessed(model, producer, x, y)
    assert a.site.groups == 2 and a.groups is not None
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
    # The consumers' best update (block-diagonal for a grouped consumer).
    consumer = model.get_submodule(a.site.consumers[0])
    eps = 1e-6
    handler_for(consumer).add_to_weight_matrix(consumer, eps * a.solution.updates[0].delta)
    with torch.no_grad():
        derivative = (float(F.cross_entropy(model(x), y)) - base) / eps
    handler_for(consumer).add_to_weight_matrix(consumer, -eps * a.solution.updates[0].delta)
    expected = -a.solution.updates[0].first_order_gain * a.solution.rows_per_sample
    assert abs(derivative / expected - 1) < 1e-3
    # Two levels of new neurons: two per group.
    neurons = a.solution.neurons.take(4)
    units, scale = new_units(a, neurons, torch.float64)
    predicted = a.site.slope_at_zero * scale * float(neurons_raw_gain(a.moments, neurons.alpha, neurons.omega).sum())
    producer_module = model.get_submodule(producer)
    groups_before = producer_module.groups, consumer.groups
    with torch.no_grad():
        growth = SiteGrowth(model, a.site, units)
        assert (producer_module.groups, consumer.groups) == groups_before
        assert a.site.width(model) in (8, 10)  # 4 + 2 per group, or 6 + 2 per group
        growth.set_amplitude(1e-3)
        observed = (base - float(F.cross_entropy(model(x), y))) / 1e-3**2
        assert abs(observed / predicted - 1) < 0.1, (observed, predicted)
        growth.undo()
        torch.testing.assert_close(float(F.cross_entropy(model(x), y)), base, rtol=0, atol=0)


def test_units_in_two_groupings_are_refused_with_the_reason():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4))
    report = find_width_sites(trace(model))
    skipped = dict(report.skipped)
    assert "0" in skipped and "2 and 4 channel groups" in skipped["0"]


def test_optimizer_state_follows_every_group_and_comes_back_on_undo():
    """A grouped producer grows one unit per group: its BatchNorm's and its weight's Adam moments
    keep their channels, now spread over the groups, the dense reader's columns move with their
    channels, and undoing restores the state exactly."""
    from growc.graph.rewrite import carry_optimizer_state, uncarry_optimizer_state

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 3, 1),
    )
    x = torch.randn(5, 2, 6, 6)
    site = next(s for s in find_width_sites(trace(model)).sites if s.producer == "2")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).square().mean().backward()
    optimizer.step()
    reader, norm = model[5], model[3]
    reader_moments = optimizer.state[reader.weight]["exp_avg"].clone()  # (3, 6, 1, 1): groups [0:3], [3:6]
    norm_moments = optimizer.state[norm.weight]["exp_avg"].clone()
    units = NewUnits(rows=torch.randn(2, 36), bias=None, omega=torch.randn(3, 2), omega_rows=[3])
    growth = SiteGrowth(model, site, units)
    growth.set_amplitude(1.0)
    carry_optimizer_state([optimizer], growth.parameter_swaps)
    assert model[2].weight.shape == (8, 2, 3, 3) and model[2].groups == 2 and reader.weight.shape[1] == 8
    old = torch.tensor([0, 1, 2, 4, 5, 6])  # each group's new channel at its end: positions 3 and 7
    torch.testing.assert_close(optimizer.state[reader.weight]["exp_avg"][:, old], reader_moments)
    torch.testing.assert_close(optimizer.state[norm.weight]["exp_avg"][old], norm_moments)
    assert not optimizer.state[norm.weight]["exp_avg"][[3, 7]].any()
    torch.testing.assert_close(reader.weight[:, [3, 7], 0, 0], units.omega)  # unit 0 in group 0, unit 1 in group 1
    # Each new output reads its own group's inputs: unit 1 (group 1) takes rows' channels 2-3.
    torch.testing.assert_close(model[2].weight[7], units.rows[1].reshape(4, 3, 3)[2:])
    uncarry_optimizer_state([optimizer], growth.parameter_swaps)
    growth.undo()
    assert model[2].weight.shape == (6, 2, 3, 3) and reader.weight.shape[1] == 6
    torch.testing.assert_close(optimizer.state[reader.weight]["exp_avg"], reader_moments)


def test_the_significance_count_is_whole_levels():
    """Neurons of a grouped site are counted a level (one per group) at a time: a clear
    bottleneck in one group's outputs gives a count that is a multiple of the groups."""
    from growc.tiny.significance import significant_neuron_count

    model = _model()
    x, y = _data(600)
    site = next(s for s in find_width_sites(trace(model)).sites if s.producer == "0")
    collector = StatisticsCollector(model, [site], folds=4)
    with collector:
        for i in range(0, 600, 100):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            collector.accumulate(100)
    a = assess_sites(model, [site], collector.accumulators, GrowthConfig())[0]
    result = significant_neuron_count(collector.accumulators[site.name], 6, 2.0, a.mode, None, a.groups)
    assert result.significant > 0 and result.significant % 2 == 0
    assert a.significant % 2 == 0 and a.solution.neurons.count % 2 == 0
