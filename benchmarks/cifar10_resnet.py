"""Suite `cifar10-resnet`: a small ResNet grown from 1/8 of its width, and from fewer blocks with
depth growth, against the full-width ResNet trained for the same wall time.

The ResNet: a 3x3 stem conv-BN-ReLU at `widths[0]` channels; per stage i a stack of `blocks[i]`
basic residual blocks (conv-BN-ReLU-conv-BN, identity shortcut, ReLU) at `widths[i]` channels,
with a stride-2 conv-BN-ReLU between stages; global average pooling; a linear classifier.
Default full model: widths 32-64-128, one block per stage.

Methods, same data, seed, batch size and Adam learning rate:
- grown (width): widths / 8, all blocks, `growc.grow` (depth off);
- grown (width + depth): widths / 8, `--depth-start-blocks` blocks per stage (default none), with
  `GrowthConfig(depth=True)`: growc may insert residual blocks `x + omega(act(alpha(x)))`;
- the grown architecture (the growth run's final model, re-initialized) trained from scratch
  for the growth run's number of epochs, Adam with a cosine decay (`--no-scratch`: left out);
- full width, same wall time as each growth run (its whole wall time, evaluations included):
  Adam with a cosine decay to 0 over that wall time, stopped when it is used up.
growc grows whatever sites it finds; the report lists them. Since coupled growth (commit 7abc1ff)
a residual stream is one site whose writers (stem or stage transition, and each block's second
conv) grow together; before it, only each block's inner conv could widen.

Data: the CIFAR-10 subset in ../shared/data (40,000 train, 10,000 test, JPEG; `growc.data.cifar10`),
no augmentation. The CPU configuration uses a training and a test subset to finish in under
30 minutes on 2 cores; `--device cuda` uses all of it with a configuration sized for about 5 minutes
on one H100/H200 (not measured here). Test images are growc's validation set: only the
validation stop reads them (see benchmarks/README.md: no recorded run stopped on it).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    CIFAR_FILE,
    Table,
    data_file,
    fmt,
    log,
    machine,
    machine_line,
    parse_widths,
    subset,
    write_outputs,
)
from benchmarks.growth_runs import accuracy_plot, add_weight_decay_argument, from_scratch, grow_run, train_fixed
from growc import GrowthConfig, candidates_of, trace
from growc.data import cifar10
from growc.graph.depth import find_depth_edges


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SmallResNet(nn.Module):
    def __init__(self, widths: list[int], blocks: list[int], classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, widths[0], 1)]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            if i > 0:
                layers.append(_conv_bn_relu(widths[i - 1], width, 2))
            layers += [BasicBlock(width) for _ in range(count)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: the whole suite (two growth runs, two full-width runs as long) under 30 minutes
    "cpu": {
        "train_samples": 10_000,
        "test_samples": 2_000,
        "steps": 10,
        "epochs": 1,
        "final_epochs": 3,
        "batch_size": 128,
        "time_budget": 180.0,
    },
    # one H100/H200: about 5 minutes in all (not measured: sized from the CPU run's proportions)
    "cuda": {
        "train_samples": None,
        "test_samples": None,
        "steps": 15,
        "epochs": 1,
        "final_epochs": 5,
        "batch_size": 256,
        "time_budget": 45.0,
    },
    "quick": {
        "train_samples": 1_000,
        "test_samples": 500,
        "steps": 2,
        "epochs": 1,
        "final_epochs": 1,
        "batch_size": 128,
        "time_budget": None,
    },
}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    preset = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    settings = dict(PRESETS[preset], preset=preset)
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def _what_grew(record: dict[str, Any]) -> dict[str, Any]:
    """Neurons added per site over the run, and the residual blocks growc inserted."""
    added: dict[str, int] = {}
    for step in record["steps"]:
        for site, neurons in step["grown"].items():
            if neurons:
                added[site] = added.get(site, 0) + neurons
    return {
        "neurons_added": added,
        "blocks_inserted": sorted(s for s in added if s.startswith("depth:")),
    }


def run(args: argparse.Namespace) -> int:
    s = _settings(args)
    path = data_file(args.data_dir, CIFAR_FILE)
    log("decoding CIFAR-10 JPEGs")
    train, val = cifar10(path=str(path))
    train, val = subset(train, s["train_samples"]), subset(val, s["test_samples"])
    full = list(args.widths)
    small = [max(1, w // args.width_divisor) for w in full]
    log(
        f"cifar10-resnet ({s['preset']}): {len(train)} train / {len(val)} test images, full widths {full}, "
        f"start {small}, blocks {args.blocks}"
    )
    seed = 0
    cases = [
        ("grown (width)", small, list(args.blocks), False),
        ("grown (width + depth)", small, list(args.depth_start_blocks), True),
    ]
    runs: list[dict[str, Any]] = []
    sites: dict[str, Any] = {}
    for label, widths, blocks, depth in cases:
        torch.manual_seed(seed)
        model = SmallResNet(widths, blocks)
        report = candidates_of(model)
        sites[label] = {
            "width_sites": [site.name for site in report.sites],
            "left_intact": [f"{name}: {why}" for name, why in report.skipped],
            "depth_edges": [d.name for d in find_depth_edges(trace(model))] if depth else [],
        }
        log(f"{label}: {len(report.sites)} width sites {sites[label]['width_sites']}")
        config = GrowthConfig(
            steps=s["steps"],
            epochs=s["epochs"],
            final_epochs=s["final_epochs"],
            batch_size=s["batch_size"],
            lr=args.lr,
            weight_decay=args.weight_decay,
            time_budget=s["time_budget"],
            depth=depth,
            seed=seed,
            device=args.device,
        )
        record, grown = grow_run(label, model, train, val, config, start_widths=widths, start_blocks=blocks)
        record.update(_what_grew(record))
        runs.append(record)
        fixed = functools.partial(
            train_fixed,
            train=train,
            val=val,
            lr=args.lr,
            weight_decay=args.weight_decay,
            batch_size=s["batch_size"],
            device=args.device,
            seed=seed,
        )
        if not args.no_scratch:
            scratch = from_scratch(grown, seed)
            label_scratch = f"architecture of '{label}' from scratch, same epochs"
            runs.append(fixed(label_scratch, scratch, epochs=record["epochs"], widths=record["widths"]))
        torch.manual_seed(seed)
        full_model = SmallResNet(full, list(args.blocks))
        label_full = f"full width, wall time of '{label}'"
        runs.append(fixed(label_full, full_model, seconds=record["seconds"], widths=full, blocks=list(args.blocks)))

    info = machine(args.device)
    table = Table(["method", "test acc (%)", "params", "MACs/sample", "epochs", "wall time (s)", "what grew"])
    for r in runs:
        grew = "-"
        if "neurons_added" in r:
            parts = [f"{site} +{n}" for site, n in r["neurons_added"].items()]
            grew = ", ".join(parts) or "nothing"
        table.add(
            r["method"],
            fmt(r["accuracy"] * 100),
            r["params"],
            r["macs"],
            fmt(r["epochs"], 1),
            fmt(r["seconds"], 0),
            grew,
        )
    site_lines = []
    for label, info_sites in sites.items():
        site_lines.append(f"- {label}: width sites {', '.join(info_sites['width_sites']) or 'none'}")
        if info_sites["depth_edges"]:
            site_lines.append(f"  depth edges: {', '.join(info_sites['depth_edges'])}")
        if info_sites["left_intact"]:
            site_lines.append(f"  left intact: {'; '.join(info_sites['left_intact'])}")
    markdown = "\n".join(
        [
            "## CIFAR-10 ResNet grown from 1/8 width (and from fewer blocks with depth growth)",
            "",
            f"Machine: {machine_line(info)}. Preset {s['preset']}: {len(train)} train / {len(val)} test images, "
            f"1 seed, no augmentation. Full ResNet widths {full}, blocks {list(args.blocks)}; growth from {small} "
            f"(width run: blocks {list(args.blocks)}; depth run: blocks {list(args.depth_start_blocks)}, depth on). "
            f"Growth: up to {s['steps']} steps, {s['epochs']} epoch(s) between, growth stopped after "
            f"{fmt(s['time_budget'], 0)} s, {s['final_epochs']} final epochs; Adam lr {args.lr}, batch "
            f"{s['batch_size']}. From scratch: the grown model re-initialized, the growth run's epochs, Adam "
            "with a cosine decay. Full width: Adam, cosine decay over the growth run's wall time.",
            "",
            table.markdown(),
            "",
            "Sites growc found at the start (it grows whatever it finds):",
            *site_lines,
        ]
    )
    payload = {
        "suite": "cifar10-resnet",
        "quick": args.quick,
        "machine": info,
        "settings": {
            **s,
            "full_widths": full,
            "start_widths": small,
            "blocks": list(args.blocks),
            "depth_start_blocks": list(args.depth_start_blocks),
            "lr": args.lr,
            "seed": seed,
        },
        "sites": sites,
        "runs": runs,
    }
    name = "cifar10-resnet-quick" if args.quick else f"cifar10-resnet{'-cuda' if s['preset'] == 'cuda' else ''}"
    plot = accuracy_plot([("CIFAR-10 small ResNet: grown vs full width at equal wall time", runs, {})])
    write_outputs(args.out, name, markdown, payload, plot)
    return 0


def _blocks(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 3 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"three block counts >= 0, got '{text}'")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=parse_widths, default=[32, 64, 128], help="full-width channels per stage")
    parser.add_argument("--blocks", type=_blocks, default=[1, 1, 1], help="residual blocks per stage (full model)")
    parser.add_argument(
        "--depth-start-blocks", type=_blocks, default=[0, 0, 0], help="blocks per stage the depth run starts from"
    )
    parser.add_argument("--width-divisor", type=int, default=8, help="growth starts at widths // this")
    parser.add_argument("--lr", type=float, default=3e-3)
    add_weight_decay_argument(parser)
    parser.add_argument("--train-samples", type=int, default=None, help="override the preset's training subset")
    parser.add_argument("--test-samples", type=int, default=None, help="override the preset's test subset")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--final-epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of growth before the final phase")
    parser.add_argument(
        "--no-scratch", action="store_true", help="leave out the grown architectures trained from scratch"
    )
