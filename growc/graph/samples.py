"""The samples a site's statistics are made of, read from the tensors its layers see.

For each consumer output sample the producer-side row `b'` is the producer's input patch that
feeds the new unit there; a trailing column is 1 where the new unit exists at that sample and 0
where it falls in a consumer's zero padding (so that constant and masked inputs are exact).
  Linear -> Linear          b' is the producer's input row.
  Conv -> Conv              b' is the producer patch at the consumer's centre tap (the new
                            channel's outgoing weights sit there), pooled windows averaged.
  Conv -> flatten -> Linear b' is the mean of the producer patches over the map: a new channel
                            enters the linear layer through its spatial mean.
Max pooling is linearized as average pooling: exact for the statistics' shape, approximate for
the first-order prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growc.graph.candidates import WidthSite
from growc.graph.depth import BLOCK_KERNEL, DepthSite
from growc.graph.handlers import Conv2dHandler, centre_tap, conv_output_size, handler_for

_CONV = Conv2dHandler()


def _with_ones(rows: Tensor, ones: Tensor | None = None) -> Tensor:
    ones = rows.new_ones(rows.shape[0], 1) if ones is None else ones.reshape(-1, 1).to(rows)
    return torch.cat([rows, ones], dim=1)


def _pool_map(maps: Tensor, pools: tuple[tuple, ...]) -> Tensor:
    for spec in pools:
        if spec[0] == "adaptive":
            maps = F.adaptive_avg_pool2d(maps, spec[1])
        else:
            _, kernel, stride, padding = spec
            maps = F.avg_pool2d(maps, kernel, stride, padding, count_include_pad=True)
    return maps


def producer_rows(site: WidthSite, root: nn.Module, x_prev: Tensor) -> Tensor:
    """`b'` rows (n, in_flat + 1) aligned with the consumers' output samples."""
    producer = root.get_submodule(site.producer)
    consumer = root.get_submodule(site.consumers[0])
    if isinstance(producer, nn.Linear):
        return _with_ones(handler_for(producer).input_rows(producer, x_prev))
    patches = _pool_map(_CONV.patches(producer, x_prev), site.pools)  # (B, d, H, W)
    batch, d, height, width = patches.shape
    if site.spatial:
        return _with_ones(patches.mean(dim=(2, 3)))
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
    return _with_ones(rows, mask.expand(batch, out_h, out_w))


def depth_rows(
    site: DepthSite, x: Tensor, grad_x: Tensor, batch_size: int
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """A depth candidate's rows: b' is what the block's input layer would read (3x3 patches of the
    map, or the vector) and the block's output layer has no inputs yet, so b is empty and its
    whole desired update is -g at the edge."""
    if site.conv:
        patches = F.unfold(x, BLOCK_KERNEL, padding=BLOCK_KERNEL // 2)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        g = grad_x.permute(0, 2, 3, 1).reshape(-1, grad_x.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
        g = grad_x.reshape(-1, grad_x.shape[-1])
    return _with_ones(rows), [(rows.new_zeros(rows.shape[0], 0), g * batch_size)]


def consumer_rows(root: nn.Module, name: str, x: Tensor, g: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(b, g) rows of a consumer: its input (bias column appended when it has a bias) and the
    per-sample gradient at its output (the batch-mean loss's gradient times the batch size)."""
    consumer = root.get_submodule(name)
    handler = handler_for(consumer)
    b = handler.input_rows(consumer, x)
    if handler.has_bias(consumer):
        b = _with_ones(b)
    return b, handler.output_rows(consumer, g) * batch_size
