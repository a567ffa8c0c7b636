"""Width sites found on the traced graph.

A width site is a hidden dimension that can take more units: the outputs of a layer (features
of a Linear, channels of a Conv2d) and everything tied to them (see `coupling.py`): the other
layers that write the same units through a residual addition, the BatchNorms and depthwise
convs they pass through, and every layer that reads them, wherever a concatenation puts them.
Growing it by K neurons gives the source layer K new outputs (the new neurons), the other
writers K zero outputs, each carrier K pass-through entries, and every reader K input units
(the neurons' outgoing weights for the readers in the statistics, zeros for the others).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from growc.graph.coupling import Group, Ungrowable, Value, find_group, is_token_mean, trace_values
from growc.graph.handlers import (
    UNIT_NORM,
    GroupedConv2dHandler,
    Place,
    channel_handler_for,
    grouped_positions,
    handler_for,
    is_batchnorm,
    is_depthwise,
    is_feature_map_layer,
    is_growable_type,
    is_unit_norm,
    owner_of,
    unhandled_reason,
)
from growc.graph.rewrite import NewUnits, SiteGrowth
from growc.graph.samples import consumer_rows, producer_rows, sampled_conv_rows
from growc.graph.site import ChannelGroups, PositionSampler, Recorded, Rows, Taps
from growc.graph.trace import module_of


@dataclass(frozen=True)
class Slot:
    """Where a site's units sit among a reader's inputs after a concatenation: after the units
    of the layers `before` and before those of `after`. Widths are read when growing, so the
    offsets follow other sites' growth."""

    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def widths(self, root: nn.Module, names: tuple[str, ...]) -> int:
        return sum(handler_for(m).out_size(m) for m in (root.get_submodule(n) for n in names))


