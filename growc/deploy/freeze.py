"""A grown model turned into a plain inference model.

Growth leaves neurons whose outgoing weights are all zero (new units that never took off), and
users train with BatchNorm and Dropout. None of this is needed at inference time: `freeze` drops
the dead neurons, folds each BatchNorm into the layer before it and removes Dropout/Identity, on
a copy, so the frozen model computes the same outputs (eval mode) with fewer parameters and ops.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from growc.deploy.parity import RELATIVE_TOLERANCE, compare
from growc.deploy.standalone import write_standalone  # write_standalone: the next step
from growc.errors import GrowcError
from growc.graph.candidates import find_width_sites
from growc.graph.handlers import batchnorm_folds_into, handler_for, is_batchnorm
from growc.graph.trace import trace

# Identity at inference: removed so that neither ONNX nor the standalone file carries them.
_NO_OPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def freeze(
    model: nn.Module,
    example_inputs: Sequence[Tensor] | None = None,
    leaf_modules: Iterable[str] = (),
) -> fx.GraphModule:
    """A frozen copy of `model` (a GraphModule from `growc.load` or any traceable model) in eval
    mode; `model` itself is left untouched.

    `example_inputs` let BatchNorm1d folding check the layer's output rank: without them a
    Linear -> BatchNorm1d pair is folded when the sizes match, which assumes (batch, features)
    inputs (the MLP case)."""
    gm = copy.deepcopy(model) if isinstance(model, fx.GraphModule) else trace(copy.deepcopy(model), leaf_modules)
    gm.eval()
    ranks = _output_ranks(gm, example_inputs) if example_inputs is not None else None
    with torch.no_grad():
        _remove_no_ops(gm)
        _fold_batch_norms(gm, ranks)
        _drop_dead_neurons(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval()


def _output_ranks(gm: fx.GraphModule, example_inputs: Sequence[Tensor]) -> dict[str, int]:
    ShapeProp(gm).propagate(*[x.detach().cpu()[:2] for x in example_inputs])
    ranks = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            ranks[node.name] = len(meta.shape)
    return ranks


def _remove_no_ops(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(str(node.target))) in _NO_OPS:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _fold_batch_norms(gm: fx.GraphModule, ranks: dict[str, int] | None) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(str(node.target))
        if not is_batchnorm(bn) or not bn.track_running_stats or bn.running_mean is None:
            continue  # without running statistics the BN normalizes by the batch: not foldable
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer = gm.get_submodule(str(source.target))
        if not _foldable(layer, bn, source, ranks):
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == source.target) != 1:
            continue  # a layer called twice would get the BN applied on its other call too
        _fold(layer, bn)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)


def _foldable(layer: nn.Module, bn: nn.Module, source: fx.Node, ranks: dict[str, int] | None) -> bool:
    rank = None if ranks is None else ranks.get(source.name, -1)  # -1: not propagated, do not assume
    return batchnorm_folds_into(layer, bn, rank)


def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """w' = w * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), in float64."""
    weight = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double() + bn.bias.detach().double()
    dtype = layer.weight.dtype
    new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_bias = bias * scale + shift
    layer.weight = nn.Parameter(new_weight.to(dtype), requires_grad=False)
    layer.bias = nn.Parameter(new_bias.to(dtype), requires_grad=False)


def _drop_dead_neurons(gm: fx.GraphModule) -> None:
    """Between a site's producer and its consumers every op acts on each unit alone (activation,
    per-channel pooling, flatten), so a unit whose weights are zero in every consumer cannot change
    the output: remove its output from the producer and its inputs from the consumers."""
    for site in find_width_sites(gm).sites:
        if not site.is_chain or site.norm or site.groups > 1:
            continue  # tied layers (streams, concatenations, carriers), unfolded BatchNorms, channel groups keep every unit
        producer, consumers = site.modules(gm)
        units = producer.weight.shape[0]
        spatial = site.spatial_size(gm)
        alive = torch.zeros(units, dtype=torch.bool)
        for consumer in consumers:
            alive |= (handler_for(consumer).unit_columns(consumer, units, spatial) != 0).any(dim=1)
        if bool(alive.all()):
            continue
        if not bool(alive.any()):
            alive[0] = True  # keep one unit: zero-width layers are not portable
        keep = alive.nonzero().flatten()
        handler_for(producer).keep_outputs(producer, keep)
        for consumer in consumers:
            handler_for(consumer).keep_inputs(consumer, keep, spatial)


def check_same_outputs(
    original: nn.Module, frozen: nn.Module, inputs: Sequence[Tensor], tolerance: float = RELATIVE_TOLERANCE
) -> float:
    """The largest |original - frozen| on `inputs`; raise when it is above `tolerance` relative to
    the output's scale (folding BatchNorm rounds differently, more so where values are large)."""
    original.eval()
    with torch.no_grad():
        parity = compare(original(*inputs), frozen(*inputs))
    if not parity.within(tolerance):
        raise GrowcError(
            f"the frozen model differs from the checkpoint's ({parity.describe()}; at most {tolerance:.0e}): "
            "report this as a growc bug and deploy the unfrozen model meanwhile"
        )
    return parity.max_abs_diff


__all__ = ["check_same_outputs", "freeze", "write_standalone"]
