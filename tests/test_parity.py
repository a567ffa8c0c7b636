"""Parity between two computations of a model is judged relative to the output's scale."""

import math

import numpy as np
import torch
from torch import nn

from growc.deploy.export import export_onnx
from growc.deploy.parity import compare


def test_a_difference_is_measured_against_the_largest_output():
    expected = torch.tensor([[1.0e4, -2.0], [3.0, 4.0]])
    got = expected.clone()
    got[1, 0] += 5e-3
    parity = compare(expected, got)
    assert math.isclose(parity.max_abs_diff, 5e-3, rel_tol=1e-3)
    assert parity.scale == 1.0e4
    assert math.isclose(parity.relative_diff, 5e-7, rel_tol=1e-3)
    assert parity.within()


def test_small_outputs_are_judged_absolutely():
    expected = np.array([1e-3, -1e-3], dtype=np.float32)
    parity = compare(expected, expected + 5e-4)  # half the output: a real error, though below 1e-3
    assert parity.scale == 1.0
    assert not parity.within()


def test_nested_outputs_shape_mismatch_and_nan_are_refused():
    a = (torch.ones(2, 3), {"b": torch.zeros(2)})
    assert compare(a, (torch.ones(2, 3), {"b": torch.zeros(2)})).within()
    assert not compare(torch.ones(2, 3), torch.ones(3, 2)).within()
    assert not compare(torch.ones(2), torch.tensor([1.0, float("nan")])).within()


class _LargeLogits(nn.Module):
    """Outputs around 1e4, like a deep unnormalized network: float32 rounding alone exceeds 1e-4."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))

    def forward(self, x):
        return self.layers(x) * 3.0e4


def test_a_model_with_large_outputs_exports_and_reports_both_differences(tmp_path):
    torch.manual_seed(0)
    model = _LargeLogits()
    x = torch.randn(64, 16)
    result = export_onnx(model, [x], tmp_path / "large.onnx")
    assert result.path.is_file()
    assert result.parity.scale > 1e3
    assert result.relative_diff <= 1e-4
    assert result.max_abs_diff == result.parity.max_abs_diff
