"""Models of every common shape: growc traces them, finds what it can grow (and says why it
leaves the rest), grows those sites exactly, and exports the result with ONNX parity."""

import pytest
import torch
import torch.nn.functional as F
from zoo import ZOO, inputs_for

from growc.deploy.export import export_onnx
from growc.deploy.parity import compare
from growc.graph.candidates import find_width_sites
from growc.graph.depth import find_depth_edges
from growc.graph.handlers import handler_for
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Trained-looking norms: at initialization every BatchNorm channel is identical, which hides
    a new entry put at the wrong channel."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=generator))
                    m.bias.copy_(torch.randn(m.num_features, generator=generator))
                m.momentum = 0.0  # a training-mode forward leaves the running statistics as they are
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.3)


def _outputs(model, x, seed=1):
    """The model's outputs with the same random draws at every call. Dropout is kept off: its
    mask is drawn per unit, so a grown layer would draw other masks for its old units too."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    torch.manual_seed(seed)
    try:
        return model(*x)
    finally:
        for m in dropouts:
            m.train()


def _assert_same(got, expected, what):
    parity = compare(expected, got)
    assert parity.within(1e-5), f"{what}: {parity.describe()}"


def _random_units(graph, site, k=2, generator=None):
    producer = graph.get_submodule(site.producer)  # the graph is the model (lifted F.linear layers)
    handler = handler_for(producer)
    flat_in = handler.in_size(producer) * handler.taps(producer)  # dense rows, whatever the groups
    k *= site.groups * site.unit_block  # k per channel group, whole heads
    rows = [graph.get_submodule(c).weight.shape[0] for c in site.consumers]
    return NewUnits(
        rows=torch.randn(k, flat_in, generator=generator),
        bias=torch.randn(k, generator=generator),
        omega=torch.randn(sum(rows), k, generator=generator),
        omega_rows=rows,
        norm_weight=torch.randn(k, generator=generator),
        norm_mean=torch.randn(k, generator=generator),
        norm_var=torch.rand(k, generator=generator) + 0.5,
    )


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_zoo_model_candidates_and_exact_growth(cls):
    """The graph computes the user's model in train and in eval mode, before and after every
    site grows random units (with trained-looking norm statistics); at amplitude 0 nothing
    changes in either mode; every layer is in a site or has its reason."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = cls()
    _randomize_norms(model, g)
    x = inputs_for(model)
    graph = trace(model)
    report = find_width_sites(graph)
    assert report.sites or report.skipped or find_depth_edges(graph)
    for name, why in report.skipped:
        assert isinstance(why, str) and why, name
    in_sites = {name for site in report.sites for name in site.layers} | {name for name, _ in report.skipped}
    for name, module in model.named_modules():  # every layer is in a site or has its reason
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            assert name in in_sites, f"{name} is in no site and has no reason"
    with torch.no_grad():
        before = {}
        for mode in (False, True):
            model.train(mode), graph.train(mode)
            before[mode] = _outputs(graph, x)
            _assert_same(_outputs(model, x), before[mode], f"user's module vs graph, training={mode}")
        growths = []
        for site in report.sites:
            growth = SiteGrowth(graph, site, _random_units(graph, site, generator=g))
            growth.set_amplitude(0.0)
            growths.append(growth)
        for mode in (False, True):  # every site grew, nothing changed
            model.train(mode), graph.train(mode)
            _assert_same(_outputs(graph, x), before[mode], f"amplitude 0, training={mode}")
            _assert_same(_outputs(model, x), before[mode], f"user's module after growth, training={mode}")
        for growth in growths:
            growth.set_amplitude(0.3)
        model.eval(), graph.eval()
        grown = graph(*x)
        _assert_same(model(*x), grown, "user's module after growth at amplitude 0.3")
    if growths:
        assert not torch.allclose(grown, before[False])
    # ONNX parity of the width-grown graph is checked below, with blocks inserted as well: one
    # export per model covers both (an export is most of these tests' time).


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_zoo_model_every_block_insertion_is_exact_at_zero_and_exports(cls, tmp_path):
    """Every width site grown (random units, amplitude 0.3), then a residual block on every
    depth edge at once: nothing changes at amplitude 0, the output moves at amplitude 1, and the
    wider and deeper graph exports with parity."""
    from growc.graph.depth import DepthGrowth

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = cls().eval()
    x = inputs_for(model)
    graph = trace(model)
    with torch.no_grad():
        for site in find_width_sites(graph).sites:
            SiteGrowth(graph, site, _random_units(graph, site, generator=g)).set_amplitude(0.3)
    edges = find_depth_edges(graph)
    assert edges, "every zoo model has an edge where a block fits"
    with torch.no_grad():
        before = graph(*x)
        blocks = []
        for edge in edges:
            d = edge.channels(graph)
            taps = 9 if edge.conv else 1
            # A bias of 3 or more keeps the block's ReLUs alive on the few test inputs.
            block = DepthGrowth(graph, edge, torch.randn(3, d * taps), torch.randn(3).abs() + 3, torch.randn(d, 3))
            block.set_amplitude(0.0)
            blocks.append(block)
        torch.testing.assert_close(graph(*x), before, rtol=1e-5, atol=1e-6)
        for block in blocks:
            block.set_amplitude(1.0)
        deeper = graph(*x)
        assert not torch.allclose(deeper, before)
    result = export_onnx(graph, x, tmp_path / "deeper.onnx", check_inputs=inputs_for(model, batch=5))
    assert result.max_abs_diff <= 1e-5 * max(1.0, float(deeper.abs().max()))  # float32 rounding, relative
    for block in reversed(blocks):
        block.undo()
    with torch.no_grad():
        torch.testing.assert_close(graph(*x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_zoo_growth_with_real_neurons_lowers_the_training_loss(cls):
    """Each site, grown alone from the same statistics with TINY neurons and their line-searched
    amplitude, never raises the loss, and at least one site of every model lowers it."""
    from growc.growth.collector import StatisticsCollector
    from growc.growth.config import GrowthConfig
    from growc.growth.step import LineSearchBatch, StepContext, assess_sites, grow_site
    from growc.tiny.strategies import make_strategy

    torch.manual_seed(1)
    model = cls()
    x = inputs_for(model, batch=512)
    # Labels the inputs determine (a random projection's argmax): there is something to learn.
    flat = x[0].flatten(1)
    y = (flat @ torch.randn(flat.shape[1], 3, generator=torch.Generator().manual_seed(3))).argmax(1)
    graph = trace(model)
    sites = find_width_sites(graph).sites
    assert sites, "every zoo model has something to grow"
    collector = StatisticsCollector(graph, sites, folds=4)
    with collector:
        for i in range(0, 512, 32):
            graph.zero_grad()
            F.cross_entropy(graph(*[t[i : i + 32] for t in x]), y[i : i + 32]).backward()
            collector.accumulate(32)
    batch = LineSearchBatch(x, y, F.cross_entropy)
    config = GrowthConfig(update_existing=False)  # the neurons alone, not the consumers' update
    graph.eval(), model.eval()  # compared below in one mode; eval moves no BatchNorm statistics
    before = batch.loss(graph)
    gains = {}
    for a in assess_sites(graph, sites, collector.accumulators, config):
        _, undo = grow_site(
            StepContext(graph, make_strategy("tiny"), [], batch, config, torch.Generator().manual_seed(0)), a, 2
        )
        gains[a.site.name] = before - batch.loss(graph)
        # The user's module grew in place with the graph (lifted F.linear and root Parameters
        # included): the same outputs, and every Parameter of the user's at the graph's shape.
        with torch.no_grad():
            torch.testing.assert_close(model(*x), graph(*x))
        shapes = {tuple(p.shape) for p in graph.parameters()}
        assert all(tuple(p.shape) in shapes for p in model.parameters())
        undo()
        assert batch.loss(graph) == pytest.approx(before, abs=1e-6), f"undoing {a.site.name} restores the model"
    assert min(gains.values()) >= -1e-6, gains
    assert max(gains.values()) > 1e-4, gains


ZOO_MODEL_FILE = """\
import sys

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, {tests!r})
import zoo

model = zoo.{name}


def data():
    inputs = zoo.inputs_for(model(), batch=384)
    teacher = torch.randn(inputs[0][0].numel(), 3, generator=torch.Generator().manual_seed(1))
    target = (inputs[0].flatten(1) @ teacher).argmax(1)  # a learnable rule of the first input
    train = TensorDataset(*[x[:256] for x in inputs], target[:256])
    val = TensorDataset(*[x[256:] for x in inputs], target[256:])
    return train, val
"""


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_zoo_model_grows_through_the_cli_and_exports(cls, tmp_path):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from growc.cli import app

    path = tmp_path / f"{cls.__name__.lower()}.py"
    path.write_text(ZOO_MODEL_FILE.format(tests=str(Path(__file__).parent), name=cls.__name__))
    out = tmp_path / "out"
    args = ["grow", str(path), "--out", str(out), "--steps", "2", "--final-epochs", "1", "--batch-size", "32"]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["onnx_max_abs_diff"] <= 1e-5
    assert (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    # The checkpoint describes the grown model itself (`growc export` needs no model file),
    # except where the graph calls one of the user's own modules whole (see graph/modes.py).
    from growc import load, load_into

    if cls.__name__ in ("StochasticDepth", "ConvBNAct"):
        reloaded = load_into(cls(), out / "model.safetensors").eval()
    else:
        reloaded = load(out / "model.safetensors").eval()
    assert reloaded(*inputs_for(cls())).shape[0] == 6


def test_optimizer_state_follows_units_inserted_between_old_ones():
    """Growing the first branch of a concatenation inserts its units in the middle of the
    reader's inputs: Adam's moments move with the old columns, the new ones start at zero,
    and taking the growth back restores the state exactly."""
    from zoo import Inception

    from growc.graph.rewrite import carry_optimizer_state, uncarry_optimizer_state

    torch.manual_seed(0)
    x = inputs_for(Inception())
    graph = trace(Inception())
    site = next(s for s in find_width_sites(graph).sites if s.name == "b1")
    assert site.inserts_between == ("mix",)
    optimizer = torch.optim.Adam(graph.parameters(), lr=1e-3)
    graph(*x).square().mean().backward()
    optimizer.step()
    mix = graph.get_submodule("mix")
    moments = optimizer.state[mix.weight]["exp_avg"].clone()  # (4, 6, 1, 1): b1's 3 channels, then b2's 3
    units = NewUnits(rows=torch.randn(2, 2), bias=torch.randn(2), omega=torch.randn(4, 2), omega_rows=[4])
    growth = SiteGrowth(graph, site, units)
    growth.set_amplitude(1.0)
    carry_optimizer_state([optimizer], growth.parameter_swaps)
    grown = optimizer.state[mix.weight]["exp_avg"]
    assert mix.weight.shape[1] == 8 and grown.shape[1] == 8
    torch.testing.assert_close(grown[:, :3], moments[:, :3])
    torch.testing.assert_close(grown[:, 5:], moments[:, 3:])  # b2's columns moved past the new units
    assert not grown[:, 3:5].any()
    torch.testing.assert_close(mix.weight[:, 3:5, 0, 0], units.omega)  # the new columns hold omega
    uncarry_optimizer_state([optimizer], growth.parameter_swaps)
    growth.undo()
    assert mix.weight.shape[1] == 6
    torch.testing.assert_close(optimizer.state[mix.weight]["exp_avg"], moments)
    assert graph(*x).shape == (6, 3)


def test_a_scalar_factor_carries_units_a_gate_grows_with_them_and_a_zero_factor_stops_them():
    from torch import nn

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.relu(self.a(x)) * 2.0
            if self.factor == "sigmoid":
                return self.b(h * torch.sigmoid(self.gate(x)))
            if self.factor == "relu":  # 0 at 0: a new unit times the factor's new entry is always 0
                return self.b(h * torch.relu(self.gate(x)))
            return self.b(h)

    Scaled.factor = None
    assert [s.name for s in find_width_sites(trace(Scaled())).sites] == ["a"]
    Scaled.factor = "sigmoid"
    (site,) = find_width_sites(trace(Scaled())).sites
    assert (site.producer, site.writers) == ("a", ("gate",))
    assert site.slope_at_zero == pytest.approx(0.5 * 0.5)  # ReLU's slope times sigmoid(0)
    Scaled.factor = "relu"
    report = find_width_sites(trace(Scaled()))
    assert not report.sites and "a factor that is 0 there" in dict(report.skipped)["a"]


def test_single_channel_convs_are_plain_layers_not_depthwise_carriers():
    """A 1-in, 1-out conv (groups = 1) is an ordinary layer: its own site, never a carrier."""
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(1, 1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )
    graph = trace(model)
    sites = find_width_sites(graph).sites
    assert [(s.name, s.carriers) for s in sites] == [("0", ()), ("2", ()), ("4", ())]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        before = graph(x)
        for site in sites:
            producer, consumers = site.modules(graph)
            units = NewUnits(
                rows=torch.randn(2, producer.weight[0].numel()),
                bias=torch.randn(2),
                omega=torch.randn(sum(c.weight.shape[0] for c in consumers), 2),
                omega_rows=[c.weight.shape[0] for c in consumers],
            )
            SiteGrowth(graph, site, units).set_amplitude(0.0)
        torch.testing.assert_close(graph(x), before)


def test_grower_steps_under_the_callers_control():
    """Grower: measure, grow a named site by a given count with the caller's optimizer, and
    say clearly what is wrong when asked to grow before measuring or an unknown site."""
    from zoo import ResBlock

    import growc
    from growc.errors import GrowcError

    torch.manual_seed(0)
    x = inputs_for(ResBlock(), batch=256)[0]
    y = torch.randint(0, 3, (256,))
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    grower = growc.Grower(ResBlock(), F.cross_entropy, growc.GrowthConfig(stat_samples=256))
    optimizer = torch.optim.Adam(grower.model.parameters(), lr=1e-3)
    with pytest.raises(GrowcError, match="measure the sites first"):
        grower.grow(optimizer=optimizer)
    found = grower.measure(loader)
    assert {a.site.name for a in found} == {s.name for s in grower.candidates.sites}
    assert all({"bottleneck", "relative", "best_gain", "significant"} <= set(a.summary()) for a in found)
    with pytest.raises(GrowcError, match="no measured site 'nope'"):
        grower.grow("nope")
    stream = next(s for s in grower.candidates.sites if s.writers)
    width = stream.width(grower.model)
    (record,) = grower.grow(stream.name, neurons=2, optimizer=optimizer)
    assert stream.width(grower.model) == width + record.neurons
    # The optimizer now holds the grown Parameters, not the replaced ones.
    assert {id(p) for p in grower.model.parameters()} == {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grower.model(x).shape == (256, 3)


def test_readers_of_another_geometry_get_fitted_outgoing_weights():
    """A residual stream read by a 3x3 conv and by a stride-2 1x1 shortcut: the statistics are
    solved on one, and the others get each neuron's least-squares outgoing weights from their
    own statistics. At a small amplitude that lowers the loss below zero outgoing weights."""
    from zoo import ResBlock

    from growc.growth.collector import StatisticsCollector
    from growc.growth.config import GrowthConfig
    from growc.growth.step import LineSearchBatch, assess_sites, new_units

    torch.manual_seed(0)
    model = ResBlock()
    x = inputs_for(model, batch=256)
    y = torch.randint(0, 3, (256,))
    graph = trace(model)
    site = next(s for s in find_width_sites(graph).sites if s.reached)
    collector = StatisticsCollector(graph, [site], folds=2)
    with collector:
        for i in range(0, 256, 32):
            graph.zero_grad()
            F.cross_entropy(graph(x[0][i : i + 32]), y[i : i + 32]).backward()
            collector.accumulate(32)
    (a,) = assess_sites(graph, [site], collector.accumulators, GrowthConfig())
    assert {r for readers, _ in a.reached_moments for r in readers} == set(
        site.attached
    )  # all downstream of the source
    units, _ = new_units(a, a.solution.neurons.take(2), torch.float32)
    assert units.reached_omega and all(w.abs().sum() > 0 for w in units.reached_omega.values())
    batch = LineSearchBatch(x, y, F.cross_entropy)
    losses = {}
    for fitted in (True, False):
        trial = NewUnits(**{**units.__dict__, "reached_omega": units.reached_omega if fitted else None})
        growth = SiteGrowth(graph, site, trial)
        growth.set_amplitude(0.05)
        losses[fitted] = batch.loss(graph)
        growth.undo()
    assert losses[True] < losses[False], losses
