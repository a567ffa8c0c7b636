"""Amplitude line search on the real loss: 0 is always tried, so a step never hurts."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

#: Amplitudes tried for new neurons, relative to "as large as a typical existing neuron".
NEURON_AMPLITUDES: tuple[float, ...] = (0.0, 1 / 16, 1 / 4, 1 / 2, 1.0, 2.0)
#: Sizes tried for the best update of existing weights, relative to the weights' norm.
UPDATE_FRACTIONS: tuple[float, ...] = (0.0, 0.01, 0.1)


def line_search(
    loss_at: Callable[[float], float], candidates: Sequence[float], known: Mapping[float, float] | None = None
) -> tuple[float, float, dict[float, float]]:
    """Evaluate each candidate; return (best, its loss, all losses). Ties go to the smaller value;
    a non-finite loss never wins. `known` holds losses already measured (the model as it stands
    at 0, say): those candidates are not evaluated again, so the model is left at whichever
    candidate was evaluated last, and the caller sets the one it keeps."""
    losses = {}
    for value in candidates:
        loss = known[value] if known is not None and value in known else loss_at(value)
        losses[value] = loss if math.isfinite(loss) else math.inf
    best = min(sorted(losses), key=lambda v: losses[v])
    return best, losses[best], losses
