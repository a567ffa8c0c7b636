"""Suite `solve`: the cost of a site's TINY solve at conv widths, and of measuring whole models.

Part 1, per width d (default 288, 1153, 2305: C_in * 3 * 3 (+1) of 32, 128 and 256 channels):
moments of activation-like data (ReLU of correlated Gaussians, a constant coordinate) for a site
whose producer input b' and consumer input b are both d wide, then the site solve as a growth
step runs it (`inverses` with the default ridge, then `solve_site`), timed with growc's path
(certified Cholesky) and with the reference (the eigen-decomposition forced), in the same run;
the largest relative difference of the neurons' lambdas between the two is reported.

Part 2, per model (a ResNet-18-like and a MobileNet-v2-like network, written here, at 64x64
input: CIFAR-10 images upsampled): one plain training epoch on the CIFAR subset, then
`Grower.measure` over the same samples (statistics of every site + solve of every site), with
the solve part timed on its own, and (unless `--no-reference`) the same sites solved again from
the same statistics with the eigen path forced.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from benchmarks.common import (
    CIFAR_FILE,
    Stopwatch,
    Table,
    data_file,
    log,
    machine,
    machine_line,
    parameter_count,
    subset,
    write_outputs,
)
from growc import GrowthConfig
from growc.data import as_loader, cifar10
from growc.growth import stepwise
from growc.growth.train import make_optimizer, train_epoch
from growc.tiny import solver
from growc.tiny.site_solution import inverses, solve_site
from growc.tiny.statistics import ConsumerMoments, SiteMoments

RIDGE = GrowthConfig.ridge


@contextlib.contextmanager
def eigen_reference() -> Iterator[None]:
    """Every whitening inside takes the eigen-decomposition path (the pre-Cholesky solver)."""
    original = solver._certified_inverse_factor
    solver._certified_inverse_factor = lambda a, floor: None
    try:
        yield
    finally:
        solver._certified_inverse_factor = original


# --- part 1: one site at a given width ------------------------------------------------------


def _activations(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """(n, d): d - 1 ReLU features of correlated Gaussians (a decaying spectrum) and a 1."""
    latent = torch.randn(n, d // 2 + 1, generator=g, dtype=torch.float64)
    mix = torch.randn(d // 2 + 1, d - 1, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(n, d - 1, generator=g, dtype=torch.float64)
    return torch.cat([torch.relu(latent @ mix / (d**0.5) + noise + 0.1), torch.ones(n, 1, dtype=torch.float64)], 1)


def site_moments(d: int, out: int = 64, seed: int = 0) -> SiteMoments:
    g = torch.Generator().manual_seed(seed)
    n = 3 * d
    b_prev, b = _activations(n, d, g), _activations(n, d, g)
    signal = b_prev @ torch.randn(d, out, generator=g, dtype=torch.float64) / d**0.5
    grad = torch.randn(n, out, generator=g, dtype=torch.float64) + signal
    consumer = ConsumerMoments(
        s=b.T @ b / n, m=b.T @ grad / n, c=b_prev.T @ b / n, p=b_prev.T @ grad / n, g_sq=float((grad**2).sum() / n)
    )
    return SiteMoments(n=n, s_prev=b_prev.T @ b_prev / n, consumers=(consumer,))


def _timed_solve(moments: SiteMoments, cap: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    solution = solve_site(moments, cap, inverses(moments, RIDGE))
    return time.perf_counter() - start, solution.neurons.lambdas


def measure_width(d: int, repeats: int, reference_repeats: int, cap: int = 16) -> dict[str, Any]:
    moments = site_moments(d)
    new = [_timed_solve(moments, cap) for _ in range(repeats)]
    with eigen_reference():
        ref = [_timed_solve(moments, cap) for _ in range(reference_repeats)]
    lam_new, lam_ref = new[0][1], ref[0][1]
    k = min(lam_new.numel(), lam_ref.numel())
    difference = float(((lam_new[:k] - lam_ref[:k]).abs() / lam_ref[:k].abs().clamp_min(1e-300)).max()) if k else 0.0
    row = {
        "width": d,
        "new_s": [t for t, _ in new],
        "reference_s": [t for t, _ in ref],
        "neurons": [int(lam_new.numel()), int(lam_ref.numel())],
        "lambda_max_rel_diff": difference,
    }
    row["new_median_s"] = statistics.median(row["new_s"])
    row["reference_median_s"] = statistics.median(row["reference_s"])
    log(f"solve/width {d}: growc {row['new_median_s']:.3f} s, eigh reference {row['reference_median_s']:.2f} s")
    return row


# --- part 2: whole models at 64x64 ----------------------------------------------------------


def _channels(base: int, width: float) -> int:
    return max(4, int(round(base * width)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18_like(width: float = 1.0, classes: int = 10) -> nn.Module:
    """ResNet-18's layout (7x7/2 stem, max pool, 4 stages of 2 basic blocks, 64-512 channels
    times `width`)."""
    c = [_channels(b, width) for b in (64, 128, 256, 512)]
    layers: list[nn.Module] = [nn.Conv2d(3, c[0], 7, 2, 3, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU()]
    layers.append(nn.MaxPool2d(3, 2, 1))
    c_in = c[0]
    for stage, c_out in enumerate(c):
        for block in range(2):
            layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and block == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2_like(width: float = 1.0, classes: int = 10) -> nn.Module:
    """MobileNet-v2's layout (stem 32/2, the 17 inverted residual blocks, 1x1 conv to 1280)."""
    c_in = _channels(32, width)
    layers: list[nn.Module] = [nn.Conv2d(3, c_in, 3, 2, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6()]
    for expand, channels, repeats, stride in MOBILENET_V2:
        c_out = _channels(channels, width)
        for index in range(repeats):
            layers.append(InvertedResidual(c_in, c_out, stride if index == 0 else 1, expand))
            c_in = c_out
    last = _channels(1280, max(width, 1.0))
    layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


def cifar_at_64(args: argparse.Namespace) -> Dataset:
    path = data_file(args.data_dir, CIFAR_FILE)
    log("decoding the CIFAR-10 JPEGs (a few seconds)")
    train, _ = cifar10(path=str(path))
    x, y = subset(train, args.train_samples).tensors
    return TensorDataset(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False), y)


