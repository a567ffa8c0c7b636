"""The samples a site's statistics are made of, read from the tensors its layers see.

For each consumer output sample the producer-side row `b'` is the producer's input patch that
feeds the new unit there; a trailing column is 1 where the new unit exists at that sample and 0
where it falls in a consumer's zero padding (so that constant and masked inputs are exact).
  Linear -> Linear          b' is the producer's input row.
  Conv -> Conv              b' is the producer patch at the consumer's centre tap (the new
                            channel's outgoing weights sit there), pooled windows averaged.
  Conv -> flatten -> Linear b' is the mean of the producer patches over the map: a new channel
                            enters the linear layer through its spatial mean.
  Linear -> mean over tokens -> Linear
                            b' is the producer's input averaged over the same tokens.
Max pooling is linearized as average pooling: exact for the statistics' shape, approximate for
the first-order prediction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growc.graph.handlers import Conv2dHandler, centre_tap, conv_output_size, handler_for, is_feature_map_layer

if TYPE_CHECKING:
    from growc.graph.candidates import WidthSite

_CONV = Conv2dHandler()


def with_ones(rows: Tensor, ones: Tensor | None = None) -> Tensor:
    ones = rows.new_ones(rows.shape[0], 1) if ones is None else ones.reshape(-1, 1).to(rows)
    return torch.cat([rows, ones], dim=1)


def _pool_map(maps: Tensor, pools: tuple[tuple, ...]) -> Tensor:
    for spec in pools:
        if spec[0] == "adaptive":
            maps = F.adaptive_avg_pool2d(maps, spec[1])
        else:
            _, kernel, stride, padding, ceil_mode, count_include_pad = spec
            maps = F.avg_pool2d(maps, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    return maps


def pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Positions along one axis after a pooling window, as torch computes them: with
    `ceil_mode` a last partial window counts, unless it would start in the right padding."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def producer_rows(site: WidthSite, root: nn.Module, x_prev: Tensor) -> Tensor:
    """`b'` rows (n, in_flat + 1) aligned with the consumers' output samples."""
    producer = root.get_submodule(site.producer)
    consumer = root.get_submodule(site.consumers[0])
    if not is_feature_map_layer(producer):
        for spec in site.pools:  # averages over tokens on the way: the new unit there is the mean
            if spec[0] == "mean":
                x_prev = x_prev.mean(dim=spec[1])
            elif spec[0] == "keys mean":  # a new attention head, uniform over the keys, at every query
                x_prev = x_prev.mean(dim=-2, keepdim=True).expand_as(x_prev)
            elif spec[0] == "select":  # one token read (a class token): that token's input
                x_prev = x_prev.select(spec[1], spec[2])
        return with_ones(handler_for(producer).input_rows(producer, x_prev))
    if site.spatial and all(spec == ("adaptive", (1, 1)) for spec in site.pools):
        return with_ones(mean_patch(producer, x_prev))  # global pooling or none: the mean patch
    patches = _pool_map(_CONV.patches(producer, x_prev), site.pools)  # (B, d, H, W)
    batch, d, height, width = patches.shape
    if site.spatial:
        return with_ones(patches.mean(dim=(2, 3)))
    out_h, out_w = conv_output_size(consumer, (height, width))
    taps = centre_tap(consumer)
    index, valid = [], []
    for i, (size, out) in enumerate(((height, out_h), (width, out_w))):
        pos = torch.arange(out, device=patches.device) * consumer.stride[i] - consumer.padding[i]
        pos = pos + consumer.dilation[i] * taps[i]
        valid.append((pos >= 0) & (pos < size))
        index.append(pos.clamp(0, size - 1))
    mask = (valid[0][:, None] & valid[1][None, :]).to(patches.dtype)  # (Hq, Wq)
    chosen = patches[:, :, index[0]][:, :, :, index[1]] * mask
    rows = chosen.permute(0, 2, 3, 1).reshape(-1, d)
    return with_ones(rows, mask.expand(batch, out_h, out_w))


