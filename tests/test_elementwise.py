"""The element-wise op table: every entry's slope at 0 and its value at 0 are the op's own."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from growc.graph.candidates import find_width_sites
from growc.graph.elementwise import _FUNCTIONS, _MODULES, OPS, elementwise_op
from growc.graph.trace import trace

H = 1e-6


def _centred_slope(f) -> float:
    """The mean of the one-sided derivatives at 0 (the linearization growc uses at a kink)."""
    x = torch.tensor([-H, 0.0, H], dtype=torch.float64)
    y = f(x)
    return float((y[2] - y[0]) / (2 * H))


def _first_call(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method"))


@pytest.mark.parametrize(
    "cls", [c for c, name in _MODULES.items() if OPS[name].slope is not None], ids=lambda c: c.__name__
)
def test_each_activation_module_has_its_own_slope_and_value_at_zero(cls):
    module = cls().double().eval()  # RReLU: its mean slope in eval mode
    gm = trace(nn.Sequential(module))
    op = elementwise_op(gm, _first_call(gm))
    with torch.no_grad():
        assert op.slope == pytest.approx(_centred_slope(module), abs=1e-4), cls.__name__
        assert op.value_at_zero == pytest.approx(float(module(torch.zeros(1, dtype=torch.float64))), abs=1e-12)


@pytest.mark.parametrize(
    "function",
    [f for f, name in _FUNCTIONS.items() if OPS[name].slope is not None],
    ids=lambda f: getattr(f, "__name__", str(f)),
)
def test_each_activation_function_has_its_own_slope_and_value_at_zero(function):
    class Calls(nn.Module):
        def forward(self, x):
            return function(x.clone()) if function.__name__.endswith("_") else function(x)

    gm = trace(Calls())
    # F.tanh and F.sigmoid trace to the tensor methods they call.
    node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target != "clone")
    op = elementwise_op(gm, node)
    kwargs = {"training": False} if function is F.rrelu else {}
    with torch.no_grad():
        assert op.slope == pytest.approx(_centred_slope(lambda x: function(x.clone(), **kwargs)), abs=1e-4)
        at_zero = float(function(torch.zeros(1, dtype=torch.float64), **kwargs))
        assert op.value_at_zero == pytest.approx(at_zero, abs=1e-12)


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda x: F.leaky_relu(x, 0.3), 0.65),
        (lambda x: F.leaky_relu(x, negative_slope=0.1), 0.55),
        (lambda x: F.elu(x, alpha=0.5), 0.75),
        (lambda x: F.hardtanh(x, -3.0, 3.0), 1.0),
        (lambda x: F.hardtanh(x, 0.0, 6.0), 0.5),
        (lambda x: F.hardtanh(x, 0.5, 2.0), 0.0),
        (lambda x: F.softplus(x, beta=2.0), 0.5),
    ],
)
def test_parameters_of_a_call_set_its_slope(call, expected):
    class Calls(nn.Module):
        def forward(self, x):
            return call(x)

    gm = trace(Calls())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    op = elementwise_op(gm, node)
    assert op.slope == pytest.approx(expected)
    assert _centred_slope(call) == pytest.approx(expected, abs=1e-4)
    assert op.value_at_zero == pytest.approx(float(call(torch.zeros(1, dtype=torch.float64))))


def test_a_per_channel_prelu_is_not_a_pass_through():
    """PReLU with one slope per channel holds a parameter of the units' size: not in the table."""
    model = nn.Sequential(nn.Linear(4, 3), nn.PReLU(3), nn.Linear(3, 2))
    report = find_width_sites(trace(model))
    assert not report.sites and any(name == "0" for name, _ in report.skipped)


@pytest.mark.parametrize(
    "activation, kinked",
    [(nn.ReLU(), True), (nn.Hardtanh(0.0, 6.0), True), (nn.PReLU(), True), (nn.GELU(), False), (nn.Hardtanh(), False)],
    ids=repr,
)
def test_a_site_knows_whether_its_activation_has_a_kink_at_zero(activation, kinked):
    """The sign test (growth/kinks.py) runs where the activation has a kink at 0, whatever its name."""
    (site,) = find_width_sites(trace(nn.Sequential(nn.Linear(4, 3), activation, nn.Linear(3, 2)))).sites
    assert site.kinked is kinked


class _DropPath(nn.Module):
    """timm's DropPath, written out: one random factor per sample in training, identity in eval."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _GlobalGate(nn.Module):
    """One factor per sample, but computed from the sample's values: a new unit would move it."""

    def forward(self, x):
        return x * torch.sigmoid(x.flatten(1).mean(1)).reshape((-1,) + (1,) * (x.ndim - 1))


class _ChannelDrop(nn.Module):
    """A random factor per sample and channel: more channels would draw other factors."""

    def forward(self, x):
        return x * torch.rand(x.shape[:2] + (1,) * (x.ndim - 2)) if self.training else x


class _Residual(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.stem, self.body, self.drop, self.head = nn.Linear(5, 4), nn.Linear(4, 4), drop, nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(h + self.drop(self.body(h)))


@pytest.mark.parametrize(
    "drop, carries", [(_DropPath(), True), (_GlobalGate(), False), (_ChannelDrop(), False)], ids=lambda v: str(v)
)
def test_stochastic_depth_called_whole_carries_the_stream_and_look_alikes_do_not(drop, carries):
    """A module the graph calls whole (it reads self.training) that scales each sample by a factor
    of its own, independent of the values, lets the stream's units through; one whose factor
    depends on the values or on the channel does not. The random generator is left as it was."""
    from growc.graph.elementwise import scales_each_sample

    state = torch.random.get_rng_state()
    assert scales_each_sample(drop) is carries
    assert torch.equal(torch.random.get_rng_state(), state)
    sites = {s.name: s for s in find_width_sites(trace(_Residual(drop))).sites}
    assert ("stem" in sites and "body" in sites["stem"].writers) is carries
