"""Plots of a growth run, written beside report.json (matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path

from growc.growth.report import GrowthReport


def write_plots(report: GrowthReport, out: str | Path) -> list[Path]:
    """growth.png: validation accuracy (or loss) against parameters, and losses against steps
    with the growth steps marked. Returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    steps = report.steps
    if not steps:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    params = [s.params for s in steps]
    if all(s.val_accuracy is not None for s in steps):
        left.plot(params, [100 * s.val_accuracy for s in steps], marker="o")
        left.set_ylabel("validation accuracy (%)")
    else:
        left.plot(params, [s.val_loss for s in steps], marker="o")
        left.set_ylabel("validation loss")
    left.set_xlabel("parameters")
    left.set_xscale("log")
    left.grid(alpha=0.3)
    index = [s.step for s in steps]
    right.plot(index, [s.train_loss for s in steps], label="train loss")
    right.plot(index, [s.val_loss for s in steps], label="validation loss")
    for s in steps:
        if any(g.neurons for g in s.grown):
            right.axvline(s.step, color="grey", alpha=0.25)
    right.set_xlabel("step (grey: growth happened after this step's training)")
    right.set_yscale("log")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle("growc run")
    fig.tight_layout()
    path = Path(out) / "growth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
