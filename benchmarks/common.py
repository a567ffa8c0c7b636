"""Shared pieces of the benchmark suites: data files, timing, medians, and the three outputs
(a markdown table, a JSON file, a PNG plot) every suite writes."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"

MNIST_FILE = "mnist.npz"
CIFAR_FILE = "cifar10-40k-jpeg.npz"


class MissingData(Exception):
    """A data file the suite needs is not there; the message says which and how to point at it."""


def data_file(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise MissingData(
            f"data file not found: {path}\n"
            f"  this suite needs '{name}' (see ../shared/data/README.md); "
            f"give the folder that holds it with --data-dir DIR"
        )
    return path


def subset(data: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """The first `count` samples of a fixed random permutation (the same for every method and run
    seed), as a new TensorDataset; the whole set when `count` is None or not smaller."""
    if count is None or count >= len(data):
        return data
    if not isinstance(data, TensorDataset):
        raise TypeError("subset() expects a TensorDataset")
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    return TensorDataset(*(t[index] for t in data.tensors))


def sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """`with Stopwatch(device) as w: ...` then `w.seconds`; synchronizes CUDA at both ends."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds = math.nan

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def median(values: Sequence[float | None]) -> float | None:
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(clean) if clean else None


def mlp(widths: list[int], d_in: int = 784, d_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = d_in
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, d_out))
    return nn.Sequential(*layers)


def parse_widths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths are integers separated by commas, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"widths must be positive, got '{text}'")
    return values


def linear_macs(model: nn.Module) -> int:
    """Multiply-adds of one sample's forward pass through the model's Linear layers."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": device,
        "load_average_1_5_15min": list(os.getloadavg()),  # other users' load skews timings on a shared machine
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"CPU, {info['cpu_count']} cores, {info['torch_threads']} torch threads"
    return f"{where}; torch {info['torch']}, Python {info['python']}"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "| " + " | ".join("---" for _ in self.columns) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_outputs(
    out: Path,
    name: str,
    markdown: str,
    payload: dict[str, Any],
    plot: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write NAME.md, NAME.json and (with `plot`) NAME.png into `out`; print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md_path = out / f"{name}.md"
    md_path.write_text(markdown + "\n")
    written.append(md_path)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    written.append(json_path)
    if plot is not None:
        png_path = out / f"{name}.png"
        plot(png_path)
        written.append(png_path)
    print(markdown)
    print()
    for path in written:
        print(f"wrote {path}")
    return written


def log(message: str) -> None:
    """Progress on stderr, so that stdout carries only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
