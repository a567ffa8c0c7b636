"""nn.MultiheadAttention written out (`graph/attention.py`) and feature maps laid out as tokens
(`graph/tokens.py`): the written-out module computes what the original did, the stream around
it grows exactly, and the token patterns are followed only where they are what they look like."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growc.graph.attention import SplitAttention, split_attention_modules
from growc.graph.candidates import find_width_sites
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import assess_sites, new_units, whole_block_neurons
from growc.tiny.site_solution import neurons_raw_gain


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("options", [{}, {"need_weights": False}, {"average_attn_weights": False}])
def test_split_attention_computes_what_multihead_attention_does(batch_first, training, options):
    torch.manual_seed(0)
    original = nn.MultiheadAttention(8, 2, batch_first=batch_first).train(training)
    split = SplitAttention(original).train(training)
    b, t, s = 3, 5, 7
    x = torch.randn((b, t, 8) if batch_first else (t, b, 8))
    y = torch.randn((b, s, 8) if batch_first else (s, b, 8))
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[:, -2:] = True
    calls = [
        ((x, x, x), {}),
        ((x, y, y), {"key_padding_mask": padding, "attn_mask": torch.rand(t, s) > 0.8}),
        ((x, y, y), {"attn_mask": torch.randn(b * 2, t, s)}),
        ((x, x, x), {"attn_mask": nn.Transformer.generate_square_subsequent_mask(t), "is_causal": True}),
    ]
    for args, masks in calls:
        expected, expected_weights = original(*args, **masks, **options)
        got, weights = split(*args, **masks, **options)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        if expected_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_attention_modules_are_replaced_in_place_once_each_and_unsupported_ones_kept():
    shared = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict(
        {"a": shared, "b": shared, "kv": nn.MultiheadAttention(8, 2, add_bias_kv=True), "lin": nn.Linear(8, 8)}
    )
    assert split_attention_modules(model) == ["a"]
    assert isinstance(model["a"], SplitAttention) and model["a"] is model["b"]
    assert isinstance(model["kv"], nn.MultiheadAttention)
    # Separate projection widths (kdim / vdim) become Linears of those widths.
    cross = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True)
    split = SplitAttention(cross)
    assert (split.k.in_features, split.v.in_features) == (5, 3)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    torch.testing.assert_close(split(q, k, v)[0], cross(q, k, v)[0], atol=1e-6, rtol=1e-5)


class _Patches(nn.Module):
    """timm's form: `flatten(2).transpose(1, 2)`, then a token stream of Linears."""

    def __init__(self, dim=6):
        super().__init__()
        self.embed = nn.Conv2d(2, dim, 2, stride=2)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 10), nn.Linear(10, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.class_token.expand(x.shape[0], -1, -1), h], dim=1)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(h[:, 0])


def _grow_every_site(graph, generator):
    growths = []
    for site in find_width_sites(graph).sites:
        producer, consumers = site.modules(graph)
        rows = [c.weight.shape[0] for c in consumers]
        flat_in = producer.weight[0].numel()
        units = NewUnits(
            rows=torch.randn(2, flat_in, generator=generator),
            bias=torch.randn(2, generator=generator),
            omega=torch.randn(sum(rows), 2, generator=generator),
            omega_rows=rows,
        )
        growths.append(SiteGrowth(graph, site, units))
    return growths


def test_a_patch_embedding_writes_the_token_stream_and_grows_with_it_exactly():
    torch.manual_seed(0)
    model = _Patches()
    graph = trace(model)
    report = find_width_sites(graph)
    stream = next(s for s in report.sites if "embed" in s.writers)
    assert stream.producer == "fc2" and dict(stream.broadcasts) == {"class_token": 0.0}
    # The only reader the new neurons reach reads one token per sample: the rows are that token's.
    assert stream.consumers == ("head",) and stream.pools == (("select", 1, 0),)
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        before = graph(x)
        growths = _grow_every_site(graph, torch.Generator().manual_seed(1))
        for growth in growths:
            growth.set_amplitude(0.0)
        torch.testing.assert_close(graph(x), before, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)
        assert model.embed.out_channels == 8 and model.class_token.shape == (1, 1, 8)
        for growth in growths:
            growth.set_amplitude(0.5)
        assert not torch.allclose(graph(x), before)
        for growth in reversed(growths):
            growth.undo()
        torch.testing.assert_close(graph(x), before)


