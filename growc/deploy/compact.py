"""Byte-level clean-up of an ONNX file that leaves its computation unchanged.

In a model of a few thousand parameters the graph's own bytes rival the weights: the exporter's
value_info, the quantizer's long tensor and node names (`conv1.weight_DequantizeLinear_Output`),
its metadata and unused opset imports, and all-zero zero-point tensors (int32, one per output
channel, for every bias). `compact` removes all of that, identically for the fp32 and int8 files:

- doc strings, node names, metadata (model, nodes, inputs, outputs, initializers), `value_info`
  (onnxruntime infers intermediate shapes itself);
- node attributes that hold their operator's default value (Gemm's alpha=1, transA=0, ...);
- opset imports of domains no node uses;
- initializers with identical dtype, shape and bytes, kept once;
- the all-zero int32 zero-points of the biases' DequantizeLinear (zero is the operator's default;
  weights and activations keep theirs: onnxruntime fuses Gemm into QGemm only when the weight's
  zero-point is there, and QuantizeLinear's zero-point sets its output type);
- every tensor name that is not a graph input or output, shortened to a base-36 counter.

The graph's inputs and outputs keep their names, so callers see the same interface.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _short(index: int) -> str:
    text = ""
    while True:
        index, digit = divmod(index, len(_DIGITS))
        text = _DIGITS[digit] + text
        if index == 0:
            return text


def _subgraphs(graph):
    """`graph` and every graph nested in a node attribute (If/Loop/Scan bodies)."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def _clear(message, *fields: str) -> None:
    """Unset `fields` of a protobuf message, skipping those its onnx version does not have (an
    empty string that is set still costs its tag on disk, so assigning "" is not enough)."""
    known = message.DESCRIPTOR.fields_by_name
    for name in fields:
        if name in known:
            message.ClearField(name)


def _strip(model) -> None:
    _clear(model, "doc_string", "metadata_props")
    for graph in _subgraphs(model.graph):
        _clear(graph, "doc_string", "metadata_props", "value_info")
        for item in [*graph.initializer, *graph.input, *graph.output]:
            _clear(item, "doc_string", "metadata_props")
        for node in graph.node:
            _clear(node, "doc_string", "name", "metadata_props")


def _is_default(attr, spec) -> bool:
    """Whether `attr` holds the default value that its schema `spec` declares."""
    from onnx.helper import get_attribute_value

    default = spec.default_value if spec is not None else None
    if default is None or not default.name or attr.type != default.type:
        return False  # no declared default (a required attribute, or one computed from inputs)
    return get_attribute_value(attr) == get_attribute_value(default)


def _drop_default_attributes(model) -> None:
    """Attributes of standard operators that repeat the schema's default value."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    for graph in _subgraphs(model.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                continue
            keep = [a for a in node.attribute if not _is_default(a, schema.attributes.get(a.name))]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)


def _drop_unused_opsets(model) -> None:
    used = {node.domain or "" for graph in _subgraphs(model.graph) for node in graph.node}
    used |= {node.domain or "" for function in model.functions for node in function.node}
    used |= {function.domain or "" for function in model.functions}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _rename_inputs(graph, renames: dict[str, str]) -> None:
    for g in _subgraphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]


def _dedupe_initializers(graph) -> None:
    protected = {v.name for v in graph.output} | {v.name for v in graph.input}
    first: dict[tuple, str] = {}
    renames: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha256(_values(init).tobytes()).digest())
        if key in first and init.name not in protected:
            renames[init.name] = first[key]
        else:
            first.setdefault(key, init.name)
            kept.append(init)
    if renames:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        _rename_inputs(graph, renames)


def _values(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _drop_bias_zero_points(graph) -> None:
    """DequantizeLinear(b, scale, 0) == DequantizeLinear(b, scale) for an int32 bias `b`."""
    import onnx

    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        data, zero = inits.get(node.input[0]), inits.get(node.input[2])
        if data is None or zero is None or data.data_type != onnx.TensorProto.INT32:
            continue
        if not _values(zero).any():
            del node.input[2]
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph) -> None:
    used = {name for g in _subgraphs(graph) for node in g.node for name in node.input}
    used |= {v.name for v in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _shorten_names(graph) -> None:
    """Short names for every tensor of the top graph that is not one of its inputs or outputs.
    Tensors produced or read inside subgraphs keep their names (they may refer to outer ones)."""
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    fixed |= {s.values.name for s in graph.sparse_initializer}
    nested = {name for g in list(_subgraphs(graph))[1:] for node in g.node for name in [*node.input, *node.output]}
    renames: dict[str, str] = {}
    counter = itertools.count()

    def new_name(name: str) -> str:
        if name in fixed or name in nested:
            return name
        if name not in renames:
            short = _short(next(counter))
            while short in fixed or short in nested:  # never collide with a kept name
                short = _short(next(counter))
            renames[name] = short
        return renames[name]

    for init in graph.initializer:
        init.name = new_name(init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = new_name(name)
        for i, name in enumerate(node.output):
            node.output[i] = new_name(name)


def compact(model):
    """Shrink `model` (an onnx.ModelProto, changed in place and returned) without changing what
    it computes."""
    _strip(model)
    _drop_default_attributes(model)
    _drop_unused_opsets(model)
    _dedupe_initializers(model.graph)
    _drop_bias_zero_points(model.graph)
    _shorten_names(model.graph)
    return model


def compact_file(src: str | Path, dst: str | Path | None = None) -> Path:
    """Compact the ONNX file `src` into `dst` (default: in place)."""
    import onnx

    model = compact(onnx.load(str(src)))
    dst = Path(dst or src)
    onnx.save(model, str(dst))
    return dst
