"""Everything growc knows about layer types, in one registry.

Two kinds of handlers:
  - a `LayerHandler` for each layer `a = W b` whose units can grow (Linear, Conv2d): its
    geometry, how its samples are read, how it widens and shrinks, its multiply-adds;
  - a `ChannelHandler` for each per-channel layer a site's units pass through (BatchNorm, a
    depthwise conv): one new entry per unit that lets the unit through unchanged.
Both are matched by `isinstance` (a subclass is handled when it keeps the layer's `forward`).
Supporting a new layer type means adding one handler here and listing it in `LAYERS` or
`CHANNELS`; the rest of growc asks `handler_for` / `channel_handler_for` and never checks types.

Widening keeps the module object and swaps its Parameters (so user references and the traced
graph stay valid); every swap is returned as a `TensorSwap` so the caller can carry optimizer
state over or undo it.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Where new entries go along a dimension: appended (None), before index `at` (an int), or at the
#: given positions of the grown tensor, one per new entry in the units' order (a tensor: channel
#: groups, where each group's new units go at the end of the group).
Place = int | Tensor | None


def positions_of(place: Place, size: int, count: int, device: torch.device | None = None) -> Tensor:
    """The positions, in the grown tensor of `size + count` entries, where `place` puts the
    `count` new ones (in the units' order)."""
    if isinstance(place, Tensor):
        if place.numel() != count:
            raise ValueError(f"{place.numel()} positions given for {count} new entries")
        return place.to(device=device, dtype=torch.long)
    start = size if place is None else place
    return torch.arange(start, start + count, device=device)


@dataclass
class TensorSwap:
    """One Parameter (or buffer) of a module replaced by a larger one along `dim`: the new entries
    sit at `positions` (in the units' order; consecutive, at the end, unless inserted among the
    old ones)."""

    module: nn.Module
    attr: str
    old: Tensor
    new: Tensor
    dim: int  # the dimension that grew
    old_size: int
    positions: Tensor  # where the new entries are in `new` along `dim`

    @property
    def is_parameter(self) -> bool:
        return isinstance(self.new, nn.Parameter)

    @property
    def added(self) -> int:
        return self.new.shape[self.dim] - self.old_size

    def _old_positions(self, device: torch.device) -> Tensor:
        kept = torch.ones(self.new.shape[self.dim], dtype=torch.bool, device=device)
        kept[self.positions.to(device)] = False
        return kept.nonzero().flatten()

    def new_entries(self) -> Tensor:
        """A copy of the new entries, in the units' order along `dim`."""
        return self.new.detach().index_select(self.dim, self.positions.to(self.new.device))

    @torch.no_grad()
    def set_new(self, value: Tensor) -> None:
        """Write the new entries (`value` in the units' order, any shape with their element count)."""
        shape = _grown_shape(self.new, self.dim, self.added)
        self.new.detach().index_copy_(self.dim, self.positions.to(self.new.device), value.to(self.new).reshape(shape))

    def widen(self, value: Tensor, fill: float = 0.0) -> Tensor:
        """`value` shaped like the old tensor, with `fill` where the new entries went."""
        out = value.new_full(_grown_shape(value, self.dim, self.new.shape[self.dim]), fill)
        return out.index_copy_(self.dim, self._old_positions(value.device), value)

    def narrow(self, value: Tensor) -> Tensor:
        """`value` shaped like the new tensor, with the new entries taken out."""
        return value.index_select(self.dim, self._old_positions(value.device))

    def undo(self) -> None:
        _assign(self.module, self.attr, self.old)


@dataclass
class AttributeSwap:
    """A module's plain attribute (a norm's epsilon) changed along with a growth; undone with it."""

    module: nn.Module
    attr: str
    old: float | None
    new: float | None
    is_parameter: ClassVar[bool] = False

    def __post_init__(self) -> None:
        setattr(self.module, self.attr, self.new)

    def undo(self) -> None:
        setattr(self.module, self.attr, self.old)


def _grown_shape(value: Tensor, dim: int, count: int) -> list[int]:
    shape = list(value.shape)
    shape[dim] = count
    return shape


#: Attribute of a module of the traced graph listing the user's attributes that hold the same
#: tensor under another owner (the graph's copy of a root Parameter, a lifted F.linear's weight):
#: {attr: [(weakref to the user's module, its attribute name)]}. Swaps are mirrored there, so the
#: user's module grows in place with the graph.
MIRRORS = "_growc_mirrors"
SIZE_MIRRORS = "_growc_size_mirrors"


def owner_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the tensor at dotted `path` under `root`, and its attribute name."""
    owner, _, attr = path.rpartition(".")
    return (root.get_submodule(owner) if owner else root), attr


def add_mirror(module: nn.Module, attr: str, owner: nn.Module, owner_attr: str) -> None:
    mirrors = module.__dict__.setdefault(MIRRORS, {})
    mirrors.setdefault(attr, []).append((weakref.ref(owner), owner_attr))


def add_size_mirror(layer: nn.Module, owner: nn.Module, owner_attr: str) -> None:
    """`owner.owner_attr` (an int of the user's module, such as a ViT's `hidden_dim` that its
    forward passes to `reshape`) follows `layer`'s output width whenever growth changes it."""
    layer.__dict__.setdefault(SIZE_MIRRORS, []).append((weakref.ref(owner), owner_attr))


def _sync_size_mirrors(layer: nn.Module, width: int) -> None:
    for ref, attr in layer.__dict__.get(SIZE_MIRRORS, []):
        owner = ref()
        if owner is not None:
            setattr(owner, attr, width)


def _assign(module: nn.Module, attr: str, value: Tensor) -> None:
    """Set `module.attr` (a Parameter or a buffer) and its mirrors in the user's modules."""
    targets = [(module, attr)]
    for ref, owner_attr in module.__dict__.get(MIRRORS, {}).get(attr, []):
        owner = ref()
        if owner is not None and isinstance(getattr(owner, owner_attr, None), Tensor):
            targets.append((owner, owner_attr))
    for target, name in targets:
        if isinstance(value, nn.Parameter):
            setattr(target, name, value)
        else:
            target.register_buffer(name, value)


def extend(module: nn.Module, attr: str, extra: Tensor, dim: int, at: Place = None) -> TensorSwap:
    """Insert `extra` into `module.attr` along `dim` where `at` says (default: append), as a new
    Parameter (or buffer)."""
    old = getattr(module, attr)
    size, count = old.shape[dim], extra.shape[dim]
    positions = positions_of(at, size, count, old.device)
    data = old.detach().new_empty(_grown_shape(old, dim, size + count))
    swap = TensorSwap(module, attr, old, data, dim, size, positions)
    data = swap.widen(old.detach())
    data.index_copy_(dim, positions, extra.to(dtype=old.dtype, device=old.device))
    new = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data
    _assign(module, attr, new)
    swap.new = new
    return swap


class LayerHandler(ABC):
    """A layer `a = W b` whose inputs and outputs can grow; `b` is its input, unfolded for convs."""

    layer_type: ClassVar[type[nn.Module]]
    feature_map: ClassVar[bool] = False  # its units are channels of a feature map (else vector features)

    def accepts(self, layer: nn.Module) -> bool:
        """Whether this handler grows `layer` (an instance of `layer_type`): a subclass that
        replaces `forward` computes something else and is left alone, and so is a layer whose
        weight is computed (weight_norm, spectral_norm: `torch.nn.utils.parametrize`)."""
        return type(layer).forward is self.layer_type.forward and _plain_weights(layer)

    @abstractmethod
    def geometry(self, layer: nn.Module) -> tuple:
        """What readers must share to be measured together (kernel, stride... for a conv)."""

    @abstractmethod
    def unit_columns(self, layer: nn.Module, units: int, spatial: int) -> Tensor:
        """The weights reading each input unit: (units, everything the unit feeds)."""

    @abstractmethod
    def keep_inputs(self, layer: nn.Module, keep: Tensor, spatial: int) -> None:
        """Shrink to the input units `keep` (frozen Parameters)."""

    def keep_outputs(self, layer: nn.Module, keep: Tensor) -> None:
        """Shrink to the output units `keep` (frozen Parameters)."""
        layer.weight = nn.Parameter(layer.weight.detach()[keep].clone(), requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[keep].clone(), requires_grad=False)
        self.sync_sizes(layer)

    @abstractmethod
    def in_size(self, layer: nn.Module) -> int: ...

    @abstractmethod
    def out_size(self, layer: nn.Module) -> int: ...

    def has_bias(self, layer: nn.Module) -> bool:
        return getattr(layer, "bias", None) is not None

    @abstractmethod
    def input_rows(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The layer's input as rows `b` (n, in_flat), one per output sample (no bias column)."""

    @abstractmethod
    def output_rows(self, layer: nn.Module, g: Tensor) -> Tensor:
        """A tensor shaped like the layer's output, as rows (n, out) matching `input_rows`."""

    def output_block(self, layer: nn.Module, rows: Tensor) -> Tensor:
        """K new outputs' weights as the weight's new slice along dim 0, from `rows` (K, flat)
        over the layer's inputs as the statistics see them (flattened, every input; rows
        with fewer inputs than the layer now has get zeros for the rest)."""
        k = rows.shape[0]
        padded = rows.new_zeros(k, self.in_size(layer) * self.taps(layer))
        padded[:, : rows.shape[1]] = rows
        return padded.reshape(k, *layer.weight.shape[1:])

    def grow_out(self, layer: nn.Module, rows: Tensor, bias: Tensor | None, at: Place = None) -> list[TensorSwap]:
        """New outputs where `at` says (default: appended): `rows` (K, flat, see `output_block`)
        of weights and their biases (zeros if None)."""
        k = rows.shape[0]
        swaps = [extend(layer, "weight", self.output_block(layer, rows), 0, at)]
        if layer.bias is not None:
            swaps.append(extend(layer, "bias", bias if bias is not None else rows.new_zeros(k), 0, at))
        self.sync_sizes(layer)
        return swaps

    def grow_in(self, layer: nn.Module, block: Tensor, at: Place = None) -> list[TensorSwap]:
        """Insert inputs where `at` says (default: append): `block` shaped like the weight's new
        slice (see `input_block`). `at` counts the layer's own inputs (features of a linear
        layer, even when they are a flattened feature map's)."""
        swaps = [extend(layer, "weight", block, 1, at)]
        self.sync_sizes(layer)
        return swaps

    @abstractmethod
    def input_block(self, layer: nn.Module, omega: Tensor, spatial: int) -> Tensor:
        """The weight slice for K new inputs whose outgoing weights are `omega` (out, K).

        `spatial` > 1 for a linear layer that reads a flattened feature map: each new channel is
        `spatial` features, all weighted by omega / spatial (the channel enters through its mean).
        """

    def weight_matrix(self, layer: nn.Module) -> Tensor:
        """`W` as (out, in_flat [+1 for the bias]), the matrix that `input_rows` multiply."""
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        return torch.cat([w, layer.bias.detach()[:, None]], dim=1) if layer.bias is not None else w

    def add_to_weight_matrix(self, layer: nn.Module, delta: Tensor) -> None:
        with torch.no_grad():
            delta = delta.to(layer.weight)
            flat = layer.weight.shape[0], -1
            layer.weight.view(flat).add_(delta[:, : self.in_size(layer) * self.taps(layer)])
            if layer.bias is not None:
                layer.bias.add_(delta[:, -1])

    def taps(self, layer: nn.Module) -> int:
        """Weights per input unit and output unit (kernel positions for a conv)."""
        return 1

    @abstractmethod
    def sync_sizes(self, layer: nn.Module) -> None:
        """Keep the layer's size attributes equal to its weight's shape after a swap or undo."""

    def params_per_output(self, layer: nn.Module) -> int:
        return self.in_size(layer) * self.taps(layer) + int(self.has_bias(layer))

    def params_per_input(self, layer: nn.Module, spatial: int = 1) -> int:
        return self.out_size(layer) * self.taps(layer) * spatial


class LinearHandler(LayerHandler):
    layer_type = nn.Linear

    def geometry(self, layer: nn.Linear) -> tuple:
        return ("linear",)

    def unit_columns(self, layer: nn.Linear, units: int, spatial: int) -> Tensor:
        w = layer.weight.detach()  # columns j*spatial .. (j+1)*spatial-1 read unit j
        return w.reshape(w.shape[0], units, spatial).transpose(0, 1).reshape(units, -1)

    def keep_inputs(self, layer: nn.Linear, keep: Tensor, spatial: int) -> None:
        columns = (keep[:, None] * spatial + torch.arange(spatial)).flatten()
        layer.weight = nn.Parameter(layer.weight.detach()[:, columns].clone(), requires_grad=False)
        self.sync_sizes(layer)

    def in_size(self, layer: nn.Linear) -> int:
        return layer.in_features

    def out_size(self, layer: nn.Linear) -> int:
        return layer.out_features

    def input_rows(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, layer: nn.Linear, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])

    def input_block(self, layer: nn.Linear, omega: Tensor, spatial: int) -> Tensor:
        return omega.repeat_interleave(spatial, dim=1) / spatial

    def sync_sizes(self, layer: nn.Linear) -> None:
        layer.out_features, layer.in_features = layer.weight.shape


class Conv2dHandler(LayerHandler):
    """Conv2d with groups = 1 and zero padding; samples are unfolded patches, one per position.

    A new input channel of a conv consumer gets its outgoing weights at one kernel tap (the
    centre, `centre_tap`) and zeros elsewhere: then the consumer's output at q reads the new
    channel at exactly one producer position, and the TINY solution for it is exact. Training
    fills in the other taps afterwards.
    """

    layer_type = nn.Conv2d
    feature_map = True

    def accepts(self, layer: nn.Conv2d) -> bool:
        return (
            super().accepts(layer)
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        )

    def geometry(self, layer: nn.Conv2d) -> tuple:
        return ("conv", layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    def unit_columns(self, layer: nn.Conv2d, units: int, spatial: int) -> Tensor:
        return layer.weight.detach().transpose(0, 1).reshape(units, -1)  # input channel j, every output and tap

    def keep_inputs(self, layer: nn.Conv2d, keep: Tensor, spatial: int) -> None:
        layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone(), requires_grad=False)
        self.sync_sizes(layer)

    def in_size(self, layer: nn.Conv2d) -> int:
        return layer.in_channels

    def out_size(self, layer: nn.Conv2d) -> int:
        return layer.out_channels

    def taps(self, layer: nn.Conv2d) -> int:
        return layer.kernel_size[0] * layer.kernel_size[1]

    def patches(self, layer: nn.Conv2d, x: Tensor) -> Tensor:
        """(B, C_in*kh*kw, H_out, W_out): the input patch read at each output position."""
        out_h, out_w = conv_output_size(layer, x.shape[-2:])
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.view(x.shape[0], cols.shape[1], out_h, out_w)

    def input_rows(self, layer: nn.Conv2d, x: Tensor) -> Tensor:
        p = self.patches(layer, x)
        return p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])

    def output_rows(self, layer: nn.Conv2d, g: Tensor) -> Tensor:
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])

    def input_block(self, layer: nn.Conv2d, omega: Tensor, spatial: int) -> Tensor:
        kh, kw = layer.kernel_size
        block = omega.new_zeros(omega.shape[0], omega.shape[1], kh, kw)
        th, tw = centre_tap(layer)
        block[:, :, th, tw] = omega
        return block

    def sync_sizes(self, layer: nn.Conv2d) -> None:
        layer.out_channels, layer.in_channels = layer.weight.shape[:2]
        _sync_size_mirrors(layer, layer.out_channels)


