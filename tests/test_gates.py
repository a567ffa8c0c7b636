"""Products of the units with computed factors (gates): what grows exactly, what is refused."""

import pytest
import torch
import torch.nn.functional as F
from test_zoo import _outputs, _random_units
from torch import nn

from growc.graph.candidates import find_width_sites
from growc.graph.rewrite import SiteGrowth
from growc.graph.trace import trace


def _exact_at_zero(model: nn.Module, x: torch.Tensor) -> dict:
    """Every site grows random units; at amplitude 0 the outputs are unchanged in both modes."""
    graph, g = trace(model), torch.Generator().manual_seed(0)
    report = find_width_sites(graph)
    with torch.no_grad():
        for site in report.sites:
            for training in (False, True):
                graph.train(training)
                before = _outputs(graph, [x])
                growth = SiteGrowth(graph, site, _random_units(graph, site, generator=g))
                growth.set_amplitude(0.0)
                torch.testing.assert_close(_outputs(graph, [x]), before, atol=1e-6, rtol=0)
                growth.undo()
    return {"sites": {s.name: s for s in report.sites}, "skipped": dict(report.skipped)}


class SEBranch(nn.Module):
    """Squeeze-excitation on a residual branch: the stream, the branch's layer and the gate's
    writer are one site."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.r, self.e = nn.Linear(4, 2), nn.Linear(2, 4)

    def forward(self, x):
        x = self.stem(x)
        h = F.relu(self.a(x))
        return self.b(x + h * torch.sigmoid(self.e(F.relu(self.r(h)))))


def test_a_gate_on_a_residual_branch_grows_with_the_stream():
    found = _exact_at_zero(SEBranch(), torch.randn(6, 5))
    site = next(s for s in found["sites"].values() if "e" in s.writers)
    assert {site.producer, *site.writers} == {"stem", "a", "e"}
    assert "stem" not in found["skipped"] and "a" not in found["skipped"]


def test_a_hand_written_swish_has_the_product_rules_slope():
    """h * sigmoid(h): d/dz [z sigmoid(z)] at 0 is sigmoid(0) = 0.5; h * relu(h) has none."""

    class Swish(nn.Module):
        def __init__(self, factor) -> None:
            super().__init__()
            self.a, self.b, self.factor = nn.Linear(5, 4), nn.Linear(4, 3), factor

        def forward(self, x):
            h = self.a(x)
            return self.b(h * self.factor(h))

    found = _exact_at_zero(Swish(torch.sigmoid), torch.randn(6, 5))
    assert found["sites"]["a"].slope_at_zero == pytest.approx(0.5)
    found = _exact_at_zero(Swish(torch.relu), torch.randn(6, 5))
    assert "a" not in found["sites"] and "a factor that is 0 there" in found["skipped"]["a"]


def test_a_factor_narrower_than_the_units_is_refused_not_grown():
    """A one-channel attention map broadcast over the channels (CBAM's spatial gate)."""

    class SpatialGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.att, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 1, 1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h * torch.sigmoid(self.att(h))).mean((2, 3))

    found = _exact_at_zero(SpatialGate(), torch.randn(3, 2, 6, 6))
    assert "a" not in found["sites"] and "broadcast" in found["skipped"]["a"]


def test_a_gate_on_concatenated_units_is_refused():
    """The gate's writer would get its new rows at its end, not at the units' offset."""

    class CatGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c, self.g, self.b = nn.Linear(5, 3), nn.Linear(5, 4), nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x):
            return self.b(torch.cat([self.a(x), self.c(x)], 1) * torch.sigmoid(self.g(x)))

    found = _exact_at_zero(CatGate(), torch.randn(6, 5))
    assert not {"a", "c"} & set(found["sites"])
    assert "concatenated" in found["skipped"]["a"]


def test_a_parametrized_layer_is_left_intact_with_its_reason():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    found = _exact_at_zero(model, torch.randn(6, 5))
    assert not found["sites"] and "parametrization" in found["skipped"]["0"]
