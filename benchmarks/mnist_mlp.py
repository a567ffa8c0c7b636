"""Suite `mnist-mlp`: the paper's MNIST experiment.

An MLP 784 -> [h1, h2] -> 10 (ReLU) grown from [1, 1] hidden neurons by `growc.grow` with the
strategy `tiny`, the same with `random` and with `gradmax` (same settings, data order and seeds);
then two fixed baselines trained from scratch with Adam and a cosine decay: the final
architecture of the tiny run trained for the tiny run's total number of epochs, and a large
[1000, 1000] MLP (by default for the same number of epochs; --large-epochs to shorten it on a CPU).
Test accuracy is on MNIST's 10,000 test images (growc's mnist loader uses them as the
validation set: only the validation stop reads them, and no recorded run stopped on it; see
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks.common import (
    MNIST_FILE,
    Stopwatch,
    Table,
    data_file,
    fmt,
    linear_macs,
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
from benchmarks.growth_runs import (
    Progress,
    add_weight_decay_argument,
    condensed,
    growth_config,
    interpolate,
    summaries,
)
from growc import GrowthConfig, grow
from growc.data import as_loader, mnist
from growc.growth.train import evaluate, make_optimizer, train_epoch

STRATEGIES = ("tiny", "random", "gradmax")
#: Parameter counts at which the growth curves are compared (interpolated in log-parameters).
LEVELS = (2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000)
TARGET_ACCURACY = 0.98
TARGET_PARAMS = 100_000
TARGET_GAP = 0.003


def _config(args: argparse.Namespace, strategy: str, seed: int) -> GrowthConfig:
    return growth_config(
        args,
        strategy=strategy,
        seed=seed,
        max_params=args.max_params or None,
        patience=args.patience,
        significance_z=args.significance_z,
    )


def run_growth(
    strategy: str, train: Dataset, val: Dataset, args: argparse.Namespace, seed: int
) -> tuple[dict[str, Any], nn.Module]:
    torch.manual_seed(seed)
    model = mlp(args.start_widths)
    config = _config(args, strategy, seed)
    train_loader = as_loader(train, args.batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, 1000, shuffle=False, seed=0)
    with Stopwatch(args.device) as watch:
        result = grow(model, train_loader, val_loader, nn.functional.cross_entropy, config, Progress(strategy))
    report = result.report
    steps = report.steps
    epochs = sum(s.epochs for s in steps)  # step 0 measures before any training
    growth_points = [(s.params, s.val_accuracy) for s in steps[:-1]]
    growth_seconds = {
        k: sum(s.seconds.get(k, 0.0) for s in steps) for k in ("train", "statistics", "solve", "line_search")
    }
    return (
        {
            "method": f"grown ({strategy})",
            "strategy": strategy,
            "seed": seed,
            "accuracy": report.final["final_val_accuracy"],
            "params": parameter_count(model),
            "macs": linear_macs(model),
            "widths": [model[i].out_features for i in range(0, len(model) - 1, 2)],
            "epochs": epochs,
            "growth_steps": len(steps) - 1,
            "seconds": watch.seconds,
            "seconds_by_part": growth_seconds,
            "stop_reason": report.stop_reason,
            "curve": growth_points,
            "steps": [condensed(s) for s in steps],
        },
        model,
    )


def train_fixed(
    label: str, widths: list[int], epochs: int, train: Dataset, val: Dataset, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """A fixed MLP from scratch: Adam at the same learning rate, cosine decay to 0 over all epochs."""
    torch.manual_seed(seed)
    model = mlp(widths).to(args.device)
    device = torch.device(args.device)
    train_loader = as_loader(train, args.batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, 1000, shuffle=False, seed=0)
    optimizer = make_optimizer("adam", model.parameters(), args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * len(train_loader)))
    history = []
    with Stopwatch(args.device) as watch:
        for epoch in range(epochs):
            loss = train_epoch(model, train_loader, nn.functional.cross_entropy, optimizer, device, None, scheduler)
            if args.eval_every_epoch or epoch == epochs - 1:
                _, accuracy = evaluate(model, val_loader, nn.functional.cross_entropy, device)
                history.append({"epoch": epoch + 1, "train_loss": loss, "val_accuracy": accuracy})
                log(f"  {label} epoch {epoch + 1}/{epochs}: train loss {loss:.4f}, test acc {accuracy:.4f}")
    return {
        "method": label,
        "seed": seed,
        "accuracy": history[-1]["val_accuracy"] if history else None,
        "params": parameter_count(model),
        "macs": linear_macs(model),
        "widths": list(widths),
        "epochs": epochs,
        "seconds": watch.seconds,
        "history": history,
    }


def _equal_params(runs: list[dict[str, Any]], strategies: list[str]) -> dict[int, dict[str, float | None]]:
    table: dict[int, dict[str, float | None]] = {}
    for level in LEVELS:
        row = {}
        for strategy in strategies:
            values = [interpolate(r["curve"], level) for r in runs if r.get("strategy") == strategy]
            row[strategy] = median(values) if values and all(v is not None for v in values) else None
        if any(v is not None for v in row.values()):
            table[level] = row
    return table


def _targets(summary: dict[str, dict[str, Any]], equal: dict[int, dict[str, float | None]]) -> list[str]:
    lines = []
    tiny, large = summary.get("grown (tiny)"), summary.get("large fixed")
    if tiny:
        acc, params = tiny["accuracy"], tiny["params"]
        ok = acc is not None and acc >= TARGET_ACCURACY and params <= TARGET_PARAMS
        lines.append(
            f"- grown (tiny) >= {TARGET_ACCURACY:.1%} with <= {TARGET_PARAMS:,} params: "
            f"{fmt(acc * 100 if acc is not None else None)}% with {fmt(int(params))} params -> {'met' if ok else 'not met'}"
        )
    if tiny and large and tiny["accuracy"] is not None and large["accuracy"] is not None:
        gap = large["accuracy"] - tiny["accuracy"]
        lines.append(
            f"- within {TARGET_GAP * 100:.1f} points of [1000, 1000] ({large['epochs']:.0f} epochs): "
            f"gap {gap * 100:+.2f} points -> {'met' if gap <= TARGET_GAP else 'not met'}"
        )
    wins = [
        (level, row) for level, row in equal.items() if row.get("tiny") is not None and row.get("random") is not None
    ]
    if wins:
        beats = sum(1 for _, row in wins if row["tiny"] > row["random"])
        lines.append(
            f"- tiny beats random at equal parameter counts (growth curves): at {beats} of {len(wins)} "
            f"compared levels -> {'met' if beats == len(wins) else 'not met'}"
        )
    return lines


def _plot(runs: list[dict[str, Any]], strategies: list[str]) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = {"tiny": "tab:blue", "random": "tab:orange", "gradmax": "tab:green"}
        for strategy in strategies:
            labelled = False
            for r in runs:
                if r.get("strategy") != strategy:
                    continue
                xs = [p for p, a in r["curve"] if a is not None]
                ys = [a * 100 for p, a in r["curve"] if a is not None]
                color = colors.get(strategy)
                ax.plot(xs, ys, marker=".", color=color, alpha=0.8, label=None if labelled else f"{strategy} growth")
                ax.scatter([r["params"]], [r["accuracy"] * 100], marker="*", s=120, color=color, zorder=3)
                labelled = True
        for method, marker, color in (("retrained (tiny widths)", "s", "tab:purple"), ("large fixed", "D", "black")):
            group = [r for r in runs if r["method"] == method and r["accuracy"] is not None]
            if group:
                ax.scatter(
                    [r["params"] for r in group],
                    [r["accuracy"] * 100 for r in group],
                    marker=marker,
                    color=color,
                    label=method,
                    zorder=3,
                )
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=max(10.0, ax.get_ylim()[0]))
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("MNIST MLP grown from [1, 1]: accuracy vs parameters (star: after final training)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.steps = args.steps if args.steps is not None else 8
        args.final_epochs = args.final_epochs if args.final_epochs is not None else 2
        args.train_samples = args.train_samples if args.train_samples is not None else 10_000
        args.large_epochs = args.large_epochs if args.large_epochs is not None else 1
    else:
        args.steps = args.steps if args.steps is not None else GrowthConfig.steps
        args.final_epochs = args.final_epochs if args.final_epochs is not None else GrowthConfig.final_epochs
    seeds = args.seeds or 1
    path = data_file(args.data_dir, MNIST_FILE)
    train, val = mnist(path=str(path))
    train = subset(train, args.train_samples)
    strategies = list(args.strategies)
    log(f"mnist-mlp: {len(train)} training samples, {len(val)} test samples, seeds {seeds}, strategies {strategies}")

    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        tiny_run = None
        for strategy in strategies:
            log(f"seed {seed}: growing from {args.start_widths} with strategy {strategy}")
            result, _ = run_growth(strategy, train, val, args, seed)
            runs.append(result)
            log(
                f"  -> {result['widths']}, {result['params']:,} params, test acc {result['accuracy']:.4f}, "
                f"{result['epochs']} epochs, {result['seconds']:.0f}s ({result['stop_reason']})"
            )
            if strategy == "tiny":
                tiny_run = result
        # Whole epochs: a growth run's total ends in a fraction when it grows every part of an epoch.
        budget = math.ceil(tiny_run["epochs"] if tiny_run else args.steps * args.epochs + args.final_epochs)
        if tiny_run and not args.skip_retrain:
            log(f"seed {seed}: retraining {tiny_run['widths']} from scratch for {budget} epochs")
            runs.append(train_fixed("retrained (tiny widths)", tiny_run["widths"], budget, train, val, args, seed))
        if not args.skip_large:
            large_epochs = args.large_epochs if args.large_epochs is not None else budget
            log(f"seed {seed}: training the fixed {args.large_widths} MLP for {large_epochs} epochs")
            runs.append(train_fixed("large fixed", args.large_widths, large_epochs, train, val, args, seed))

    summary = summaries(runs)
    equal = _equal_params(runs, strategies)
    info = machine(args.device)

    table = Table(["method", "widths", "test acc (%)", "params", "FLOPs (MACs/sample)", "epochs", "wall time (s)"])
    for method, s in summary.items():
        widths = s["widths"][0] if len(s["widths"]) == 1 else " / ".join(str(w) for w in s["widths"])
        table.add(
            method,
            str(widths),
            s["accuracy"] * 100 if s["accuracy"] is not None else None,
            int(s["params"]),
            int(s["macs"]),
            int(s["epochs"]),
            fmt(s["seconds"], 0),
        )
    equal_table = Table(
        ["params", *[f"{s} (%)" for s in strategies]]
        + (["tiny - random"] if {"tiny", "random"} <= set(strategies) else [])
    )
    for level, row in equal.items():
        cells: list[Any] = [level, *[row[s] * 100 if row[s] is not None else None for s in strategies]]
        if {"tiny", "random"} <= set(strategies):
            diff = None if row["tiny"] is None or row["random"] is None else (row["tiny"] - row["random"]) * 100
            cells.append(fmt(diff, 2) if diff is None else f"{diff:+.2f}")
        equal_table.add(*cells)

    mode = f"quick ({len(train)} training samples)" if args.quick else f"full ({len(train)} training samples)"
    markdown = "\n".join(
        [
            "## MNIST MLP grown from [1, 1] (TINY vs random vs GradMax)",
            "",
            f"Machine: {machine_line(info)}. Mode: {mode}. Median over {seeds} seed(s). Growth: up to {args.steps} steps, "
            f"{args.epochs} epoch(s) between steps, {args.final_epochs} final epochs, Adam lr {args.lr}, batch {args.batch_size}"
            + (f", max params {args.max_params:,}" if args.max_params else "")
            + f", patience {args.patience}, significance z {args.significance_z}"
            + ". Fixed baselines: Adam, same lr, cosine decay over their epochs.",
            "",
            table.markdown(),
            "",
            "Accuracy at equal parameter counts, from the growth curves (test accuracy after each step's "
            f"{args.epochs} epoch(s) of training, interpolated in log-parameters; '-' outside a run's range):",
            "",
            equal_table.markdown() if equal_table.rows else "(no overlapping parameter range)",
            "",
            "Targets (reported, not tuned for):",
            *_targets(summary, equal),
        ]
    )
    payload = {
        "suite": "mnist-mlp",
        "quick": args.quick,
        "machine": info,
        "settings": {
            "seeds": seeds,
            "train_samples": len(train),
            "test_samples": len(val),
            "start_widths": args.start_widths,
            "steps": args.steps,
            "epochs": args.epochs,
            "final_epochs": args.final_epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_params": args.max_params,
            "large_widths": args.large_widths,
            "large_epochs": args.large_epochs,
            "growth_config": _config(args, "tiny", 0).as_dict(),
        },
        "summary": summary,
        "equal_params": {str(k): v for k, v in equal.items()},
        "runs": runs,
    }
    name = "mnist-mlp-quick" if args.quick else "mnist-mlp"
    write_outputs(args.out, name, markdown, payload, _plot(runs, strategies))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--start-widths", type=parse_widths, default=[1, 1], help="hidden widths to grow from")
    # Defaults: growc's own (`growc grow`'s), and the issue's budget of 100,000 parameters.
    parser.add_argument(
        "--steps", type=int, default=None, help=f"most growth steps (default {GrowthConfig.steps}; quick 8)"
    )
    parser.add_argument(
        "--epochs", type=float, default=GrowthConfig.epochs, help="training epochs between growth steps"
    )
    parser.add_argument(
        "--final-epochs",
        type=int,
        default=None,
        help=f"after the last step (default {GrowthConfig.final_epochs}; quick 2)",
    )
    parser.add_argument("--lr", type=float, default=GrowthConfig.lr, help="Adam learning rate, all methods")
    add_weight_decay_argument(parser)
    parser.add_argument("--batch-size", type=int, default=GrowthConfig.batch_size)
    parser.add_argument(
        "--max-params",
        type=int,
        default=TARGET_PARAMS,
        help=f"growth parameter budget (default {TARGET_PARAMS:,}; 0: none)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=GrowthConfig.patience,
        help=f"stop after this many steps in a row with no significant gain (default {GrowthConfig.patience})",
    )
    parser.add_argument(
        "--significance-z",
        type=float,
        default=GrowthConfig.significance_z,
        help=f"z of growc's significance test (default {GrowthConfig.significance_z})",
    )
    parser.add_argument(
        "--train-samples", type=int, default=None, help="training subset size (default all 60,000; quick 10,000)"
    )
    parser.add_argument("--large-widths", type=parse_widths, default=[1000, 1000])
    parser.add_argument(
        "--large-epochs",
        type=int,
        default=None,
        help="epochs of the large fixed MLP (default: the tiny run's total epochs; quick 1)",
    )
    parser.add_argument("--skip-large", action="store_true", help="leave out the large fixed MLP")
    parser.add_argument("--skip-retrain", action="store_true", help="leave out retraining the tiny widths")
    parser.add_argument("--eval-every-epoch", action="store_true", help="fixed baselines: test accuracy every epoch")
