"""The Python API. The CLI calls these same functions and only adds printing."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from growc.data import as_loader, load_builtin
from growc.deploy.export import export_onnx
from growc.errors import GrowcError, GrowcWarning, check_writable_folder
from growc.graph.candidates import CandidateReport, find_width_sites
from growc.graph.depth import find_depth_edges
from growc.graph.trace import parameter_count, trace
from growc.growth import distributed
from growc.growth.config import GrowthConfig
from growc.growth.loop import GrowthResult, Observer, grow
from growc.growth.plots import write_plots
from growc.growth.train import first_samples
from growc.userfile import (
    beside_script,
    check_model_takes_data,
    extra_outputs_warning,
    load_user_data,
    load_user_file,
)

#: Validation samples on which onnxruntime is compared with torch.
ONNX_CHECK_SAMPLES = 1000


def candidates_of(
    model: nn.Module, leaf_modules: Iterable[str] = (), concrete_args: dict | None = None
) -> CandidateReport:
    """The growth sites of `model` (width sites and depth edges) and the layers it cannot grow,
    with the reason for each."""
    graph = trace(model, leaf_modules, concrete_args)
    report = find_width_sites(graph)
    report.depth, report.graph = find_depth_edges(graph), graph
    return report


def _export_advice(exc: GrowcError) -> str:
    text = str(exc)
    # The exporter's own exception (kept as the context) says what torch.export tripped on.
    cause = f"{type(exc.__context__).__name__}: {exc.__context__}" if exc.__context__ is not None else ""
    if "data-dependent" in (text + cause).lower() or "GuardOnDataDependent" in cause:
        return (
            "the model branches on tensor values (data-dependent control flow), which an ONNX graph "
            "cannot hold; write the branch with torch.where or torch.cond"
        )
    return text.rstrip(".")


def default_out(model_file: str | Path) -> Path:
    """Where a run's files go without --out: runs/<model file name>/ (ignored by git)."""
    return Path("runs") / Path(model_file).stem


def data_spec(data: str, model_file: Path, from_file: bool) -> str:
    """What the run was grown on, for the checkpoint, so `growc export` can use the same data:
    the model file's path when its data() was used, else the built-in set as given."""
    return str(model_file) if from_file else data


def _check_budget(config: GrowthConfig, model: nn.Module) -> None:
    params = parameter_count(model)
    if config.max_params is not None and config.max_params < params:
        raise GrowcError(
            f"--max-params {config.max_params:,} is below the model's starting size ({params:,} parameters): "
            "give a larger budget or start from a smaller model"
        )


def grow_file(
    model_file: str | Path,
    data: str = "digits",
    out: str | Path | None = None,
    observer: Observer | None = None,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict | None = None,
    opset: int = 18,
    resume: bool = False,
    **settings,
) -> GrowthResult:
    """`growc grow`: load MODEL.py, grow its model, write model.onnx, model.safetensors and
    report.json to `out` (default runs/<file name>/). The file's folder is first on sys.path for
    the whole run, as under `python MODEL.py` (its data() and loss may import modules beside it)."""
    model_file = Path(model_file)
    out = Path(out) if out is not None else default_out(model_file)
    # Under torchrun: join the process group; each rank trains on its own device (cuda:LOCAL_RANK).
    settings["device"] = distributed.join_from_environment(settings.get("device", GrowthConfig.device))
    config = GrowthConfig(**settings)
    config.check()
    with beside_script(model_file):
        return _grow_file(model_file, data, out, config, observer, leaf_modules, concrete_args, opset, resume)


def _grow_file(
    model_file: Path,
    data: str,
    out: Path,
    config: GrowthConfig,
    observer: Observer | None,
    leaf_modules: Iterable[str],
    concrete_args: dict | None,
    opset: int,
    resume: bool,
) -> GrowthResult:
    torch.manual_seed(config.seed)  # the model file builds the model: its initialization is seeded too
    user = load_user_file(model_file)
    _check_budget(config, user.model)
    train, val = load_user_data(user) if user.data is not None else load_builtin(data, config.seed)
    train_loader = as_loader(train, config.batch_size, shuffle=True, seed=config.seed)
    val_loader = as_loader(val, max(config.batch_size, 256), shuffle=False, seed=config.seed)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GrowcError("--device cuda was asked for but torch sees no GPU: use --device cpu")
    output = check_model_takes_data(user.model, train_loader, user.loss, device)
    check_writable_folder(out)
    warning = extra_outputs_warning(output, train, val)
    if warning and distributed.is_main():
        warnings.warn(warning, GrowcWarning, stacklevel=2)

    result = grow(
        user.model,
        train_loader,
        val_loader,
        user.loss,
        config,
        observer,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        checkpoint=out / "model.safetensors",
        resume=resume,
        checkpoint_extra={"data": data_spec(data, model_file, user.data is not None)},
    )
    if not distributed.is_main():
        return result  # only rank 0 writes the ONNX file, report.json and the plots
    check_inputs = first_samples(val_loader, ONNX_CHECK_SAMPLES)[0]
    try:
        exported = export_onnx(result.model, check_inputs, out / "model.onnx", opset=opset, check_inputs=check_inputs)
    except GrowcError as exc:
        result.report.write(out / "report.json")
        raise GrowcError(
            f"growth finished ({out}/model.safetensors and report.json are written) but the ONNX export "
            f"failed: {_export_advice(exc)}. Then run: growc export {out}/model.safetensors"
        ) from None
    result.report.final.update(
        {
            "onnx_path": str(exported.path),
            "onnx_max_abs_diff": exported.max_abs_diff,
            "onnx_relative_diff": exported.relative_diff,  # of the output's scale: what parity is judged on
            "opset": exported.opset,
            "checkpoint_path": str(out / "model.safetensors"),
            "model_file": str(model_file),
            "data": data if user.data is None else "model file",
        }
    )
    result.report.write(out / "report.json")
    write_plots(result.report, out)
    result.model.to(device)
    return result
