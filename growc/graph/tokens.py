"""Feature maps turned into token sequences, as vision transformers do it.

A patch embedding is a strided conv whose (B, C, H, W) map becomes (B, H*W, C) tokens:
`x.flatten(2).transpose(1, 2)` (timm), or `x.reshape(n, C, h * w).permute(0, 2, 1)`
(torchvision, with the width C written as a number). The channels stay whole: they become the
tokens' last dimension, so the conv is one more writer of the token stream. A class token is
concatenated along the tokens (a Parameter of the stream's width), and the head reads one token
(`x[:, 0]`). This module recognizes those three patterns for the coupling walk
(`graph/coupling.py`) and, at trace time, rewrites the reshape that names the width into the
`flatten(2)` it computes, so that the graph does not hold the old width as a constant.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from growc.graph.handlers import add_size_mirror


def _is_batch_size(arg: object) -> bool:
    """`x.shape[0]` / `x.size(0)` / `x.size()[0]` of any tensor: the batch's size."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return arg.args[1:] == (0,) or arg.kwargs.get("dim") == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        inner = arg.args[0]
        return isinstance(inner, fx.Node) and (
            (inner.op == "call_function" and inner.target is getattr and inner.args[1] == "shape")
            or (inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
        )
    return False


def _shape_args(node: fx.Node) -> tuple:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(dims)


def _width_attribute(model: nn.Module, node: fx.Node, width: int) -> tuple[nn.Module, str] | None:
    """The int attribute of the module whose forward wrote `node` that holds `width` (a ViT's
    `self.hidden_dim`), where exactly one does."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    names = [k for k, v in vars(owner).items() if type(v) is int and v == width and not k.startswith("_")]
    return (owner, names[0]) if len(names) == 1 else None


def flatten_patch_maps(gm: fx.GraphModule, model: nn.Module | None = None) -> int:
    """Rewrite `conv(x).reshape(n, C, L)` / `.view(...)`, where n is a batch size and C the conv's
    output channels, into `conv(x).flatten(2)`: the same tensor (the reshape succeeds only
    where L is H*W), without the width as a number. Where one int attribute of the user's
    module holds C (what its forward passed), it follows the conv's width as that grows, so the
    user's module keeps computing what the graph does. Returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_method" or node.target not in ("reshape", "view"):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        conv = gm.get_submodule(str(source.target))
        dims = _shape_args(node)
        if not isinstance(conv, nn.Conv2d) or len(dims) != 3 or not _is_batch_size(dims[0]):
            continue
        if dims[1] != conv.out_channels or isinstance(dims[2], (str, float)):
            continue
        held = _width_attribute(model, node, conv.out_channels) if model is not None else None
        if held is not None:
            add_size_mirror(conv, *held)
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_method("flatten", (source, 2))
        node.replace_all_uses_with(flat)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()  # the sizes only the reshape read
        gm.graph.lint()
        gm.recompile()
    return count


def _flattens_map(node: fx.Node) -> bool:
    """`x.flatten(2)` / `torch.flatten(x, 2)` (to the end): (B, C, H, W) to (B, C, H*W)."""
    if not (
        (node.op == "call_method" and node.target == "flatten")
        or (node.op == "call_function" and node.target is torch.flatten)
    ):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 2 and end == -1


def _swaps_last_two_of_three(node: fx.Node) -> bool:
    """`transpose(1, 2)` (either order, or as -2 / -1) or `permute(0, 2, 1)` of a 3-d tensor."""
    if (
        node.op == "call_method"
        and node.target == "transpose"
        or (node.op == "call_function" and node.target is torch.transpose)
    ):
        return (
            {d % 3 for d in node.args[1:3]} == {1, 2}
            and len(node.args) == 3
            and all(d in (1, 2, -1, -2) for d in node.args[1:3])
        )
    if node.op == "call_method" and node.target == "permute":
        return _shape_args(node) == (0, 2, 1)
    return False


def map_of_tokens(node: fx.Node) -> fx.Node | None:
    """The feature map that `node` lays out as tokens (`flatten(2)` then the swap), or None."""
    if not _swaps_last_two_of_three(node) or not isinstance(node.args[0], fx.Node):
        return None
    flat = node.args[0]
    if not _flattens_map(flat) or len(flat.users) != 1 or not isinstance(flat.args[0], fx.Node):
        return None
    return flat.args[0]


def tokens_of_map(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(flatten, swap) where `node`'s only use is laying it out as tokens, or None."""
    if len(node.users) != 1:
        return None
    (flat,) = node.users
    if not _flattens_map(flat) or flat.args[0] is not node or len(flat.users) != 1:
        return None
    (swap,) = flat.users
    return (flat, swap) if map_of_tokens(swap) is node else None


def is_token_cat(node: fx.Node) -> bool:
    """A concatenation along the tokens of (B, T, D) tensors (`dim=1` or `-2`)."""
    if not (node.op == "call_function" and node.target in (torch.cat, torch.concat)):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (1, -2)


def selected_token(node: fx.Node) -> tuple | None:
    """The index of `x[:, i]` (one token of a (B, T, D) sequence), or None."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    index = node.args[1]
    if (
        isinstance(index, tuple)
        and len(index) == 2
        and index[0] == slice(None)
        and isinstance(index[1], int)
        and not isinstance(index[1], bool)
    ):
        return index
    return None


def token_parameter(node: fx.Node) -> fx.Node | None:
    """The get_attr behind `self.class_token.expand(n, -1, -1)` (or the get_attr itself)."""
    if node.op == "call_method" and node.target == "expand" and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node if node.op == "get_attr" else None
