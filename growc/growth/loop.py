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
from growc.graph.candidates import find_width_sites
from growc.graph.depth import find_depth_edges
from growc.graph.flops import multiply_adds
from growc.graph.site import Site
from growc.graph.trace import parameter_count, trace
from growc.growth import distributed
from growc.growth.checkpoint import load_with_state, save_checkpoint
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.measure import measure
from growc.growth.observer import Observer
from growc.growth.report import FINISHED, GrowthReport, StepRecord
from growc.growth.run_state import RunState, restore_optimizer, restore_random_states
from growc.growth.run_state import pack as run_state_pack
from growc.growth.schedule import Trainer
from growc.growth.step import (
    LineSearchBatch,
    StepContext,
    allocate_with_reasons,
    assess_sites,
    grow_allocated,
    not_allocated_records,
)
from growc.growth.train import LossFn, evaluate, first_batches, make_optimizer
from growc.tiny.strategies import make_strategy


@dataclass
class GrowthResult:
    model: fx.GraphModule  # the grown model: the traced graph, sharing its layers with the user's
    user_model: nn.Module  # the user's module, widened in place (new blocks live in `model` only)
    report: GrowthReport


def _line_search_batch(loader: Iterable, samples: int, device: torch.device, loss_fn: LossFn) -> LineSearchBatch:
    batches = first_batches(loader, samples, device, what="the training data")
    return LineSearchBatch.from_batches(batches, samples, loss_fn)


def widths(model: nn.Module, sites: list) -> dict[str, int]:
    """Width of every site that widens layers (new blocks' hidden layers included once they exist;
    a block's edge has no width of its own)."""
    return {s.name: s.width(model) for s in sites if not s.adds_modules}


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
    resume: bool = False,
    checkpoint_extra: dict[str, Any] | None = None,
) -> GrowthResult:
    """Grow `model` in place by the expressivity bottleneck and return it with its report.

    With `checkpoint`, the model, the report and everything needed to continue (optimizer and
    random states) are written there atomically after every step, with `checkpoint_extra` (JSON)
    in its metadata, and the report also to report.json in the checkpoint's folder (status
    "running" until the final training has completed, then "finished"); with `resume`, a run
    continues from that checkpoint and computes what the uninterrupted run would have."""
    config = config or GrowthConfig()
    observer = observer or Observer()
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    train_loader = distributed.shard_loader(train_loader, config.seed)  # this rank's share (under torchrun)
    clock = time.perf_counter()

    # From here on the model is the traced graph (see _graph_to_grow).
    graph, saved = _graph_to_grow(model, checkpoint, resume, leaf_modules, concrete_args, observer, device)
    sites = _all_sites(graph, config)
    if not sites:
        skipped = find_width_sites(graph).skipped
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped) or "no linear layers"
        raise GrowcError(f"no growth site found in {type(model).__name__} ({reasons})")
    optimizer = make_optimizer(config.optimizer, graph.parameters(), config.lr, config.weight_decay)
    search_batch = _line_search_batch(train_loader, config.line_search_samples, device, loss_fn)
    search_batch = distributed.reduced_line_search_batch(search_batch)  # loss: mean over all ranks
    if saved is not None:
        state = _resumed_state(saved, graph, optimizer, train_loader, generator)
        observer.message(f"resumed from {checkpoint} at step {state.step}")
    else:
        state = RunState(
            initial_params=parameter_count(graph),
            initial_flops=multiply_adds(graph, [x[:1] for x in search_batch.inputs]),
            report=GrowthReport(config=config.as_dict()),
        )
        state.final = config.steps == 0  # with no growth step asked for, the first phase is the final one
    observer.run_start(sites, parameter_count(graph))
    run = _Run(
        graph=graph,
        sites=sites,
        state=state,
        config=config,
        context=StepContext(graph, make_strategy(config.strategy), [optimizer], search_batch, config, generator),
        trainer=Trainer(train_loader, val_loader, loss_fn, optimizer, device, config, observer),
        replicas=distributed.Replicas(graph),  # under torchrun: DDP around the graph, rebuilt after growth
        observer=observer,
        checkpoint=checkpoint,
        checkpoint_extra=checkpoint_extra or {},
        clock=clock,
    )
    while not state.finished:
        run.step()
    return GrowthResult(model=graph, user_model=model, report=state.report)


