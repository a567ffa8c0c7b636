"""--device cuda: the same growth on a GPU. Skipped where torch sees no GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growc.data import as_loader, digits
from growc.graph.candidates import find_width_sites
from growc.graph.trace import trace
from growc.growth.collector import StatisticsCollector
from growc.growth.config import GrowthConfig
from growc.growth.loop import grow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def test_statistics_on_gpu_equal_cpu():
    train, _ = digits()
    x, y = train.tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 10))
    moments = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        sites = find_width_sites(trace(m)).sites
        collector = StatisticsCollector(m, sites)
        with collector:
            F.cross_entropy(m(x.to(device)), y.to(device)).backward()
            collector.accumulate(len(y))
        moments[device] = collector.accumulators[sites[0].name].total()
    torch.testing.assert_close(moments["cuda"].s_prev.cpu(), moments["cpu"].s_prev, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        moments["cuda"].consumers[0].p.cpu(), moments["cpu"].consumers[0].p, rtol=1e-3, atol=1e-5
    )


@pytest.mark.parametrize("strategy", ["tiny", "random"])
def test_growth_runs_on_gpu(strategy):
    train, val = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 10))
    result = grow(
        model,
        as_loader(train, 64, True, 0),
        as_loader(val, 256, False, 0),
        F.cross_entropy,
        GrowthConfig(device="cuda", steps=10, final_epochs=10, strategy=strategy),
    )
    assert next(result.model.parameters()).is_cuda
    assert result.report.final["final_params"] > result.report.final["initial_params"]
    assert result.report.final["final_val_accuracy"] > 0.85


@pytest.mark.parametrize("name", ["ResBlock", "Inception", "MobileBlock", "LayerScale", "ResNeXtBlock", "RegNetYBlock"])
def test_coupled_growth_on_gpu(name):
    """Residual streams, concatenations, depthwise carriers, broadcast tensors and channel groups grow on the GPU
    (depth on), and the grown graph matches the user's module there."""
    import zoo

    torch.manual_seed(0)
    model = getattr(zoo, name)()
    x = zoo.inputs_for(model, batch=256)[0]
    y = (x.flatten(1) @ torch.randn(x[0].numel(), 3, generator=torch.Generator().manual_seed(1))).argmax(1)
    data = torch.utils.data.TensorDataset(x, y)
    result = grow(
        model,
        as_loader(data, 32, True, 0),
        as_loader(data, 128, False, 0),
        F.cross_entropy,
        GrowthConfig(device="cuda", steps=4, final_epochs=1, depth=True),
    )
    assert next(result.model.parameters()).is_cuda
    assert result.report.final["final_params"] > result.report.final["initial_params"]
    if not any(module.startswith("growc_depth") for module, _ in result.model.named_modules()):
        # Without inserted blocks the user's module, grown in place, is the whole model.
        with torch.no_grad():
            probe = x[:8].cuda()
            torch.testing.assert_close(result.user_model(probe), result.model(probe))
