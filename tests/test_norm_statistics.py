"""New BatchNorm channels get the running statistics of what their units really produce."""

import torch
import torch.nn.functional as F
from torch import nn

from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.step import LineSearchBatch, StepContext, assess_sites, grow_site
from growc.tiny.strategies import make_strategy


class StemIntoMaxPool(nn.Module):
    """A stem conv and BatchNorm feeding a max pool: the statistics' rows are pooled averages,
    whose variance is far below what the BatchNorm sees at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def _new_channel_outputs(model: StemIntoMaxPool, x: torch.Tensor, new: slice) -> torch.Tensor:
    with torch.no_grad():
        out = model.stem(x)[:, new]
    return out.transpose(0, 1).reshape(out.shape[1], -1)


def test_new_batchnorm_channels_start_with_the_statistics_of_their_units():
    torch.manual_seed(0)
    model = StemIntoMaxPool()
    x = torch.randn(256, 3, 12, 12) * 3 + 1  # inputs with a large mean and scale
    y = (x[:, :, :6].mean((2, 3)) @ torch.randn(3, 3)).argmax(1)  # learnable labels
    graph = trace(model)
    (site,) = [s for s in find_width_sites(graph).sites if s.producer == "stem"]
    collector = StatisticsCollector(graph, [site], folds=4)
    with collector:
        for i in range(0, 256, 32):
            graph.zero_grad()
            F.cross_entropy(graph(x[i : i + 32]), y[i : i + 32]).backward()
            collector.accumulate(32)
    graph.eval()
    (assessment,) = assess_sites(graph, [site], collector.accumulators, GrowthConfig(update_existing=False))
    batch = LineSearchBatch([x[:128]], y[:128], F.cross_entropy)
    grow_site(
        StepContext(graph, make_strategy("tiny"), [], batch, GrowthConfig(), torch.Generator().manual_seed(0)),
        assessment,
        2,
    )
    grown = graph.get_submodule("bn").num_features - 4
    assert grown > 0, "the site grew"
    new = slice(4, 4 + grown)
    real = _new_channel_outputs(model, x[128:], new)  # samples the statistics were not taken on
    running_mean, running_var = model.bn.running_mean[new], model.bn.running_var[new]
    ratio = running_var / real.var(1)
    assert torch.all((ratio > 0.8) & (ratio < 1.25)), (running_var, real.var(1))
    assert torch.allclose(running_mean, real.mean(1), atol=0.15 * float(real.std(1).max()))
