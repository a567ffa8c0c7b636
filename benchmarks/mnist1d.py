"""Suite `mnist1d`: an MLP and a CNN grown from tiny on MNIST-1D.

MNIST-1D (4,000 training / 1,000 test sequences of length 40) is generated offline by the
`mnist1d` package (`growc.data.mnist1d`, the package's default arguments, seed 42). Its 1,000
test sequences are growc's validation set: only the validation stop reads them, and no recorded
run stopped on it (benchmarks/README.md).

Per model (MLP 40 -> [h1, h2] -> 10; CNN of three stride-2 convolutions and a linear head, the
shape of MNIST-1D's reference CNN), all with the same seeds, data order, Adam learning rate and
batch size:
- grown from tiny by `growc.grow`, strategy `tiny`, and the same with `random` neurons;
- the tiny run's final architecture re-initialized and trained from scratch for the tiny run's
  total number of epochs ("retrained");
- the published baselines' architectures (MLP [100, 100], CNN 25-25-25 channels) and a large fixed
  network (MLP [1000, 1000], CNN 256-256-256), trained from scratch for the same number of epochs.
The published accuracies (MLP 68%, CNN 94%; Greydanus 2020) are quoted, not measured here.

growc's width sites for convolutions are Conv2d layers, so the 1-D signal is modelled as a
(batch, channels, 1, 40) image and every Conv1d of kernel k as a Conv2d of kernel (1, k).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    MissingData,
    Table,
    fmt,
    log,
    machine,
    machine_line,
    mlp,
    parse_widths,
    write_outputs,
)
from benchmarks.growth_runs import (
    accuracy_cell,
    accuracy_plot,
    add_weight_decay_argument,
    equal_params,
    from_scratch,
    grow_run,
    growth_config,
    summaries,
    train_fixed,
    widths_cell,
)
from growc import GrowcError, GrowthConfig

SEQUENCE_LENGTH = 40
PUBLISHED = {"mlp": ("published MLP (68%)", 0.68), "cnn": ("published CNN (94%)", 0.94)}
LEVELS = (100, 300, 1_000, 3_000, 10_000, 30_000)


class Signal1dCNN(nn.Module):
    """Three convolutions (kernels 5, 3, 3; stride 2; padding 1), ReLU, flatten, linear: MNIST-1D's
    reference CNN, as Conv2d over a (B, C, 1, L) map."""

    def __init__(self, channels: list[int], length: int = SEQUENCE_LENGTH, classes: int = 10) -> None:
        super().__init__()
        a, b, c = channels
        self.conv1 = nn.Conv2d(1, a, (1, 5), stride=(1, 2), padding=(0, 1))
        self.conv2 = nn.Conv2d(a, b, (1, 3), stride=(1, 2), padding=(0, 1))
        self.conv3 = nn.Conv2d(b, c, (1, 3), stride=(1, 2), padding=(0, 1))
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.linear = nn.Linear(c * out, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], 1, 1, x.shape[-1])
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(torch.flatten(h, 1))


def build(kind: str, widths: list[int]) -> nn.Module:
    return mlp(widths, d_in=SEQUENCE_LENGTH) if kind == "mlp" else Signal1dCNN(widths)


def _config(args: argparse.Namespace, strategy: str, seed: int) -> GrowthConfig:
    return growth_config(args, strategy=strategy, seed=seed)


def _load(args: argparse.Namespace):
    from growc.data import mnist1d

    try:
        return mnist1d(seed=0)  # seed 0: the package's own default data (its seed 42)
    except GrowcError as exc:
        raise MissingData(f"{exc} (into the environment that runs the benchmark)") from None


def _model_runs(kind: str, train, val, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    start = args.mlp_start if kind == "mlp" else args.cnn_start
    runs = []
    tiny_graph = None
    tiny_epochs = args.steps * args.epochs + args.final_epochs
    for strategy in ("tiny", "random"):
        log(f"{kind} seed {seed}: growing from {start} with strategy {strategy}")
        torch.manual_seed(seed)
        record, graph = grow_run(
            f"grown ({strategy})", build(kind, start), train, val, _config(args, strategy, seed), family=kind
        )
        runs.append(record)
        if strategy == "tiny":
            tiny_graph, tiny_epochs = graph, record["epochs"]
    common = {
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": seed,
        "epochs": tiny_epochs,
    }
    log(f"{kind} seed {seed}: the tiny architecture from scratch, {tiny_epochs} epochs")
    runs.append(
        train_fixed(
            "retrained (tiny arch.)",
            from_scratch(tiny_graph, seed),
            train,
            val,
            widths=runs[0]["widths"],
            family=kind,
            **common,
        )
    )
    for label, widths in (
        ("published arch., measured", args.mlp_published if kind == "mlp" else args.cnn_published),
        ("large fixed", args.mlp_large if kind == "mlp" else args.cnn_large),
    ):
        log(f"{kind} seed {seed}: {label} {widths}, {tiny_epochs} epochs")
        torch.manual_seed(seed)
        runs.append(train_fixed(label, build(kind, widths), train, val, widths=widths, family=kind, **common))
    return runs


def render(
    runs: list[dict[str, Any]], args: argparse.Namespace, seeds: int, n_train: int, n_val: int, info: dict[str, Any]
) -> tuple[str, list, dict[str, Any]]:
    """The markdown report, the plot's panels and the per-method medians of a finished run."""
    sections, panels, payload_summary = [], [], {}
    for kind in args.models:
        kind_runs = [r for r in runs if r["family"] == kind]
        summary = summaries(kind_runs)
        payload_summary[kind] = summary
        table = Table(["method", "widths", "test acc (%)", "params", "MACs/sample", "epochs", "wall time (s)"])
        for method, s in summary.items():
            table.add(
                method,
                widths_cell(s["widths"]),
                accuracy_cell(s),
                int(s["params"]),
                int(s["macs"]),
                fmt(s["epochs"], 0),
                fmt(s["seconds"], 0),
            )
        name, published = PUBLISHED[kind]
        table.add(name.split(" (")[0] + " (quoted, not measured)", "-", fmt(published * 100, 0), "-", "-", "-", "-")
        equal = equal_params(kind_runs, ["grown (tiny)", "grown (random)"], LEVELS)
        equal_table = Table(["params", "tiny (%)", "random (%)", "tiny - random"])
        for level, row in equal.items():
            t, r = row["grown (tiny)"], row["grown (random)"]
            diff = None if t is None or r is None else f"{(t - r) * 100:+.2f}"
            equal_table.add(level, t * 100 if t is not None else None, r * 100 if r is not None else None, diff or "-")
        tiny = summary["grown (tiny)"]
        overhead = tiny["overhead_per_step_epochs"]
        title = "MLP 40 -> [h1, h2] -> 10" if kind == "mlp" else "CNN, 3 convs (1-D as (B, C, 1, 40) Conv2d)"
        start = args.mlp_start if kind == "mlp" else args.cnn_start
        sections += [
            f"### {title}, grown from {start}",
            "",
            table.markdown(),
            "",
            f"Growth run (tiny): growth cost per step {fmt(overhead)} training epochs "
            f"(statistics + solve + line search; median over seeds). Accuracy along the growth curves "
            "at equal parameter counts (interpolated in log-parameters):",
            "",
            equal_table.markdown() if equal_table.rows else "(no overlapping range)",
            "",
        ]
        panels.append((f"MNIST-1D {title}", kind_runs, {name: published}))

    mode = "quick" if args.quick else "full"
    markdown = "\n".join(
        [
            "## MNIST-1D: MLP and CNN grown from tiny",
            "",
            f"Machine: {machine_line(info)}. Mode: {mode}. Median over {seeds} seed(s) (range in brackets). "
            f"Data: mnist1d {n_train} train / {n_val} test. Growth: up to {args.steps} steps, {args.epochs} "
            f"epoch(s) between steps, {args.final_epochs} final epochs, Adam lr {args.lr}, batch {args.batch_size}, "
            "growc defaults otherwise. Fixed baselines: Adam at the same lr, cosine decay to 0, the tiny run's "
            "total epochs. Published figures (Greydanus 2020) are quoted, not measured here.",
            "",
            *sections,
        ]
    )
    return markdown, panels, payload_summary


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.steps = args.steps if args.steps is not None else 4
        args.final_epochs = args.final_epochs if args.final_epochs is not None else 2
        seeds = args.seeds or 1
    else:
        args.steps = args.steps if args.steps is not None else GrowthConfig.steps
        args.final_epochs = args.final_epochs if args.final_epochs is not None else 30
        seeds = args.seeds or 3
    train, val = _load(args)
    log(f"mnist1d: {len(train)} training / {len(val)} test sequences, seeds {seeds}, models {args.models}")

    runs: list[dict[str, Any]] = []
    for kind in args.models:
        for seed in range(seeds):
            runs += _model_runs(kind, train, val, args, seed)

    info = machine(args.device)
    markdown, panels, payload_summary = render(runs, args, seeds, len(train), len(val), info)
    payload = {
        "suite": "mnist1d",
        "quick": args.quick,
        "machine": info,
        "settings": {
            "seeds": seeds,
            "train_samples": len(train),
            "test_samples": len(val),
            "models": args.models,
            "mlp_start": args.mlp_start,
            "cnn_start": args.cnn_start,
            "published_quoted": {k: v[1] for k, v in PUBLISHED.items()},
            "growth_config": _config(args, "tiny", 0).as_dict(),
        },
        "summary": payload_summary,
        "runs": runs,
    }
    write_outputs(args.out, "mnist1d-quick" if args.quick else "mnist1d", markdown, payload, accuracy_plot(panels))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--mlp-start", type=parse_widths, default=[1, 1], help="MLP hidden widths to grow from")
    parser.add_argument("--cnn-start", type=parse_widths, default=[1, 1, 1], help="CNN channels to grow from")
    parser.add_argument("--mlp-published", type=parse_widths, default=[100, 100])
    parser.add_argument("--cnn-published", type=parse_widths, default=[25, 25, 25])
    parser.add_argument("--mlp-large", type=parse_widths, default=[1000, 1000])
    parser.add_argument("--cnn-large", type=parse_widths, default=[256, 256, 256])
    parser.add_argument(
        "--steps", type=int, default=None, help=f"most growth steps (default {GrowthConfig.steps}; quick 4)"
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=GrowthConfig.epochs,
        help=f"training epochs between growth steps (default {GrowthConfig.epochs:g}, growc's)",
    )
    parser.add_argument("--final-epochs", type=int, default=None, help="after the last step (default 30; quick 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, all methods")
    add_weight_decay_argument(parser)
    parser.add_argument("--batch-size", type=int, default=100)
