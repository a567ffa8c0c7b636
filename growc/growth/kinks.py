"""Choosing each new neuron's sign under a kinked activation (ReLU and its kin).

TINY linearizes the activation at 0, and the linearization cannot tell `(alpha, omega)` from
`(-alpha, -omega)`: both fit the bottleneck equally. Under ReLU they differ: the neuron
contributes `omega relu(alpha^T b')` or `-omega relu(-alpha^T b')`. Since
`relu(z) - relu(-z) = z`, the two first-order gains add up to the linear one, so the better sign
keeps at least half of it. growc measures both on the line-search samples (one forward and
backward pass) and keeps, for each neuron, the sign with the larger gain, dropping neurons for
which neither helps (a dead-on-arrival ReLU unit is never added).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from growc.graph.candidates import WidthSite
from growc.graph.samples import consumer_rows, producer_rows
from growc.graph.site import Site
from growc.growth.train import modes_kept
from growc.tiny.input_mode import InputMode
from growc.tiny.solver import Neurons


def is_kinked(site: Site) -> bool:
    return site.sign_testable and site.kinked


def signed_gains(
    model: nn.Module,
    site: WidthSite,
    neurons: Neurons,
    mode: InputMode,
    mean: Tensor,
    solved_rows: list[int],
    inputs: list[Tensor],
    target: Tensor,
    loss_fn,
) -> Tensor:
    """(K, 2): first-order loss decrease per unit amplitude of each neuron with sign + and -."""
    captured: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def keep_input(name):
        def hook(module, args, output):
            captured[name] = args[0].detach()
            if name in site.consumers:
                outputs[name] = output

        return hook

    names = {site.producer, *site.consumers}
    handles = [model.get_submodule(n).register_forward_hook(keep_input(n)) for n in names]
    try:
        with modes_kept(model), torch.enable_grad():
            model.eval()
            loss = loss_fn(model(*inputs), target)
            grads = torch.autograd.grad(loss, [outputs[c] for c in site.consumers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    batch = target.shape[0]
    rows = producer_rows(site, model, captured[site.producer]).double()
    # The producer may have gained inputs earlier in this step: only the solved ones count.
    b_prev = mode.encode_rows(rows, neurons.alpha.shape[0], mean)
    # A consumer may have gained outputs earlier in this step: only the solved ones count.
    g = torch.cat(
        [
            consumer_rows(model, c, captured[c], grad if grad is not None else torch.zeros_like(outputs[c]), batch)[1][
                :, :rows
            ]
            for c, grad, rows in zip(site.consumers, grads, solved_rows)
        ],
        dim=1,
    ).double()
    z = b_prev @ neurons.alpha.to(b_prev)
    push = -(g @ neurons.omega.to(g))  # how much each neuron's output direction lowers the loss
    plus = (torch.relu(z) * push).mean(0)
    minus = (torch.relu(-z) * -push).mean(0)
    return torch.stack([plus, minus], dim=1)


def choose_signs(gains: Tensor, neurons: Neurons, together: int = 1) -> Neurons:
    """Flip each neuron to its better sign; drop those that help with neither. Neurons that come
    `together` (one per channel group) are kept or dropped together, on their summed gain."""
    best, which = gains.max(dim=1)
    sign = torch.where(which == 0, 1.0, -1.0).to(neurons.alpha)
    keep = best > 0
    if together > 1:
        keep = (best.reshape(-1, together).sum(1) > 0).repeat_interleave(together)
    return Neurons(
        alpha=(neurons.alpha * sign)[:, keep], omega=(neurons.omega * sign)[:, keep], lambdas=neurons.lambdas[keep]
    )