def _epoch(model: nn.Module, train: Dataset, args: argparse.Namespace) -> float:
    loader = as_loader(train, args.batch_size, shuffle=True, seed=0)
    optimizer = make_optimizer("adam", model.parameters(), 1e-3, 0.0)
    with Stopwatch(args.device) as watch:
        train_epoch(model, loader, F.cross_entropy, optimizer, torch.device(args.device))
    return watch.seconds


def _measure(model: nn.Module, train: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """`Grower.measure` with its solve (`assess_sites`) timed alone and, unless disabled,
    repeated on the same statistics with the eigen path forced."""
    record: dict[str, Any] = {}
    original = stepwise.assess_sites

    def timed(*call: Any) -> list[Any]:
        with Stopwatch(args.device) as watch:
            found = original(*call)
        record["solve_runs_s"] = [watch.seconds]
        record["sites"] = {a.site.name: a.moments.s_prev.shape[0] for a in found}
        if args.reference:
            with eigen_reference(), Stopwatch(args.device) as watch:
                reference = original(*call)
            record["reference_solve_s"] = watch.seconds
            record["lambda_max_rel_diff"] = _largest_difference(found, reference)
            record["significant_equal"] = [a.significant for a in found] == [a.significant for a in reference]
            # growc's solve once more, after the reference: on a shared machine the first call
            # right after the backward passes is sometimes much slower, which would favour the
            # reference; the mean of the two runs is reported.
            with Stopwatch(args.device) as watch:
                original(*call)
            record["solve_runs_s"].append(watch.seconds)
        record["solve_s"] = statistics.mean(record["solve_runs_s"])
        return found

    config = GrowthConfig(batch_size=args.batch_size, device=args.device)
    grower = stepwise.Grower(model, F.cross_entropy, config)
    stepwise.assess_sites = timed
    try:
        with Stopwatch(args.device) as watch:
            grower.measure(as_loader(train, args.batch_size, shuffle=True, seed=1))
    finally:
        stepwise.assess_sites = original
    extra = record.get("reference_solve_s", 0.0) + sum(record["solve_runs_s"][1:])
    record["measure_s"] = watch.seconds - extra  # the first growc solve stays in
    return record


def _largest_difference(found: list[Any], reference: list[Any]) -> float:
    worst = 0.0
    for a, b in zip(found, reference):
        la, lb = a.solution.neurons.lambdas, b.solution.neurons.lambdas
        k = min(la.numel(), lb.numel())
        if la.numel() != lb.numel():
            return float("inf")
        if k:
            worst = max(worst, float(((la - lb).abs() / lb.abs().clamp_min(1e-300)).max()))
    return worst


def measure_model(
    name: str, build: Callable[[], nn.Module], train: Dataset, args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().to(args.device)
    log(f"solve/{name}: {parameter_count(model):,} parameters, {len(train)} samples at 64x64")
    epoch_s = _epoch(copy.deepcopy(model), train, args)
    log(f"solve/{name}: epoch {epoch_s:.1f} s; measuring every site")
    row = {"model": name, "params": parameter_count(model), "epoch_s": epoch_s, **_measure(model, train, args)}
    log(f"solve/{name}: measure {row['measure_s']:.1f} s (solve {row['solve_s']:.1f} s)")
    return row


# --- the suite ------------------------------------------------------------------------------


def _tables(widths: list[dict[str, Any]], models: list[dict[str, Any]]) -> list[str]:
    width_table = Table(["width d", "growc solve (s)", "eigh reference (s)", "reference / growc", "lambda rel. diff"])
    for r in widths:
        ratio = r["reference_median_s"] / r["new_median_s"]
        width_table.add(
            r["width"],
            f"{r['new_median_s']:.3f}",
            r["reference_median_s"],
            f"{ratio:.0f}x",
            f"{r['lambda_max_rel_diff']:.1e}",
        )
    out = ["### One site, S' and S both d wide", "", width_table.markdown()]
    if models:
        model_table = Table(
            [
                "model",
                "params",
                "sites (widest d')",
                "epoch (s)",
                "measure (s)",
                "measure / epoch",
                "solve (s)",
                "eigh solve (s)",
                "lambda rel. diff",
            ]
        )
        for r in models:
            widest = max(r["sites"].values()) if r["sites"] else 0
            model_table.add(
                r["model"],
                r["params"],
                f"{len(r['sites'])} ({widest})",
                r["epoch_s"],
                r["measure_s"],
                r["measure_s"] / r["epoch_s"],
                r["solve_s"],
                r.get("reference_solve_s"),
                f"{r['lambda_max_rel_diff']:.1e}" if "lambda_max_rel_diff" in r else "-",
            )
        out += ["", "### Measuring every site at 64x64 vs one training epoch", "", model_table.markdown()]
    return out


def run(args: argparse.Namespace) -> int:
    repeats = args.repeats or (1 if args.quick else 3)
    widths = [measure_width(d, repeats, 1) for d in args.widths]
    models = []
    if args.models:
        train = cifar_at_64(args)
        builders = {
            "resnet18-like": lambda: resnet18_like(args.resnet_width),
            "mobilenet_v2-like": lambda: mobilenet_v2_like(args.mobilenet_width),
        }
        models = [measure_model(name, builders[name], train, args) for name in args.models]
    info = machine(args.device)
    load = ", ".join(f"{v:.1f}" for v in info["load_average_1_5_15min"])
    markdown = "\n".join(
        [
            "## Cost of the TINY solve: certified Cholesky vs the eigen-decomposition",
            "",
            f"Machine: {machine_line(info)}; load average {load}. Part 1: median of {repeats} runs of growc's "
            "path, 1 of the reference. Part 2: models at width x"
            f"{args.resnet_width} (ResNet) / x{args.mobilenet_width} (MobileNet), {args.train_samples} CIFAR-10 "
            f"training samples upsampled to 64x64, batch {args.batch_size}; measure = growc's `Grower.measure` "
            "(statistics + solve of every site, growc defaults), solve = its solve part alone.",
            "",
            *_tables(widths, models),
        ]
    )
    payload = {
        "suite": "solve",
        "quick": args.quick,
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
        "widths": widths,
        "models": models,
    }
    write_outputs(args.out, "solve-quick" if args.quick else "solve", markdown, payload)
    return 0


def _width_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"widths must be at least 2, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=_width_list, default=[288, 1153, 2305], help="site widths d for part 1")
    parser.add_argument("--repeats", type=int, default=None, help="runs of growc's solve per width (default 3)")
    parser.add_argument(
        "--models",
        nargs="*",
        choices=["resnet18-like", "mobilenet_v2-like"],
        default=["resnet18-like", "mobilenet_v2-like"],
    )
    parser.add_argument(
        "--resnet-width", type=float, default=0.5, help="channel multiplier of the ResNet (default 0.5)"
    )
    parser.add_argument("--mobilenet-width", type=float, default=1.0, help="channel multiplier of the MobileNet")
    parser.add_argument("--train-samples", type=int, default=2000, help="CIFAR-10 training samples (the epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the eigh solve of the models"
    )