@dataclass
class _Run:
    """A growth run's working set: what every step reads and changes."""

    graph: fx.GraphModule
    sites: list[Site]
    state: RunState
    config: GrowthConfig
    context: StepContext  # the model, strategy, optimizer, line-search batch and generator of growth
    trainer: Trainer
    replicas: distributed.Replicas
    observer: Observer
    checkpoint: str | Path | None
    checkpoint_extra: dict[str, Any]
    clock: float  # when the time not yet added to `state.elapsed` began

    def step(self) -> None:
        """Train (not before step 0: a network at its random start has strong, clean gradients to
        grow from, and a layer of one ReLU unit can die in its first epoch), measure, grow, and
        decide whether to go on; the final step trains only."""
        state, graph, trainer = self.state, self.graph, self.trainer
        seconds = {"train": 0.0, "statistics": 0.0, "solve": 0.0, "line_search": 0.0}
        train_loss, epochs = math.nan, 0
        if state.step > 0 or state.final:
            train_loss, epochs = trainer.phase(self.replicas.module(), state.step, state.final, seconds)
        collector = None
        if not state.final:
            collector, measured_loss = _measurement(
                graph,
                self.sites,
                self.config,
                state.step,
                trainer.train_loader,
                trainer.loss_fn,
                trainer.device,
                seconds,
            )
            train_loss = measured_loss if epochs == 0 else train_loss
        train_loss = distributed.mean_across_ranks(train_loss)
        if not math.isfinite(train_loss):
            raise GrowcError(
                f"the training loss became {train_loss} at step {state.step}: lower the learning rate (--lr)"
            )
        record = _step_record(
            graph,
            self.sites,
            state.step,
            train_loss,
            epochs,
            seconds,
            trainer.val_loader,
            trainer.loss_fn,
            trainer.device,
        )
        state.report.steps.append(record)
        if state.final:
            state.finished, state.report.status = True, FINISHED
            state.report.final = _final_block(state, graph, self.sites, record, self.context.batch)
        else:
            self._grow(collector, record)
        self.save()
        self.observer.step_end(record)

    def _grow(self, collector: StatisticsCollector, record: StepRecord) -> None:
        state, config = self.state, self.config
        record.seconds["statistics"] += distributed.before_growth_step(collector.accumulators, self.context.generator)
        outcome = _growth_step(self.context, self.sites, collector, record)
        if outcome.blocks_inserted:
            self.sites = _all_sites(self.graph, config)  # a new block: its hidden layer is a site, its output an edge
        state.barren = 0 if outcome.significant else state.barren + 1  # steps in a row without significant neurons
        session_seconds = time.perf_counter() - self.clock
        reason = _stop_reason(config, state, record, outcome, self.context.batch, self.graph, session_seconds)
        reason = distributed.broadcast_from_main(reason)  # the same decision on every rank (clocks differ)
        if reason:
            state.final, state.report.stop_reason = True, reason
            record.note = "; ".join(filter(None, [record.note, reason]))
        state.step += 1

    def save(self) -> None:
        if self.checkpoint is None or not distributed.is_main():
            return
        now = time.perf_counter()
        self.state.elapsed += now - self.clock
        self.clock = now
        optimizer, loader = self.context.optimizers[0], self.trainer.train_loader
        tensors, meta = run_state_pack(self.graph, optimizer, loader, self.context.generator)
        save_checkpoint(
            self.checkpoint, self.graph, {**self.checkpoint_extra, "run": self.state.to_json(), **meta}, tensors
        )
        _write_report(self.state.report, self.checkpoint)


