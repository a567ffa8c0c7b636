"""How far two computations of the same model are apart, judged relative to the output's scale.

float32 rounding grows with the size of the values a model computes: a ResNet-50 whose logits
reach 1.7e4 differs from onnxruntime by 7e-3 in absolute terms, 4e-7 of its scale. A fixed
absolute bound would refuse it while accepting a real error on a model whose outputs are 1e-3.
So a difference is divided by the output's scale (its largest magnitude, at least 1, so that
near-zero outputs are judged absolutely), and both numbers are reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

#: Largest accepted difference, relative to the output's scale (absolute when the scale is below 1).
RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float  # the largest |expected - got| over every output element
    scale: float  # the largest |expected|, at least 1

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.scale

    def within(self, tolerance: float = RELATIVE_TOLERANCE) -> bool:
        return self.relative_diff <= tolerance  # False for NaN as well

    def describe(self) -> str:
        return f"max |diff| {self.max_abs_diff:.2e}, {self.relative_diff:.1e} of the output's scale {self.scale:.3g}"


def _arrays(value: Any) -> Iterable[np.ndarray]:
    """The arrays inside a model output: a tensor or array, or tuples, lists and dicts of them."""
    if isinstance(value, Tensor):
        yield value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _arrays(item)


def compare(expected: Any, got: Any) -> Parity:
    """The parity of `got` against `expected` (same structure: tensors, arrays, or nested tuples,
    lists and dicts of them)."""
    diff, scale = 0.0, 1.0
    for a, b in zip(_arrays(expected), _arrays(got), strict=True):
        if a.shape != b.shape:
            return Parity(max_abs_diff=float("inf"), scale=1.0)
        if a.size:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            gap = float(np.max(np.abs(a64 - b64)))
            diff = max(diff, math.inf if math.isnan(gap) else gap)  # a NaN on either side never passes
            scale = max(scale, float(np.max(np.abs(a64))))
    return Parity(max_abs_diff=diff, scale=scale)
