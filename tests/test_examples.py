"""The examples the README points to keep working."""

import json
import runpy
import sys
from pathlib import Path

import onnxruntime as ort
import torch

from growc.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _run_example(name: str, capsys) -> str:
    """Runs an example script as `python examples/NAME` would (as __main__, no arguments), in
    this process: a subprocess would pay torch's import and the exporter's set-up again."""
    argv = sys.argv
    sys.argv = [str(ROOT / "examples" / name)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_api_example_runs_end_to_end(capsys):
    out = _run_example("api_example.py", capsys)
    assert "val accuracy" in out and "model.onnx" in out


def test_cnn_example_grows_channels_and_exports(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app,
        [
            "grow",
            str(ROOT / "examples" / "digits_cnn.py"),
            "--out",
            str(tmp_path),
            "--quiet",
            "--steps",
            "6",
            "--final-epochs",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    final = report["final"]
    assert final["final_params"] > final["initial_params"]
    assert any(w > 2 for w in final["widths"].values())
    assert final["final_val_accuracy"] > 0.8
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    out = session.run(None, {"input": torch.randn(3, 1, 8, 8).numpy()})[0]
    assert out.shape == (3, 10)


def test_stepwise_api_example_runs_end_to_end(capsys):
    out = _run_example("api_stepwise.py", capsys)
    assert "also writing: back" in out  # the residual stream is one site
    assert "bottleneck" in out and "grew" in out and "model.onnx" in out


def test_transformer_example_grows_its_stream_through_every_layernorm(tmp_path):
    from typer.testing import CliRunner

    from growc.graph.candidates import find_width_sites
    from growc.graph.trace import trace
    from growc.userfile import load_user_file

    user = load_user_file(ROOT / "examples" / "digits_transformer.py")
    stream = next(s for s in find_width_sites(trace(user.model)).sites if s.name == "embed")
    assert stream.centred and set(stream.carriers) == {"norm1", "norm2", "norm"}
    assert set(stream.writers) == {"proj", "fc2"} and dict(stream.broadcasts) == {"position": 0.0}
    args = ["grow", str(ROOT / "examples" / "digits_transformer.py"), "--out", str(tmp_path), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--steps", "4", "--final-epochs", "1"])
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "report.json").read_text())["final"]
    assert final["final_params"] > final["initial_params"] and final["onnx_max_abs_diff"] <= 1e-4


def test_resnext_example_grows_every_channel_group_alike(tmp_path):
    from typer.testing import CliRunner

    from growc import load
    from growc.graph.candidates import find_width_sites
    from growc.graph.trace import trace
    from growc.userfile import load_user_file

    user = load_user_file(ROOT / "examples" / "digits_resnext.py")
    grouped = {s.name for s in find_width_sites(trace(user.model)).sites if s.groups == 4}
    assert grouped == {"block1.reduce", "block1.grouped", "block2.reduce", "block2.grouped"}
    args = ["grow", str(ROOT / "examples" / "digits_resnext.py"), "--out", str(tmp_path), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--final-epochs", "1"])
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "report.json").read_text())["final"]
    assert final["onnx_max_abs_diff"] <= 1e-4
    grew = {name for name in grouped if final["widths"][name] > 8}
    assert grew, final["widths"]
    reloaded = load(tmp_path / "model.safetensors")
    for name in grouped:
        conv = reloaded.get_submodule(name.replace("reduce", "grouped"))
        assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert all(final["widths"][name] % 4 == 0 for name in grouped)
