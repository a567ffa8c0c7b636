"""Model-agnostic pieces of the growth suites (mnist1d, cifar10-resnet): one growth run of any
model, a fixed model trained from scratch for a number of epochs or of seconds, re-initializing a
grown architecture, per-method summaries and the accuracy-vs-parameters plot."""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks.common import Stopwatch, fmt, log, median, parameter_count
from growc import GrowthConfig, grow
from growc.data import as_loader
from growc.graph.flops import multiply_adds
from growc.growth.observer import Observer
from growc.growth.report import StepRecord
from growc.growth.train import evaluate, make_optimizer, split_batch

GROWTH_PARTS = ("statistics", "solve", "line_search")
EVAL_BATCH = 1000


class Progress(Observer):
    """One log line per growth step."""

    def __init__(self, label: str) -> None:
        self.label = label

    def step_end(self, record: StepRecord) -> None:
        acc = record.val_accuracy if record.val_accuracy is not None else math.nan
        grown = ", ".join(f"{g.site}+{g.neurons}" for g in record.grown if g.neurons) or "none"
        log(f"  {self.label} step {record.step}: {record.params:,} params, test acc {acc:.4f}, grown {grown}")


def condensed(record: StepRecord) -> dict[str, Any]:
    return {
        "step": record.step,
        "params": record.params,
        "params_after": record.params_after,
        "val_accuracy": record.val_accuracy,
        "train_loss": record.train_loss,
        "widths": record.widths,
        "grown": {g.site: g.neurons for g in record.grown},
        "seconds": record.seconds,
        "note": record.note,
    }


def interpolate(curve: list[tuple[int, float]], params: float) -> float | None:
    """Accuracy of a growth curve at `params`, linear in log(params); None outside its range."""
    points = [(p, a) for p, a in curve if a is not None]
    if not points or params < points[0][0] or params > points[-1][0]:
        return None
    xs = np.log([p for p, _ in points])
    ys = np.array([a for _, a in points])
    # Several records can share a parameter count (a step that grew nothing): keep the last.
    keep = np.append(np.diff(xs) > 0, True)
    xs, ys = xs[keep], ys[keep]
    if len(xs) == 1:
        return float(ys[0])
    return float(np.interp(math.log(params), xs, ys))


def add_weight_decay_argument(parser: argparse.ArgumentParser) -> None:
    """--weight-decay, growc's default, for the growth runs and the fixed baselines alike."""
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=GrowthConfig.weight_decay,
        help=f"Adam L2 penalty, all methods (default {GrowthConfig.weight_decay:g}, growc's)",
    )


def growth_config(args: argparse.Namespace, **settings: Any) -> GrowthConfig:
    """A GrowthConfig from a suite's common options (steps, epochs, final epochs, batch size, lr,
    device) and the given settings."""
    return GrowthConfig(
        steps=args.steps,
        epochs=args.epochs,
        final_epochs=args.final_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        device=args.device,
        **settings,
    )


def example_input(data: Dataset) -> list[torch.Tensor]:
    *inputs, _ = data[0]
    return [x.unsqueeze(0) for x in inputs]


def macs_of(model: nn.Module, data: Dataset, device: str) -> int:
    return multiply_adds(model, [x.to(device) for x in example_input(data)])


