"""A site whose significant neurons were not added says why, in report.json and on the console."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growc.growth.step as step_module
from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import (
    LineSearchBatch,
    StepContext,
    allocate_with_reasons,
    assess_sites,
    grow_site,
    not_allocated_records,
)
from growc.tiny.strategies import make_strategy


@pytest.fixture(scope="module")
def measured():
    """A two-site MLP, measured on data it underfits: both sites have significant neurons."""
    torch.manual_seed(0)
    x = torch.randn(1024, 10)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5:].pow(2).sum(1) > 5).long()
    model = nn.Sequential(nn.Linear(10, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3))
    graph = trace(model)
    sites = find_width_sites(graph).sites
    collector = StatisticsCollector(graph, sites, folds=4)
    with collector:
        for i in range(0, 1024, 64):
            graph.zero_grad()
            F.cross_entropy(graph(x[i : i + 64]), y[i : i + 64]).backward()
            collector.accumulate(64)
    assessments = assess_sites(graph, sites, collector.accumulators, GrowthConfig())
    assert all(a.significant > 0 for a in assessments), [a.significant for a in assessments]
    return graph, assessments, LineSearchBatch([x[:256]], y[:256], F.cross_entropy)


def test_sites_left_out_by_the_budget_say_so(measured):
    _, assessments, _ = measured
    cheapest = min(a.cost for a in assessments)
    counts, reasons = allocate_with_reasons(assessments, cheapest - 1)
    assert counts == {}
    records = not_allocated_records(assessments, reasons, [])
    assert {r.site for r in records} == {a.site.name for a in assessments}
    for r in records:
        assert r.neurons == 0 and r.significant > 0
        assert "parameter budget" in r.reason and f"{cheapest - 1:,} are left" in r.reason
    counts, reasons = allocate_with_reasons(assessments, None)
    assert sum(counts.values()) == sum(a.significant for a in assessments) and reasons == {}
    # A budget for one neuron: the other significant neurons say why they did not go in.
    counts, reasons = allocate_with_reasons(assessments, cheapest)
    assert sum(counts.values()) == 1
    assert set(reasons) == {a.site.name for a in assessments if counts.get(a.site.name, 0) < a.significant}


def _context(graph, strategy: str, batch) -> StepContext:
    """One site's growth alone: the neurons without the consumers' update."""
    config = GrowthConfig(update_existing=False)
    return StepContext(graph, make_strategy(strategy), [], batch, config, torch.Generator().manual_seed(0))


def test_a_line_search_that_keeps_zero_says_what_it_tried(measured, monkeypatch):
    graph, assessments, batch = measured
    real_search = step_module.line_search

    def keeps_zero(loss_at, candidates, known=None):
        """The real losses at every amplitude, then 0 chosen, as when every amplitude hurts."""
        _, _, losses = real_search(loss_at, candidates, known)
        return 0.0, losses[0.0], losses

    monkeypatch.setattr(step_module, "line_search", keeps_zero)
    record, undo = grow_site(
        _context(graph, "tiny", batch),
        assessments[0],
        1,
    )
    undo()
    assert record.neurons == 0 and record.gamma == 0.0
    assert record.reason is not None
    assert "line search kept amplitude 0" in record.reason and "against" in record.reason, record.reason


def test_a_site_that_grows_as_asked_gives_no_reason(measured):
    graph, assessments, batch = measured
    a = assessments[0]
    record, undo = grow_site(
        _context(graph, "random", batch),
        a,
        a.significant,
    )
    undo()
    assert (record.neurons == a.significant) == (record.reason is None), record


def test_the_significance_numbers_are_reported_and_name_what_stopped_the_run(measured):
    from growc.growth.loop import _last_tests
    from growc.growth.report import StepRecord

    _, assessments, _ = measured
    bottlenecks = {}
    for a in assessments:
        summary = a.summary()
        mean, error, z = summary["held_out_alignment"], summary["held_out_std_error"], summary["z"]
        assert z == GrowthConfig().significance_z
        assert (mean > z * error and mean > 0) == (a.significant > 0)  # the numbers are the test's
        bottlenecks[a.site.name] = summary
    record = StepRecord(
        step=0, params=0, train_loss=0.0, val_loss=0.0, val_accuracy=None, widths={}, bottlenecks=bottlenecks
    )
    text = _last_tests(record)
    for name, s in bottlenecks.items():
        assert f"{name}: first neuron's held-out alignment {s['held_out_alignment']:.3g}" in text
