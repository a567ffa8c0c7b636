"""The growth statistics come from the last `stat_samples` samples of an epoch, counted in the
batches the user's loader really gives (not in `GrowthConfig.batch_size`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.loop import Observer, _train_one_epoch, loader_batch_size, stat_window_start

N, BATCH, STAT = 128, 16, 32  # the loader's batches are 4x smaller than the config's default 64


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


def test_declared_batch_sizes():
    sizes = {name: loader_batch_size(loader) for name, loader in _loaders().items()}
    assert sizes == {"batch_size": BATCH, "batch_sampler": BATCH, "custom batch sampler": None, "list of batches": None}


def test_window_start():
    assert stat_window_start(batches=8, batch_size=16, stat_samples=32) == 6
    assert stat_window_start(batches=8, batch_size=16, stat_samples=40) == 5  # a partial batch counts whole
    assert stat_window_start(batches=8, batch_size=16, stat_samples=10_000) == 0
    assert stat_window_start(batches=0, batch_size=16, stat_samples=32) == 0  # unknown length: from the start


@pytest.mark.parametrize("kind", list(_loaders()))
def test_statistics_come_from_the_last_batches_of_the_users_loader(kind):
    loader = _loaders()[kind]
    torch.manual_seed(0)
    graph = trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    sites = find_width_sites(graph).sites
    config = GrowthConfig(stat_samples=STAT, folds=2)
    assert config.batch_size != BATCH
    collector = StatisticsCollector(graph, sites, config.folds, config.stat_samples, config.stat_rows_per_sample, 0)
    optimizer = torch.optim.SGD(graph.parameters(), lr=0.0)  # the weights stay put
    seen: list[int] = []
    real_accumulate = collector.accumulate

    def accumulate(size: int) -> None:  # the real collector, with a note of when it collected
        seen.append(collector.samples)
        real_accumulate(size)

    collector.accumulate = accumulate
    seconds = {"train": 0.0, "statistics": 0.0}
    _train_one_epoch(
        graph,
        loader,
        F.cross_entropy,
        optimizer,
        torch.device("cpu"),
        config,
        Observer(),
        0,
        0,
        1,
        collector,
        seconds,
        None,
    )
    assert collector.samples == STAT
    assert len(seen) == STAT // BATCH  # only the epoch's last batches were offered to it
