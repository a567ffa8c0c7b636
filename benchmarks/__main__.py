"""`python -m benchmarks SUITE [--device cpu|cuda] [--seeds N] [--quick] [--out DIR] [--data-dir DIR]`

Suites: overhead (growth cost per step relative to a training epoch), mnist-mlp (the paper's MNIST
MLP experiment: TINY vs random vs GradMax growth, retrained and large fixed baselines), mnist1d
(MLP and CNN on MNIST-1D), peer (growc vs gromo), cifar10-resnet (a small ResNet grown from 1/8 width),
solve (the cost of the TINY solve at conv widths and of measuring whole models), time-to-accuracy
(MNIST: how soon a growth run reaches 97.5% against a [1000, 1000] MLP), coverage (how much of
torchvision-shaped classifiers grows, exactly, with ONNX parity).
Each suite writes SUITE.md, SUITE.json and SUITE.png (SUITE-quick.* with --quick) into --out and
prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks import cifar10_resnet, coverage, mnist1d, mnist_mlp, overhead, peer, solve, time_to_accuracy
from benchmarks.common import DEFAULT_DATA_DIR, DEFAULT_OUT, MissingData

SUITES = {
    "overhead": (overhead, "growth overhead per step relative to one training epoch (MNIST MLP, CIFAR-10 CNN)"),
    "mnist-mlp": (mnist_mlp, "MNIST MLP grown from [1, 1]: tiny vs random vs gradmax, retrained, [1000, 1000]"),
    "mnist1d": (mnist1d, "MNIST-1D MLP and CNN grown from tiny: tiny vs random, retrained, published and large fixed"),
    "peer": (peer, "growc vs gromo (the reference library, in its own venv) growing the same MNIST MLP"),
    "cifar10-resnet": (
        cifar10_resnet,
        "small ResNet grown from 1/8 width (and with depth) vs full width, same wall time",
    ),
    "time-to-accuracy": (
        time_to_accuracy,
        "MNIST: wall time for a growth run and a fixed [1000, 1000] MLP to reach 97.5% test accuracy",
    ),
    "coverage": (coverage, "torchvision-shaped classifiers: share of layers grown, exact at amplitude 0, ONNX parity"),
    "solve": (solve, "TINY site solve at conv widths (Cholesky vs eigh), measuring ResNet-18/MobileNet-v2 vs an epoch"),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seeds", type=int, default=None, help="run seeds (repeats); medians are reported")
    parser.add_argument("--quick", action="store_true", help="data subsets and a smaller budget, for a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"folder holding mnist.npz and cifar10-40k-jpeg.npz (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, (module, help_text) in SUITES.items():
        suite_parser = sub.add_parser(name, help=help_text, description=module.__doc__)
        _common(suite_parser)
        module.add_arguments(suite_parser)
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    module, _ = SUITES[args.suite]
    try:
        return module.run(args)
    except MissingData as exc:
        print(f"python -m benchmarks {args.suite}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
