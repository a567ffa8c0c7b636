"""LayerNorm and RMSNorm across the grown units: new units enter at the mean the norm removes
(LayerNorm) or at 0 (RMSNorm); the norm's epsilon and its old weights absorb the variance
factor d / (d + k), so growth at amplitude 0 is exact; the norms growc cannot keep exact are left
intact with the reason."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growc.deploy.parity import compare
from growc.graph.candidates import find_width_sites
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace


def _units(graph, site, k, generator, scale=3.0):
    producer = graph.get_submodule(site.producer)
    rows = [graph.get_submodule(c).weight.shape[0] for c in site.consumers]
    return NewUnits(
        rows=torch.randn(k, producer.weight[0].numel(), generator=generator) * scale,
        bias=torch.randn(k, generator=generator) * scale,
        omega=torch.randn(sum(rows), k, generator=generator),
        omega_rows=rows,
    )


class Hidden(nn.Module):
    def __init__(self, norm: nn.Module, width: int = 5):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, width), norm, nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


@pytest.mark.parametrize("norm", [nn.LayerNorm(5), nn.LayerNorm(5, bias=False), nn.RMSNorm(5), nn.RMSNorm(5, eps=1e-3)])
def test_growth_through_a_norm_is_exact_at_zero_and_undoes_exactly(norm):
    """Small pre-norm variances make the epsilon matter (var 1e-4 against eps 1e-5 or 1e-3): the
    scaled epsilon keeps amplitude 0 exact all the same, and undo puts every value back."""
    torch.manual_seed(0)
    model = Hidden(norm)
    with torch.no_grad():
        model.fc1.weight.mul_(0.02)
        model.fc1.bias.mul_(0.02)
        norm.weight.copy_(torch.rand(5) + 0.5)
    graph = trace(model)
    (site,) = find_width_sites(graph).sites
    assert site.carriers == ("norm",) and site.centred == isinstance(norm, nn.LayerNorm)
    x = torch.randn(64, 8)
    with torch.no_grad():
        before, weight, eps = graph(x), norm.weight.detach().clone(), norm.eps
        growth = SiteGrowth(graph, site, _units(graph, site, 3, torch.Generator().manual_seed(1)))
        growth.set_amplitude(0.0)
        assert norm.normalized_shape == (8,) and norm.weight.shape == (8,)
        assert norm.eps == pytest.approx((eps or torch.finfo(torch.float32).eps) * 5 / 8)
        parity = compare(before, graph(x))
        assert parity.within(1e-6), parity.describe()
        growth.set_amplitude(1.0)
        assert not compare(before, graph(x)).within(1e-3)  # the new units do reach the output
        growth.undo()
        assert norm.eps == eps and norm.normalized_shape == (5,)
        torch.testing.assert_close(norm.weight, weight, rtol=0, atol=0)
        torch.testing.assert_close(graph(x), before, rtol=0, atol=0)


class PreNorm(nn.Module):
    """Tokens (B, T, D): a stream read by a LayerNorm in every block, averaged over tokens at the end."""

    def __init__(self):
        super().__init__()
        self.embed, self.position = nn.Linear(4, 6), nn.Parameter(torch.randn(5, 6))
        self.norm1, self.up, self.down = nn.LayerNorm(6), nn.Linear(6, 9), nn.Linear(9, 6)
        self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):  # (B, 5 tokens, 4)
        h = self.embed(x) + self.position
        h = h + self.down(F.gelu(self.up(self.norm1(h))))
        return self.head(self.norm(h).mean(-2))


def test_a_pre_norm_stream_grows_with_every_writer_at_its_mean():
    torch.manual_seed(0)
    graph = trace(PreNorm())
    stream = next(s for s in find_width_sites(graph).sites if s.name == "embed")
    assert stream.centred and set(stream.carriers) == {"norm1", "norm"} and stream.writers == ("down",)
    assert "head" in stream.readers  # through the mean over tokens
    x = torch.randn(16, 5, 4)
    with torch.no_grad():
        before = graph(x)
        old_rows, old_position = graph.down.weight.detach().clone(), graph.position.detach().clone()
        growth = SiteGrowth(graph, stream, _units(graph, stream, 2, torch.Generator().manual_seed(2)))
        growth.set_amplitude(0.0)
        parity = compare(before, graph(x))
        assert parity.within(1e-6), parity.describe()
        # The other writer writes the mean of its units, whatever the amplitude, and the
        # position term its mean per token.
        torch.testing.assert_close(graph.down.weight[6:], old_rows.mean(0).expand(2, -1))
        torch.testing.assert_close(graph.position[:, 6:], old_position.mean(1, keepdim=True).expand(5, 2))
        growth.undo()


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 6, 3)

    def forward(self, x):  # (B, 2, 6, 6)
        return self.head(self.conv(x).mean(-2).flatten(1))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.ln, self.rms, self.a, self.b = (
            nn.Linear(4, 6),
            nn.LayerNorm(6),
            nn.RMSNorm(6),
            nn.Linear(6, 3),
            nn.Linear(6, 3),
        )

    def forward(self, x):
        h = self.embed(x)
        return self.a(self.ln(h)) + self.b(self.rms(h))


class ScaledBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.branch, self.norm, self.head = (
            nn.Linear(4, 6),
            nn.Linear(6, 6),
            nn.LayerNorm(6),
            nn.Linear(6, 3),
        )
        self.scale = nn.Parameter(torch.full((6,), 0.1))

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.norm(h + self.scale * self.branch(h)))


class ActivatedStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.embed(x))))


@pytest.mark.parametrize(
    "model, layer, phrase",
    [
        (Hidden(nn.LayerNorm(5, elementwise_affine=False)), "fc1", "without a weight"),
        (Hidden(nn.GroupNorm(1, 5)), "fc1", "in groups"),
        (Mixed(), "embed", "an RMSNorm read the same units"),
        (ActivatedStream(), "embed", "cannot put new units at the mean"),
        (ScaledBranch(), "embed", "cannot put new units at the mean"),
        (Convs(), "conv", "averages a feature map"),
    ],
    ids=["no-weight", "groupnorm", "layer-and-rms", "through-tanh", "layer-scale", "conv-token-mean"],
)
def test_norms_growc_cannot_keep_exact_are_left_intact_with_the_reason(model, layer, phrase):
    report = find_width_sites(trace(model))
    assert layer not in {s.producer for s in report.sites}
    why = dict(report.skipped)[layer]
    assert phrase in why, why


def test_an_attached_reader_after_a_mean_over_tokens_gets_columns_no_larger_than_its_own():
    """The head reads the stream through a mean over tokens, where a new neuron's value is far
    smaller than at the blocks' readers: its fitted outgoing weights are capped at the RMS of its
    own columns, so training right after the growth stays stable."""
    import growc
    from growc.data import as_loader

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 5, 4, generator=g)
    y = (x.mean(1) @ torch.randn(4, 3, generator=g)).argmax(1)
    data = torch.utils.data.TensorDataset(x, y)
    config = growc.GrowthConfig(steps=1, final_epochs=0, epochs=0.0)
    result = growc.grow(
        PreNorm(),
        as_loader(data, 64, shuffle=True, seed=0),
        as_loader(data, 256, shuffle=False, seed=0),
        F.cross_entropy,
        config,
    )
    head = result.model.head.weight.detach()
    grown = head.shape[1] - 6
    assert grown > 0, [(r.site, r.neurons, r.reason) for s in result.report.steps for r in s.grown]
    level = head[:, :6].norm(dim=0).pow(2).mean().sqrt()
    gamma = max(r.gamma for s in result.report.steps for r in s.grown if r.site == "embed")
    assert (head[:, 6:].norm(dim=0) <= gamma * level * 1.001).all()
