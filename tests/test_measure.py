"""The measurement pass gathers the growth statistics at fixed weights: it counts the samples the
user's loader really gives, leaves the model exactly as it was (weights, gradients, BatchNorm
running statistics, train/eval flags), and its activation-only backward gives the same moments
as an ordinary backward pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.measure import measure

N, BATCH, STAT = 128, 16, 48


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _loaders() -> dict[str, object]:
    data = _data()
    return {
        "batch_size": DataLoader(data, batch_size=BATCH),
        "batch_sampler": DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), BATCH, False)),
        "custom batch sampler": DataLoader(data, batch_sampler=[list(range(i, i + BATCH)) for i in range(0, N, BATCH)]),
        "list of batches": [data[i : i + BATCH] for i in range(0, N, BATCH)],
    }


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("kind", list(_loaders()))
def test_measures_stat_samples_of_the_users_batches(kind):
    graph = trace(_model())
    collector = StatisticsCollector(graph, find_width_sites(graph).sites, folds=2, max_samples=STAT)
    seen: list[int] = []
    loss = measure(
        graph, collector, _loaders()[kind], F.cross_entropy, torch.device("cpu"), lambda x, t: seen.append(len(t))
    )
    assert collector.samples == STAT
    assert 0.0 < loss < 10.0  # the mean loss of the measured samples
    assert seen == [BATCH] * (STAT // BATCH)  # it stopped once full, without reading further


def test_the_model_is_left_exactly_as_it_was():
    graph = trace(_model())
    graph.get_submodule("3").eval()  # a user's frozen sub-layer keeps its flag
    before = {k: v.clone() for k, v in graph.state_dict().items()}
    collector = StatisticsCollector(graph, find_width_sites(graph).sites, folds=2, max_samples=STAT)
    measure(graph, collector, _loaders()["batch_size"], F.cross_entropy, torch.device("cpu"))
    after = graph.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name  # running means, variances and batch counts too
    assert all(p.grad is None for p in graph.parameters())
    assert graph.training and not graph.get_submodule("3").training
    assert collector.samples == STAT


def test_activation_gradients_give_the_moments_of_a_full_backward():
    graph = trace(_model())
    sites = find_width_sites(graph).sites
    measured = StatisticsCollector(graph, sites, folds=2, max_samples=STAT)
    measure(graph, measured, _loaders()["batch_size"], F.cross_entropy, torch.device("cpu"))

    reference = StatisticsCollector(graph, sites, folds=2, max_samples=STAT)
    state = {k: v.clone() for k, v in graph.state_dict().items()}
    with reference:
        for x, y in _loaders()["batch_size"]:
            graph.zero_grad()
            F.cross_entropy(graph(x), y).backward()
            reference.accumulate(len(y))
            if reference.full:
                break
    graph.load_state_dict(state)
    for site in sites:
        a, b = measured.accumulators[site.name].total(), reference.accumulators[site.name].total()
        torch.testing.assert_close(a.s_prev, b.s_prev)
        for ca, cb in zip(a.consumers, b.consumers):
            for ta, tb in ((ca.s, cb.s), (ca.m, cb.m), (ca.c, cb.c), (ca.p, cb.p)):
                torch.testing.assert_close(ta, tb)