def grow_run(
    label: str,
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    config: GrowthConfig,
    **extra: Any,
) -> tuple[dict[str, Any], nn.Module]:
    """`growc.grow` on `model` (grown in place); returns the run's record and the grown graph,
    which is the model to use afterwards (it also holds new residual blocks)."""
    train_loader = as_loader(train, config.batch_size, shuffle=True, seed=config.seed)
    val_loader = as_loader(val, EVAL_BATCH, shuffle=False, seed=0)
    with Stopwatch(config.device) as watch:
        result = grow(model, train_loader, val_loader, nn.functional.cross_entropy, config, Progress(label))
    report = result.report
    steps = report.steps
    seconds_by_part = {k: sum(s.seconds.get(k, 0.0) for s in steps) for k in ("train", *GROWTH_PARTS)}
    record = {
        "method": label,
        "strategy": config.strategy,
        "seed": config.seed,
        "accuracy": report.final["final_val_accuracy"],
        "params": report.final["final_params"],
        "macs": report.final["final_flops"],
        "initial_params": report.final["initial_params"],
        "widths": report.final["widths"],
        "initial_widths": report.final["initial_widths"],
        "epochs": sum(s.epochs for s in steps),  # step 0 measures before any training
        "growth_steps": len(steps) - 1,
        "seconds": watch.seconds,
        "seconds_by_part": seconds_by_part,
        # growth's own cost (statistics, solve, line search) per growth step, in training epochs
        "overhead_per_step_epochs": _overhead(steps),
        "stop_reason": report.stop_reason,
        "curve": [(s.params, s.val_accuracy) for s in steps[:-1]],
        "steps": [condensed(s) for s in steps],
        **extra,
    }
    log(
        f"  -> {label}: {record['params']:,} params, test acc {record['accuracy']:.4f}, {record['epochs']} epochs, "
        f"{record['seconds']:.0f}s ({record['stop_reason']})"
    )
    return record, result.model


def _overhead(steps: list) -> float | None:
    """Growth's own cost per growth step (statistics, solve, line search), in epochs of training
    of the same run (the mean epoch of its growth phase)."""
    growth_steps = steps[:-1]
    train = sum(s.seconds.get("train", 0.0) for s in growth_steps)
    epochs = sum(s.epochs for s in growth_steps)
    if not growth_steps or train <= 0 or epochs == 0:
        return None
    growth = sum(s.seconds.get(k, 0.0) for s in growth_steps for k in GROWTH_PARTS)
    return growth / len(growth_steps) / (train / epochs)


