"""A frozen model as a standalone `model.py` + `weights.safetensors`, loadable with torch and
safetensors alone: the user's device never needs growc, nor the model's original source.

The generated class builds each module from its torch.nn class and constructor arguments (read
the same way as for checkpoints) and its `forward` is the fx graph's own generated code.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, fx

import growc
from growc.deploy.parity import compare
from growc.errors import CheckpointError, ExportError
from growc.graph.modes import is_mode_flag
from growc.graph.serialize import TRACED_BUILTINS, module_spec

MODEL_FILE = "model.py"
WEIGHTS_FILE = "weights.safetensors"

# Names fx's generated code may use, defined once at the top of the generated file.
_PREAMBLE_GLOBALS = {"inf", "nan", "NoneType", "device", "torch", "math", "operator", "fx_pytree", "pytree"}

_HEADER = '''"""{class_name}: an inference model exported by growc {version}.

Needs only torch and safetensors:

    model = load_model()  # reads {weights} beside this file
    outputs = model(inputs)
"""

from __future__ import annotations

import math  # noqa: F401
import operator  # noqa: F401
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

inf = float("inf")
nan = float("nan")
NoneType = type(None)
device = torch.device


def _owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    return owner, leaf


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, leaf = _owner(root, path)
    owner.add_module(leaf, module)


def _attach_buffer(root: nn.Module, path: str, tensor: torch.Tensor) -> None:
    owner, leaf = _owner(root, path)
    owner.register_buffer(leaf, tensor)

'''

_FOOTER = '''
def load_model(folder: str | Path | None = None) -> {class_name}:
    """The model with its weights, in eval mode."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    model = {class_name}()
    model.load_state_dict(load_file(str(folder / "{weights}")), strict=True)
    return model.eval()
'''


def _literal(value: Any) -> str:
    """Python source for a constructor argument as `module_spec` encodes it."""
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        if "tuple" in value:
            items = [_literal(v) for v in value["tuple"]]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if "dict" in value:
            return "{" + ", ".join(f"{k!r}: {_literal(v)}" for k, v in value["dict"].items()) + "}"
        if "dtype" in value:
            return f"torch.{value['dtype']}"
        if "device" in value:
            return f"torch.device({value['device']!r})"
        if "float" in value:
            return f"float({value['float']!r})"
        if "slice" in value:
            return "slice(" + ", ".join(_literal(v) for v in value["slice"]) + ")"
        if "ellipsis" in value:
            return "Ellipsis"
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


def _import_line(name: str, obj: Any) -> str:
    """An import that binds `name` to `obj` in the generated file: torch, math, operator and a few
    builtins only."""
    if isinstance(obj, types.ModuleType) and obj.__name__.split(".")[0] in ("torch", "math", "operator"):
        return f"import {obj.__name__} as {name}"
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if (
        module
        and qualname
        and "." not in qualname
        and module.split(".")[0] in ("torch", "math", "operator", "_operator")
    ) or (module == "builtins" and qualname in TRACED_BUILTINS):  # x.shape in a forward is getattr(x, "shape")
        return f"from {module} import {qualname} as {name}"
    raise ExportError(
        f"the graph uses '{name}' ({type(obj).__name__}), which a standalone model.py can only get from "
        "growc or the model's source: keep it out of the traced graph (mark its module with --leaf)"
    )


def _modules_of(gm: fx.GraphModule) -> list[str]:
    paths = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) not in paths:
            paths.append(str(node.target))
    return paths


def generate(gm: fx.GraphModule, class_name: str = "GrownModel") -> tuple[str, dict[str, Tensor]]:
    """The source of model.py and the tensors its class loads."""
    modules = _modules_of(gm)
    lines = [f"class {class_name}(nn.Module):", "    def __init__(self) -> None:", "        super().__init__()"]
    tensors: dict[str, Tensor] = {}
    for path in modules:
        module = gm.get_submodule(path)
        try:
            spec = module_spec(module)
        except CheckpointError as exc:
            raise ExportError(f"cannot write a standalone model.py: {exc}") from None
        kwargs = ", ".join(f"{k}={_literal(v)}" for k, v in spec["kwargs"].items())
        lines.append(f"        _attach(self, {path!r}, nn.{spec['type']}({kwargs}))")
        tensors.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
    for node in gm.graph.nodes:
        if node.op != "get_attr" or is_mode_flag(node):  # the generated module has its own `training`
            continue
        path = str(node.target)
        if any(path.startswith(m + ".") for m in modules):
            continue  # a tensor of a module built above
        value = _get_tensor(gm, path)
        dtype = str(value.dtype).removeprefix("torch.")
        lines.append(
            f"        _attach_buffer(self, {path!r}, torch.empty({tuple(value.shape)!r}, dtype=torch.{dtype}))"
        )
        tensors[path] = value
    code = _untyped_code(gm.graph)
    imports = [_import_line(n, obj) for n, obj in code.globals.items() if n not in _PREAMBLE_GLOBALS]
    forward = "\n".join(("    " + line) if line.strip() else "" for line in code.src.strip("\n").splitlines())
    header = _HEADER.format(class_name=class_name, version=growc.__version__, weights=WEIGHTS_FILE)
    source = (
        header
        + ("\n".join(imports) + "\n" if imports else "")
        + "\n"
        + "\n".join(lines)
        + "\n\n"
        + forward.rstrip()
        + "\n\n"
        + _FOOTER.format(class_name=class_name, weights=WEIGHTS_FILE)
    )
    return source, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _untyped_code(graph: fx.Graph):
    """The graph's Python code without type annotations: they may name the user's classes."""
    types_ = {node: node.type for node in graph.nodes}
    try:
        for node in graph.nodes:
            node.type = None
        return graph.python_code("self")
    finally:
        for node, type_ in types_.items():
            node.type = type_


def _get_tensor(gm: fx.GraphModule, path: str) -> Tensor:
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, attr)
    if not isinstance(value, Tensor):
        raise ExportError(f"the graph reads '{path}', which is not a tensor: a standalone model.py cannot hold it")
    return value


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_standalone(
    model: fx.GraphModule,
    folder: str | Path,
    example_inputs: Sequence[Tensor] | None = None,
    class_name: str = "GrownModel",
) -> Path:
    """Write `folder`/model.py and `folder`/weights.safetensors. The generated class is first
    built here and loaded strictly (and compared with `model` on `example_inputs` if given), so
    a file that would not load is never written."""
    if not isinstance(model, fx.GraphModule):
        raise ExportError("write_standalone needs a traced model: pass growc.deploy.freeze.freeze(model)")
    source, tensors = generate(model, class_name)
    namespace: dict[str, Any] = {"__name__": "growc_standalone_check", "__file__": str(Path(folder) / MODEL_FILE)}
    exec(compile(source, MODEL_FILE, "exec"), namespace)  # our own generated code, checked before writing
    rebuilt = namespace[class_name]()
    rebuilt.load_state_dict(tensors, strict=True)
    if example_inputs is not None:
        rebuilt.eval()
        model.eval()
        with torch.no_grad():
            parity = compare(model(*example_inputs), rebuilt(*example_inputs))
        if not parity.within(1e-5):  # the same ops on the same weights: only summation order may differ
            raise ExportError(
                f"the standalone model.py differs from the model ({parity.describe()}): it was not written"
            )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"growc": growc.__version__}))
    _atomic_write(folder / MODEL_FILE, lambda p: p.write_text(source))
    return folder / MODEL_FILE
