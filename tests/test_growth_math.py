"""The method on real modules: exact function preservation, first-order predictions that match
the observed loss change, and TINY neurons that beat random ones."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growc.data import digits
from growc.graph.candidates import find_width_sites
from growc.graph.handlers import handler_for
from growc.graph.rewrite import NewUnits, SiteGrowth, carry_optimizer_state
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import LineSearchBatch, StepContext, assess_sites, capped_neurons, grow_site, new_units
from growc.tiny.site_solution import neurons_raw_gain, solve_site
from growc.tiny.strategies import make_strategy


def _mlp(act: nn.Module, seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4), act, nn.Linear(4, 3), act, nn.Linear(3, 5)).to(dtype)


def _data(seed: int = 0, n: int = 2000, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = (x[:, :5] * x[:, 3:]).argmax(1)  # needs more than a linear read-out
    return x, y


def _grow(model, site, alpha, omega) -> SiteGrowth:
    """Add neurons given in the solver's layout: alpha (in + 1 for the bias, K), omega (out, K)."""
    units = NewUnits(rows=alpha[:-1].T, bias=alpha[-1], omega=omega, omega_rows=[omega.shape[0]])
    return SiteGrowth(model, site, units)


def _collect(model, sites, x, y, folds=1):
    collector = StatisticsCollector(model, sites, folds=folds)
    with collector:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        collector.accumulate(x.shape[0])
    return collector


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_growth_with_amplitude_zero_leaves_outputs_unchanged():
    model = _mlp(nn.ReLU(), dtype=torch.float32)
    x, _ = _data(dtype=torch.float32)
    graph = trace(model)
    before = model(x).detach()
    for site in find_width_sites(graph).sites:
        width = site.width(model)
        alpha = torch.randn(site.modules(model)[0].in_features + 1, 3)
        omega = torch.randn(sum(c.out_features for c in site.modules(model)[1]), 3)
        growth = _grow(model, site, alpha, omega)
        growth.set_amplitude(0.0)
        assert site.width(model) == width + 3
        # Equal up to float32 rounding (the wider matmul may sum in another order).
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(graph(x), before, rtol=1e-6, atol=1e-6)  # the graph is the same model
        growth.set_amplitude(0.5)
        assert not torch.allclose(model(x), before)
        growth.undo()
        assert site.width(model) == width
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # undo restores the very tensors


def test_best_update_first_order_gain_matches_the_loss_derivative():
    model = _mlp(nn.Tanh())
    x, y = _data()
    site = find_width_sites(trace(model)).sites[1]
    solution = solve_site(_collect(model, [site], x, y).accumulators[site.name].total())
    consumer = model.get_submodule(site.consumers[0])
    handler = handler_for(consumer)
    base = _loss(model, x, y)
    eps = 1e-6
    handler.add_to_weight_matrix(consumer, eps * solution.updates[0].delta)
    derivative = (_loss(model, x, y) - base) / eps
    assert abs(derivative / -solution.updates[0].first_order_gain - 1) < 1e-3


def test_new_neurons_first_order_gain_matches_the_observed_decrease():
    for seed, act in [(0, nn.Tanh()), (1, nn.Tanh()), (2, nn.SiLU())]:
        model = _mlp(act, seed)
        x, y = _data(seed)
        graph = trace(model)
        for site in find_width_sites(graph).sites:
            moments = _collect(model, [site], x, y).accumulators[site.name].total()
            neurons = solve_site(moments).neurons
            predicted = site.slope_at_zero * float(neurons_raw_gain(moments, neurons.alpha, neurons.omega).sum())
            base = _loss(model, x, y)
            growth = _grow(model, site, neurons.alpha, neurons.omega)
            gamma = 1e-3
            growth.set_amplitude(gamma)
            observed = (base - _loss(model, x, y)) / gamma**2
            growth.undo()
            assert abs(observed / predicted - 1) < 0.1, (seed, site.name, observed, predicted)


def test_tiny_neurons_lower_the_loss_more_than_random_ones():
    """In the real growth step (scaling and amplitude search included), on digits."""
    train, _ = digits()
    x, y = train.tensors
    config = GrowthConfig(update_existing=False)
    batch = LineSearchBatch([x], y, F.cross_entropy)
    wins, trials = 0, 0
    for seed in range(8):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(20):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        sites = find_width_sites(trace(model)).sites
        collector = _collect(model, sites, x, y, folds=4)
        for a in assess_sites(model, sites, collector.accumulators, config):
            gains = {}
            for name in ("tiny", "random"):
                draws = 1 if name == "tiny" else 3
                gains[name] = []
                for draw in range(draws):
                    trial = copy.deepcopy(model)
                    generator = torch.Generator().manual_seed(100 * seed + draw)
                    record, _ = grow_site(StepContext(trial, make_strategy(name), [], batch, config, generator), a, 2)
                    gains[name].append(record.observed_gain)
            for random_gain in gains["random"]:
                wins += gains["tiny"][0] > random_gain
                trials += 1
    assert wins >= 0.95 * trials, f"TINY beat random in {wins}/{trials}"