def from_scratch(model: nn.Module, seed: int) -> nn.Module:
    """A copy of `model` (any architecture, a grown graph included) with every layer's parameters
    and buffers re-initialized by its own `reset_parameters`: the same architecture, trained anew."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


class _CosineByTime:
    """Cosine decay of the learning rate to 0 over a wall-time budget (for 'same wall time')."""

    def __init__(self, optimizer: torch.optim.Optimizer, seconds: float, start: float) -> None:
        self.optimizer, self.seconds, self.start = optimizer, seconds, start
        self.base = [g["lr"] for g in optimizer.param_groups]

    def step(self) -> None:
        fraction = min(1.0, (time.perf_counter() - self.start) / self.seconds)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * fraction))


def train_fixed(
    label: str,
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    *,
    lr: float,
    batch_size: int,
    device: str,
    seed: int,
    epochs: float | None = None,
    seconds: float | None = None,
    weight_decay: float = GrowthConfig.weight_decay,
    **extra: Any,
) -> dict[str, Any]:
    """Train `model` from its current weights with Adam (the growth runs' weight decay) and a
    cosine decay to 0, either for `epochs` epochs or for `seconds` of wall time (checked after
    every batch)."""
    if (epochs is None) == (seconds is None):
        raise ValueError("give epochs or seconds")
    if epochs is not None:
        epochs = math.ceil(epochs)  # whole epochs: a growth run's total can end in a fraction
    model = model.to(device)
    dev = torch.device(device)
    loader = as_loader(train, batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, EVAL_BATCH, shuffle=False, seed=0)
    optimizer = make_optimizer("adam", model.parameters(), lr, weight_decay)
    batches_done, loss_sum, samples = 0, 0.0, 0
    with Stopwatch(device) as watch:
        start = time.perf_counter()
        if seconds is not None:
            scheduler: Any = _CosineByTime(optimizer, seconds, start)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * len(loader)))
        done = False
        epoch = 0
        while not done:
            model.train()
            for batch in loader:
                inputs, target = split_batch(batch, dev)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(*inputs), target)
                loss.backward()
                optimizer.step()
                scheduler.step()
                batches_done += 1
                loss_sum += float(loss.detach()) * target.shape[0]
                samples += target.shape[0]
                if seconds is not None and time.perf_counter() - start >= seconds:
                    done = True
                    break
            epoch += 1
            done = done or (epochs is not None and epoch >= epochs)
        _, accuracy = evaluate(model, val_loader, nn.functional.cross_entropy, dev)
    record = {
        "method": label,
        "seed": seed,
        "accuracy": accuracy,
        "params": parameter_count(model),
        "macs": macs_of(model, val, device),
        "epochs": batches_done / len(loader),
        "seconds": watch.seconds,
        "train_loss_mean": loss_sum / max(samples, 1),
        **extra,
    }
    log(
        f"  -> {label}: {record['params']:,} params, test acc {accuracy:.4f}, {record['epochs']:.1f} epochs, "
        f"{record['seconds']:.0f}s"
    )
    return record


def summaries(runs: Iterable[dict[str, Any]], key: str = "method") -> dict[str, dict[str, Any]]:
    """Medians over seeds, per method."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r[key], []).append(r)
    out = {}
    for name, group in groups.items():
        out[name] = {
            "seeds": len(group),
            "accuracy": median([r["accuracy"] for r in group]),
            "accuracy_all": [r["accuracy"] for r in group],
            "params": median([r["params"] for r in group]),
            "macs": median([r["macs"] for r in group]),
            "epochs": median([r["epochs"] for r in group]),
            "seconds": median([r["seconds"] for r in group]),
            "overhead_per_step_epochs": median([r.get("overhead_per_step_epochs") for r in group]),
            "widths": [r.get("widths") for r in group],
        }
    return out


def accuracy_cell(summary: dict[str, Any]) -> str:
    """'95.40' for one seed, '95.40 (95.1-95.9)' with the range over several."""
    acc = summary["accuracy"]
    if acc is None:
        return "-"
    values = [a for a in summary["accuracy_all"] if a is not None]
    if len(values) > 1:
        return f"{acc * 100:.2f} ({min(values) * 100:.1f}-{max(values) * 100:.1f})"
    return fmt(acc * 100)


def widths_cell(widths: list[Any]) -> str:
    """The widths of every seed's model, each distinct one once."""
    texts = []
    for w in widths:
        text = "[" + ", ".join(str(v) for v in (w.values() if isinstance(w, dict) else w)) + "]" if w else "-"
        if text not in texts:
            texts.append(text)
    return " / ".join(texts)


def equal_params(
    runs: list[dict[str, Any]], methods: list[str], levels: Iterable[int]
) -> dict[int, dict[str, float | None]]:
    """Median accuracy of each growth method's curves at each parameter level (None where a
    seed's curve does not reach it)."""
    table: dict[int, dict[str, float | None]] = {}
    for level in levels:
        row: dict[str, float | None] = {}
        for method in methods:
            values = [interpolate(r["curve"], level) for r in runs if r["method"] == method]
            row[method] = median(values) if values and all(v is not None for v in values) else None
        if any(v is not None for v in row.values()):
            table[level] = row
    return table


def accuracy_plot(
    panels: list[tuple[str, list[dict[str, Any]], dict[str, float]]],
) -> Callable[[Path], None]:
    """One figure, one panel per (title, runs, published accuracies): each growth run's curve
    (its final point as a star), fixed models as markers, published figures as dashed lines."""

    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        markers = iter("sDv^P<>ph" * 3)
        marker_of: dict[str, str] = {}
        colors: dict[str, Any] = {}
        palette = iter(plt.get_cmap("tab10").colors * 3)
        for ax, (title, runs, published) in zip(axes[0], panels):
            labelled: set[str] = set()
            for r in runs:
                color = colors.setdefault(r["method"], next(palette))
                label = None if r["method"] in labelled else r["method"]
                labelled.add(r["method"])
                if "curve" in r:
                    xs = [p for p, a in r["curve"] if a is not None]
                    ys = [a * 100 for p, a in r["curve"] if a is not None]
                    ax.plot(xs, ys, marker=".", color=color, alpha=0.8, label=label)
                    ax.scatter([r["params"]], [r["accuracy"] * 100], marker="*", s=120, color=color, zorder=3)
                else:
                    marker = marker_of.setdefault(r["method"], next(markers))
                    ax.scatter([r["params"]], [r["accuracy"] * 100], marker=marker, color=color, label=label, zorder=3)
            for name, acc in published.items():
                ax.axhline(acc * 100, linestyle="--", color="gray", linewidth=1, label=f"{name}, quoted")
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw
