"""Reused forward passes (graph/incremental.py): the values kept between evaluations are the
values a whole forward gives, bit for bit, whatever growth changes, and a change deep in the
graph reruns only what it reaches."""

import pytest
import torch
from test_zoo import _random_units, _randomize_norms
from torch import nn
from zoo import ZOO, inputs_for

from growc.graph.candidates import find_width_sites
from growc.graph.incremental import IncrementalForward
from growc.graph.rewrite import SiteGrowth
from growc.graph.trace import trace
from growc.growth.step import LineSearchBatch


def _same(got, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return torch.equal(got, expected)
    if isinstance(expected, (tuple, list)):
        return len(got) == len(expected) and all(_same(a, b) for a, b in zip(got, expected))
    return got == expected


def _check(reuse: IncrementalForward, graph, chunks, what: str) -> None:
    with torch.no_grad():
        expected = [graph(*c) for c in chunks]
    got = reuse.outputs(graph, chunks)
    assert all(_same(a, b) for a, b in zip(got, expected)), what


def _chunks(model):
    x = inputs_for(model, batch=6)
    return [[t[:3] for t in x], [t[3:] for t in x]]


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_reused_outputs_equal_a_whole_forward_through_growth(cls):
    """Every site grown, at amplitude 0.3 then 0, then undone, and a weight changed behind
    autograd's back (`.data`, which no version counter sees): each evaluation equals `graph(*x)`."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = cls()
    _randomize_norms(model, g)
    graph = trace(model).eval()
    chunks = _chunks(model)
    reuse = IncrementalForward()
    _check(reuse, graph, chunks, "first evaluation")
    run = reuse.run_nodes
    _check(reuse, graph, chunks, "nothing changed")
    assert reuse.run_nodes == run, "an evaluation with nothing changed reran nodes"
    for site in find_width_sites(graph).sites:
        with torch.no_grad():
            growth = SiteGrowth(graph, site, _random_units(graph, site, generator=g))
            growth.set_amplitude(0.3)
        _check(reuse, graph, chunks, f"{site.name} at amplitude 0.3")
        with torch.no_grad():
            growth.set_amplitude(0.0)
        _check(reuse, graph, chunks, f"{site.name} at amplitude 0")
        growth.undo()
        _check(reuse, graph, chunks, f"{site.name} undone")
    weights = [m.weight for m in graph.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights[-1].data.mul_(1.5)
    _check(reuse, graph, chunks, "last layer scaled through .data")
    weights[0].data.add_(0.01)
    _check(reuse, graph, chunks, "first layer moved through .data")


class InPlace(nn.Module):
    """In-place calls of every traced form whose result is what is read next: a module with
    inplace=True, `+=`, `relu_`, `add_`, `F.relu(inplace=True)`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.a(x))
        skip = h * 1.0
        h = self.b(h)
        h += skip
        h = torch.relu_(h)
        h = h.add_(1.0)
        return self.c(torch.nn.functional.relu(h, inplace=True))


def test_in_place_calls_never_overwrite_a_kept_value():
    torch.manual_seed(0)
    model = InPlace().eval()
    graph = trace(model).eval()
    chunks = [[torch.randn(5, 4)], [torch.randn(5, 4)]]
    reuse = IncrementalForward()
    for step in range(4):  # the middle layer changes: the in-place calls after it read kept values
        _check(reuse, graph, chunks, f"evaluation {step}")
        graph.b.weight.data.mul_(0.7)
        assert model.act.inplace, "the module's own setting is restored"
    assert reuse.reused_nodes > 0


def test_a_change_at_the_end_reruns_only_the_end():
    torch.manual_seed(0)
    graph = trace(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))).eval()
    chunks = [[torch.randn(8, 4)]]
    reuse = IncrementalForward()
    _check(reuse, graph, chunks, "first")
    run = reuse.run_nodes
    graph.get_submodule("4").weight.data.mul_(2.0)
    _check(reuse, graph, chunks, "last layer changed")
    assert reuse.run_nodes - run == 1, "only the last Linear reruns"
    graph.get_submodule("0").eps = 1.0  # a new plain attribute counts as a change too
    _check(reuse, graph, chunks, "first layer's attributes changed")
    assert reuse.run_nodes - run == 1 + 5


def test_a_budget_too_small_for_any_value_still_gives_the_outputs():
    torch.manual_seed(0)
    graph = trace(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))).eval()
    chunks = [[torch.randn(8, 4)], [torch.randn(8, 4)]]
    reuse = IncrementalForward(budget_bytes=1)
    for _ in range(3):
        _check(reuse, graph, chunks, "no value kept")
        graph.get_submodule("2").weight.data.mul_(0.5)
    assert reuse.reused_nodes == 0


def test_line_search_loss_is_the_same_with_and_without_reuse():
    """The loss the amplitude search compares, chunked, through a growth: equal as floats."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ZOO[ZOO.index(next(c for c in ZOO if c.__name__ == "ResBlock"))]()
    graph = trace(model)
    x = inputs_for(model, batch=10)
    target = torch.randint(0, graph(*x).shape[1], (10,), generator=g)
    loss_fn = nn.functional.cross_entropy
    reused = LineSearchBatch(x, target, loss_fn, chunk=4)
    plain = LineSearchBatch(x, target, loss_fn, chunk=4, reuse=None)
    assert reused.loss(graph) == plain.loss(graph)
    for site in find_width_sites(graph).sites:
        with torch.no_grad():
            growth = SiteGrowth(graph, site, _random_units(graph, site, generator=g))
        for amplitude in (0.0, 0.25, 1.0):
            with torch.no_grad():
                growth.set_amplitude(amplitude)
            assert reused.loss(graph) == plain.loss(graph), (site.name, amplitude)
    assert graph.training, "the model's mode is kept"


class SideEffect(nn.Module):
    """`h.add_(1)` whose result is never used: the next node reads `h`, written in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h.add_(1.0)
        return self.b(h)


def test_a_graph_that_reads_what_an_in_place_call_wrote_is_evaluated_whole():
    torch.manual_seed(0)
    graph = trace(SideEffect()).eval()
    chunks = [[torch.randn(5, 4)]]
    reuse = IncrementalForward()
    for _ in range(3):
        _check(reuse, graph, chunks, "side effect")
        graph.b.weight.data.mul_(0.5)
    assert reuse.reused_nodes == 0
