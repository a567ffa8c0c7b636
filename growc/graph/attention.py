"""`nn.MultiheadAttention`, written out so that the stream around it can grow.

An `nn.MultiheadAttention` is one module whose `embed_dim` is at once the width of the stream it
reads and writes and the width of its heads, and whose query, key and value projections are one
packed Parameter: the stream cannot get one more unit while the module stays what it is. Before
tracing, growc replaces each one (in the user's model too: the graph and the model keep sharing
their modules) by a `SplitAttention` holding the same numbers as four Linears, `q`, `k`, `v` and
`out_proj` (the original's Parameters), around `F.scaled_dot_product_attention`. The graph then shows the
projections as layers: `q`, `k` and `v` read the stream and `out_proj` writes it, like a
hand-written attention block, and the heads themselves are a site of their own that growc leaves
intact with its reason.

The replacement computes what the module did (to float rounding), in both modes, with or without
masks. A configuration it does not cover (`add_bias_kv`, `add_zero_attn`) keeps the original
module, called whole by the graph; its reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask in `nn.MultiheadAttention`'s sense (bool: True where attention is not allowed;
    float: added to the scores) as a float mask to add."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@fx.wrap
def attention_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive (batch, heads, queries, keys) mask for `F.scaled_dot_product_attention` made
    from `nn.MultiheadAttention`'s two masks. Called whole by a traced graph: it branches on the
    masks' dtypes."""
    mask = torch.zeros((), dtype=dtype)
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        mask = mask + (m.view(batch, heads, queries, keys) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        mask = mask + _additive(key_padding_mask, dtype).view(batch, 1, 1, keys)
    return mask


class SplitAttention(nn.Module):
    """Multi-head attention with separate `q`, `k`, `v` projections; `forward` takes and returns
    what `nn.MultiheadAttention.forward` does (inputs of 3 dimensions)."""

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        self.head_dim, self.batch_first, self.dropout = source.head_dim, source.batch_first, source.dropout
        e = source.embed_dim
        if source._qkv_same_embed_dim:
            weights = source.in_proj_weight.detach().split(e)
        else:
            weights = (source.q_proj_weight.detach(), source.k_proj_weight.detach(), source.v_proj_weight.detach())
        biases = source.in_proj_bias.detach().split(e) if source.in_proj_bias is not None else (None,) * 3
        projections = []
        for weight, bias in zip(weights, biases):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
            linear.to(weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            linear.weight.requires_grad_(source.out_proj.weight.requires_grad)
            projections.append(linear)
        self.q, self.k, self.v = projections
        # A plain Linear holding the same Parameters (the original's class is one that a
        # checkpoint's architecture cannot name).
        out = source.out_proj
        self.out_proj = nn.Linear(out.in_features, out.out_features, bias=out.bias is not None, device="meta")
        self.out_proj.weight = out.weight
        if out.bias is not None:
            self.out_proj.bias = out.bias
        # Dropout on the attention weights is a module, so that it reads its own mode in the graph.
        self.attention_dropout = nn.Dropout(source.dropout)

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def _heads(self, x: torch.Tensor, batch, tokens) -> torch.Tensor:
        """(batch, tokens, width) or (tokens, batch, width) to (batch, heads, tokens, head_dim):
        the number of heads follows the projections' width, so a new head is `head_dim` more rows."""
        if self.batch_first:
            return x.view(batch, tokens, -1, self.head_dim).transpose(1, 2)
        return x.view(tokens, batch, -1, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.batch_first:
            batch, queries, keys = query.size(0), query.size(1), key.size(1)
        else:
            batch, queries, keys = query.size(1), query.size(0), key.size(0)
        q = self._heads(self.q(query), batch, queries)
        k = self._heads(self.k(key), batch, keys)
        v = self._heads(self.v(value), batch, keys)
        mask = None
        if attn_mask is not None or key_padding_mask is not None:
            mask = attention_mask(attn_mask, key_padding_mask, batch, q.size(1), queries, keys, q.dtype)
            is_causal = False  # the mask given is the one to use (nn.MultiheadAttention's reading of the hint)
        weights = None
        if need_weights or self.dropout > 0:
            # Written out: the weights are an output, or their dropout is a module of the graph.
            scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(queries, keys, dtype=torch.bool).triu(1), float("-inf"))
            weights = self.attention_dropout(scores.softmax(-1))
            heads = weights @ v
            if need_weights:
                weights = weights.mean(1) if average_attn_weights else weights
        else:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        if self.batch_first:
            joined = heads.transpose(1, 2).reshape(batch, queries, -1)
        else:
            joined = heads.permute(2, 0, 1, 3).reshape(queries, batch, -1)
        return self.out_proj(joined), weights if need_weights else None


def why_kept_whole(module: nn.MultiheadAttention) -> str | None:
    """Why growc keeps this attention module whole instead of splitting it, or None."""
    if module.bias_k is not None:
        return "it appends learned key and value tokens (add_bias_kv)"
    if module.add_zero_attn:
        return "it appends a zero key and value (add_zero_attn)"
    return None


def split_attention_modules(model: nn.Module) -> list[str]:
    """Replace, in place, every `nn.MultiheadAttention` inside `model` that `SplitAttention`
    covers (a module used in several places gets one replacement, used there all); the names
    of the replaced modules."""
    replaced: dict[int, SplitAttention] = {}
    names = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):  # named_children() skips a repeated module
            if not isinstance(child, nn.MultiheadAttention) or why_kept_whole(child) is not None:
                continue
            if id(child) not in replaced:
                replaced[id(child)] = SplitAttention(child).train(child.training)
                names.append(f"{parent_name}.{attr}" if parent_name else attr)
            setattr(parent, attr, replaced[id(child)])
    return names


@dataclass(frozen=True)
class HeadPath:
    """Self-attention written as `SplitAttention` writes it, seen from the graph: q, k, v
    projections of one input, each `view(b, t, -1, head_dim).transpose(1, 2)`, into
    `F.scaled_dot_product_attention` without a mask, then `transpose(1, 2).reshape(b, t, -1)`
    into the output projection. Its units are heads of `head_dim` values each."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    attention: fx.Node
    nodes: tuple[fx.Node, ...]  # the views and transposes of q, k, v, the attention, its transpose
    joined: fx.Node  # the reshape the output projection reads
    head_dim: int


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_method(node: fx.Node | None, name: str, args: tuple | None = None) -> bool:
    return (
        node is not None
        and node.op == "call_method"
        and node.target == name
        and (args is None or tuple(node.args[1:]) == args)
    )


def _split_into_heads(projection: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """(view, transpose, head_dim) where `projection`'s output goes only into the head split."""
    view = _only_user(projection)
    if not _is_method(view, "view") or len(view.args) != 5 or view.args[3] != -1:
        return None
    head_dim = view.args[4]
    swap = _only_user(view)
    if not isinstance(head_dim, int) or not _is_method(swap, "transpose", (1, 2)):
        return None
    return view, swap, head_dim


def head_path(projection: fx.Node) -> HeadPath | None:
    """The self-attention whose q, k or v projection is `projection` (a call_module node), when
    it has exactly `HeadPath`'s form; None otherwise."""
    split = _split_into_heads(projection)
    attention = _only_user(split[1]) if split else None
    if attention is None or attention.op != "call_function" or attention.target is not F.scaled_dot_product_attention:
        return None
    if len(attention.args) != 3 or any(v not in (None, False, 0.0) for v in attention.kwargs.values()):
        return None  # a mask, dropout or another scale: not the plain form
    chains = []
    for swap in attention.args:
        view = swap.args[0] if isinstance(swap, fx.Node) and isinstance(swap.args[0], fx.Node) else None
        p = view.args[0] if view is not None else None
        found = _split_into_heads(p) if isinstance(p, fx.Node) and p.op == "call_module" else None
        if found is None or found[1] is not swap:
            return None
        chains.append((p, *found))
    (q, *_, d), (k, *_, dk), (v, *_, dv) = chains
    if len({d, dk, dv}) != 1 or not (q.args[0] is k.args[0] is v.args[0]):
        return None  # heads of different sizes, or cross-attention
    back = _only_user(attention)
    joined = _only_user(back) if _is_method(back, "transpose", (1, 2)) else None
    if not _is_method(joined, "reshape") or len(joined.args) != 4 or joined.args[3] != -1:
        return None
    reader = _only_user(joined)
    if reader is None or reader.op != "call_module":
        return None
    nodes = tuple(n for _, view, swap, _ in chains for n in (view, swap)) + (attention, back)
    return HeadPath(q, k, v, attention, nodes, joined, d)