class GroupedConv2dHandler(Conv2dHandler):
    """Conv2d with groups > 1 (ResNeXt, RegNet), seen as the dense conv whose weight is
    block-diagonal: group i's outputs read group i's inputs only. Rows, weight matrices and
    outgoing weights are in those dense terms everywhere the statistics and the solver meet the
    layer, and this handler turns them into the grouped weight (out, in / groups, kh, kw).

    Units are added to every group alike: K = L * groups new units, unit u in group u % groups
    (`group_of_unit`), each group's at its end (`grouped_positions`). A new output of group i
    reads group i's inputs; a new input of group i (L more per group: the weight's dim 1 grows by
    L) feeds group i's outputs. Depthwise convs are carriers instead (`DepthwiseHandler`).
    """

    def accepts(self, layer: nn.Conv2d) -> bool:
        return (
            LayerHandler.accepts(self, layer)
            and layer.groups > 1
            and not layer.in_channels == layer.out_channels == layer.groups  # depthwise-shaped
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        )

    def geometry(self, layer: nn.Conv2d) -> tuple:
        return (*super().geometry(layer), ("groups", layer.groups))

    def _split(self, layer: nn.Conv2d) -> tuple[int, int, int, int]:
        """(groups, outputs per group, inputs per group, taps)."""
        groups = layer.groups
        return groups, layer.weight.shape[0] // groups, layer.weight.shape[1], self.taps(layer)

    def unit_columns(self, layer: nn.Conv2d, units: int, spatial: int) -> Tensor:
        groups, per_out, per_in, taps = self._split(layer)
        w = layer.weight.detach().reshape(groups, per_out, per_in, taps)
        return w.permute(0, 2, 1, 3).reshape(groups * per_in, per_out * taps)  # its group's outputs only

    def keep_inputs(self, layer: nn.Conv2d, keep: Tensor, spatial: int) -> None:
        raise ValueError("a grouped conv keeps every input: removing some would unbalance its groups")

    def keep_outputs(self, layer: nn.Conv2d, keep: Tensor) -> None:
        raise ValueError("a grouped conv keeps every output: removing some would unbalance its groups")

    def weight_matrix(self, layer: nn.Conv2d) -> Tensor:
        groups, per_out, per_in, taps = self._split(layer)
        blocks = layer.weight.detach().reshape(groups, per_out, per_in * taps)
        dense = torch.block_diag(*blocks)
        return torch.cat([dense, layer.bias.detach()[:, None]], dim=1) if layer.bias is not None else dense

    def add_to_weight_matrix(self, layer: nn.Conv2d, delta: Tensor) -> None:
        """`delta` in the dense terms of `weight_matrix`; only its diagonal blocks can be applied
        (the solver's updates of a grouped consumer have nothing elsewhere)."""
        groups, per_out, per_in, taps = self._split(layer)
        delta = delta.to(layer.weight)
        dense = delta[:, : groups * per_in * taps].reshape(groups, per_out, groups, per_in * taps)
        index = torch.arange(groups, device=delta.device)
        with torch.no_grad():
            layer.weight.add_(dense[index, :, index].reshape(layer.weight.shape))
            if layer.bias is not None:
                layer.bias.add_(delta[:, -1])

    def output_block(self, layer: nn.Conv2d, rows: Tensor) -> Tensor:
        """Each new output's weights over its own group's inputs, from dense rows."""
        groups, _, per_in, taps = self._split(layer)
        k = rows.shape[0]
        if rows.shape[1] != groups * per_in * taps:
            raise ValueError(f"rows over {rows.shape[1]} inputs for a grouped conv reading {groups * per_in * taps}")
        by_group = rows.reshape(k, groups, per_in * taps)
        own = by_group[torch.arange(k, device=rows.device), group_of_unit(torch.arange(k, device=rows.device), groups)]
        return own.reshape(k, *layer.weight.shape[1:])

    def input_block(self, layer: nn.Conv2d, omega: Tensor, spatial: int) -> Tensor:
        """(out, L, kh, kw) for K = L * groups new inputs: output o takes the new units of its own
        group at the centre tap, `omega[o, l * groups + group(o)]`."""
        groups, per_out, _, _ = self._split(layer)
        out, k = omega.shape
        levels = k // groups
        group = torch.arange(out, device=omega.device)[:, None] // per_out
        own = omega.gather(1, torch.arange(levels, device=omega.device)[None, :] * groups + group)  # (out, levels)
        kh, kw = layer.kernel_size
        block = omega.new_zeros(out, levels, kh, kw)
        th, tw = centre_tap(layer)
        block[:, :, th, tw] = own
        return block

    def grow_in(self, layer: nn.Conv2d, block: Tensor, at: Place = None) -> list[TensorSwap]:
        """L new inputs per group: each group's go at its end (dim 1 holds one group's inputs)."""
        swaps = [extend(layer, "weight", block, 1)]
        self.sync_sizes(layer)
        return swaps

    def sync_sizes(self, layer: nn.Conv2d) -> None:
        layer.out_channels = layer.weight.shape[0]
        layer.in_channels = layer.weight.shape[1] * layer.groups

    def params_per_output(self, layer: nn.Conv2d) -> int:
        return layer.weight.shape[1] * self.taps(layer) + int(self.has_bias(layer))

    def params_per_input(self, layer: nn.Conv2d, spatial: int = 1) -> int:
        return layer.weight.shape[0] // layer.groups * self.taps(layer)


