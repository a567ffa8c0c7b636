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
