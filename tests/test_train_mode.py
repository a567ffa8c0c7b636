"""Growth evaluates in eval mode but gives the user's model its train/eval flags back, per module."""

import torch
import torch.nn.functional as F
from torch import nn

import growc
from growc.growth.train import batch_loss, evaluate


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _loader(n: int = 128, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_batch_loss_and_evaluate_keep_every_modules_mode():
    model = _model().train()
    model[3].eval()  # a user's layer kept in eval mode inside a training model
    before = _modes(model)
    x, y = _loader()[0]
    batch_loss(model, [x], y, F.cross_entropy)
    assert _modes(model) == before
    evaluate(model, _loader(), F.cross_entropy, torch.device("cpu"))
    assert _modes(model) == before


def test_grower_leaves_dropout_in_train_mode():
    grower = growc.Grower(_model().train(), F.cross_entropy, growc.GrowthConfig(stat_samples=128, folds=2))
    assert all(_modes(grower.model).values())
    grower.measure(_loader())
    assert all(_modes(grower.model).values())
    optimizer = torch.optim.Adam(grower.model.parameters(), lr=1e-3)
    site = grower.candidates.sites[0].name
    grower.grow(site, neurons=2, optimizer=optimizer)  # the amplitude search evaluates the loss
    assert all(_modes(grower.model).values()), _modes(grower.model)