def group_of_unit(unit: Tensor, groups: int) -> Tensor:
    """The group of each new unit: units are numbered level by level, one per group in each."""
    return unit % groups


def grouped_positions(width: int, groups: int, count: int) -> Tensor:
    """Where `count` new units (a multiple of `groups`) go among `width` units in `groups` equal
    groups: group i's new units at its end, in the units' order (see `group_of_unit`)."""
    if width % groups or count % groups:
        raise ValueError(f"{count} new units over {width} units cannot be spread evenly over {groups} groups")
    per_group, levels = width // groups, count // groups
    unit = torch.arange(count)
    group, level = group_of_unit(unit, groups), unit // groups
    return group * (per_group + levels) + per_group + level


def conv_output_size(layer: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    out = []
    for i in range(2):
        span = layer.dilation[i] * (layer.kernel_size[i] - 1) + 1
        out.append((size[i] + 2 * layer.padding[i] - span) // layer.stride[i] + 1)
    return out[0], out[1]


def centre_tap(layer: nn.Conv2d) -> tuple[int, int]:
    return (layer.kernel_size[0] - 1) // 2, (layer.kernel_size[1] - 1) // 2


def _plain_weights(layer: nn.Module) -> bool:
    """Its weight and bias are Parameters of its own, not computed from others."""
    return not torch.nn.utils.parametrize.is_parametrized(layer) and isinstance(layer.weight, nn.Parameter)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise conv that maps each channel to itself, position for position at its centre tap
    (odd kernel, zero "same" padding): a new channel can pass through it unchanged."""
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and _plain_weights(module)
        and module.groups == module.in_channels == module.out_channels
        and module.groups > 1  # one channel, one group: a plain conv
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and all(k % 2 == 1 for k in module.kernel_size)
        and all(p == d * (k - 1) // 2 for p, d, k in zip(module.padding, module.dilation, module.kernel_size))
    )


class ChannelHandler(ABC):
    """A per-channel layer that a site's units pass through: it grows one entry per unit."""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool: ...

    @abstractmethod
    def grow_pass_through(self, module: nn.Module, count: int, at: Place = None) -> list[TensorSwap]:
        """`count` entries that let new units through (nearly) unchanged, inserted before channel
        `at` (default: appended)."""

    @abstractmethod
    def params_per_channel(self, module: nn.Module) -> int: ...

    @abstractmethod
    def sync_sizes(self, module: nn.Module) -> None: ...


class BatchNormHandler(ChannelHandler):
    """BatchNorm tied to a site: grows with it, one entry per new channel."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.modules.batchnorm._BatchNorm)

    def grow(
        self,
        bn: nn.modules.batchnorm._BatchNorm,
        count: int,
        mean: Tensor,
        var: Tensor,
        weight: float = 0.0,
        at: Place = None,
    ) -> list[TensorSwap]:
        """`count` new entries with weight `weight`, bias 0 and the given running statistics,
        inserted before channel `at` (default: appended)."""
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        swaps = []
        if bn.affine:
            swaps.append(extend(bn, "weight", ref.new_full((count,), weight), 0, at))
            swaps.append(extend(bn, "bias", ref.new_zeros(count), 0, at))
        if bn.track_running_stats and bn.running_mean is not None:
            swaps.append(extend(bn, "running_mean", mean, 0, at))
            swaps.append(extend(bn, "running_var", var, 0, at))
        self.sync_sizes(bn)
        return swaps

    def grow_pass_through(self, module: nn.Module, count: int, at: Place = None) -> list[TensorSwap]:
        """Weight 1, bias 0, the statistics of a zero-mean, unit-variance input."""
        return self.grow(module, count, torch.zeros(count), torch.ones(count), weight=1.0, at=at)

    def params_per_channel(self, module: nn.Module) -> int:
        return 2 if module.affine else 0

    def sync_sizes(self, bn: nn.Module) -> None:
        source = bn.weight if bn.weight is not None else bn.running_mean
        bn.num_features = source.shape[0]


class DepthwiseHandler(ChannelHandler):
    """A depthwise conv that carries a site's units: one new channel per unit, whose kernel is
    the identity (1 at the centre tap) with zero bias, so the unit passes through unchanged and
    training shapes the kernel afterwards."""

    def matches(self, module: nn.Module) -> bool:
        return is_depthwise(module)

    def grow_pass_through(self, layer: nn.Conv2d, count: int, at: Place = None) -> list[TensorSwap]:
        """`count` identity channels inserted before channel `at` (default: appended)."""
        kernel = layer.weight.new_zeros(count, 1, *layer.kernel_size)
        th, tw = centre_tap(layer)
        kernel[:, :, th, tw] = 1.0
        swaps = [extend(layer, "weight", kernel, 0, at)]
        if layer.bias is not None:
            swaps.append(extend(layer, "bias", layer.bias.new_zeros(count), 0, at))
        self.sync_sizes(layer)
        return swaps

    def sync_sizes(self, layer: nn.Conv2d) -> None:
        layer.out_channels = layer.in_channels = layer.groups = layer.weight.shape[0]

    def params_per_channel(self, layer: nn.Conv2d) -> int:
        return layer.kernel_size[0] * layer.kernel_size[1] + int(layer.bias is not None)


class UnitNormHandler(ChannelHandler):
    """A LayerNorm or RMSNorm across the units (over their last dimension, with a weight).

    New units enter it at 0 (RMSNorm) or at the mean of the old units (LayerNorm: the writers'
    new rows are the means of their rows, `SiteGrowth`), so the mean it removes is unchanged and
    the mean square it divides by, var + eps, would become d / (d + k) var + eps. Scaling eps by
    d / (d + k) too makes it exactly d / (d + k) of what it was, and the old entries' weights,
    scaled by sqrt(d / (d + k)), give the old units their outputs back exactly. The new entries'
    weights are the old ones' RMS after that scaling, their bias 0: a new unit at the mean
    leaves the norm at 0. (An RMSNorm without eps uses its dtype's machine epsilon: that value
    is scaled and set.)
    """

    def matches(self, module: nn.Module) -> bool:
        return (
            isinstance(module, (nn.LayerNorm, nn.RMSNorm))
            and type(module).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward)
            and len(module.normalized_shape) == 1
            and isinstance(module.weight, nn.Parameter)
        )

    @staticmethod
    def centres(module: nn.Module) -> bool:
        """It removes the units' mean (LayerNorm), so new units must enter at that mean."""
        return isinstance(module, nn.LayerNorm)

    def grow_pass_through(self, module: nn.Module, count: int, at: Place = None) -> list[TensorSwap | AttributeSwap]:
        weight = module.weight.detach()
        share = weight.shape[0] / (weight.shape[0] + count)
        factor = math.sqrt(share)
        level = float(weight.double().pow(2).mean().sqrt()) * factor
        eps = module.eps if module.eps is not None else torch.finfo(weight.dtype).eps
        swaps: list[TensorSwap | AttributeSwap] = [AttributeSwap(module, "eps", module.eps, eps * share)]
        swaps.append(extend(module, "weight", weight.new_full((count,), level), 0, at))
        with torch.no_grad():
            swaps[1].new.copy_(swaps[1].widen(weight * factor, fill=level))
        if getattr(module, "bias", None) is not None:
            swaps.append(extend(module, "bias", module.bias.new_zeros(count), 0, at))
        self.sync_sizes(module)
        return swaps

    def params_per_channel(self, module: nn.Module) -> int:
        return 1 + int(getattr(module, "bias", None) is not None)

    def sync_sizes(self, module: nn.Module) -> None:
        module.normalized_shape = (module.weight.shape[0],)


BATCHNORM = BatchNormHandler()
DEPTHWISE = DepthwiseHandler()
UNIT_NORM = UnitNormHandler()

#: The registry: every layer type growc grows, and every per-channel type it grows through.
LAYERS: tuple[LayerHandler, ...] = (LinearHandler(), Conv2dHandler(), GroupedConv2dHandler())
CHANNELS: tuple[ChannelHandler, ...] = (BATCHNORM, DEPTHWISE, UNIT_NORM)

#: Layers that hold weights for a cost count (growable or not: 1-D and 3-D convs).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def handler_for(module: nn.Module | None) -> LayerHandler | None:
    """The handler that grows `module`'s units, or None."""
    if module is None:
        return None
    return next((h for h in LAYERS if isinstance(module, h.layer_type) and h.accepts(module)), None)


def channel_handler_for(module: nn.Module | None) -> ChannelHandler | None:
    """The handler of a per-channel layer a site's units can pass through, or None."""
    if module is None:
        return None
    return next((h for h in CHANNELS if h.matches(module)), None)


def is_feature_map_layer(module: nn.Module | None) -> bool:
    """A growable layer whose units are channels of a feature map (a conv)."""
    handler = handler_for(module)
    return handler is not None and handler.feature_map


def is_batchnorm(module: nn.Module | None) -> bool:
    return module is not None and BATCHNORM.matches(module)


def is_unit_norm(module: nn.Module | None) -> bool:
    """A LayerNorm / RMSNorm across the units that growc grows through (`UnitNormHandler`)."""
    return module is not None and UNIT_NORM.matches(module)


def is_growable_type(module: nn.Module | None) -> bool:
    """An instance of a layer type growc grows, whether or not this one can (a grouped conv)."""
    return isinstance(module, tuple(h.layer_type for h in LAYERS))


def unhandled_reason(module: nn.Module | None) -> str | None:
    """Why no handler takes an instance of a growable type (None: one does, or it is not one)."""
    if not is_growable_type(module) or handler_for(module) is not None:
        return None
    base = next(h.layer_type for h in LAYERS if isinstance(module, h.layer_type))
    if type(module).forward is not base.forward or not _plain_weights(module):
        return (
            f"the {type(module).__name__} computes its weight (a parametrization such as weight_norm) or "
            "replaces its layer's forward: growc does not widen it"
        )
    if is_depthwise(module):
        return (
            "a depthwise conv grows with the layer feeding it, and no site holds that layer's units here "
            "(see the reason given for it)"
        )
    if module.in_channels == module.out_channels == module.groups:
        return (
            "a depthwise conv carries new channels only with an odd kernel and zero padding that keeps the "
            "map's size (its centre tap passes each channel through)"
        )
    return (
        "convs padded other than with zeros, or with an even kernel's padding='same' (one side more than the "
        "other), are not grown"
    )


def layer_multiply_adds(module: nn.Module, output: Tensor) -> int:
    """Multiply-adds of one call of a weight layer producing `output`."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return output.numel() * module.weight[0].numel()  # a conv: (in_channels / groups) * kernel volume each


def batchnorm_folds_into(layer: nn.Module, bn: nn.Module, output_rank: int | None) -> bool:
    """Whether `bn` right after `layer` normalizes exactly `layer`'s output units, so that it
    can be folded into its weights (`output_rank`: the layer output's rank, None if unknown)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # Conv{k}d outputs (N, C, ...) and every BatchNorm normalizes dim 1: the channels.
        return layer.out_channels == bn.num_features
    if isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
        # BatchNorm1d normalizes dim 1, which is the Linear's feature dim only for 2-D outputs.
        return layer.out_features == bn.num_features and output_rank in (None, 2)
    return False


def sync_sizes(module: nn.Module) -> None:
    """Size attributes follow the weight's shape after a swap or its undo."""
    if BATCHNORM.matches(module):
        BATCHNORM.sync_sizes(module)
    elif UNIT_NORM.matches(module):
        UNIT_NORM.sync_sizes(module)
    elif is_depthwise(module) or _carried_depthwise(module):
        DEPTHWISE.sync_sizes(module)  # mid-undo its sizes disagree with its weight: not "depthwise" yet
    elif (h := handler_for(module)) is not None:
        h.sync_sizes(module)


def _carried_depthwise(module: nn.Module) -> bool:
    """A depthwise conv by its size attributes (one input per group, as many groups as channels),
    whatever its weight's shape says now: mid-undo the two disagree."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.weight.shape[1] == 1
        and module.in_channels == module.out_channels == module.groups
    )
