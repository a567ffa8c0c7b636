"""Growth under PyTorch's distributed engine: one process per device, each on its shard.

Under `torchrun` (or any initialized process group with more than one process) a growth run
trains with `DistributedDataParallel`, every rank on its own shard of the training data. What
the method needs to see the whole batch is gathered here:

- `shard_loader`: the training loader, dealt to the ranks. Rank r reads positions r, r + W, ...
  of the same shuffled order, so the union of the ranks' t-th batches is the t-th batch of size
  B x W of one process with the same seed (the order is drawn exactly as a shuffled DataLoader
  draws it).
- `all_reduce_statistics`: every site's float64 sums, row and sample counts, fold by fold, are
  summed over the ranks before the solver runs, so the neurons and the significance test see
  the statistics of all shards.
- `reduced_line_search_batch`: the amplitude search's loss is the mean over every rank's search
  samples, so each rank takes the same decisions.
- `sync_generator`, `broadcast_from_main`: random draws (the random strategy's) and decisions
  that depend on a clock (the time budget) come from rank 0.
- `Replicas`: the DDP wrapper around the traced graph, rebuilt whenever growth has replaced or
  added parameters (DDP does not tolerate a change of parameter shapes).

Validation is not sharded: every rank evaluates the whole validation set, so every rank sees the
same numbers. Without an initialized process group (or with one process) every function here
returns its input unchanged and the run is the single-process run.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from growc.errors import GrowcError
from growc.growth.step import LineSearchBatch
from growc.tiny.statistics import MomentAccumulator

# ---------------------------------------------------------------------------------------------
# The process group


def active() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """The process that writes files and prints (rank 0; the only one without a group)."""
    return rank() == 0


def environment_rank() -> int:
    """This process's rank as the launcher (torchrun) set it, before any group exists."""
    return int(os.environ.get("RANK", "0"))


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def join_from_environment(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1 in the environment) with no process group yet, start one
    (NCCL for a CUDA device, gloo otherwise), give each rank its GPU (cuda:LOCAL_RANK), and end
    the group when the process exits. Returns the device this process trains on (`device`
    itself outside torchrun or when the caller already started a group)."""
    if not _launched() or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise GrowcError("this torch build has no torch.distributed: run growc without torchrun")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise GrowcError("--device cuda was asked for but torch sees no GPU: use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    atexit.register(_end_group)
    return device


def _end_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must be for the group's backend (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(value: float) -> float:
    """The mean of a per-rank float (e.g. the training loss; ranks have equally many samples)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t[0]) / world_size()


def sync_generator(generator: torch.Generator) -> None:
    """Give `generator` rank 0's state, so that random draws are the same on every rank."""
    if not active():
        return
    state = generator.get_state()
    t = state.to(_comm_device())
    dist.broadcast(t, src=0)
    generator.set_state(t.cpu())


# ---------------------------------------------------------------------------------------------
# Sharded training data


class ShardSampler(Sampler[int]):
    """Rank `rank`'s share of one order of the data set: positions rank, rank + W, ... of it.

    Shuffled, the order is drawn from `generator` exactly as a shuffled DataLoader with that
    generator draws it (one permutation per epoch, and one more when an epoch ends, as
    RandomSampler does), so with the same generator state every world size reads the same
    order. Like DistributedSampler, the order is padded with its first indices to a multiple of
    the world size: every rank gets as many samples, hence as many batches (DDP needs it)."""

    def __init__(self, length: int, rank: int, world: int, shuffle: bool, generator: torch.Generator | None) -> None:
        if shuffle and generator is None:
            raise ValueError("a shuffled ShardSampler needs a generator shared by all ranks")
        self.length, self.rank, self.world = length, rank, world
        self.shuffle, self.generator = shuffle, generator

    def __len__(self) -> int:
        return math.ceil(self.length / self.world)

    def __iter__(self) -> Iterator[int]:
        n = self.length
        order = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else list(range(n))
        total = len(self) * self.world
        while len(order) < total:
            order += order[: total - len(order)]
        yield from order[self.rank : total : self.world]
        if self.shuffle:
            torch.randperm(n, generator=self.generator)  # RandomSampler's draw at exhaustion: stay in step


def shard_loader(loader: Iterable, seed: int) -> Iterable:
    """The training loader this rank reads: `loader` dealt to the ranks (see ShardSampler).

    A loader that already shards (a DistributedSampler or ShardSampler), or any iterable that is
    not a DataLoader, is taken as this rank's share as it is. Without a group: `loader`."""
    if not active() or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise GrowcError(
            "growc cannot shard an iterable data set or a custom batch sampler across processes: "
            "give each process its share (e.g. a DataLoader with a DistributedSampler)"
        )
    shuffle = isinstance(loader.sampler, RandomSampler)
    generator = None
    if shuffle:
        generator = torch.Generator()
        if isinstance(loader.generator, torch.Generator):
            generator.set_state(loader.generator.get_state())
        else:
            generator.manual_seed(seed)
        sync_generator(generator)  # one order for all ranks, whatever each was given
    sampler = ShardSampler(len(loader.dataset), rank(), world_size(), shuffle, generator)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=generator if shuffle else loader.generator,
        persistent_workers=loader.persistent_workers,
    )