def mean_patch(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """(B, C * kh * kw): the mean over output positions of the unfolded patches, from one strided
    slice of the padded input per kernel tap instead of the whole unfolded map."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    out_h, out_w = conv_output_size(layer, x.shape[-2:])
    padded = F.pad(x, (pw, pw, ph, ph))
    taps = [
        padded[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw].mean(
            dim=(2, 3)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(taps, dim=2).reshape(x.shape[0], -1)  # channel-major, like F.unfold


def consumer_rows(root: nn.Module, name: str, x: Tensor, g: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(b, g) rows of a consumer: its input (bias column appended when it has a bias) and the
    per-sample gradient at its output (the batch-mean loss's gradient times the batch size)."""
    consumer = root.get_submodule(name)
    handler = handler_for(consumer)
    b = handler.input_rows(consumer, x)
    if handler.has_bias(consumer):
        b = with_ones(b)
    return b, handler.output_rows(consumer, g) * batch_size


def patches_at(x: Tensor, kernel, stride, padding, dilation, rows: Tensor, cols: Tensor) -> Tensor:
    """(B * P, C * kh * kw): the unfolded patches at output positions (rows[p], cols[p]) only, in
    the layout `F.unfold` gives, rows ordered by sample then position. Reading a few positions
    this way costs a few positions, not the whole map."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    height, width = x.shape[-2:]
    r = rows[:, None, None] * sh - ph + torch.arange(kh, device=x.device)[None, :, None] * dh
    c = cols[:, None, None] * sw - pw + torch.arange(kw, device=x.device)[None, None, :] * dw
    # One gather along the flattened map (about 2x faster than indexing rows and columns); taps
    # in the zero padding read a clamped position and are zeroed, so the map is never copied.
    flat = (r.clamp(0, height - 1) * width + c.clamp(0, width - 1)).reshape(-1)  # (P * kh * kw,)
    batch, channels = x.shape[:2]
    positions, taps = rows.shape[0], kh * kw
    inside = ((r >= 0) & (r < height) & (c >= 0) & (c < width)).reshape(-1) if ph or pw else None
    if channels >= 8:
        # Wide maps: gather whole (sample, channel) slabs from the position-major map, about 1.5x
        # faster than indexing the last axis of (B, C, H * W) once C is 8 or more (3 channels: slower).
        by_position = x.reshape(batch, channels, height * width).permute(2, 0, 1).reshape(height * width, -1)
        patches = by_position.index_select(0, flat)  # (P * kh * kw, B * C)
        if inside is not None:
            patches = patches * inside[:, None].to(patches.dtype)
        patches = patches.reshape(positions, taps, batch, channels).permute(2, 0, 3, 1)
        return patches.reshape(-1, channels * taps)
    patches = x.reshape(batch, channels, height * width)[:, :, flat]  # (B, C, P * kh * kw)
    if inside is not None:
        patches = patches * inside.to(patches.dtype)
    patches = patches.reshape(batch, channels, positions, taps)
    return patches.permute(0, 2, 1, 3).reshape(-1, channels * taps)


def _geometry(layer: nn.Conv2d) -> tuple:
    return layer.kernel_size, layer.stride, layer.padding, layer.dilation


def sample_positions(grad: Tensor, positions: int, generator: torch.Generator) -> tuple[Tensor, Tensor, float] | None:
    """`positions` random positions of `grad`'s map, the same for the whole batch: (rows, cols,
    the fraction of the map they are); None when the map has no more positions than that."""
    height, width = grad.shape[-2:]
    total = height * width
    if total <= positions:
        return None
    index = torch.randperm(total, generator=generator)[:positions].to(grad.device)
    return index // width, index % width, positions / total


def rows_at(maps: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B * P, C): a (B, C, H, W) tensor read at P positions, rows ordered by sample then position."""
    return maps[:, :, rows, cols].permute(0, 2, 1).reshape(-1, maps.shape[1])


