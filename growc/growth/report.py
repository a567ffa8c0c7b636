"""The machine-readable account of a growth run (report.json)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class SiteGrowthRecord:
    site: str
    neurons: int
    predicted_gain: float  # first-order decrease of the line-search loss predicted for the change
    observed_gain: float  # decrease actually measured on the line-search samples
    gamma: float  # amplitude of the new neurons (1 = typical existing neuron)
    update_fraction: float  # size of the best update applied to the consumers' weights
    significant: int  # neurons that passed the significance test


@dataclass
class StepRecord:
    step: int
    params: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None
    widths: dict[str, int]
    bottlenecks: dict[str, dict[str, float]]  # site -> bottleneck, relative, best lambda^2
    grown: list[SiteGrowthRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # train, statistics, solve, line_search
    params_after: int | None = None
    note: str = ""


@dataclass
class GrowthReport:
    config: dict
    steps: list[StepRecord] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    stop_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GrowthReport:
        steps = []
        for entry in data.get("steps", []):
            entry = dict(entry)
            entry["grown"] = [SiteGrowthRecord(**g) for g in entry.get("grown", [])]
            steps.append(StepRecord(**entry))
        return cls(
            config=data.get("config", {}),
            steps=steps,
            final=data.get("final", {}),
            stop_reason=data.get("stop_reason", ""),
        )

    def write(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a report."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, float):
        return None
    return str(value)
