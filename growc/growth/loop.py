"""The growth run: train, measure, choose, apply, repeat; readable top to bottom in `grow`."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from growc.errors import GrowcError
from growc.graph.candidates import WidthSite, find_width_sites
from growc.graph.depth import DepthSite, find_depth_edges
from growc.graph.trace import parameter_count, trace
from growc.growth.checkpoint import save_checkpoint
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.report import GrowthReport, StepRecord
from growc.growth.step import LineSearchBatch, allocate, assess_sites, grow_site
from growc.growth.train import LossFn, evaluate, make_optimizer, split_batch, train_epoch
from growc.tiny.strategies import make_strategy


class Observer:
    """Hooks for whoever shows progress (the CLI); every method is optional."""

    def run_start(self, sites: list[WidthSite], params: int) -> None: ...
    def epoch_start(self, step: int, epoch: int, epochs: int, batches: int) -> None: ...
    def batch_end(self) -> None: ...
    def epoch_end(self, step: int, epoch: int, train_loss: float) -> None: ...
    def step_end(self, record: StepRecord) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class GrowthResult:
    model: fx.GraphModule  # the grown model: the traced graph, sharing its layers with the user's
    user_model: nn.Module  # the user's module, widened in place (new blocks live in `model` only)
    report: GrowthReport


def _line_search_batch(loader: Iterable, samples: int, device: torch.device, loss_fn: LossFn) -> LineSearchBatch:
    parts: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    count = 0
    for batch in loader:
        inputs, target = split_batch(batch, device)
        parts.append((inputs, target))
        count += target.shape[0]
        if count >= samples:
            break
    if not parts:
        raise GrowcError("the training data is empty: give at least one batch of samples")
    inputs = [torch.cat([p[0][i] for p in parts])[:samples] for i in range(len(parts[0][0]))]
    target = torch.cat([p[1] for p in parts])[:samples]
    return LineSearchBatch(inputs, target, loss_fn)


def _train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    config: GrowthConfig,
    observer: Observer,
    step: int,
    epoch: int,
    epochs: int,
    collector: StatisticsCollector | None,
    seconds: dict[str, float],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> float:
    """One training epoch; with a collector, its last batches also feed the growth statistics."""
    batches = len(loader) if hasattr(loader, "__len__") else 0
    # Statistics come from the last batches before the growth step: the freshest weights.
    first_stat_batch = max(0, batches - math.ceil(config.stat_samples / config.batch_size))
    observer.epoch_start(step, epoch, epochs, batches)

    def after_backward(index: int, size: int) -> None:
        if collector is not None and index >= first_stat_batch:
            start = time.perf_counter()
            collector.accumulate(size)
            seconds["statistics"] += time.perf_counter() - start
        observer.batch_end()

    start = time.perf_counter()
    if collector is not None:
        with collector:
            loss = train_epoch(model, loader, loss_fn, optimizer, device, after_backward, scheduler)
    else:
        loss = train_epoch(model, loader, loss_fn, optimizer, device, after_backward, scheduler)
    seconds["train"] += time.perf_counter() - start
    observer.epoch_end(step, epoch, loss)
    return loss


def widths(model: nn.Module, sites: list) -> dict[str, int]:
    """Width of every width site (new blocks included once they exist)."""
    return {s.name: s.width(model) for s in sites if isinstance(s, WidthSite)}


def _all_sites(graph: fx.GraphModule, config: GrowthConfig) -> list:
    sites: list = list(find_width_sites(graph).sites)
    if config.depth:
        sites += find_depth_edges(graph)
    return sites


def grow(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    loss_fn: LossFn,
    config: GrowthConfig | None = None,
    observer: Observer | None = None,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> GrowthResult:
    """Grow `model` in place by the expressivity bottleneck and return it with its report.

    With `checkpoint`, the model and the report so far are written there (atomically) after every
    step, so an interrupted run leaves its last good state readable."""
    config = config or GrowthConfig()
    observer = observer or Observer()
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)

    user_model = model
    # From here on the model is the traced graph: it shares every layer with the user's module
    # (width growth shows in both) and is the only one that can receive new blocks.
    model = graph = trace(user_model, leaf_modules, concrete_args)
    candidates = find_width_sites(graph)
    sites = _all_sites(graph, config)
    if not sites:
        reasons = "; ".join(f"{name}: {why}" for name, why in candidates.skipped) or "no linear layers"
        raise GrowcError(f"no growth site found in {type(user_model).__name__} ({reasons})")
    strategy = make_strategy(config.strategy)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
    search_batch = _line_search_batch(train_loader, config.line_search_samples, device, loss_fn)
    report = GrowthReport(config=config.as_dict())
    initial_params = parameter_count(model)
    observer.run_start(sites, initial_params)

    final = config.steps == 0  # with no growth step asked for, the first phase is the final one
    barren = 0  # consecutive steps where no site had a significant gain
    for step in range(config.steps + 1):
        epochs = (
            config.epochs if not final else (config.final_epochs if config.final_epochs is not None else config.epochs)
        )
        seconds = {"train": 0.0, "statistics": 0.0, "solve": 0.0, "line_search": 0.0}
        collector = StatisticsCollector(model, sites, config.folds, config.stat_samples)
        # Learning-rate policy: constant while growing (new and old neurons share it, Adam's
        # per-entry scaling adapts to each), then a cosine decay to 0 over the final training.
        scheduler = None
        if final and epochs and hasattr(train_loader, "__len__"):
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
        train_loss = math.nan
        for epoch in range(epochs):
            collecting = not final and epoch == epochs - 1
            train_loss = _train_one_epoch(
                model,
                train_loader,
                loss_fn,
                optimizer,
                device,
                config,
                observer,
                step,
                epoch,
                epochs,
                collector if collecting else None,
                seconds,
                scheduler,
            )
        seconds["train"] -= seconds["statistics"]
        if not math.isfinite(train_loss) and epochs:
            raise GrowcError(f"the training loss became {train_loss} at step {step}: lower the learning rate (--lr)")
        val_loss, val_accuracy = evaluate(model, val_loader, loss_fn, device)
        params = parameter_count(model)
        record = StepRecord(
            step=step,
            params=params,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            widths=widths(model, sites),
            bottlenecks={},
        )
        record.seconds = seconds
        report.steps.append(record)
        if final:
            record.params_after = params
            observer.step_end(record)
            break

        start = time.perf_counter()
        assessments = assess_sites(model, sites, collector.accumulators, config)
        seconds["solve"] = time.perf_counter() - start
        record.bottlenecks = {
            a.site.name: {
                "bottleneck": a.solution.bottleneck,
                "relative": a.solution.relative_bottleneck,
                "best_gain": float(a.solution.neurons.lambdas[0] ** 2) if a.solution.neurons.count else 0.0,
                "significant": a.significant,
            }
            for a in assessments
        }
        budget = None if config.max_params is None else config.max_params - params
        counts = allocate(assessments, budget)
        start = time.perf_counter()
        widened: set[str] = set()  # layers whose input dimension grew in this step
        # Width first, then new blocks; a block on an edge whose width just changed waits a step
        # (its statistics were taken at the old width).
        for a in sorted(assessments, key=lambda a: (isinstance(a.site, DepthSite), -a.value(0) if a.significant else 0.0)):
            if counts.get(a.site.name, 0) == 0:
                continue
            if isinstance(a.site, DepthSite) and a.site.consumer in widened:
                continue
            grown = grow_site(model, a, counts[a.site.name], strategy, [optimizer], search_batch, config, generator)
            record.grown.append(grown)
            if grown.neurons:
                widened.update(a.site.consumers)
        seconds["line_search"] = time.perf_counter() - start
        record.params_after = parameter_count(model)
        if any(isinstance(a.site, DepthSite) and g.neurons for a in assessments for g in record.grown if g.site == a.site.name):
            sites = _all_sites(graph, config)  # a new block: its hidden layer is a site, its output an edge
        observer.step_end(record)
        if checkpoint is not None:
            save_checkpoint(checkpoint, graph, {"report": report.to_dict(), "step": step})

        if step + 1 >= config.steps:
            final, report.stop_reason = True, f"reached the {config.steps} growth steps asked for"
        elif (
            config.max_params is not None
            and record.params_after + min((a.cost for a in assessments), default=0) > config.max_params
        ):
            final, report.stop_reason = True, f"reached the parameter budget ({config.max_params})"
        else:
            barren = 0 if any(a.significant for a in assessments) else barren + 1
            if barren >= config.patience:
                final = True
                report.stop_reason = f"no site had a significant gain for {barren} steps in a row"
        if final:
            record.note = report.stop_reason
    last = report.steps[-1]
    report.final = {
        "initial_params": initial_params,
        "final_params": parameter_count(model),
        "final_val_accuracy": last.val_accuracy,
        "final_val_loss": last.val_loss,
        "widths": widths(model, sites),
    }
    return GrowthResult(model=graph, user_model=user_model, report=report)
