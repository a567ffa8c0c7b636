"""Suite `overhead`: what one growth step costs, in units of one plain training epoch.

For each model: the wall time of one plain training epoch (growc's own training loop, no hooks),
then, from the same initial weights and data order, the same epoch followed by one `grow` run
with `steps=1` (its step 0 measures the model as given, with no training of its own), whose report splits the growth step into `statistics`
(the measurement pass: forward and backward of `stat_samples` samples at fixed weights, turned
into moments), `solve` (every site's TINY solution and significance test) and `line_search`
(applying the chosen neurons with their amplitude search). The headline number
is (statistics + solve + line_search) / epoch; the target is <= 0.5.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks.common import (
    CIFAR_FILE,
    MNIST_FILE,
    Stopwatch,
    Table,
    data_file,
    log,
    machine,
    machine_line,
    median,
    mlp,
    parameter_count,
    parse_widths,
    subset,
    write_outputs,
)
from growc import GrowthConfig, grow
from growc.data import as_loader, cifar10, mnist
from growc.growth.train import make_optimizer, train_epoch

TARGET = 0.5
PARTS = ("statistics", "solve", "line_search")


def small_cnn(widths: list[int]) -> nn.Sequential:
    """conv-BN-ReLU-pool, conv-BN-ReLU-pool, conv-ReLU, global average pool, linear."""
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(3, a, 3, padding=1),
        nn.BatchNorm2d(a),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1),
        nn.BatchNorm2d(b),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(b, c, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, 10),
    )


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[], nn.Module]
    train: Dataset
    val: Dataset


def _warm_up(model: nn.Module, train: Dataset, batch_size: int, device: str, batches: int = 10) -> None:
    """A few training batches on a throwaway copy: one-time kernel and allocator set-up is not
    charged to whichever measurement happens to come first."""
    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = as_loader(train, batch_size, shuffle=True, seed=12345)
    for index, (x, y) in enumerate(loader):
        if index >= batches:
            break
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()


def _plain_epoch(model: nn.Module, train: Dataset, args: argparse.Namespace, seed: int) -> float:
    loader = as_loader(train, args.batch_size, shuffle=True, seed=seed)
    model.to(args.device)
    optimizer = make_optimizer("adam", model.parameters(), args.lr, 0.0)
    with Stopwatch(args.device) as watch:
        train_epoch(model, loader, nn.functional.cross_entropy, optimizer, torch.device(args.device))
    return watch.seconds


def _growth_step(model: nn.Module, case: Case, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    config = GrowthConfig(
        steps=1,
        epochs=1,
        final_epochs=0,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        device=args.device,
    )
    train = as_loader(case.train, args.batch_size, shuffle=True, seed=seed)
    val = as_loader(case.val, 1000, shuffle=False, seed=0)
    # A growth step on a trained network, as in a run: one plain epoch first (not timed here;
    # step 0 of `grow` then measures the model as it is).
    _plain_epoch(model, case.train, args, seed)
    params_before = parameter_count(model)
    with Stopwatch(args.device) as watch:
        result = grow(model, train, val, nn.functional.cross_entropy, config)
    step = result.report.steps[0]
    return {
        "seconds": dict(step.seconds),
        "grow_wall_s": watch.seconds,
        "params_before": params_before,
        "params_after": step.params_after,
        "grown": {g.site: g.neurons for g in step.grown},
        "significant": {name: b.get("significant") for name, b in step.bottlenecks.items()},
    }


def measure(case: Case, args: argparse.Namespace, seeds: int) -> dict[str, Any]:
    log(f"overhead/{case.name}: {case.description}, {len(case.train)} training samples, {seeds} repeats")
    _warm_up(case.build(), case.train, args.batch_size, args.device)
    repeats = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        initial = case.build()
        order = ("plain", "grow") if seed % 2 == 0 else ("grow", "plain")  # cancel slow drifts in load
        row: dict[str, Any] = {"seed": seed}
        for what in order:
            if what == "plain":
                row["epoch_s"] = _plain_epoch(copy.deepcopy(initial), case.train, args, seed)
            else:
                row.update(_growth_step(copy.deepcopy(initial), case, args, seed))
        epoch = row["epoch_s"]
        seconds = row["seconds"]
        row["ratios"] = {part: seconds[part] / epoch for part in PARTS}
        row["ratios"]["total"] = sum(seconds[part] for part in PARTS) / epoch
        repeats.append(row)
        log(
            f"  seed {seed}: epoch {epoch:.2f}s, statistics {seconds['statistics']:.2f}s, "
            f"solve {seconds['solve']:.2f}s, line search {seconds['line_search']:.2f}s -> "
            f"ratio {row['ratios']['total']:.2f} (grown {row['grown']})"
        )
    return {
        "case": case.name,
        "description": case.description,
        "params": parameter_count(case.build()),
        "train_samples": len(case.train),
        "repeats": repeats,
        "median": {
            "epoch_s": median([r["epoch_s"] for r in repeats]),
            **{f"{part}_s": median([r["seconds"][part] for r in repeats]) for part in PARTS},
            **{f"ratio_{key}": median([r["ratios"][key] for r in repeats]) for key in (*PARTS, "total")},
        },
    }


def _cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    train_limit = {"mlp": 10_000 if args.quick else None, "cnn": 4_000 if args.quick else None}
    if "mlp" in args.models:
        path = data_file(args.data_dir, MNIST_FILE)
        train, val = mnist(path=str(path))
        mlp_widths = list(args.mlp_widths)  # own name: the lambda must not see the CNN's widths
        cases.append(
            Case(
                name="mnist-mlp",
                description=f"MNIST MLP 784-{'-'.join(map(str, mlp_widths))}-10",
                build=lambda: mlp(mlp_widths),
                train=subset(train, train_limit["mlp"]),
                val=subset(val, 1000),
            )
        )
    if "cnn" in args.models:
        path = data_file(args.data_dir, CIFAR_FILE)
        log("decoding the CIFAR-10 JPEGs (a few seconds)")
        train, val = cifar10(path=str(path))
        cnn_widths = list(args.cnn_widths)
        if len(cnn_widths) != 3:
            raise SystemExit(f"--cnn-widths takes three channel counts, got {len(cnn_widths)}")
        cases.append(
            Case(
                name="cifar-cnn",
                description=f"CIFAR-10 CNN conv {'-'.join(map(str, cnn_widths))} (BN) + linear",
                build=lambda: small_cnn(cnn_widths),
                train=subset(train, train_limit["cnn"]),
                val=subset(val, 1000),
            )
        )
    return cases


def _table(results: list[dict[str, Any]]) -> Table:
    table = Table(
        [
            "model",
            "params",
            "train samples",
            "epoch (s)",
            "statistics (s)",
            "solve (s)",
            "line search (s)",
            "stat/epoch",
            "solve/epoch",
            "LS/epoch",
            "(stat+solve+LS)/epoch",
            f"<= {TARGET}",
        ]
    )
    for r in results:
        m = r["median"]
        table.add(
            r["description"],
            r["params"],
            r["train_samples"],
            m["epoch_s"],
            m["statistics_s"],
            m["solve_s"],
            m["line_search_s"],
            m["ratio_statistics"],
            m["ratio_solve"],
            m["ratio_line_search"],
            m["ratio_total"],
            m["ratio_total"] is not None and m["ratio_total"] <= TARGET,
        )
    return table


def _plot(results: list[dict[str, Any]]) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [r["description"] for r in results]
        bottom = [0.0] * len(results)
        for part, label in zip(PARTS, ("statistics", "solve", "line search")):
            values = [r["median"][f"ratio_{part}"] or 0.0 for r in results]
            ax.bar(names, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET}")
        ax.set_ylabel("growth step cost / training epoch")
        ax.set_title("Growth overhead per step (median over repeats)")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


def run(args: argparse.Namespace) -> int:
    seeds = args.seeds or (2 if args.quick else 3)
    cases = _cases(args)
    results = [measure(case, args, seeds) for case in cases]
    info = machine(args.device)
    table = _table(results)
    mode = "quick (data subsets: the fixed-size statistics and line search weigh more)" if args.quick else "full data"
    markdown = "\n".join(
        [
            "## Growth overhead per step, relative to one training epoch",
            "",
            f"Machine: {machine_line(info)}. Mode: {mode}. Median of {seeds} repeats; "
            f"batch {args.batch_size}, Adam lr {args.lr}, growc defaults otherwise "
            f"(stat_samples {GrowthConfig.stat_samples}, line_search_samples {GrowthConfig.line_search_samples}).",
            "",
            table.markdown(),
            "",
            "statistics = the measurement pass (forward and backward of stat_samples samples at fixed "
            "weights, and their moments); solve = TINY solutions + significance tests of all sites; LS = "
            "applying the chosen neurons with the amplitude line search.",
        ]
    )
    payload = {
        "suite": "overhead",
        "quick": args.quick,
        "target": TARGET,
        "machine": info,
        "settings": {
            "seeds": seeds,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "mlp_widths": args.mlp_widths,
            "cnn_widths": args.cnn_widths,
            "growth_config": GrowthConfig(  # as run; the seed is each repeat's
                steps=1, epochs=1, final_epochs=0, batch_size=args.batch_size, lr=args.lr, device=args.device
            ).as_dict(),
        },
        "results": results,
    }
    name = "overhead-quick" if args.quick else "overhead"
    write_outputs(args.out, name, markdown, payload, _plot(results))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--mlp-widths", type=parse_widths, default=[64, 32], help="hidden widths of the MNIST MLP")
    parser.add_argument("--cnn-widths", type=parse_widths, default=[16, 32, 64], help="channels of the three convs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
