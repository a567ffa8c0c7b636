"""report.json: strict JSON (no NaN), written after every step so an interrupted run has one."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from observers import StopAfter
from torch import nn
from typer.testing import CliRunner

import growc
from growc.cli import app
from growc.growth.loop import grow
from growc.growth.report import FINISHED, RUNNING, GrowthReport, SiteGrowthRecord, StepRecord

runner = CliRunner()


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq) do."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(data, batch_size=128)
    model = nn.Sequential(nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 3))
    config = growc.GrowthConfig(steps=4, final_epochs=1, stat_samples=256, folds=2, line_search_samples=64)
    return model, train, val, config


def test_an_interrupted_run_leaves_a_readable_report(tmp_path):
    model, train, val, config = _setup()
    with pytest.raises(KeyboardInterrupt):
        grow(model, train, val, F.cross_entropy, config, StopAfter(1), checkpoint=tmp_path / "model.safetensors")
    report = _strict((tmp_path / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [0, 1]
    assert report["status"] == RUNNING and not report["final"]
    assert not list(tmp_path.glob("*.tmp"))

    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") > 2]
    assert rows == ["0", "1"], result.output  # the completed steps
    assert "the run has not finished" in result.output


def test_a_finished_run_says_so(tmp_path):
    model, train, val, config = _setup()
    config.steps = 1
    result = grow(model, train, val, F.cross_entropy, config, checkpoint=tmp_path / "model.safetensors")
    assert result.report.status == FINISHED
    report = _strict((tmp_path / "report.json").read_text())
    assert report["status"] == FINISHED and report["final"]["final_params"] == result.report.final["final_params"]
    output = runner.invoke(app, ["report", str(tmp_path)]).output
    assert "growth summary" in output and "has not finished" not in output


def test_non_finite_numbers_are_written_as_null(tmp_path):
    step = StepRecord(
        step=0,
        params=10,
        train_loss=math.inf,
        val_loss=math.nan,
        val_accuracy=math.nan,
        widths={"fc1": 2},
        bottlenecks={"fc1": {"bottleneck": math.nan, "relative": 0.5, "best_gain": -math.inf}},
        grown=[SiteGrowthRecord("fc1", 1, math.nan, math.inf, 1.0, 0.0, 1)],
        params_after=12,
    )
    report = GrowthReport(config={"ridge": 0.1}, steps=[step], final={"values": [1.0, math.nan]})
    report.write(tmp_path / "report.json")
    data = _strict((tmp_path / "report.json").read_text())
    (s,) = data["steps"]
    assert s["train_loss"] is None and s["val_loss"] is None and s["val_accuracy"] is None
    assert s["bottlenecks"]["fc1"] == {"bottleneck": None, "relative": 0.5, "best_gain": None}
    assert s["grown"][0]["predicted_gain"] is None and s["grown"][0]["observed_gain"] is None
    assert data["final"]["values"] == [1.0, None]
    assert GrowthReport.from_dict(data).steps[0].grown[0].gamma == 1.0  # and it reads back

    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "the run has not finished" in result.output
