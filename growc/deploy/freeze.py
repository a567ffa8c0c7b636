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
from growc.graph.trace import trace

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
        if not isinstance(bn, _BATCH_NORMS) or not bn.track_running_stats or bn.running_mean is None:
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
    if isinstance(layer, _CONVS):
        # Conv{k}d outputs (N, C, ...) and every BatchNorm normalizes dim 1: the channels.
        return layer.out_channels == bn.num_features
    if isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
        # BatchNorm1d normalizes dim 1, which is the Linear's feature dim only for 2-D outputs.
        if layer.out_features != bn.num_features:
            return False
        return ranks is None or ranks.get(source.name) == 2
    return False


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


def _unit_columns(consumer: nn.Module, units: int, spatial: int) -> Tensor:
    """The consumer's weights grouped by hidden unit: (units, everything the unit feeds)."""
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):  # columns j*spatial .. (j+1)*spatial-1 read unit j
        return w.reshape(w.shape[0], units, spatial).transpose(0, 1).reshape(units, -1)
    return w.transpose(0, 1).reshape(units, -1)  # conv: input channel j, every output and tap


def _keep_inputs(consumer: nn.Module, keep: Tensor, spatial: int) -> None:
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):
        columns = (keep[:, None] * spatial + torch.arange(spatial)).flatten()
        consumer.weight = nn.Parameter(w[:, columns].clone(), requires_grad=False)
        consumer.in_features = len(columns)
    else:
        consumer.weight = nn.Parameter(w[:, keep].clone(), requires_grad=False)
        consumer.in_channels = len(keep)


def _keep_outputs(producer: nn.Module, keep: Tensor) -> None:
    producer.weight = nn.Parameter(producer.weight.detach()[keep].clone(), requires_grad=False)
    if producer.bias is not None:
        producer.bias = nn.Parameter(producer.bias.detach()[keep].clone(), requires_grad=False)
    if isinstance(producer, nn.Linear):
        producer.out_features = len(keep)
    else:
        producer.out_channels = len(keep)


def _drop_dead_neurons(gm: fx.GraphModule) -> None:
    """Between a site's producer and its consumers every op acts on each unit alone (activation,
    per-channel pooling, flatten), so a unit whose weights are zero in every consumer cannot change
    the output: remove its output from the producer and its inputs from the consumers."""
    layers = (nn.Linear, nn.Conv2d)
    for site in find_width_sites(gm).sites:
        if not site.is_chain:
            continue  # tied layers (residual streams, concatenations, carriers) keep all their units
        producer, consumers = site.modules(gm)
        if site.norm or not all(type(m) in layers for m in [producer, *consumers]):
            continue  # a BatchNorm left in the path (not foldable) would need its entries cut too
        if isinstance(producer, nn.Conv2d) and producer.groups != 1:
            continue
        if any(isinstance(c, nn.Conv2d) and c.groups != 1 for c in consumers):
            continue
        units = producer.weight.shape[0]
        spatial = site.spatial_size(gm)
        alive = torch.zeros(units, dtype=torch.bool)
        for consumer in consumers:
            alive |= (_unit_columns(consumer, units, spatial) != 0).any(dim=1)
        if bool(alive.all()):
            continue
        if not bool(alive.any()):
            alive[0] = True  # keep one unit: zero-width layers are not portable
        keep = alive.nonzero().flatten()
        _keep_outputs(producer, keep)
        for consumer in consumers:
            _keep_inputs(consumer, keep, spatial)


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
