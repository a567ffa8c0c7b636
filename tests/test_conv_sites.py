"""Conv2d and BatchNorm sites: statistics equal the linear ones on unfolded patches, growth at
amplitude 0 is exact in train and eval mode, first-order predictions match where they are exact."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growc.graph.candidates import find_width_sites
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import assess_sites, new_units
from growc.tiny.site_solution import neurons_raw_gain


def _images(n=300, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    y = (x[:, 0, 2:5, 2:5].sum((1, 2)) * x[:, 1, 4:7, 1:4].sum((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0)
    return x, y


def _collect(model, sites, x, y, folds=1):
    collector = StatisticsCollector(model, sites, folds=folds)
    with collector:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        collector.accumulate(x.shape[0])
    return collector


def test_conv_statistics_equal_linear_statistics_on_unfolded_patches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 4)
    ).double()
    x, y = _images()
    site = next(s for s in find_width_sites(trace(model)).sites if s.producer == "0")
    moments = _collect(model, [site], x, y).accumulators[site.name].total()

    # The same quantities by hand: unfold, append the ones column, take means over rows.
    captured = {}

    def keep(module, inputs, output):
        captured["h"] = inputs[0]
        output.register_hook(lambda g: captured.update(g=g))

    model[2].register_forward_hook(keep)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    b_prev = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)  # producer patches, position = consumer position
    b_prev = torch.cat([b_prev, torch.ones(len(b_prev), 1, dtype=x.dtype)], 1)
    b = F.unfold(captured["h"], 3, padding=1).transpose(1, 2).reshape(-1, 27)
    b = torch.cat([b, torch.ones(len(b), 1, dtype=x.dtype)], 1)
    g = captured["g"].permute(0, 2, 3, 1).reshape(-1, 4) * x.shape[0]
    n = len(b)
    torch.testing.assert_close(moments.s_prev, b_prev.T @ b_prev / n)
    (c,) = moments.consumers
    torch.testing.assert_close(c.s, b.T @ b / n)
    torch.testing.assert_close(c.m, b.T @ g / n)
    torch.testing.assert_close(c.p, b_prev.T @ g / n)
    torch.testing.assert_close(c.c, b_prev.T @ b / n)
    assert moments.rows_per_sample == 64


CASES = {
    "conv-conv stride 2": lambda act: [
        nn.Conv2d(2, 3, 3, padding=1),
        act(),
        nn.Conv2d(3, 4, 3, padding=1, stride=2),
        act(),
        nn.Flatten(),
        nn.Linear(64, 4),
    ],
    "conv-conv dilated, no padding": lambda act: [
        nn.Conv2d(2, 3, 3),
        act(),
        nn.Conv2d(3, 4, 3, dilation=2),
        act(),
        nn.Flatten(),
        nn.Linear(16, 4),
    ],
    "conv-avgpool-flatten-linear": lambda act: [
        nn.Conv2d(2, 3, 3, padding=1),
        act(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 4),
    ],
    "conv-global-pool-linear": lambda act: [
        nn.Conv2d(2, 3, 3, padding=1),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_first_order_gain_matches_the_observed_decrease(case):
    torch.manual_seed(1)
    model = nn.Sequential(*CASES[case](nn.Tanh)).double()
    x, y = _images(seed=1)
    sites = find_width_sites(trace(model)).sites
    assert sites and sites[0].producer == "0"
    collector = _collect(model, sites[:1], x, y)
    (a,) = assess_sites(model, sites[:1], collector.accumulators, GrowthConfig())
    neurons = a.solution.neurons.take(2)
    units, scale = new_units(a, neurons, torch.float64)
    predicted = a.site.slope_at_zero * scale * float(neurons_raw_gain(a.moments, neurons.alpha, neurons.omega).sum())
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
        growth = SiteGrowth(model, a.site, units)
        gamma = 1e-3
        growth.set_amplitude(gamma)
        observed = (base - float(F.cross_entropy(model(x), y))) / gamma**2
    assert abs(observed / predicted - 1) < 0.1, (observed, predicted)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_site_growth_at_amplitude_zero_is_exact(mode):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
    )
    x, y = _images(dtype=torch.float32)
    model.train()
    model(x)  # running statistics move away from their initial values
    sites = find_width_sites(trace(model)).sites
    site = next(s for s in sites if s.producer == "0")
    assert site.norm == "1"
    (a,) = assess_sites(model, [site], _collect(model, [site], x, y, folds=4).accumulators, GrowthConfig())
    grown = copy.deepcopy(model).train(mode == "train")
    model.train(mode == "train")
    with torch.no_grad():
        before = model(x)
        growth = SiteGrowth(grown, a.site, new_units(a, a.solution.neurons.take(2), torch.float32)[0])
        growth.set_amplitude(0.0)
        after = grown(x)
    assert grown[1].num_features == 5 and grown[1].running_mean.shape == (5,)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # The new entries' running statistics are the new channels' own statistics.
    if mode == "eval":
        new_channels = grown[0](x)[:, 3:]
        torch.testing.assert_close(grown[1].running_mean[3:], new_channels.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(
            grown[1].running_var[3:], new_channels.var((0, 2, 3), unbiased=False), rtol=1e-2, atol=1e-3
        )


def test_sites_the_finder_must_leave_alone():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 3, padding=1)
            self.b = nn.Conv2d(2, 2, 3, padding=1, groups=2)
            self.c = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(x + self.a(x))))

    report = find_width_sites(trace(Residual()))
    skipped = dict(report.skipped)
    assert "a" in skipped and "model input 'x' is added" in skipped["a"]
    assert "b" in skipped and "depthwise conv grows with the layer feeding it" in skipped["b"]
    assert not report.sites


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, (3, 5), dilation=(2, 1), padding=(0, 2)),
    ],
)
def test_patches_at_a_few_positions_equal_the_unfolded_ones(conv):
    from growc.graph.handlers import conv_output_size
    from growc.graph.samples import patches_at

    x = torch.randn(2, 3, 11, 9)
    out_h, out_w = conv_output_size(conv, (11, 9))
    full = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride).view(
        2, -1, out_h, out_w
    )
    rows, cols = torch.tensor([0, out_h - 1, 1]), torch.tensor([out_w - 1, 0, 1])
    mine = patches_at(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, rows, cols)
    torch.testing.assert_close(mine, full[:, :, rows, cols].permute(0, 2, 1).reshape(-1, full.shape[1]))


def test_sampled_positions_keep_per_sample_scale_and_agree_with_all_positions():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 4)
    ).double()
    x, y = _images(n=2000, seed=3)
    site = next(s for s in find_width_sites(trace(model)).sites if s.producer == "0")
    moments = {}
    for rows in (None, 16):
        collector = StatisticsCollector(model, [site], folds=1, rows_per_sample=rows)
        with collector:
            for i in range(0, 2000, 50):
                model.zero_grad()
                F.cross_entropy(model(x[i : i + 50]), y[i : i + 50]).backward()
                collector.accumulate(50)
        moments[rows] = collector.accumulators[site.name].total()
    assert moments[16].rows_per_sample == pytest.approx(64)
    assert moments[16].n == 2000 * 16
    # A quarter of the positions: the means agree to sampling accuracy.
    torch.testing.assert_close(moments[16].s_prev, moments[None].s_prev, rtol=0.1, atol=0.05)


POOLS = [
    None,
    nn.MaxPool2d(2),
    nn.AvgPool2d(3, 2, 1),
    nn.MaxPool2d(3, 2, ceil_mode=True),  # 9x9 -> 4x4 (floor would give 4x4 too: see the 10x10 case)
    nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
    nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(2, ceil_mode=True),
]


# (producer's input channels, the site's width): maps of 8 channels or more take another gather.
@pytest.mark.parametrize("channels", [(2, 3), (9, 10)], ids=str)
@pytest.mark.parametrize("size", [9, 10])
@pytest.mark.parametrize("pool", POOLS, ids=repr)
def test_sampled_rows_equal_the_full_rows_at_the_same_positions(pool, size, channels):
    from growc.graph.samples import consumer_rows, producer_rows, sampled_conv_rows

    torch.manual_seed(4)
    c_in, width = channels
    layers = (
        [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
        + ([pool] if pool else [])
        + [nn.Conv2d(width, 4, 3, padding=1), nn.Flatten()]
    )
    model = nn.Sequential(*layers)
    site = find_width_sites(trace(model)).sites[0]
    x = torch.randn(5, c_in, size, size)
    hidden = model[:-2](x)
    grad = torch.randn_like(model[-2](hidden))
    consumer = str(len(layers) - 2)
    positions = grad.shape[-2] * grad.shape[-1] - 1
    b_prev, pairs, samples = sampled_conv_rows(
        site, model, {"0": x, consumer: hidden}, {consumer: grad}, 5, positions, torch.Generator().manual_seed(0)
    )
    chosen = torch.randperm(positions + 1, generator=torch.Generator().manual_seed(0))[:positions]
    full = producer_rows(site, model, x)
    assert full.shape[0] == 5 * (positions + 1)  # one row per consumer output: the pooled map's true size
    torch.testing.assert_close(b_prev, full.view(5, positions + 1, -1)[:, chosen].reshape(-1, full.shape[1]))
    ((b, g),) = pairs
    full_b, full_g = consumer_rows(model, consumer, hidden, grad, 5)
    for sampled, whole in ((b, full_b), (g, full_g)):
        torch.testing.assert_close(sampled, whole.view(5, positions + 1, -1)[:, chosen].reshape(-1, whole.shape[1]))
    assert samples == pytest.approx(5 * positions / (positions + 1))


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, dilation=2), nn.AvgPool2d(2, divisor_override=3)], ids=repr)
def test_a_pooling_the_statistics_cannot_follow_is_a_reason_not_a_crash(pool):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(3, 4, 3, padding=1), nn.Flatten())
    report = find_width_sites(trace(model))
    assert "0" not in [s.name for s in report.sites]
    assert any(name == "0" and "pooling" in why for name, why in report.skipped), report.skipped


def test_mean_patch_equals_the_mean_of_unfolded_patches():
    from growc.graph.handlers import Conv2dHandler
    from growc.graph.samples import mean_patch

    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(1, 2))
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(mean_patch(conv, x), Conv2dHandler().patches(conv, x).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_padding_given_as_a_string_grows_like_its_numbers():
    """padding="same" (odd kernels, dilated too) and "valid" are the numbers they stand for:
    the convs compute the same, their sites grow exactly; an even kernel's "same", which pads
    one side more, is left intact with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same"),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding="same", dilation=2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding="valid"),
        nn.Tanh(),
        nn.Conv2d(4, 2, 2, padding="same"),
        nn.Flatten(),
        nn.Linear(72, 3),
    ).double()
    x, _ = _images(n=5)
    before = model(x)
    report = find_width_sites(trace(model))
    assert model[0].padding == (1, 1) and model[2].padding == (2, 2) and model[4].padding == (0, 0)
    assert model[6].padding == "same"
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert {s.producer for s in report.sites} == {"0", "2"}
    assert "even kernel" in dict(report.skipped)["6"]
    with torch.no_grad():
        for site in report.sites:
            producer = model.get_submodule(site.producer)
            flat = producer.in_channels * 9
            rows = [model.get_submodule(c).weight.shape[0] for c in site.consumers]
            units = NewUnits(
                torch.randn(2, flat, dtype=x.dtype),
                torch.randn(2, dtype=x.dtype),
                torch.randn(sum(rows), 2, dtype=x.dtype),
                rows,
            )
            SiteGrowth(model, site, units).set_amplitude(0.0)
        torch.testing.assert_close(model(x), before)
