"""Time per training epoch and per growth step with 1 and 2 processes (gloo, CPU).

    python -m benchmarks.distributed [--repeat 4] [--steps 3] [--threads 1] [--hidden 8]

The digits MLP grown from [8, 8] (`--hidden`) on scikit-learn's digits tiled `--repeat` times, with the same
global batch (64) whatever the number of processes: one process reads batches of 64, two read 32
each. Every process is a fresh one started by torch.multiprocessing (a process group of gloo on
127.0.0.1 when there are two), with `--threads` torch threads each. Times come from the run's
report: an epoch is a growth step's training time divided by its epochs; a growth step is its
statistics (gathering and, with two processes, the all-reduce), solve and line-search time.
`measure(world)` returns the numbers for one world size, for whoever wants them in a suite.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

GLOBAL_BATCH = 64


class MLP(nn.Module):
    def __init__(self, hidden: tuple[int, int] = (8, 8)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _run(
    rank: int, world: int, port: int, repeat: int, steps: int, epochs: int, threads: int, hidden: int, out: Path
) -> None:
    from growc.data import as_loader, digits
    from growc.growth.config import GrowthConfig
    from growc.growth.loop import grow

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train, val = digits()
        train = TensorDataset(*(t.repeat(repeat, *[1] * (t.dim() - 1)) for t in train.tensors))
        batch = GLOBAL_BATCH // world
        # Batch, statistics and line-search samples are per process: divided by the world size,
        # the processes together do the work of one process.
        config = GrowthConfig(
            steps=steps,
            epochs=epochs,
            final_epochs=epochs,
            batch_size=batch,
            seed=0,
            stat_samples=4096 // world,
            line_search_samples=1024 // world,
        )
        torch.manual_seed(0)
        result = grow(
            MLP((hidden, hidden)),
            as_loader(train, batch, shuffle=True, seed=0),
            as_loader(val, 256, shuffle=False, seed=0),
            nn.functional.cross_entropy,
            config,
        )
        if rank == 0:
            records = result.report.steps
            epoch = [r.seconds["train"] / epochs for r in records]
            growth = [r.seconds["statistics"] + r.seconds["solve"] + r.seconds["line_search"] for r in records[:-1]]
            torch.save(
                {
                    "epoch": epoch,
                    "growth": growth,
                    "widths": result.report.final["widths"],
                    "accuracy": result.report.final["final_val_accuracy"],
                },
                out / "result.pt",
            )
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, repeat: int = 4, steps: int = 3, epochs: int = 1, threads: int = 1, hidden: int = 8) -> dict:
    """{'epoch': seconds per epoch (median), 'growth': seconds per growth step (median), ...}."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        mp.spawn(_run, args=(world, _free_port(), repeat, steps, epochs, threads, hidden, out), nprocs=world, join=True)
        result = torch.load(out / "result.pt")
    return {
        "processes": world,
        "epoch": statistics.median(result["epoch"]),
        "growth": statistics.median(result["growth"]) if result["growth"] else 0.0,
        "widths": result["widths"],
        "accuracy": result["accuracy"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=4, help="digits training set tiled this many times")
    parser.add_argument("--steps", type=int, default=3, help="growth steps")
    parser.add_argument("--epochs", type=int, default=1, help="epochs between growth steps (and after the last)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--hidden", type=int, default=8, help="starting width of both hidden layers")
    args = parser.parse_args(argv)
    rows = [measure(w, args.repeat, args.steps, args.epochs, args.threads, args.hidden) for w in (1, 2)]
    samples = 1438 * args.repeat
    print(
        f"digits x{args.repeat} ({samples} samples), MLP from [{args.hidden}, {args.hidden}], "
        f"global batch {GLOBAL_BATCH}, {args.threads} thread(s)/process"
    )
    print(f"{'processes':>9}  {'s / epoch':>9}  {'s / growth step':>15}  {'val acc':>7}  widths")
    for r in rows:
        print(f"{r['processes']:>9}  {r['epoch']:>9.3f}  {r['growth']:>15.3f}  {r['accuracy']:>7.2%}  {r['widths']}")


if __name__ == "__main__":
    main()