def sampled_conv_rows(
    site: WidthSite,
    root: nn.Module,
    inputs: dict[str, Tensor],
    grads: dict[str, Tensor],
    batch_size: int,
    positions: int,
    generator: torch.Generator,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]], float] | None:
    """A conv site's rows at `positions` random output positions (the same for the whole batch),
    built without unfolding whole maps; None where this does not apply (linear sites, pooling or
    flattening on the way, maps with fewer positions) and the full rows are used instead.
    Returns (b', [(b, g)], samples) with `samples` scaled so that rows per sample stays the map's
    true number of positions."""
    producer = root.get_submodule(site.producer)
    consumers = [root.get_submodule(c) for c in site.consumers]
    pools = site.pools
    if not is_feature_map_layer(producer) or site.spatial or len(pools) > 1 or (pools and pools[0][0] != "window"):
        return None
    consumer = consumers[0]
    chosen = sample_positions(grads[site.consumers[0]], positions, generator)
    if chosen is None:
        return None
    q_rows, q_cols, share = chosen
    # The producer position each sampled consumer output reads the new channel at (centre tap).
    # Through a pooling window the consumer reads pooled position r: the new channel there is
    # the average over the window's producer positions (zero padding counted, as avg_pool2d).
    x_prev = inputs[site.producer]
    p_height, p_width = conv_output_size(producer, x_prev.shape[-2:])
    kernel, stride, padding, ceil_mode, count_include_pad = (
        pools[0][1:] if pools else ((1, 1), (1, 1), (0, 0), False, True)
    )
    read_h = pooled_size(p_height, kernel[0], stride[0], padding[0], ceil_mode)
    read_w = pooled_size(p_width, kernel[1], stride[1], padding[1], ceil_mode)
    taps = centre_tap(consumer)
    r_rows = q_rows * consumer.stride[0] - consumer.padding[0] + consumer.dilation[0] * taps[0]
    r_cols = q_cols * consumer.stride[1] - consumer.padding[1] + consumer.dilation[1] * taps[1]
    read = (r_rows >= 0) & (r_rows < read_h) & (r_cols >= 0) & (r_cols < read_w)
    batch, positions = x_prev.shape[0], q_rows.shape[0]
    # Every window offset (i, j) of every sampled position, read in one gather: (taps, P) each.
    offsets_h = torch.arange(kernel[0], device=q_rows.device).repeat_interleave(kernel[1])
    offsets_w = torch.arange(kernel[1], device=q_rows.device).repeat(kernel[0])
    p_rows = r_rows[None, :] * stride[0] - padding[0] + offsets_h[:, None]
    p_cols = r_cols[None, :] * stride[1] - padding[1] + offsets_w[:, None]
    valid = read & (p_rows >= 0) & (p_rows < p_height) & (p_cols >= 0) & (p_cols < p_width)
    # avg_pool2d's divisor: the window within the padded map (with count_include_pad), else the
    # window's positions inside the map.
    in_padded = (p_rows < p_height + padding[0]) & (p_cols < p_width + padding[1])
    counted = (in_padded if count_include_pad else valid).to(x_prev.dtype).sum(0)  # (P,)
    at = patches_at(
        x_prev,
        *_geometry(producer),
        p_rows.clamp(0, p_height - 1).reshape(-1),
        p_cols.clamp(0, p_width - 1).reshape(-1),
    ).reshape(batch, *valid.shape, -1)  # (B, taps, P, in')
    weights = valid.to(at.dtype) / counted.clamp_min(1.0)  # (taps, P)
    b_prev = (at * weights[None, :, :, None]).sum(1).reshape(batch * positions, -1)
    mask = read.to(x_prev.dtype).repeat(batch)[:, None]
    b_prev = with_ones(b_prev, mask)
    pairs = []
    for name, layer in zip(site.consumers, consumers):
        b = patches_at(inputs[name], *_geometry(layer), q_rows, q_cols)
        if layer.bias is not None:
            b = with_ones(b)
        pairs.append((b, rows_at(grads[name], q_rows, q_cols) * batch_size))
    return b_prev, pairs, batch_size * share
