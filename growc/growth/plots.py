"""Plots of a growth run, written beside report.json (matplotlib, when installed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from growc.growth.report import FINISHED, GrowthReport, StepRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

#: `gid` of the artists that mark the final training (after the last growth step).
FINAL_TRAINING = "final-training"


def write_plots(report: GrowthReport, out: str | Path) -> list[Path]:
    """growth.png: validation accuracy (or loss) against parameters, and losses against steps
    with the growth steps and the final training marked. Returns the files written (none
    without matplotlib, or without a step)."""
    try:
        figure = growth_figure(report)
    except ImportError:
        return []
    if figure is None:
        return []
    path = Path(out) / "growth.png"
    figure.savefig(path, dpi=110)
    return [path]


def growth_figure(report: GrowthReport) -> Figure | None:
    """The figure of growth.png (None for a report without steps); raises ImportError without
    matplotlib. Built on a bare Figure: no pyplot state, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = report.steps
    if not steps:
        return None
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    final = _final_step(report)
    _accuracy_panel(left, steps, final)
    _loss_panel(right, steps, final, _final_epochs(report))
    figure.suptitle("growc run")
    figure.tight_layout()
    return figure


def _final_step(report: GrowthReport) -> StepRecord | None:
    """The record of the final training: a finished run's last one."""
    return report.steps[-1] if report.status == FINISHED and report.final else None


def _final_epochs(report: GrowthReport) -> int | None:
    epochs = report.config.get("final_epochs")
    return epochs if epochs is not None else report.config.get("epochs")


def _accuracy_panel(ax: Axes, steps: list[StepRecord], final: StepRecord | None) -> None:
    params = [s.params for s in steps]
    if all(s.val_accuracy is not None for s in steps):
        values = [100 * s.val_accuracy for s in steps]
        ax.set_ylabel("validation accuracy (%)")
    else:
        values = [s.val_loss for s in steps]
        ax.set_ylabel("validation loss")
    ax.plot(params, values, marker="o")
    if final is not None:
        # The final training adds no parameter: its point sits on the last growth step's.
        ax.plot(
            params[-1],
            values[-1],
            marker="*",
            markersize=14,
            color="C3",
            linestyle="none",
            label="after the final training",
            gid=FINAL_TRAINING,
        )
        ax.legend(loc="lower right")
    ax.margins(x=0.05, y=0.08)  # room for the star on the last point
    ax.set_xlabel("parameters")
    ax.set_xscale("log")
    _sparse_log_ticks(ax.xaxis, min(params), max(params))
    ax.grid(alpha=0.3)


def _loss_panel(ax: Axes, steps: list[StepRecord], final: StepRecord | None, final_epochs: int | None) -> None:
    index = [s.step for s in steps]
    train = [s.train_loss for s in steps]
    val = [s.val_loss for s in steps]
    ax.plot(index, train, label="train loss")
    ax.plot(index, val, label="validation loss")
    for s in steps:
        if any(g.neurons for g in s.grown):
            ax.axvline(s.step, color="grey", alpha=0.25)
    if final is not None:
        # A point is the loss at the end of its step's training: the final training runs from
        # the previous point (the last growth) to the last one.
        start = final.step - 1 if len(steps) > 1 else final.step - 0.5
        what = f"final training ({final_epochs} epochs)" if final_epochs is not None else "final training"
        ax.axvspan(start, final.step, color="C2", alpha=0.15, label=what, gid=FINAL_TRAINING)
    ax.set_xlabel("step (grey: growth happened after this step's training)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    finite = [v for v in train + val if v is not None and math.isfinite(v) and v > 0]
    if finite:
        _sparse_log_ticks(ax.yaxis, min(finite), max(finite))
    ax.legend()
    ax.grid(alpha=0.3)


def _sparse_log_ticks(axis: Axis, low: float, high: float) -> None:
    """A few short labels on a log axis (200, 500, 1k, 2k, ...) and none on the minor ticks,
    whose default labels (2x10^2, 3x10^2, ...) run into each other over a short range."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    if decades <= 0.7:  # less than a decade: every mantissa, else a single label at best
        subs: tuple[float, ...] = tuple(float(m) for m in range(1, 10))
    elif decades <= 2:
        subs = (1.0, 2.0, 5.0)
    else:
        subs = (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda value, _: _short(value)))
    axis.set_minor_formatter(NullFormatter())


def _short(value: float) -> str:
    """1500 -> 1.5k, 2e6 -> 2M, 0.05 -> 0.05."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"
