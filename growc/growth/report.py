"""The machine-readable account of a growth run (report.json)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SiteGrowthRecord:
    site: str
    neurons: int
    predicted_gain: float  # first-order decrease of the line-search loss predicted for the change
    observed_gain: float  # decrease actually measured on the line-search samples
    gamma: float  # amplitude of the new neurons (1 = typical existing neuron)
    update_fraction: float  # size of the best update applied to the consumers' weights
    significant: int  # neurons that passed the significance test
    reason: str | None = None  # why fewer neurons were added than passed the test (None: as many)


@dataclass
class StepRecord:
    step: int
    params: int
    train_loss: float  # mean over the last training epoch (step 0: over the measured samples)
    val_loss: float
    val_accuracy: float | None
    widths: dict[str, int]
    bottlenecks: dict[str, dict[str, float]]  # site -> bottleneck, relative, best lambda^2, the test's numbers
    grown: list[SiteGrowthRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # train, statistics, solve, line_search
    params_after: int | None = None
    note: str = ""
    epochs: float = 0  # training epochs before this step's measurement (0: the model as it came)


#: `GrowthReport.status` of a run whose final training has not completed: it is in progress, or
#: it was stopped (Ctrl-C, SIGTERM, SIGKILL) and report.json holds the steps completed before.
RUNNING = "running"
FINISHED = "finished"


@dataclass
class GrowthReport:
    config: dict
    steps: list[StepRecord] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    stop_reason: str = ""
    status: str = RUNNING

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
            # Reports written before the status existed were written once, at the end.
            status=data.get("status", FINISHED if data.get("final") else RUNNING),
        )

    def to_json(self) -> str:
        """Strict JSON: a NaN or infinite number (a diverged loss, an undefined gain) is null."""
        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False, default=str)

    def write(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a report."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