@dataclass(frozen=True)
class WidthSite:
    """A hidden dimension that can take more units (see `growc.graph.site.Site`)."""

    name: str  # the source layer's module path: the site is "the outputs of this layer"
    producer: str  # the source: the layer whose new outputs are the new neurons
    consumers: tuple[str, ...]  # the readers in the statistics (same geometry and path)
    activation: str  # the first non-linearity on the way to the consumers
    slope_at_zero: float  # its slope at 0 (1.0 when the path is linear)
    kinked: bool = False  # it has a kink at 0 (the ReLU family): the sign of a new neuron matters
    norm: str | None = None  # a BatchNorm right after the producer
    spatial: bool = False  # the consumers are linear layers reading the flattened feature map
    pools: tuple[tuple, ...] = ()  # per-channel pooling on the way: coupling.window(...) or ("adaptive", size)
    writers: tuple[str, ...] = ()  # other layers writing the same units (residual additions): zero rows
    gates: tuple[str, ...] = ()  # those of `writers` that write a factor multiplying the units (a gate)
    writer_norms: tuple[str, ...] = ()  # the BatchNorms right after those
    carriers: tuple[str, ...] = ()  # depthwise convs, other BatchNorms, LayerNorms / RMSNorms the units pass through
    centred: bool = False  # a LayerNorm removes the units' mean: new units enter at the old ones' mean
    attached: tuple[str, ...] = ()  # readers outside the statistics: zero columns, learnt in training
    # Where the units sit among other units after a concatenation, for the readers, carriers and
    # broadcast tensors (by module or tensor path) that see them there.
    slots: tuple[tuple[str, Slot], ...] = ()
    broadcasts: tuple[tuple[str, float], ...] = ()  # tensors broadcast onto the units, new entries' value
    # Attached readers that the new units reach, by geometry: (readers, spatial, pools). Their
    # statistics give them the outgoing weights that fit the neurons once these are chosen.
    reached: tuple[tuple[tuple[str, ...], bool, tuple[tuple, ...]], ...] = ()
    groups: int = 1  # channel groups of the grouped convs the units belong to: every group grows alike
    # Units that come only in blocks of this many (attention heads: head_dim values each).
    unit_block: int = 1
    # Writers whose new rows start random, not zero (a new head's keys: with zero query rows the
    # head is exact at any keys, and zero queries with zero keys would never move).
    seeded: tuple[str, ...] = ()

    adds_modules: ClassVar[bool] = False  # growth widens existing layers only
    sign_testable: ClassVar[bool] = True

    def reached_sites(self) -> list[WidthSite]:
        """One site per geometry of the attached readers the new units reach, for their
        statistics only: the same source, those readers as consumers."""
        return [
            replace(
                self,
                name=f"{self.name}>{readers[0]}",
                consumers=readers,
                spatial=spatial,
                pools=pools,
                attached=(),
                reached=(),
                slots=(),
            )
            for readers, spatial, pools in self.reached
        ]

    @property
    def readers(self) -> tuple[str, ...]:
        return self.consumers + self.attached

    @property
    def layers(self) -> tuple[str, ...]:
        """Every module the site's growth changes."""
        norm = (self.norm,) if self.norm else ()
        return (self.producer, *norm, *self.writers, *self.writer_norms, *self.carriers, *self.readers)

    @property
    def is_chain(self) -> bool:
        """One layer's units read directly by others: nothing tied, nothing concatenated."""
        return not (self.writers or self.carriers or self.attached or self.slots or self.broadcasts)

    def broadcast_dim(self, root: nn.Module, path: str) -> int | None:
        """The dimension of a broadcast tensor that runs along the units (None: it has size 1
        there, nothing to grow)."""
        tensor = _tensor_at(root, path)
        conv = is_feature_map_layer(root.get_submodule(self.producer))
        dim = tensor.dim() - (3 if conv else 1)  # (C, 1, 1) against (B, C, H, W); (..., D) against (..., D)
        if dim < 0 or tensor.shape[dim] not in (1, self.width(root)):
            raise Ungrowable(f"the tensor '{path}' of shape {tuple(tensor.shape)} does not line up with the units")
        return None if tensor.shape[dim] == 1 and self.width(root) != 1 else dim

    @property
    def inserts_between(self) -> tuple[str, ...]:
        """Layers where the new units go between old ones (a concatenation with more after, or
        channel groups: every layer of the site): a step that grows this site must not grow
        another site through them."""
        if self.groups > 1:
            return self.layers
        return tuple(reader for reader, slot in self.slots if slot.after)

    def slot(self, reader: str) -> Slot:
        return dict(self.slots).get(reader, Slot())

    def modules(self, root: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        return root.get_submodule(self.producer), [root.get_submodule(c) for c in self.consumers]

    def width(self, root: nn.Module) -> int:
        producer = root.get_submodule(self.producer)
        return handler_for(producer).out_size(producer)

    def insertion_index(self, root: nn.Module, reader: str) -> int | None:
        """The unit (channel) of a reader's input, a carrier or a broadcast tensor before which
        new units go; None: at the end. Read before the site grows."""
        slot = self.slot(reader)
        if not slot.after:
            return None
        return slot.widths(root, slot.before) + self.width(root)

    def place(self, root: nn.Module, name: str, count: int) -> Place:
        """Where `count` new units go in the unit dimension of a layer, carrier or broadcast
        tensor of the site: at the end (None), at an offset (a concatenation), or at the end of
        each channel group (positions). A grouped reader's own weight holds one group's inputs
        per row: its new inputs are appended. Read before the site grows."""
        if self.groups == 1:
            return self.insertion_index(root, name)
        if name in self.readers and isinstance(handler_for(root.get_submodule(name)), GroupedConv2dHandler):
            return None
        return grouped_positions(self.width(root), self.groups, count)

    def channel_groups(self, root: nn.Module) -> ChannelGroups | None:
        """How the units split into channel groups in the statistics' coordinates (None: they do
        not): group i's coordinates of `b'` under a grouped producer, and its outputs and their
        inputs for each grouped consumer."""
        if self.groups == 1:
            return None
        groups = self.groups
        producer = root.get_submodule(self.producer)
        p_handler = handler_for(producer)
        read = _group_coordinates(producer, ()) if isinstance(p_handler, GroupedConv2dHandler) else None
        outputs, inputs = [], []
        for name in self.consumers:
            consumer = root.get_submodule(name)
            handler = handler_for(consumer)
            if not isinstance(handler, GroupedConv2dHandler):
                outputs.append(None), inputs.append(None)
                continue
            per_out = handler.out_size(consumer) // groups
            outputs.append(tuple(torch.arange(i * per_out, (i + 1) * per_out) for i in range(groups)))
            bias = (handler.in_size(consumer) * handler.taps(consumer),) if handler.has_bias(consumer) else ()
            inputs.append(_group_coordinates(consumer, bias))
        constant = p_handler.in_size(producer) * p_handler.taps(producer)
        return ChannelGroups(groups, read, tuple(outputs), tuple(inputs), constant)

    def spatial_size(self, root: nn.Module, reader: str | None = None) -> int:
        """Features per channel in a reader's input (H*W after pooling; 1 unless it is a linear
        layer reading a feature map). Default: the consumers'."""
        reader = reader or self.consumers[0]
        module = root.get_submodule(reader)
        if is_feature_map_layer(module) or not is_feature_map_layer(root.get_submodule(self.producer)):
            return 1
        slot = self.slot(reader)
        channels = self.width(root) + slot.widths(root, slot.before) + slot.widths(root, slot.after)
        return handler_for(module).in_size(module) // max(channels, 1)

    def input_mode(self, root: nn.Module) -> str:
        """How the producer's input enters the new neurons: "centered" behind a BatchNorm (it
        removes the mean), else "affine" or "linear" as the producer has a bias or not."""
        if self.norm:
            return "centered"
        producer = root.get_submodule(self.producer)
        return "affine" if handler_for(producer).has_bias(producer) else "linear"

    def params_per_neuron(self, root: nn.Module) -> int:
        total = 0
        for name in (self.producer, *self.writers):
            layer = root.get_submodule(name)
            total += handler_for(layer).params_per_output(layer)
        for name in (*((self.norm,) if self.norm else ()), *self.writer_norms, *self.carriers):
            module = root.get_submodule(name)
            total += channel_handler_for(module).params_per_channel(module)
        for name in self.readers:
            layer = root.get_submodule(name)
            total += handler_for(layer).params_per_input(layer, self.spatial_size(root, name))
        for path, _ in self.broadcasts:
            dim, tensor = self.broadcast_dim(root, path), _tensor_at(root, path)
            if dim is not None and isinstance(tensor, nn.Parameter):
                total += tensor.numel() // tensor.shape[dim]
        return total

    def taps(self) -> Taps:
        return Taps(inputs={self.producer, *self.consumers}, output_grads=set(self.consumers))

    def rows(
        self, root: nn.Module, recorded: Recorded, batch_size: int, sampler: PositionSampler | None
    ) -> Rows | None:
        inputs, grads = recorded.inputs, recorded.output_grads
        if self.producer not in inputs or any(c not in grads for c in self.consumers):
            return None
        if sampler is not None:
            sampled = sampled_conv_rows(self, root, inputs, grads, batch_size, sampler.positions, sampler.generator)
            if sampled is not None:
                return Rows(*sampled, sampled=True)
        b_prev = producer_rows(self, root, inputs[self.producer])
        pairs = [consumer_rows(root, c, inputs[c], grads[c], batch_size) for c in self.consumers]
        return Rows(b_prev, pairs, batch_size)

    def waits_for(self, widened: set[str]) -> str | None:
        return None  # the statistics of every reader's old inputs still hold

    def unit_scale(self, root: nn.Module, s_prev: torch.Tensor) -> float:
        """Behind a BatchNorm, the RMS of its weights; else the RMS pre-activation of the
        producer's units on the statistics (about their mean through a LayerNorm)."""
        if self.norm is not None:
            norm = root.get_submodule(self.norm)
            if norm.weight is None or norm.weight.numel() == 0:
                return 1.0
            return float(norm.weight.detach().double().pow(2).mean().sqrt()) or 1.0
        producer = root.get_submodule(self.producer)
        w = handler_for(producer).weight_matrix(producer).to(torch.float64).cpu()
        if w.shape[0] == 0:
            return 1.0
        if self.centred:
            # A LayerNorm divides by the units' spread about their mean, not by their RMS: a new
            # unit as large as the RMS would come out of it far larger than the old ones wherever
            # the units share a large offset.
            w = w - w.mean(0)
        energy = ((w @ s_prev.cpu()) * w).sum(1).mean()
        return float(energy.clamp_min(0).sqrt()) or 1.0

    def column_scale(self, root: nn.Module, s_prev: torch.Tensor) -> float:
        """The consumers' RMS input-column norm."""
        total, columns = 0.0, 0
        for name in self.consumers:
            consumer = root.get_submodule(name)
            h = handler_for(consumer)
            w = h.weight_matrix(consumer)[:, : h.in_size(consumer)]
            total += float((w.double() ** 2).sum())
            columns = max(columns, w.shape[1])
        return math.sqrt(total / columns) if columns and total > 0 else 1.0

    def grow(self, root: nn.Module, units: NewUnits) -> SiteGrowth:
        return SiteGrowth(root, self, units)


def _tensor_at(root: nn.Module, path: str) -> torch.Tensor:
    return getattr(*owner_of(root, path))


def _group_coordinates(conv: nn.Conv2d, extra: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Per group of a grouped conv, the coordinates of its unfolded input (channel-major, as
    `F.unfold` lays it out) that the group reads, then `extra` (the constant's coordinate)."""
    per_in, taps = conv.in_channels // conv.groups, conv.kernel_size[0] * conv.kernel_size[1]
    tail = torch.tensor(extra, dtype=torch.long)
    return tuple(
        torch.cat([torch.arange(i * per_in * taps, (i + 1) * per_in * taps), tail]) for i in range(conv.groups)
    )


@dataclass
class CandidateReport:
    sites: list[WidthSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why it cannot grow)
    depth: list = field(default_factory=list)  # DepthSite edges, where the caller asked for them
    graph: fx.GraphModule | None = None  # the traced model the names refer to, where the caller kept it


def describe_ties(site: WidthSite) -> str:
    """The layers a site's growth changes, in words: `producer -> consumers`, then the rest."""
    parts = [f"{site.producer}{' + ' + site.norm if site.norm else ''} -> {', '.join(site.consumers)}"]
    if set(site.writers) - set(site.gates):
        parts.append("also writing: " + ", ".join(w for w in site.writers if w not in site.gates))
    if site.gates:
        parts.append("gated by: " + ", ".join(site.gates))
    if site.carriers:
        parts.append("through: " + ", ".join(site.carriers))
    if site.attached:
        parts.append("also reading: " + ", ".join(site.attached))
    if site.slots:
        parts.append("concatenated into: " + ", ".join(reader for reader, _ in site.slots))
    if site.broadcasts:
        parts.append("broadcast: " + ", ".join(path for path, _ in site.broadcasts))
    if site.groups > 1:
        parts.append(f"in {site.groups} channel groups, each growing alike")
    if site.unit_block > 1:
        parts.append(f"whole attention heads of {site.unit_block} values")
    return "; ".join(parts)


def site_kind(site: WidthSite) -> str:
    if set(site.writers) - set(site.gates):
        return "width, residual stream"
    if site.gates:
        return "width, gated"
    if site.slots:
        return "width, concatenated"
    if site.groups > 1:
        return "width, channel groups"
    if site.unit_block > 1:
        return "width, attention heads"
    return "width"


def _site_from(gm: fx.GraphModule, group: Group, source: fx.Node) -> tuple[WidthSite, int]:
    """The site that grows `group` with new neurons in `source`, and how many readers the
    neurons reach (the others read the group upstream of the source, where the units are 0)."""
    values = trace_values(gm, group, source)
    conv = is_feature_map_layer(module_of(gm, source))
    if group.heads is not None and source is not group.heads.v:
        raise Ungrowable(
            f"new heads are grown from their values ('{group.heads.v.target}'): the queries' and keys' new rows "
            "start at 0 and random"
        )
    if group.token_views and conv:
        raise Ungrowable(
            f"'{source.target}' writes a feature map that '{group.token_views[0].name}' lays out as tokens: its new "
            "neurons are measured only in the layers that write the tokens"
        )
    if not group.token_views and any(is_feature_map_layer(module_of(gm, w)) != conv for w in group.writers):
        raise Ungrowable("an addition mixes the outputs of convolutions and linear layers")
    if conv and (mean := next((n for n in group.nodes if is_token_mean(n)), None)) is not None:
        raise Ungrowable(f"'{mean.name}' averages a feature map over dimensions that growc cannot follow")
    classes: dict[tuple, list[tuple[str, Value]]] = {}
    readers: list[str] = []
    for reader, read in group.readers:
        module, value = module_of(gm, reader), values[read]
        if conv and not is_feature_map_layer(module) and value.stage != "flat":
            raise Ungrowable(f"'{reader.name}' reads the feature map without flattening it")
        if not conv and is_feature_map_layer(module):
            raise Ungrowable(f"'{reader.name}' reads a vector as a feature map")
        readers.append(str(reader.target))
        if value.live:
            key = (handler_for(module).geometry(module), value.stage == "flat", value.pools, value.slot)
            classes.setdefault(key, []).append((str(reader.target), value))
    if not classes:
        stopped = next((v.stopped for v in values.values() if v.stopped), None)
        if stopped is not None:
            raise Ungrowable(
                f"'{stopped}' multiplies what '{source.target}' would add by a factor that is 0 there (a ReLU of "
                "a layer's output, or the units themselves): the new units would stay 0"
            )
        raise Ungrowable(f"no layer reads what '{source.target}' would add")

    # The statistics need one geometry; the largest class of readers is measured, the others
    # get zero outgoing weights and learn them in training.
    def weight(members: list[tuple[str, Value]]) -> tuple[int, int]:
        layers = [gm.get_submodule(name) for name, _ in members]
        return len(members), sum(handler_for(m).params_per_input(m) for m in layers)

    primary = max(classes.values(), key=weight)
    consumers = tuple(name for name, _ in primary)
    value = primary[0][1]
    slope, act, kinked = value.slopes[0] if value.slopes else (1.0, "identity", False)
    slope *= value.scale  # a gate on the way multiplies the new units by its value at 0
    norms = {n: n.args[0] for n in group.nodes if is_batchnorm(module_of(gm, n))}
    site = WidthSite(
        name=str(source.target),
        producer=str(source.target),
        consumers=consumers,
        activation=act,
        slope_at_zero=slope,
        kinked=kinked,
        norm=next((str(n.target) for n, into in norms.items() if into is source), None),
        spatial=value.stage == "flat",
        pools=value.pools,
        writers=tuple(str(w.target) for w in group.writers if w is not source),
        gates=tuple(str(w.target) for w in group.gates if w is not source),
        writer_norms=tuple(str(n.target) for n, into in norms.items() if into in group.writers and into is not source),
        carriers=tuple(
            str(n.target)
            for n in group.nodes
            if n not in group.writers
            and (
                (n in norms and norms[n] not in group.writers)
                or is_depthwise(module_of(gm, n))
                or is_unit_norm(module_of(gm, n))
            )
        ),
        centred=_centred(gm, group, values, conv),
        attached=tuple(r for r in readers if r not in consumers),
        reached=tuple(
            (tuple(name for name, _ in members), members[0][1].stage == "flat", members[0][1].pools)
            for members in classes.values()
            if members is not primary
        ),
        slots=_slots(group, values, readers),
        broadcasts=tuple(group.broadcasts),
    )
    for path, _ in site.broadcasts:
        site.broadcast_dim(gm, path)  # raises where the tensor does not line up with the units
    site = replace(site, groups=_channel_groups(gm, site))
    if group.heads is not None:
        site = replace(site, unit_block=group.heads.head_dim, seeded=(str(group.heads.k.target),))
    return site, sum(len(members) for members in classes.values())


def _channel_groups(gm: fx.GraphModule, site: WidthSite) -> int:
    """The number of channel groups the site's grouped convs split its units into (1: none);
    raises where growing every group alike would not be exact or could not be solved."""
    grouped = {
        name: module.groups
        for name in (site.producer, *site.writers, *site.readers)
        if isinstance(handler_for(module := gm.get_submodule(name)), GroupedConv2dHandler)
    }
    if not grouped:
        return 1
    first, *others = grouped.items()
    other = next(((name, g) for name, g in others if g != first[1]), None)
    if other is not None:
        raise Ungrowable(
            f"'{first[0]}' and '{other[0]}' split these units into {first[1]} and {other[1]} channel groups: "
            "growc grows units in one grouping only"
        )
    unmeasured = next((name for name in site.attached if name in grouped), None)
    if unmeasured is not None:
        raise Ungrowable(
            f"the grouped conv '{unmeasured}' reads these units through another geometry than the measured "
            "readers: growc solves channel groups only for the readers it measures"
        )
    if site.slots:
        raise Ungrowable(
            f"these units are split into channel groups by '{next(iter(grouped))}' and concatenated with others: "
            "growc cannot place new units in both at once"
        )
    return first[1]


def _centred(gm: fx.GraphModule, group: Group, values: dict[fx.Node, Value], conv: bool) -> bool:
    """Whether a LayerNorm removes the units' mean (new units then enter at the old ones' mean,
    written by every writer's mean row); raises where growth through the norms would not be exact."""
    norms = [n for n in group.nodes if is_unit_norm(module_of(gm, n))]
    if not norms:
        return False
    if conv:
        raise Ungrowable(f"'{norms[0].name}' normalizes the last dimension of a feature map, not its channels")
    centring = [n for n in norms if UNIT_NORM.centres(module_of(gm, n))]
    if not centring:
        return False  # RMSNorm only: new units enter at 0, as everywhere else
    if len(centring) < len(norms):
        raise Ungrowable(
            f"'{centring[0].name}' (LayerNorm) and an RMSNorm read the same units: new units cannot be at "
            "their mean for one and at 0 for the other"
        )
    factors = [path for path, fill in group.broadcasts if fill != 0.0]  # terms (position embeddings) are fine
    carriers = [n for n in group.nodes if is_batchnorm(module_of(gm, n)) or is_depthwise(module_of(gm, n))]
    for norm in centring:
        read = values[norm.args[0]]
        if factors or carriers or group.gates or group.cat_slots or read.stage != "pre" or read.scale != 1.0:
            raise Ungrowable(
                f"the LayerNorm '{norm.name}' reads these units through more than layers' outputs and terms "
                "added up (an activation, a norm, a gate, a concatenation or a scale multiplying them): growc "
                "cannot put new units at the mean it removes"
            )
    return True


def _slots(group: Group, values: dict[fx.Node, Value], readers: list[str]) -> tuple[tuple[str, Slot], ...]:
    """Every per-channel tensor that meets the units after a concatenation gets its new entries
    at their offset there: readers' input columns, carriers' entries, broadcast tensors'."""
    seen = [(r, values[read].slot) for r, (_, read) in zip(readers, group.readers)]
    seen += [(str(n.target), values[n].slot) for n in group.nodes if n.op == "call_module" and n not in group.writers]
    seen += [(path, values[node].slot) for path, node in group.broadcast_at.items() if node in values]
    return tuple((name, Slot(*slot)) for name, slot in seen if any(slot))


def _best_site(gm: fx.GraphModule, group: Group) -> WidthSite:
    """Of the group's writers, the source whose neurons reach the most readers, then the most
    measured ones, then the one with the widest input (the richest view of the data)."""
    sites, reasons = [], []
    for source in group.writers:
        try:
            sites.append(_site_from(gm, group, source))
        except Ungrowable as exc:
            reasons.append(str(exc))
    if not sites:
        raise Ungrowable(reasons[0])

    def rank(found: tuple[WidthSite, int]) -> tuple[int, int, int]:
        site, reached = found
        producer = gm.get_submodule(site.producer)
        handler = handler_for(producer)
        return reached, len(site.consumers), handler.in_size(producer) * handler.taps(producer)

    return max(sites, key=rank)[0]


def _shared(gm: fx.GraphModule, group: Group, calls: Counter) -> str | None:
    """A layer of the group with state that is called more than once (an activation may be)."""
    for node in [*group.nodes, *(r for r, _ in group.readers)]:
        if node.op != "call_module" or calls[str(node.target)] < 2:
            continue
        module = gm.get_submodule(str(node.target))
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return f"'{node.target}' is called more than once (shared weights)"
    return None


def find_width_sites(gm: fx.GraphModule) -> CandidateReport:
    report = CandidateReport()
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    placed: set[str] = set()  # layers that already belong to a site
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        name = str(node.target)
        if module is None or handler_for(module) is None or name in placed:
            continue
        try:
            group = find_group(gm, node)
            shared = _shared(gm, group, calls)
            if shared:
                raise Ungrowable(shared)
            site = _best_site(gm, group)
        except Ungrowable as exc:
            report.skipped.append((name, str(exc)))
            continue
        placed.update((site.producer, *site.writers))
        report.sites.append(site)
    # A walk from one writer can fail where one from another succeeds (a gate reached from its
    # units' side through pooling): a layer a site holds has no reason to be left intact.
    report.skipped = [(name, why) for name, why in report.skipped if name not in placed]
    carried = {c for site in report.sites for c in site.carriers}
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        why = unhandled_reason(module) if node.op == "call_module" and str(node.target) not in carried else None
        if why is not None:
            report.skipped.append((str(node.target), why))
        if node.op == "call_function" and node.target in (F.linear, F.conv2d):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            held = getattr(weight, "target", "a computed tensor")
            report.skipped.append(
                (
                    str(held),
                    f"'{node.name}' calls {node.target.__name__} on tensors other than the module's own "
                    "Parameters (each read once), which growc cannot widen",
                )
            )
    report.skipped += _unaccounted_layers(gm, report)
    return report


def _unaccounted_layers(gm: fx.GraphModule, report: CandidateReport) -> list[tuple[str, str]]:
    """A reason for every Linear and Conv2d that no site holds and no reason names yet: those
    inside a module the graph calls whole (attention, the user's opaque modules), or unused."""
    accounted = {name for site in report.sites for name in site.layers} | {name for name, _ in report.skipped}
    called = {
        str(n.target): type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes if n.op == "call_module"
    }
    reasons = []
    for name, module in gm.named_modules():
        if not is_growable_type(module) or name in accounted or name in called:
            continue
        owner = next((c for c in called if name.startswith(c + ".")), None)
        if owner is not None:
            why = f"it is inside '{owner}' ({called[owner]}), which the graph calls as one opaque module"
        else:
            why = "the traced forward never calls it"
        reasons.append((name, why))
    return reasons
