"""Growth one step at a time, under the caller's control.

`grow()` runs the whole schedule. `Grower` is for people who keep their own training loop, or
who study growth: it traces the model once, lists the candidates, measures their bottlenecks
on batches the caller chooses, and grows the sites the caller names (or lets the allocation by
gain per parameter choose), carrying the caller's optimizer state over to grown parameters.

    grower = Grower(model, F.cross_entropy)
    for a in grower.measure(train_loader):        # statistics + TINY solution of every site
        print(a.site.name, a.summary())
    grower.grow("fc1", neurons=4, optimizer=opt)  # or grower.grow(optimizer=opt): all sites
    ... train grower.model with opt ...
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from growc.errors import GrowcError
from growc.graph.candidates import CandidateReport, find_width_sites
from growc.graph.depth import find_depth_edges
from growc.graph.site import Site
from growc.graph.trace import parameter_count, trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.measure import measure
from growc.growth.report import SiteGrowthRecord
from growc.growth.step import (
    LineSearchBatch,
    SiteAssessment,
    StepContext,
    allocate_with_reasons,
    assess_sites,
    grow_allocated,
    not_allocated_records,
)
from growc.growth.train import LossFn
from growc.tiny.strategies import make_strategy


class Grower:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: GrowthConfig | None = None,
        leaf_modules: Iterable[str] = (),
        concrete_args: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or GrowthConfig()
        self.loss_fn = loss_fn
        #: The model to train and export: the traced graph, sharing its layers with `model`.
        self.model: fx.GraphModule = trace(model, leaf_modules, concrete_args)
        self.candidates: CandidateReport = CandidateReport()
        self.assessments: dict[str, SiteAssessment] = {}
        self._batch: LineSearchBatch | None = None
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._find_sites()

    def _find_sites(self) -> None:
        self.candidates = find_width_sites(self.model)
        self.candidates.depth = find_depth_edges(self.model) if self.config.depth else []
        self.candidates.graph = self.model

    @property
    def sites(self) -> list[Site]:
        return [*self.candidates.sites, *self.candidates.depth]

    def measure(self, loader: Iterable) -> list[SiteAssessment]:
        """Run `config.stat_samples` samples of `loader` forward and backward (no parameter
        or buffer changes), gather every site's statistics and solve them; returns the assessments, the
        most valuable first. Also keeps `config.line_search_samples` samples for `grow`."""
        if not self.sites:
            raise GrowcError("the model has no growth site: see `candidates.skipped` for why")
        device = next(self.model.parameters()).device
        collector = StatisticsCollector(
            self.model,
            self.sites,
            self.config.folds,
            self.config.stat_samples,
            self.config.stat_rows_per_sample,
            self.config.seed,
        )
        kept: list[tuple[list[torch.Tensor], torch.Tensor]] = []

        def keep(inputs: list[torch.Tensor], target: torch.Tensor) -> None:
            if sum(t.shape[0] for _, t in kept) < self.config.line_search_samples:
                kept.append((inputs, target))

        measure(self.model, collector, loader, self.loss_fn, device, keep)
        if not kept:
            raise GrowcError("the loader gave no batch to measure the sites on")
        self._batch = LineSearchBatch.from_batches(kept, self.config.line_search_samples, self.loss_fn)
        found = assess_sites(self.model, self.sites, collector.accumulators, self.config)
        found.sort(key=lambda a: -a.gain_per_parameter(0) if a.significant else 0.0)
        self.assessments = {a.site.name: a for a in found}
        return found

    def grow(
        self,
        site: str | None = None,
        neurons: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> list[SiteGrowthRecord]:
        """Grow from the last measurement: `site` with `neurons` new neurons (default: as many as
        passed the significance test, at least one), or with `site` None every site as the
        allocation by gain per parameter decides. `optimizer`'s state is carried over to the
        grown parameters. The measurement is used up: measure again before the next growth."""
        if not self.assessments or self._batch is None:
            raise GrowcError("measure the sites first: grower.measure(loader)")
        assessments = list(self.assessments.values())
        not_given: dict[str, str] = {}
        if site is None:
            budget = None
            if self.config.max_params is not None:
                budget = self.config.max_params - parameter_count(self.model)
            counts, not_given = allocate_with_reasons(assessments, budget)
        elif site not in self.assessments:
            raise GrowcError(f"no measured site '{site}': choose one of {', '.join(self.assessments)}")
        else:
            chosen = self.assessments[site]
            counts = {site: neurons if neurons is not None else max(chosen.significant, 1)}
            assessments = [chosen]
        context = StepContext(
            self.model,
            make_strategy(self.config.strategy),
            [optimizer] if optimizer is not None else [],
            self._batch,
            self.config,
            self._generator,
        )
        records, _, blocks = grow_allocated(context, assessments, counts)
        records += not_allocated_records(assessments, not_given, records)
        self.assessments = {}
        if blocks:
            self._find_sites()  # a new block: its hidden layer is a site, its output an edge
        return records