def _graph_to_grow(
    user_model: nn.Module,
    checkpoint: str | Path | None,
    resume: bool,
    leaf_modules: Iterable[str],
    concrete_args: dict[str, Any] | None,
    observer: Observer,
    device: torch.device,
) -> tuple[fx.GraphModule, tuple[dict, dict] | None]:
    """The traced graph of the user's model, or the one a checkpoint holds when resuming (with
    its saved tensors and metadata). The graph shares every layer with the user's module (width
    growth shows in both) and is the only one that can receive new blocks."""
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        graph, state_tensors, extra = load_with_state(checkpoint)
        if "run" not in extra:
            raise GrowcError(f"'{checkpoint}' holds no resumable run state: start the run again without --resume")
        return graph.to(device), (state_tensors, extra)
    if resume:
        observer.message(f"no checkpoint at {checkpoint} to resume from: starting a new run")
    return trace(user_model, leaf_modules, concrete_args), None


def _resumed_state(
    saved: tuple[dict, dict],
    graph: fx.GraphModule,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    generator: torch.Generator,
) -> RunState:
    """The loop's state from a checkpoint, with the optimizer's and random generators' states put back."""
    state_tensors, extra = saved
    restore_optimizer(optimizer, graph, state_tensors, extra)
    restore_random_states(state_tensors, train_loader, generator)
    return RunState.from_json(extra["run"])


def _step_record(
    graph: fx.GraphModule,
    sites: list,
    step: int,
    train_loss: float,
    epochs: float,
    seconds: dict[str, float],
    val_loader: Iterable,
    loss_fn: LossFn,
    device: torch.device,
) -> StepRecord:
    """The step's record before growth: its losses, validation, widths and parameters."""
    val_loss, val_accuracy = evaluate(graph, val_loader, loss_fn, device)
    params = parameter_count(graph)
    return StepRecord(
        step=step,
        params=params,
        train_loss=train_loss,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        widths=widths(graph, sites),
        bottlenecks={},
        seconds=seconds,
        params_after=params,
        epochs=epochs,
    )


def _measurement(
    graph: fx.GraphModule,
    sites: list,
    config: GrowthConfig,
    step: int,
    train_loader: Iterable,
    loss_fn: LossFn,
    device: torch.device,
    seconds: dict[str, float],
) -> tuple[StatisticsCollector, float]:
    """The step's measurement pass: every site's moments, and the mean loss of the samples."""
    start = time.perf_counter()
    collector = StatisticsCollector(
        graph, sites, config.folds, config.stat_samples, config.stat_rows_per_sample, config.seed + step
    )
    # On the plain graph: a pass without updates needs no DDP.
    loss = measure(graph, collector, train_loader, loss_fn, device)
    seconds["statistics"] = time.perf_counter() - start
    return collector, loss


def _write_report(report: GrowthReport, checkpoint: str | Path) -> None:
    """report.json beside the checkpoint, after every step: a run stopped at any moment (even by
    SIGKILL) leaves the steps it completed readable, marked as not finished until the end."""
    report.write(Path(checkpoint).parent / "report.json")


def _final_block(state: RunState, graph: fx.GraphModule, sites: list, last: StepRecord, batch: LineSearchBatch) -> dict:
    first = state.report.steps[0]
    return {
        "initial_params": state.initial_params,
        "final_params": parameter_count(graph),
        "initial_flops": state.initial_flops,
        "final_flops": multiply_adds(graph, [x[:1] for x in batch.inputs]),
        "initial_widths": first.widths,
        "first_val_accuracy": first.val_accuracy,
        "final_val_accuracy": last.val_accuracy,
        "final_val_loss": last.val_loss,
        "widths": widths(graph, sites),
    }


@dataclass
class StepOutcome:
    blocks_inserted: bool  # the graph changed: sites must be found again
    significant: int  # significant neurons over all sites
    cheapest_neuron: int  # parameters of the cheapest neuron anywhere


