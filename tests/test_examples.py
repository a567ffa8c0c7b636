"""The examples the README points to keep working."""

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import torch

from growc.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_runs_end_to_end():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_example.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "val accuracy" in done.stdout and "model.onnx" in done.stdout


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


def test_stepwise_api_example_runs_end_to_end():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_stepwise.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "also writing: back" in done.stdout  # the residual stream is one site
    assert "bottleneck" in done.stdout and "grew" in done.stdout and "model.onnx" in done.stdout