# ---------------------------------------------------------------------------------------------
# DDP around a growing graph


class Replicas:
    """The module to train: `graph` itself without a group, else a DistributedDataParallel
    wrapper around it, rebuilt when growth has replaced or added parameters. Building one
    checks that every rank has the same parameter shapes and copies rank 0's values to all."""

    def __init__(self, graph: nn.Module) -> None:
        self.graph = graph
        self._ddp: DistributedDataParallel | None = None
        self._params: list[nn.Parameter] = []
        self.rebuilds = 0

    def module(self) -> nn.Module:
        if not active():
            return self.graph
        params = list(self.graph.parameters())
        fresh = len(params) == len(self._params) and all(a is b for a, b in zip(params, self._params))
        if self._ddp is None or not fresh:
            # The old wrapper's gradient hooks sit on parameters that the new one also holds:
            # it must be gone before the new one registers its own.
            self._ddp, self._params = None, []
            gc.collect()
            device = params[0].device if params else torch.device("cpu")
            ids = None
            if device.type == "cuda":
                ids = [device.index if device.index is not None else torch.cuda.current_device()]
            self._ddp = DistributedDataParallel(self.graph, device_ids=ids)
            self._params = params
            self.rebuilds += 1
        return self._ddp


# ---------------------------------------------------------------------------------------------
# What the growth step needs from all ranks


def all_reduce_statistics(accumulators: dict[str, MomentAccumulator]) -> None:
    """Sum every site's statistics over the ranks, fold by fold, in place: afterwards every
    rank holds the moments of all ranks' samples. Folds are dealt by each rank's batch index,
    so fold f is the union of the ranks' folds f. One object gather (the layout) and one
    all-reduce of a single float64 buffer."""
    if not active():
        return
    names = sorted(accumulators)
    layout = []
    for name in names:
        acc = accumulators[name]
        for index in range(acc.fold_count):
            rows, samples, sums = acc.fold_sums(index)
            layout.append((name, index, rows, samples, None if sums is None else [tuple(t.shape) for t in sums]))
    layouts: list[Any] = [None] * world_size()
    dist.all_gather_object(layouts, layout)
    if any([(e[0], e[1]) for e in other] != [(e[0], e[1]) for e in layout] for other in layouts):
        raise GrowcError("the ranks gathered statistics for different sites: their models differ")

    comm = _comm_device()
    home = next(
        (t.device for acc in accumulators.values() for i in range(acc.fold_count) for t in acc.fold_sums(i)[2] or []),
        comm,
    )
    plan, parts = [], []
    for position, (name, index, *_rest) in enumerate(layout):
        shapes = next((other[position][4] for other in layouts if other[position][4] is not None), None)
        for other in layouts:
            if other[position][4] is not None and other[position][4] != shapes:
                raise GrowcError(f"the ranks' statistics of site {name} differ in shape: their models differ")
        rows = sum(other[position][2] for other in layouts)
        samples = sum(other[position][3] for other in layouts)
        plan.append((name, index, rows, samples, shapes))
        if shapes is None:
            continue
        local = accumulators[name].fold_sums(index)[2]
        for k, shape in enumerate(shapes):
            if local is None:
                parts.append(torch.zeros(math.prod(shape), dtype=torch.float64, device=comm))
            else:
                parts.append(local[k].detach().to(device=comm, dtype=torch.float64).reshape(-1))
    buffer = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=comm)
    dist.all_reduce(buffer)
    offset = 0
    for name, index, rows, samples, shapes in plan:
        sums = None
        if shapes is not None:
            sums = []
            for shape in shapes:
                size = math.prod(shape)
                sums.append(buffer[offset : offset + size].reshape(shape).to(home).clone())
                offset += size
        accumulators[name].set_fold_sums(index, rows, samples, sums)


def before_growth_step(accumulators: dict[str, MomentAccumulator], generator: torch.Generator) -> float:
    """Everything a growth step needs to decide the same way on every rank: the statistics of
    all shards, and rank 0's random state for the strategy's draws. Returns the seconds spent
    (0 without a group)."""
    if not active():
        return 0.0
    start = time.perf_counter()
    all_reduce_statistics(accumulators)
    sync_generator(generator)
    return time.perf_counter() - start


class ReducedLineSearchBatch(LineSearchBatch):
    """A line-search batch whose loss is the mean over every rank's search samples."""

    def loss(self, model: nn.Module) -> float:
        local = super().loss(model)
        count = self.target.shape[0]
        t = torch.tensor([local * count, count], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t[0] / t[1])


def reduced_line_search_batch(batch: LineSearchBatch) -> LineSearchBatch:
    """`batch` (this rank's search samples) with its loss averaged over all ranks' samples."""
    if not active():
        return batch
    return ReducedLineSearchBatch(batch.inputs, batch.target, batch.loss_fn, batch.chunk)
