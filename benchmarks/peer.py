"""Suite `peer`: growc against gromo, the TINY method's reference library, on the same MLP.

Both grow a 784 -> [1, 1] -> 10 ReLU MLP on the same shuffled MNIST training subset (mnist.npz is
sorted by label) with the same seeds, batch size, Adam learning rate and epoch budget: growc runs
first (`growc.grow`, its defaults), then gromo runs exactly as many growth steps as growc took,
with the same epochs between steps and the same final epochs with a cosine decay. Test accuracy
is on MNIST's 10,000 test images.

gromo is not a dependency of growc: the suite installs it (PyPI `gromo==0.1.0`) into its own
virtual environment (default `benchmarks/.venv-gromo`, made with `--system-site-packages` so that
it reuses this torch) and runs `benchmarks/gromo_driver.py` there in a subprocess; the two
exchange JSON, and the data go over as a `torch.save`d file of the very tensors growc used.

Reported: accuracy and parameters of both, the growth curves at equal parameter counts, and the
growth cost per step (statistics + solve + line search) relative to one training epoch of the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import (
    MNIST_FILE,
    REPO_ROOT,
    MissingData,
    Table,
    data_file,
    fmt,
    log,
    machine,
    machine_line,
    median,
    mlp,
    subset,
    write_outputs,
)
from benchmarks.growth_runs import (
    GROWTH_PARTS,
    accuracy_cell,
    accuracy_plot,
    equal_params,
    grow_run,
    growth_config,
    summaries,
)
from growc import GrowthConfig
from growc.data import mnist

GROMO_VERSION = "0.1.0"
# gromo's own requirements, minus torch and numpy (reused from this environment)
GROMO_DEPENDENCIES = ("deprecated", "networkx", "torchmetrics")
DEFAULT_VENV = REPO_ROOT / "benchmarks" / ".venv-gromo"
DRIVER = Path(__file__).with_name("gromo_driver.py")
GROWC, GROMO = "growc (tiny)", f"gromo {GROMO_VERSION}"
LEVELS = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
TARGET_COST_RATIO = 2.0


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_gromo(venv: Path) -> Path:
    """The venv's python, creating the venv and installing gromo into it when needed."""
    python = venv_python(venv)
    check = [str(python), "-c", "import gromo.containers.growing_mlp"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    log(f"installing gromo {GROMO_VERSION} into {venv}")
    commands = [
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"gromo=={GROMO_VERSION}"],
        [str(python), "-m", "pip", "install", "--quiet", *GROMO_DEPENDENCIES],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise MissingData(
                f"could not install gromo ({' '.join(command)}):\n{done.stderr.strip()[-2000:]}\n"
                f"  the peer suite needs PyPI access once, or a venv with gromo at {venv} (--venv DIR)"
            )
    if subprocess.run(check, capture_output=True).returncode != 0:
        raise MissingData(f"gromo was installed into {venv} but does not import")
    return python


def cost_per_step(steps: list[dict[str, Any]], epochs_per_step: int) -> dict[str, Any]:
    """Growth cost (statistics + solve + line search) of each step in epochs of that step's own
    training (its `train` seconds / epochs); median over steps, and each part's median."""
    ratios, parts = [], {k: [] for k in GROWTH_PARTS}
    for s in steps:
        seconds = s.get("seconds") or {}
        epoch = seconds.get("train", 0.0) / epochs_per_step
        if epoch <= 0 or not any(k in seconds for k in GROWTH_PARTS):
            continue
        ratios.append(sum(seconds.get(k, 0.0) for k in GROWTH_PARTS) / epoch)
        for k in GROWTH_PARTS:
            parts[k].append(seconds.get(k, 0.0) / epoch)
    return {
        "median": median(ratios),
        "per_step": ratios,
        "parts": {k: median(v) for k, v in parts.items()},
        "epoch_seconds": median([s["seconds"]["train"] / epochs_per_step for s in steps if s.get("seconds")]),
    }


def run_gromo(
    python: Path, train: TensorDataset, val: TensorDataset, args: argparse.Namespace, seed: int, steps: int, work: Path
) -> dict[str, Any]:
    data = work / "data.pt"
    if not data.exists():
        x_train, y_train = train.tensors
        x_test, y_test = val.tensors
        torch.save({"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}, data)
    config = GrowthConfig()
    settings = {
        "data": str(data),
        "seed": seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "start_width": args.start_width,
        "hidden_layers": 2,
        "stat_samples": config.stat_samples,
        "line_search_samples": config.line_search_samples,
        "steps": steps,
        "epochs": args.epochs,
        "final_epochs": args.final_epochs,
        "threads": torch.get_num_threads(),
    }
    settings_path, result_path = work / f"settings-{seed}.json", work / f"result-{seed}.json"
    settings_path.write_text(json.dumps(settings))
    log(f"seed {seed}: gromo, {steps} growth steps")
    done = subprocess.run(
        [str(python), str(DRIVER), str(settings_path), str(result_path)], stderr=subprocess.PIPE, text=True
    )
    for line in done.stderr.splitlines():
        if line.startswith("gromo step"):
            log(f"  {line}")
    if done.returncode != 0:
        raise RuntimeError(f"the gromo driver failed:\n{done.stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    for step in result["steps"]:
        begin = step["step"] * args.epochs
        step["seconds"]["train"] = sum(result["epoch_seconds"][begin : begin + args.epochs])
    result.update(
        method=GROMO,
        seed=seed,
        macs=None,
        curve=[(s["params"], s["val_accuracy"]) for s in result["steps"]],
        growth_steps=len(result["steps"]),
        cost=cost_per_step(result["steps"], args.epochs),
    )
    log(
        f"  -> gromo: {result['widths']}, {result['params']:,} params, test acc {result['accuracy']:.4f}, "
        f"{result['seconds']:.0f}s"
    )
    return result


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.steps = args.steps if args.steps is not None else 3
        args.final_epochs = args.final_epochs if args.final_epochs is not None else 1
        args.train_samples = args.train_samples if args.train_samples is not None else 2_000
        seeds = args.seeds or 1
    else:
        args.steps = args.steps if args.steps is not None else 20
        args.final_epochs = args.final_epochs if args.final_epochs is not None else 10
        args.train_samples = args.train_samples if args.train_samples is not None else 10_000
        seeds = args.seeds or 3
    path = data_file(args.data_dir, MNIST_FILE)
    python = ensure_gromo(args.venv)
    train, val = mnist(path=str(path))
    train = subset(train, args.train_samples)  # a fixed random permutation: the file is sorted by label
    log(f"peer: {len(train)} training / {len(val)} test samples, seeds {seeds}, gromo at {python}")

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="growc-peer-") as tmp:
        for seed in range(seeds):
            log(f"seed {seed}: growc from [{args.start_width}, {args.start_width}]")
            torch.manual_seed(seed)
            config = growth_config(args, seed=seed)
            record, _ = grow_run(GROWC, mlp([args.start_width] * 2), train, val, config)
            record["widths"] = list(record["widths"].values())
            record["cost"] = cost_per_step(record["steps"][:-1], args.epochs)
            runs.append(record)
            runs.append(run_gromo(python, train, val, args, seed, max(1, record["growth_steps"]), Path(tmp)))

    summary = summaries(runs)
    for name, s in summary.items():
        group = [r for r in runs if r["method"] == name]
        s["cost_per_step_epochs"] = median([r["cost"]["median"] for r in group])
        s["cost_parts"] = {k: median([r["cost"]["parts"][k] for r in group]) for k in GROWTH_PARTS}
        s["epoch_seconds"] = median([r["cost"]["epoch_seconds"] for r in group])
        s["growth_steps"] = median([r["growth_steps"] for r in group])
    equal = equal_params(runs, [GROWC, GROMO], LEVELS)
    info = machine(args.device)

    table = Table(
        [
            "method",
            "widths",
            "test acc (%)",
            "params",
            "growth steps",
            "epochs",
            "growth cost / step (epochs)",
            "stat / solve / LS",
            "epoch (s)",
            "wall (s)",
        ]
    )
    for name, s in summary.items():
        parts = " / ".join(fmt(s["cost_parts"][k]) for k in GROWTH_PARTS)
        table.add(
            name,
            " ".join(str(w) for w in s["widths"]),
            accuracy_cell(s),
            int(s["params"]),
            fmt(s["growth_steps"], 0),
            fmt(s["epochs"], 0),
            fmt(s["cost_per_step_epochs"]),
            parts,
            fmt(s["epoch_seconds"], 3),
            fmt(s["seconds"], 0),
        )
    equal_table = Table(["params", "growc (%)", "gromo (%)", "growc - gromo"])
    for level, row in equal.items():
        a, b = row[GROWC], row[GROMO]
        diff = "-" if a is None or b is None else f"{(a - b) * 100:+.2f}"
        equal_table.add(level, a * 100 if a is not None else None, b * 100 if b is not None else None, diff)

    ours, theirs = summary[GROWC], summary[GROMO]
    compared = [row for row in equal.values() if row[GROWC] is not None and row[GROMO] is not None]
    wins = sum(1 for row in compared if row[GROWC] >= row[GROMO])
    ratio = (
        theirs["cost_per_step_epochs"] / ours["cost_per_step_epochs"]
        if ours["cost_per_step_epochs"] and theirs["cost_per_step_epochs"]
        else None
    )
    targets = [
        f"- at least as accurate as gromo at equal parameters: at {wins} of {len(compared)} compared levels on the "
        f"growth curves; final {fmt(ours['accuracy'] * 100)}% ({int(ours['params']):,} params) vs "
        f"{fmt(theirs['accuracy'] * 100)}% ({int(theirs['params']):,}) -> "
        f"{'met' if compared and wins == len(compared) else 'not met'} on the curves",
        f"- growth step at least {TARGET_COST_RATIO:.0f}x cheaper relative to an epoch: growc "
        f"{fmt(ours['cost_per_step_epochs'])} epochs, gromo {fmt(theirs['cost_per_step_epochs'])} epochs, "
        f"ratio {fmt(ratio)}x -> {'met' if ratio is not None and ratio >= TARGET_COST_RATIO else 'not met'}",
    ]
    mode = "quick" if args.quick else "full"
    markdown = "\n".join(
        [
            "## peer: growc vs gromo (the reference library), MNIST MLP grown from "
            f"[{args.start_width}, {args.start_width}]",
            "",
            f"Machine: {machine_line(info)}. Mode: {mode}. Median over {seeds} seed(s) (range in brackets). "
            f"Data: {len(train)} shuffled MNIST training images, 10,000 test. Both: Adam lr {args.lr}, batch "
            f"{args.batch_size}, {args.epochs} epoch(s) between growth steps, {args.final_epochs} final epochs "
            f"(cosine decay); growc at most {args.steps} steps (its defaults otherwise), gromo as many steps as growc "
            f"took (library defaults, one layer per step, <= max(4, width) neurons, its own line search). Growth "
            "cost per step = (statistics + solve + line search) / one training epoch of the same run, median over steps.",
            "",
            table.markdown(),
            "",
            "Accuracy along the growth curves at equal parameter counts (test accuracy after each step's training, "
            "interpolated in log-parameters):",
            "",
            equal_table.markdown() if equal_table.rows else "(no overlapping range)",
            "",
            "Targets (reported, not tuned for):",
            *targets,
        ]
    )
    payload = {
        "suite": "peer",
        "quick": args.quick,
        "machine": info,
        "settings": {
            "seeds": seeds,
            "train_samples": len(train),
            "test_samples": len(val),
            "start_width": args.start_width,
            "steps": args.steps,
            "epochs": args.epochs,
            "final_epochs": args.final_epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "gromo_version": GROMO_VERSION,
            "growth_config": growth_config(args).as_dict(),
        },
        "summary": summary,
        "equal_params": {str(k): v for k, v in equal.items()},
        "runs": runs,
    }
    plot = accuracy_plot([(f"MNIST MLP from [{args.start_width}, {args.start_width}]: growc vs gromo", runs, {})])
    write_outputs(args.out, "peer-quick" if args.quick else "peer", markdown, payload, plot)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"gromo's virtual environment ({DEFAULT_VENV})")
    parser.add_argument("--start-width", type=int, default=1, help="both hidden layers start at this width")
    parser.add_argument("--steps", type=int, default=None, help="most growth steps of growc (default 20; quick 3)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs between growth steps")
    parser.add_argument("--final-epochs", type=int, default=None, help="after the last step (default 10; quick 1)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=None, help="MNIST training subset (default 10,000)")