def _growth_step(
    context: StepContext, sites: list[Site], collector: StatisticsCollector, record: StepRecord
) -> StepOutcome:
    """Measure every site, allocate neurons, grow; fills `record`."""
    graph, config, search_batch = context.model, context.config, context.batch
    start = time.perf_counter()
    assessments = assess_sites(graph, sites, collector.accumulators, config)
    record.seconds["solve"] = time.perf_counter() - start
    record.bottlenecks = {a.site.name: a.summary() for a in assessments}
    budget = None if config.max_params is None else config.max_params - record.params
    counts, not_given = allocate_with_reasons(assessments, budget)
    start = time.perf_counter()
    grown, undos, blocks = grow_allocated(context, assessments, counts)
    record.grown.extend(grown)
    record.grown.extend(not_allocated_records(assessments, not_given, grown))
    after = search_batch.loss(graph) if undos else 0.0
    if not math.isfinite(after):
        # Each site's amplitude was safe on its own; together they broke the loss: take it all back.
        for undo in reversed(undos):
            undo()
        for g in record.grown:
            if g.neurons:
                g.neurons, g.reason = 0, "rolled back with the whole step (the loss became non-finite)"
        blocks = False
        record.note = f"growth rolled back: the loss became {after} after this step's changes"
    record.seconds["line_search"] = time.perf_counter() - start
    record.params_after = parameter_count(graph)
    return StepOutcome(
        blocks_inserted=blocks,
        significant=sum(a.significant for a in assessments),
        cheapest_neuron=min((a.cost for a in assessments), default=0),
    )


def _stop_reason(
    config: GrowthConfig,
    state: RunState,
    record: StepRecord,
    outcome: StepOutcome,
    search_batch: LineSearchBatch,
    graph: fx.GraphModule,
    session_seconds: float,
) -> str:
    """Why growth stops after this step ("" to go on); the final training follows either way."""
    if state.step + 1 >= config.steps:
        return f"reached the {config.steps} growth steps asked for"
    if config.max_params is not None and record.params_after + outcome.cheapest_neuron > config.max_params:
        return f"reached the parameter budget ({config.max_params:,})"
    if config.max_flops is not None:
        flops = multiply_adds(graph, [x[:1] for x in search_batch.inputs])
        if flops >= config.max_flops:
            return f"reached the compute budget ({flops:,} >= {config.max_flops:,} multiply-adds per sample)"
    if (
        config.target_accuracy is not None
        and record.val_accuracy is not None
        and record.val_accuracy >= config.target_accuracy
    ):
        return f"reached the target accuracy ({record.val_accuracy:.2%} >= {config.target_accuracy:.2%})"
    if config.time_budget is not None and state.elapsed + session_seconds >= config.time_budget:
        return f"used the time budget ({config.time_budget:g} s)"
    if state.barren >= config.patience:
        return f"no site had a significant gain for {state.barren} steps in a row ({_last_tests(record)})"
    return _validation_plateau(config, state.report.steps)


def _validation_plateau(config: GrowthConfig, steps: list[StepRecord]) -> str:
    """Why growth stops on the validation loss ("" to go on): over the last
    `validation_patience` epochs of training, it never beat its best before them by
    `plateau_tolerance` (relative)."""
    if config.validation_patience is None:
        return ""
    window, epochs = [], 0.0
    for record in reversed(steps):
        if epochs >= config.validation_patience - 1e-9:
            break
        window.append(record)
        epochs += record.epochs
    before = steps[: len(steps) - len(window)]
    if epochs < config.validation_patience - 1e-9 or not before:
        return ""
    losses = [r.val_loss for r in before if math.isfinite(r.val_loss)]
    recent = [r.val_loss for r in window if math.isfinite(r.val_loss)]
    if not losses or not recent:
        return ""
    best, latest_best = min(losses), min(recent)
    if latest_best < best * (1 - config.plateau_tolerance):
        return ""
    return (
        f"the validation loss did not improve on its best ({best:.4g}) by {config.plateau_tolerance:.0%} over the "
        f"last {epochs:g} epochs of growth (best there {latest_best:.4g}; validation_patience {config.validation_patience:g})"
    )


def _last_tests(record: StepRecord) -> str:
    """The significance test's numbers at each site in the last step: what stopped the run."""
    parts = []
    for site, b in record.bottlenecks.items():
        if "held_out_alignment" in b:
            parts.append(
                f"{site}: first neuron's held-out alignment {b['held_out_alignment']:.3g} against "
                f"{b['z']:g} x its standard error {b['held_out_std_error']:.3g}, relative bottleneck {b['relative']:.3g}"
            )
        else:
            parts.append(f"{site}: too few statistics folds for the test")
    return "; ".join(parts) or "no site was measured"
