"""Fast checks of the benchmark suites' pieces (the suites themselves take minutes: see
benchmarks/README.md for their --quick runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("matplotlib")
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, ROOT)

from benchmarks.__main__ import SUITES, main  # noqa: E402
from benchmarks.cifar10_resnet import SmallResNet  # noqa: E402
from benchmarks.growth_runs import from_scratch, train_fixed  # noqa: E402
from benchmarks.mnist1d import Signal1dCNN  # noqa: E402
from benchmarks.peer import cost_per_step  # noqa: E402


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_parses(suite: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([suite, "--help"])
    assert exit_info.value.code == 0


def test_conv2d_over_a_row_is_the_conv1d_it_stands_for() -> None:
    torch.manual_seed(0)
    cnn = Signal1dCNN([3, 4, 5])
    conv1d = nn.Conv1d(1, 3, 5, stride=2, padding=1)
    conv1d.weight.data.copy_(cnn.conv1.weight.data[:, :, 0, :])
    conv1d.bias.data.copy_(cnn.conv1.bias.data)
    x = torch.randn(7, 40)
    as_2d = cnn.conv1(x.view(7, 1, 1, 40))[:, :, 0, :]
    torch.testing.assert_close(as_2d, conv1d(x.view(7, 1, 40)))
    assert cnn(x).shape == (7, 10)


def test_from_scratch_keeps_the_architecture_and_draws_new_weights() -> None:
    model = SmallResNet([2, 4, 8], [1, 0, 1])
    fresh = from_scratch(model, seed=1)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert not torch.equal(fresh.head.weight, model.head.weight)
    assert fresh(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_train_fixed_stops_on_its_wall_time() -> None:
    data = TensorDataset(torch.randn(256, 8), torch.randint(0, 10, (256,)))
    record = train_fixed("t", nn.Linear(8, 10), data, data, lr=1e-2, batch_size=32, device="cpu", seed=0, seconds=0.05)
    assert record["epochs"] > 0 and record["seconds"] < 5


def test_growth_cost_is_per_epoch_of_the_same_step() -> None:
    steps = [{"seconds": {"train": 2.0, "statistics": 0.5, "solve": 0.25, "line_search": 0.25}}]
    cost = cost_per_step(steps, epochs_per_step=2)
    assert cost["median"] == pytest.approx(1.0)
    assert cost["parts"]["statistics"] == pytest.approx(0.5)
