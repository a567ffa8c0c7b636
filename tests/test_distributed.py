"""Growth under torch.distributed: two processes (gloo on 127.0.0.1, CPU) against one.

One spawn of two ranks does all the distributed work (statistics of a few batches, then a short
growth run of the digits MLP from [2, 2]); the single-process references run in this process.
With per-rank batch B and world size 2, rank r reads positions r, r + 2, ... of the same shuffled
order, so the union of the ranks' t-th batches is exactly the t-th batch of one process with batch
2B: the two runs see the same data in the same steps and differ only in the order of float sums.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from growc.data import as_loader, digits
from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth import distributed
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.loop import grow

WORLD = 2
GLOBAL_BATCH = 64  # one process's batch; each of the two ranks reads half of it
STAT_BATCHES = 6  # batches of the statistics check: folds 0 and 1 get two each, folds 2 and 3 one


class MLP(nn.Module):
    def __init__(self, hidden: tuple[int, int]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _moments(m) -> list[torch.Tensor]:
    out = [torch.tensor(float(m.n)), torch.tensor(m.rows_per_sample), m.s_prev]
    for k in m.consumers:
        out += [k.s, k.m, k.c, k.p, torch.tensor(k.g_sq)]
    return [t.clone() for t in out]


def statistics(rank: int, world: int) -> dict[str, list[list[torch.Tensor]]]:
    """Every site's total and per-fold moments after STAT_BATCHES batches of this rank's share
    (rows [t*64 + rank*b, t*64 + (rank+1)*b) of global batch t, b = 64 / world), summed over ranks."""
    torch.manual_seed(1)
    graph = trace(MLP((3, 4)))
    sites = find_width_sites(graph).sites
    x, y = digits()[0].tensors
    b = GLOBAL_BATCH // world
    trained = DistributedDataParallel(graph) if world > 1 else graph
    collector = StatisticsCollector(graph, sites, folds=4)
    with collector:
        for t in range(STAT_BATCHES):
            rows = slice(t * GLOBAL_BATCH + rank * b, t * GLOBAL_BATCH + (rank + 1) * b)
            loss = nn.functional.cross_entropy(trained(x[rows]), y[rows])
            loss.backward()
            collector.accumulate(b)
    distributed.all_reduce_statistics(collector.accumulators)
    return {
        name: [_moments(acc.total())] + [_moments(acc.fold(i)) for i in acc.usable_folds()]
        for name, acc in collector.accumulators.items()
    }


def growth_run(rank: int, world: int, out: Path) -> dict:
    """The digits MLP grown from [2, 2]: two growth steps, one epoch each, one final epoch."""
    torch.manual_seed(0)
    model = MLP((2, 2))
    train, val = digits()
    b = GLOBAL_BATCH // world
    # Line-search samples are per rank: 256 each on two ranks are the 512 of one process.
    config = GrowthConfig(steps=2, epochs=1, final_epochs=1, batch_size=b, seed=0, line_search_samples=512 // world)
    result = grow(
        model,
        as_loader(train, b, shuffle=True, seed=0),
        as_loader(val, 256, shuffle=False, seed=0),
        nn.functional.cross_entropy,
        config,
        checkpoint=out / f"checkpoint-rank{rank}.safetensors",
    )
    report = result.report
    return {
        "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "widths": report.final["widths"],
        "grown": [[(g.site, g.neurons, g.gamma, g.update_fraction) for g in s.grown] for s in report.steps],
        "significant": [{k: v["significant"] for k, v in s.bottlenecks.items()} for s in report.steps],
        "train_loss": [s.train_loss for s in report.steps],
        "val_loss": [s.val_loss for s in report.steps],
    }


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {"statistics": statistics(rank, WORLD), "run": growth_run(rank, WORLD, out)}
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    return {"statistics": statistics(0, 1), "run": growth_run(0, 1, out)}


def test_reduced_statistics_equal_one_process_on_the_combined_batch(ranks, single):
    results, _ = ranks
    reference = single["statistics"]
    for result in results:
        assert result["statistics"].keys() == reference.keys()
        for name, parts in reference.items():
            got = result["statistics"][name]
            assert len(got) == len(parts) == 5  # the total and four folds
            for mine, theirs in zip(got, parts):
                assert len(mine) == len(theirs)
                for a, b in zip(mine, theirs):
                    # per-batch products are float32 on either side: 2 x 32 rows vs 64 rows
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ranks_end_identical(ranks):
    (a, b), _ = ranks
    assert a["run"]["widths"] == b["run"]["widths"]
    assert a["run"]["grown"] == b["run"]["grown"]
    assert a["run"]["state"].keys() == b["run"]["state"].keys()
    for key, value in a["run"]["state"].items():
        assert torch.equal(value, b["run"]["state"][key]), key
    assert a["run"]["train_loss"] == b["run"]["train_loss"]


def test_growth_equals_one_process_on_the_same_data(ranks, single):
    (a, _), _ = ranks
    mine, theirs = a["run"], single["run"]
    # The same sites, neuron counts, amplitudes and update sizes at every step...
    assert mine["grown"] == theirs["grown"]
    assert mine["significant"] == theirs["significant"]
    assert mine["widths"] == theirs["widths"]
    assert sum(g[1] for step in mine["grown"] for g in step) > 0, "the run grew nothing: the check is empty"
    # ...and the same weights, up to the order of float sums (gradients, moments, losses).
    for key, value in theirs["state"].items():
        torch.testing.assert_close(mine["state"][key], value, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.tensor(mine["train_loss"]), torch.tensor(theirs["train_loss"]), rtol=1e-4, atol=0)


def test_only_rank_0_writes_the_checkpoint(ranks):
    _, out = ranks
    assert (out / "checkpoint-rank0.safetensors").is_file()
    assert not (out / "checkpoint-rank1.safetensors").exists()


def test_shards_read_one_process_order():
    """World size 1 reads what a shuffled DataLoader reads, epoch after epoch; two ranks' t-th
    batches together are its t-th batch of twice the size."""
    data = torch.utils.data.TensorDataset(torch.arange(103), torch.zeros(103))
    plain = as_loader(data, 8, shuffle=True, seed=3)
    expected = [[b[0].tolist() for b in plain] for _ in range(3)]

    def shard(rank: int, world: int, batch: int) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(3)
        sampler = distributed.ShardSampler(len(data), rank, world, True, generator)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler, generator=generator)
        return [[b[0].tolist() for b in loader] for _ in range(3)]

    assert shard(0, 1, 8) == expected
    r0, r1 = shard(0, 2, 4), shard(1, 2, 4)
    for epoch in range(3):
        assert len(r0[epoch]) == len(r1[epoch]) == 13  # 103 padded to 104: 52 each
        union = [sorted(a + b) for a, b in zip(r0[epoch], r1[epoch])]
        padded = [sorted(x) for x in expected[epoch]]
        assert union[:-1] == padded[:-1]
        assert set(union[-1]) == set(padded[-1]) | {expected[epoch][0][0]}  # padded with the first index


def test_without_a_process_group_nothing_changes():
    assert not distributed.active()
    loader = as_loader(digits()[0], 16, shuffle=True, seed=0)
    assert distributed.shard_loader(loader, 0) is loader
    graph = trace(MLP((2, 2)))
    assert distributed.Replicas(graph).module() is graph
    assert distributed.broadcast_from_main("x") == "x"
    assert distributed.mean_across_ranks(1.5) == 1.5
