"""Suite `time-to-accuracy`: how soon a growth run reaches a test accuracy, against a large network.

On MNIST, in one process and with the same seeds, data order, Adam learning rate, weight decay and
batch size:
- growc's run at its own defaults (`growc grow`'s) from a [1, 1] MLP, with a parameter budget
  (default 100,000), test accuracy measured after every training epoch and every growth step;
- a fixed [1000, 1000] MLP trained from scratch with a cosine decay over `--large-epochs`, test
  accuracy measured every quarter of an epoch.

Reported: the wall time at which each first reaches `--target` (default 97.5%) and their ratio.
The time spent measuring test accuracy for this suite is left out of both clocks (the growth run's
own validation, which growc does at every step, stays in).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    MNIST_FILE,
    Table,
    data_file,
    fmt,
    log,
    machine,
    machine_line,
    median,
    mlp,
    parse_widths,
    write_outputs,
)
from benchmarks.growth_runs import add_weight_decay_argument
from growc import GrowthConfig, grow
from growc.data import as_loader, mnist
from growc.growth.observer import Observer
from growc.growth.report import StepRecord
from growc.growth.train import evaluate, make_optimizer, split_batch

EVAL_BATCH = 1000


class _Clock:
    """Wall time since construction, less the time `accuracy` spent (the suite's own evaluations)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.excluded = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def accuracy(self, model: nn.Module, loader, device: torch.device) -> float:
        began = time.perf_counter()
        _, accuracy = evaluate(model, loader, nn.functional.cross_entropy, device)
        self.excluded += time.perf_counter() - began
        return float(accuracy)


class _Curve(Observer):
    """Test accuracy against wall time, after every epoch and every growth step."""

    def __init__(self, model: nn.Module, loader, device: torch.device, clock: _Clock) -> None:
        self.model, self.loader, self.device, self.clock = model, loader, device, clock
        self.points: list[dict[str, Any]] = []

    def _point(self, where: str) -> None:
        seconds = self.clock.now()
        accuracy = self.clock.accuracy(self.model, self.loader, self.device)
        params = sum(p.numel() for p in self.model.parameters())
        self.points.append({"seconds": seconds, "accuracy": accuracy, "params": params, "at": where})

    def epoch_end(self, step: int, epoch: int, train_loss: float) -> None:
        self._point(f"step {step} epoch {epoch + 1}")

    def step_end(self, record: StepRecord) -> None:
        self._point(f"after step {record.step}")
        log(f"  grown step {record.step}: {record.params_after:,} params, test acc {self.points[-1]['accuracy']:.4f}")


def _first_time(points: list[dict[str, Any]], target: float) -> float | None:
    return next((p["seconds"] for p in points if p["accuracy"] >= target), None)


def grown_run(train, val, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    device = torch.device(args.device)
    config = GrowthConfig(
        max_params=args.max_params,
        weight_decay=args.weight_decay,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=seed,
        device=args.device,
    )
    torch.manual_seed(seed)
    model = mlp([1, 1])
    train_loader = as_loader(train, config.batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, EVAL_BATCH, shuffle=False, seed=0)
    clock = _Clock()
    curve = _Curve(model, val_loader, device, clock)
    result = grow(model, train_loader, val_loader, nn.functional.cross_entropy, config, curve)
    return {
        "method": "grown (growc defaults)",
        "seed": seed,
        "points": curve.points,
        "seconds_to_target": _first_time(curve.points, args.target),
        "seconds": clock.now(),
        "accuracy": result.report.final["final_val_accuracy"],
        "params": result.report.final["final_params"],
        "widths": list(result.report.final["widths"].values()),
    }


def large_run(train, val, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = mlp(args.large_widths).to(device)
    loader = as_loader(train, args.batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, EVAL_BATCH, shuffle=False, seed=0)
    optimizer = make_optimizer("adam", model.parameters(), args.lr, args.weight_decay)
    batches = len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.large_epochs * batches)
    every = max(1, batches // 4)
    clock = _Clock()
    points: list[dict[str, Any]] = []
    done = 0
    for epoch in range(args.large_epochs):
        model.train()
        for batch in loader:
            inputs, target = split_batch(batch, device)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(*inputs), target).backward()
            optimizer.step()
            scheduler.step()
            done += 1
            if done % every == 0 or done == args.large_epochs * batches:
                seconds = clock.now()
                accuracy = clock.accuracy(model, val_loader, device)
                points.append({"seconds": seconds, "accuracy": accuracy, "epochs": done / batches})
                model.train()
        log(f"  large epoch {epoch + 1}: test acc {points[-1]['accuracy']:.4f}, {clock.now():.1f} s")
    return {
        "method": f"fixed {args.large_widths}",
        "seed": seed,
        "points": points,
        "seconds_to_target": _first_time(points, args.target),
        "seconds": clock.now(),
        "accuracy": points[-1]["accuracy"],
        "params": sum(p.numel() for p in model.parameters()),
        "widths": list(args.large_widths),
    }


def _plot(runs: list[dict[str, Any]], target: float) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run in runs:
            xs = [p["seconds"] for p in run["points"]]
            ys = [100 * p["accuracy"] for p in run["points"]]
            ax.plot(xs, ys, marker=".", label=f"{run['method']}, seed {run['seed']}")
        ax.axhline(100 * target, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(90, 100)
        ax.set_xlabel("wall time (s), test evaluations excluded")
        ax.set_ylabel("MNIST test accuracy (%)")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


def run(args: argparse.Namespace) -> int:
    seeds = args.seeds or 1
    train, val = mnist(path=str(data_file(args.data_dir, MNIST_FILE)))
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        # Alternate the order, so that neither method always runs on a warmer (or busier) machine.
        order = (large_run, grown_run) if seed % 2 == 0 else (grown_run, large_run)
        for method in order:
            log(f"seed {seed}: {method.__name__}")
            runs.append(method(train, val, args, seed))
            log(f"  -> {runs[-1]['seconds_to_target']} s to {args.target:.1%}, final {runs[-1]['accuracy']:.4f}")
    grown = [r for r in runs if r["method"].startswith("grown")]
    large = [r for r in runs if not r["method"].startswith("grown")]
    ratios = [
        g["seconds_to_target"] / lg["seconds_to_target"]
        for g, lg in zip(grown, large)
        if g["seconds_to_target"] is not None and lg["seconds_to_target"] is not None
    ]
    table = Table(["method", "params", f"seconds to {args.target:.1%}", "final test acc (%)", "run (s)"])
    for group in (grown, large):
        table.add(
            group[0]["method"],
            f"{median([r['params'] for r in group]):,.0f}",
            fmt(median([r["seconds_to_target"] for r in group]), 1),
            fmt(100 * median([r["accuracy"] for r in group])),
            fmt(median([r["seconds"] for r in group]), 0),
        )
    info = machine(args.device)
    reached = all(g["seconds_to_target"] is not None for g in grown)
    verdict = (
        f"grown / large time to {args.target:.1%}: {fmt(median(ratios))} (median of {len(ratios)}; target <= 1)"
        if ratios
        else f"a run did not reach {args.target:.1%}" + ("" if reached else " (the grown run)")
    )
    markdown = "\n\n".join(
        [
            "## Time to a test accuracy: growth run against a large fixed MLP (MNIST)",
            f"Machine: {machine_line(info)}. Median over {seeds} seed(s). growc defaults, max params "
            f"{args.max_params:,}; [1000, 1000]: {args.large_epochs} epochs, cosine; Adam lr {args.lr}, "
            f"weight decay {args.weight_decay:g}, batch {args.batch_size}.",
            table.markdown(),
            verdict + ".",
        ]
    )
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    payload = {"settings": settings, "machine": info, "ratios": ratios, "runs": runs}
    write_outputs(args.out, "time-to-accuracy", markdown, payload, _plot(runs, args.target))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=float, default=0.975, help="test accuracy to reach (default 0.975)")
    parser.add_argument("--max-params", type=int, default=100_000, help="growth parameter budget (default 100,000)")
    parser.add_argument("--large-widths", type=parse_widths, default=[1000, 1000])
    parser.add_argument("--large-epochs", type=int, default=3, help="epochs of the large MLP (cosine over them)")
    parser.add_argument("--lr", type=float, default=GrowthConfig.lr, help="Adam learning rate, both")
    parser.add_argument("--batch-size", type=int, default=GrowthConfig.batch_size)
    add_weight_decay_argument(parser)
