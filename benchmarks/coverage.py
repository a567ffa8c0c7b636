"""Suite `coverage`: how much of a real classifier growc can grow, and whether that growth is exact.

Per model (torchvision-shaped, `benchmarks/families.py`, random init, 10 classes; with
`--torchvision`, torchvision's own definitions where that package loads):
- coverage: the share of Conv2d / Linear layers (the output layer aside) whose outputs some
  width site grows (as its source, a tied writer, or a depthwise carrier), and the most frequent
  reasons given for the rest;
- exactness: every width site grows at once by random units (one per channel group) at
  amplitude 0, and the output is compared with the model's before, in eval and in training
  mode (the same random draws for stochastic depth; dropout off, since it draws a mask per
  unit and more units change the old ones' masks), relative to the output's scale;
- export: with the units at amplitude 0.3, the grown model exported to ONNX, onnxruntime
  against torch, relative to the output's scale.
Input: a batch of 2 images of 3x64x64.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
from torch import nn

from benchmarks.common import Table, log, machine, machine_line, write_outputs
from benchmarks.families import FAMILIES
from growc.deploy.export import export_onnx
from growc.deploy.parity import compare
from growc.graph.candidates import find_width_sites
from growc.graph.handlers import handler_for
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace

TORCHVISION = ("resnet50", "resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf", "efficientnet_b0")
TORCHVISION += ("mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_16", "swin_t")


def _models(use_torchvision: bool) -> dict[str, Any]:
    if not use_torchvision:
        return dict(FAMILIES)
    import torchvision.models as tv  # noqa: PLC0415 - optional, and only here

    return {name: (lambda n=name: getattr(tv, n)(num_classes=10)) for name in TORCHVISION}


def _trained_looking(model: nn.Module, generator: torch.Generator) -> None:
    """BatchNorm statistics and weights away from their initial values, where every channel is
    alike and a new entry put at the wrong channel would go unseen."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.momentum = 0.0  # training-mode forwards leave the running statistics as they are


def _random_units(graph: nn.Module, site: Any, generator: torch.Generator, dtype: torch.dtype) -> NewUnits:
    producer = graph.get_submodule(site.producer)
    handler = handler_for(producer)
    k = site.groups * site.unit_block  # one unit per channel group, or one whole head
    rows = [graph.get_submodule(c).weight.shape[0] for c in site.consumers]

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return NewUnits(
        rows=draw(k, handler.in_size(producer) * handler.taps(producer)),
        bias=draw(k),
        omega=draw(sum(rows), k),
        omega_rows=rows,
        norm_weight=draw(k),
        norm_mean=draw(k),
        norm_var=draw(k).abs() + 0.5,
    )


def _outputs(graph: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    graph.train(training)
    for m in graph.modules():  # dropout draws a mask per unit: more units, other masks for the old ones
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    torch.manual_seed(0)  # the same stochastic-depth draws every time
    with torch.no_grad():
        return graph(x)


def _grown_at_zero(build: Any, dtype: torch.dtype) -> tuple[nn.Module, Any, list[SiteGrowth], dict[bool, float], Any]:
    """The model traced, every width site grown at amplitude 0; the output's change in eval and
    in training mode, relative to its scale."""
    generator = torch.Generator().manual_seed(0)
    model = build().to(dtype)
    _trained_looking(model, generator)
    graph = trace(model)
    report = find_width_sites(graph)
    x = torch.randn(2, 3, 64, 64, generator=generator, dtype=dtype)
    before = {mode: _outputs(graph, x, mode) for mode in (False, True)}
    with torch.no_grad():
        growths = [SiteGrowth(graph, site, _random_units(graph, site, generator, dtype)) for site in report.sites]
        for growth in growths:
            growth.set_amplitude(0.0)
    exact = {mode: compare(before[mode], _outputs(graph, x, mode)).relative_diff for mode in (False, True)}
    return model, report, growths, exact, graph


def measure(name: str, build: Any) -> dict[str, Any]:
    # The model's own layers, as the user wrote it (tracing writes nn.MultiheadAttention out as
    # Linears, `graph/attention.py`: those are not the model's layers).
    layers = [n for n, m in build().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    model, report, growths, exact, graph = _grown_at_zero(build, torch.float32)
    exact64 = _grown_at_zero(build, torch.float64)[3]
    grown = {n for s in report.sites for n in (s.producer, *s.writers, *s.carriers)}
    reasons = Counter(why for layer, why in report.skipped if layer in layers and layer not in grown)
    with torch.no_grad():
        for growth in growths:
            growth.set_amplitude(0.3)
    graph.eval()
    generator = torch.Generator().manual_seed(1)
    x, check = (torch.randn(n, 3, 64, 64, generator=generator) for n in (2, 3))
    exported = export_onnx(graph, [x], f"/tmp/growc-coverage-{name}.onnx", check_inputs=[check])
    covered = sum(n in grown for n in layers)
    return {
        "model": name,
        "layers": len(layers),
        "grown": covered,
        "share": covered / len(layers) if layers else 0.0,
        "sites": len(report.sites),
        "grouped_sites": sum(s.groups > 1 for s in report.sites),
        "exact_eval": exact[False],
        "exact_train": exact[True],
        "exact_train_float64": exact64[True],
        "onnx_relative": exported.parity.relative_diff,
        "reasons": reasons.most_common(3),
    }


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, build in _models(args.torchvision).items():
        if args.models and name not in args.models:
            continue
        log(f"{name}")
        rows.append(measure(name, build))
        log(f"  {rows[-1]['grown']}/{rows[-1]['layers']} layers grown, amplitude 0: {rows[-1]['exact_eval']:.1e}")
    info = machine("cpu")
    table = Table(
        ["model", "layers grown", "sites (grouped)", "amplitude 0: eval / train / train float64", "ONNX after growth"]
    )
    for r in rows:
        table.add(
            r["model"],
            f"{r['grown']}/{r['layers']} ({r['share']:.0%})",
            f"{r['sites']} ({r['grouped_sites']})",
            f"{r['exact_eval']:.1e} / {r['exact_train']:.1e} / {r['exact_train_float64']:.1e}",
            f"{r['onnx_relative']:.1e}",
        )
    source = "torchvision's definitions" if args.torchvision else "torchvision-shaped models (benchmarks/families.py)"
    lines = [
        f"Width coverage and exactness, {source}, random init, input 2x3x64x64; {machine_line(info)}.",
        "Differences are relative to the output's scale. In training mode a BatchNorm divides by the"
        " variance of a batch of 2 over maps as small as 2x2, which magnifies float32 rounding; in float64"
        " the same growth is exact to rounding.",
        "",
        table.markdown(),
    ]
    for r in rows:
        for why, count in r["reasons"]:
            lines.append(f"- {r['model']}: {count} layers: {why}")
    write_outputs(
        args.out,
        "coverage" + ("-torchvision" if args.torchvision else ""),
        "\n".join(lines),
        {
            "machine": info,
            "models": rows,
        },
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--torchvision", action="store_true", help="torchvision's own models (needs torchvision)")
    parser.add_argument("--models", nargs="*", default=None, help="only these models")
