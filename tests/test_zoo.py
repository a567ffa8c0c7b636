"""Models of every common shape: growc traces them, finds what it can grow (and says why it
leaves the rest), grows those sites exactly, and exports the result with ONNX parity."""

import pytest
import torch
import torch.nn.functional as F
from zoo import ZOO, inputs_for

from growc.deploy.export import export_onnx
from growc.graph.candidates import find_width_sites
from growc.graph.depth import find_depth_edges
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.trace import trace


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_zoo_model_candidates_exact_growth_and_export(cls, tmp_path):
    torch.manual_seed(0)
    model = cls().eval()
    x = inputs_for(model)
    graph = trace(model)
    report = find_width_sites(graph)
    assert report.sites or report.skipped or find_depth_edges(graph)
    for name, why in report.skipped:
        assert isinstance(why, str) and why, name
    with torch.no_grad():
        before = graph(*x)
        growths = []
        for site in report.sites:
            producer = model.get_submodule(site.producer)
            flat_in = producer.weight[0].numel()
            out = sum(model.get_submodule(c).weight.shape[0] for c in site.consumers)
            rows = [model.get_submodule(c).weight.shape[0] for c in site.consumers]
            units = NewUnits(
                rows=torch.randn(2, flat_in),
                bias=torch.randn(2),
                omega=torch.randn(out, 2),
                omega_rows=rows,
                norm_weight=torch.ones(2),
                norm_mean=torch.zeros(2),
                norm_var=torch.ones(2),
            )
            growth = SiteGrowth(model, site, units)
            growth.set_amplitude(0.0)
            growths.append(growth)
        torch.testing.assert_close(graph(*x), before, rtol=1e-5, atol=1e-6)  # every site grew, nothing changed
        for growth in growths:
            growth.set_amplitude(0.3)
        grown = graph(*x)
    if growths:
        assert not torch.allclose(grown, before)
    result = export_onnx(graph, x, tmp_path / "model.onnx", check_inputs=inputs_for(model, batch=5))
    assert result.max_abs_diff <= 1e-5


def test_zoo_growth_lowers_the_training_loss_where_sites_exist():
    from growc.growth.collector import StatisticsCollector
    from growc.growth.config import GrowthConfig
    from growc.growth.step import LineSearchBatch, assess_sites, grow_site
    from growc.tiny.strategies import make_strategy

    for cls in ZOO:
        torch.manual_seed(1)
        model = cls()
        x = inputs_for(model, batch=256)
        y = torch.randint(0, 3, (256,))
        graph = trace(model)
        sites = find_width_sites(graph).sites
        if not sites:
            continue
        collector = StatisticsCollector(graph, sites, folds=4)
        with collector:
            for i in range(0, 256, 32):
                graph.zero_grad()
                F.cross_entropy(graph(*[t[i : i + 32] for t in x]), y[i : i + 32]).backward()
                collector.accumulate(32)
        batch = LineSearchBatch(x, y, F.cross_entropy)
        config = GrowthConfig()
        before = batch.loss(graph)
        for a in assess_sites(graph, sites, collector.accumulators, config):
            grow_site(graph, a, 2, make_strategy("tiny"), [], batch, config, torch.Generator().manual_seed(0))
        assert batch.loss(graph) <= before + 1e-6, cls.__name__