def test_optimizer_state_survives_growth():
    model = _mlp(nn.ReLU(), dtype=torch.float32)
    x, y = _data(dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    site = find_width_sites(trace(model)).sites[0]
    producer = model.get_submodule(site.producer)
    old_state = {k: v.clone() for k, v in optimizer.state[producer.weight].items()}
    growth = _grow(model, site, torch.randn(9, 2), torch.randn(3, 2))
    growth.set_amplitude(0.1)
    carry_optimizer_state([optimizer], growth.parameter_swaps)
    state = optimizer.state[producer.weight]
    assert state["exp_avg"].shape == producer.weight.shape
    torch.testing.assert_close(state["exp_avg"][:4], old_state["exp_avg"])
    assert (state["exp_avg"][4:] == 0).all()
    # Second moments of new entries start at the old mean (see carry_optimizer_state).
    torch.testing.assert_close(state["exp_avg_sq"][:4], old_state["exp_avg_sq"])
    assert torch.allclose(state["exp_avg_sq"][4:], old_state["exp_avg_sq"].mean().expand(2, 8))
    assert state["step"] == old_state["step"]
    assert any(p is producer.weight for p in optimizer.param_groups[0]["params"])
    # Training continues on the grown parameters, and the user's state_dict sees the growth.
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert model.state_dict()[f"{site.producer}.weight"].shape == (6, 8)


def test_a_line_search_does_not_evaluate_what_it_already_knows():
    """Losses already measured (the model as it stands, at 0) are taken, not measured again; the
    rest are evaluated once each, and the best is chosen over both."""
    from growc.growth.amplitude import line_search

    asked = []

    def loss_at(value: float) -> float:
        asked.append(value)
        return (value - 0.3) ** 2

    best, loss, losses = line_search(loss_at, (0.0, 0.25, 0.5, 1.0), known={0.0: 0.05})
    assert asked == [0.25, 0.5, 1.0]
    assert best == 0.25 and loss == pytest.approx(0.0025) and losses[0.0] == 0.05
    best, loss, _ = line_search(loss_at, (0.0, 0.25), known={0.0: 0.0})
    assert best == 0.0 and loss == 0.0 and asked[-1] == 0.25


def test_the_line_search_loss_taken_in_chunks_is_the_whole_batch_loss():
    """Chunks of the loader's batch size (the last one shorter) give the loss of the whole batch,
    and leave the model in the mode it was in."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)
    )
    model.train()
    x, y = torch.randn(50, 3, 6, 6), torch.randint(0, 5, (50,))
    whole = LineSearchBatch([x], y, F.cross_entropy).loss(model)
    batches = [([x[i : i + 16]], y[i : i + 16]) for i in range(0, 50, 16)]
    chunked = LineSearchBatch.from_batches(batches, 50, F.cross_entropy)
    assert chunked.chunk == 16
    assert chunked.loss(model) == pytest.approx(whole, rel=1e-6)
    assert model.training


def test_new_rows_are_no_longer_than_the_existing_rows():
    """Where the signal lies in an input of small variance among large ones, a unit as large (in
    pre-activation) as the existing ones, which read the large inputs, needs weights several
    times theirs; capped, its rows are the RMS row norm, in the same direction, and the
    predicted gain follows the capped neuron."""
    torch.manual_seed(0)
    x = torch.randn(512, 6, dtype=torch.float64)
    x[:, 1:] *= 10.0  # the feature the target depends on, x[:, 0], at a tenth of the others' scale
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    sites = find_width_sites(trace(model)).sites
    collector = StatisticsCollector(model, sites[:1], folds=1)
    with collector:
        F.cross_entropy(model(x), y).backward()
        collector.accumulate(x.shape[0])
    (a,) = assess_sites(model, sites[:1], collector.accumulators, GrowthConfig())
    neurons = a.solution.neurons.take(1)
    rows_rms = float(model[0].weight.detach().pow(2).sum(1).mean().sqrt())
    uncapped = new_units(a, neurons, torch.float64)[0].rows
    assert float(uncapped.norm()) > 2 * rows_rms, "the case exercises the cap"
    capped = capped_neurons(a, neurons)
    units, scale = new_units(a, capped, torch.float64)
    assert float(units.rows.norm()) == pytest.approx(rows_rms, rel=1e-9)
    assert F.cosine_similarity(units.rows.flatten(), uncapped.flatten(), dim=0) == pytest.approx(1.0)
    predicted = a.site.slope_at_zero * scale * float(neurons_raw_gain(a.moments, capped.alpha, capped.omega).sum())
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
        growth = SiteGrowth(model, a.site, units)
        growth.set_amplitude(1e-3)
        observed = (base - float(F.cross_entropy(model(x), y))) / 1e-6
    assert abs(observed / predicted - 1) < 0.05, (observed, predicted)