class _WidthAsNumber(nn.Module):
    """torchvision's form: `reshape(n, self.dim, h * w).permute(0, 2, 1)`."""

    def __init__(self, dim=6):
        super().__init__()
        self.dim, self.patch = dim, 2
        self.embed = nn.Conv2d(2, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 10), nn.Linear(10, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        n, _, h, w = x.shape
        t = self.embed(x).reshape(n, self.dim, (h // self.patch) * (w // self.patch)).permute(0, 2, 1)
        t = t + self.fc2(torch.relu(self.fc1(self.norm(t))))
        return self.head(t.mean(-2))


def test_a_width_written_as_a_number_leaves_the_graph_and_the_users_attribute_follows_it():
    torch.manual_seed(0)
    model = _WidthAsNumber()
    graph = trace(model)
    assert not any(n.target == "reshape" for n in graph.graph.nodes)
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        before = model(x)
        growths = _grow_every_site(graph, torch.Generator().manual_seed(2))
        for growth in growths:
            growth.set_amplitude(0.0)
        assert model.dim == model.embed.out_channels == 8
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(graph(x), before, atol=1e-6, rtol=1e-5)
        for growth in reversed(growths):
            growth.undo()
        assert model.dim == 6


class _ChannelIndex(nn.Module):
    """`x[:, 0]` of a Linear's 2-d output picks a unit, not a token: not a site to grow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(1, 3)

    def forward(self, x):
        return self.b(self.a(x)[:, 0].unsqueeze(1))


def test_indexing_units_that_are_not_known_tokens_is_left_intact_with_the_reason():
    report = find_width_sites(trace(_ChannelIndex()))
    why = dict(report.skipped)["a"]
    assert "cannot tell whether it selects a token" in why


class _Encoder(nn.Module):
    """A token classifier around nn.MultiheadAttention, whose heads grow."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):  # (B, 6 tokens, 3)
        h = self.embed(x)
        a = self.norm(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        return self.head(h.mean(-2))


def _token_data(n=400):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, 3, generator=g, dtype=torch.float64)
    y = (x[:, :, 0].mean(1) > 0).long() + 2 * (x[:, :3, 1].sum(1) * x[:, 3:, 2].sum(1) > 0)
    return x, y


def test_new_attention_heads_are_exact_at_zero_and_their_first_order_gain_holds():
    """A new head's query rows are 0, so it attends uniformly: exact at amplitude 0 whatever its
    (random) keys, and its values' neurons are those of the token-mean problem, whose first-order
    prediction matches the observed loss decrease."""
    torch.manual_seed(0)
    model = _Encoder().double()
    x, y = _token_data()
    graph = trace(model)
    site = next(s for s in find_width_sites(graph).sites if s.unit_block > 1)
    assert (site.producer, site.consumers, site.unit_block) == ("attention.v", ("attention.out_proj",), 4)
    assert set(site.writers) == {"attention.q", "attention.k"} and site.seeded == ("attention.k",)
    collector = StatisticsCollector(graph, [site], folds=1)
    with collector:
        graph.zero_grad()
        F.cross_entropy(graph(x), y).backward()
        collector.accumulate(x.shape[0])
    (a,) = assess_sites(graph, [site], collector.accumulators, GrowthConfig())
    assert a.group_size == 4 and a.significant % 4 == 0
    with torch.no_grad():
        base = float(F.cross_entropy(graph(x), y))
        # One head: the gradient has rank 3 here (4 classes), so its 4th value starts at 0.
        neurons = whole_block_neurons(a.solution.neurons.take(4), 4)
        assert neurons.count == 4 and neurons.alpha[:, 3].abs().sum() == 0
        units, scale = new_units(a, neurons, torch.float64)
        predicted = scale * float(neurons_raw_gain(a.moments, neurons.alpha, neurons.omega).sum())
        growth = SiteGrowth(graph, site, units)
        attention = model.attention
        assert attention.num_heads == 3 and attention.k.weight[8:].abs().sum() > 0
        growth.set_amplitude(0.0)
        assert float(F.cross_entropy(graph(x), y)) == pytest.approx(base, abs=1e-12)
        assert float(F.cross_entropy(model(x), y)) == pytest.approx(base, abs=1e-12)
        growth.set_amplitude(1e-3)
        observed = (base - float(F.cross_entropy(graph(x), y))) / 1e-3**2
        assert predicted > 0 and abs(observed / predicted - 1) < 0.05, (observed, predicted)
        growth.undo()
        assert attention.num_heads == 2
        assert float(F.cross_entropy(graph(x), y)) == base
    with pytest.raises(ValueError, match="blocks of 4"):
        SiteGrowth(graph, site, new_units(a, a.solution.neurons.take(2), torch.float64)[0])
    assert whole_block_neurons(a.solution.neurons.take(2), 4).count == 4
