"""A growth run survives interruptions, stops where it is told to, and never keeps a broken step."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from observers import StopAfter
from torch import nn

import growc
from growc.data import as_loader, digits
from growc.errors import GrowcError, GrowcWarning
from growc.growth.loop import grow
from growc.growth.step import LineSearchBatch

ROOT = Path(__file__).resolve().parents[1]


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 10))
    train, val = digits()
    return model, as_loader(train, 64, True, seed), as_loader(val, 256, False, seed)


@pytest.mark.parametrize("epochs", [1, 0.5])  # 0.5: each step trains on half an epoch's batches
def test_resume_reaches_the_same_model_as_an_uninterrupted_run(tmp_path, epochs):
    config = growc.GrowthConfig(steps=5, epochs=epochs, final_epochs=2, seed=0)
    model, train, val = _setup()
    whole = grow(model, train, val, F.cross_entropy, config, checkpoint=tmp_path / "a.safetensors")

    model, train, val = _setup()
    with pytest.raises(KeyboardInterrupt):
        grow(model, train, val, F.cross_entropy, config, observer=StopAfter(2), checkpoint=tmp_path / "b.safetensors")
    model, train, val = _setup()  # a fresh process: new model, new loaders
    resumed = grow(model, train, val, F.cross_entropy, config, checkpoint=tmp_path / "b.safetensors", resume=True)

    assert [s.widths for s in resumed.report.steps] == [s.widths for s in whole.report.steps]
    mine, theirs = whole.model.state_dict(), resumed.model.state_dict()
    assert set(mine) == set(theirs)
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6)
    assert resumed.report.final["final_val_accuracy"] == pytest.approx(whole.report.final["final_val_accuracy"])


def test_a_run_killed_with_sigkill_resumes(tmp_path):
    command = [
        sys.executable,
        "-m",
        "growc",
        "grow",
        str(ROOT / "examples" / "digits_mlp.py"),
        "--out",
        str(tmp_path),
        "--quiet",
        "--steps",
        "8",
        "--final-epochs",
        "2",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "model.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists():
            try:
                step = growc.growth.checkpoint.read_metadata(checkpoint)["extra"]["run"]["step"]
            except growc.errors.CheckpointError:
                step = 0
            if step >= 2:
                break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    model = growc.load(checkpoint)  # the last good checkpoint is readable
    assert sum(p.numel() for p in model.parameters()) > 166
    # The resumed run needs no fresh process: the CLI's own entry point, in this one.
    from typer.testing import CliRunner

    from growc.cli import app

    done = CliRunner().invoke(app, [*command[3:], "--resume"])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"][0]["step"] == 0 and report["final"]["final_params"] > 166


def test_resume_from_a_corrupted_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    model, train, val = _setup()
    grow(model, train, val, F.cross_entropy, growc.GrowthConfig(steps=1, final_epochs=0), checkpoint=path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model, train, val = _setup()
    with pytest.raises(growc.errors.CheckpointError, match="model.safetensors"):
        grow(model, train, val, F.cross_entropy, growc.GrowthConfig(), checkpoint=path, resume=True)


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"target_accuracy": 0.3}, "target accuracy"),
        ({"max_params": 400}, "parameter budget"),
        ({"max_flops": 250}, "compute budget"),
        ({"time_budget": 0.0}, "time budget"),
        ({"steps": 2}, "2 growth steps"),
    ],
)
def test_each_stopping_rule_stops_the_run(settings, reason):
    model, train, val = _setup()
    result = grow(model, train, val, F.cross_entropy, growc.GrowthConfig(final_epochs=0, **settings))
    assert reason in result.report.stop_reason
    assert len(result.report.steps) < 30
    if "max_params" in settings:
        assert result.report.final["final_params"] <= settings["max_params"]


def test_a_step_that_breaks_the_loss_is_rolled_back(monkeypatch):
    """Each site's amplitude is searched on an honest loss; the check of the whole step that
    follows sees a non-finite one (as when sites safe alone break it together): all is undone."""
    import growc.growth.loop as loop_module

    model, train, val = _setup()
    state = {"grown": False}
    original_loss, original_grow = LineSearchBatch.loss, loop_module.grow_allocated

    def grow_allocated(*args, **kwargs):
        out = original_grow(*args, **kwargs)
        state["grown"] = bool(out[1])  # something grew: the next loss is the step's check
        return out

    def loss(self, m):
        if state["grown"]:
            state["grown"] = False
            return math.nan
        return original_loss(self, m)

    monkeypatch.setattr(loop_module, "grow_allocated", grow_allocated)
    monkeypatch.setattr(LineSearchBatch, "loss", loss)
    result = grow(model, train, val, F.cross_entropy, growc.GrowthConfig(steps=3, final_epochs=0))
    rolled = [s for s in result.report.steps if "rolled back" in s.note]
    assert rolled, [s.note for s in result.report.steps]
    assert all(g.neurons == 0 for s in rolled for g in s.grown)
    assert result.report.final["final_params"] == result.report.final["initial_params"]  # every step undone


def test_non_finite_training_loss_is_a_clear_error():
    model, train, val = _setup()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    with pytest.raises(GrowcError, match="lower the learning rate"):
        grow(model, train, val, F.cross_entropy, growc.GrowthConfig(steps=2, final_epochs=0))


def test_growth_never_raises_the_loss_at_the_moment_it_is_applied():
    model, train, val = _setup(seed=3)
    result = grow(model, train, val, F.cross_entropy, growc.GrowthConfig(steps=8, final_epochs=0, seed=3))
    grown = [g for s in result.report.steps for g in s.grown]
    assert sum(g.neurons for g in grown) > 0
    # observed_gain = line-search loss before the step's change at the site minus after it.
    assert all(g.observed_gain >= -1e-6 for g in grown), [g.observed_gain for g in grown]


class _CountingBatches(growc.growth.observer.Observer):
    def __init__(self) -> None:
        self.batches: list[int] = []

    def epoch_start(self, step: int, epoch: int, epochs: int, batches: int) -> None:
        self.batches.append(0)

    def batch_end(self) -> None:
        self.batches[-1] += 1


def test_a_fraction_of_an_epoch_between_steps_trains_that_share_of_the_batches():
    model, train, val = _setup()
    counter = _CountingBatches()
    result = grow(model, train, val, F.cross_entropy, growc.GrowthConfig(steps=3, epochs=1.5, final_epochs=1), counter)
    half = round(0.5 * len(train))
    # Steps 1 and 2 train 1.5 epochs each (a whole pass, then half of one); the final phase one epoch.
    assert counter.batches == [len(train), half, len(train), half, len(train)]
    trained = 1 + half / len(train)
    assert [s.epochs for s in result.report.steps] == [0, pytest.approx(trained), pytest.approx(trained), 1]


def test_epoch_chunks_split_a_phase_into_passes():
    from growc.growth.schedule import epoch_chunks

    assert epoch_chunks(2, 10) == [None, None]
    assert epoch_chunks(2.5, 10) == [None, None, 5]
    assert epoch_chunks(0.01, 10) == [1]  # at least one batch
    assert epoch_chunks(0, 10) == []
    with pytest.warns(GrowcWarning, match="no length"):
        assert epoch_chunks(0.5, None) == [None]  # data without a length: whole epochs


def test_growth_stops_when_the_validation_loss_stops_improving():
    # Validation labels unrelated to the inputs: training helps the training set only, so the
    # validation loss never improves for long and the run stops on it, not on a step count.
    model, train, val = _setup()
    x, _ = val.dataset.tensors
    noise = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    val = as_loader(torch.utils.data.TensorDataset(x, noise), 256, False, 0)
    config = growc.GrowthConfig(final_epochs=0, epochs=0.5, validation_patience=2, patience=100)
    result = grow(model, train, val, F.cross_entropy, config)
    assert "validation loss did not improve" in result.report.stop_reason
    assert len(result.report.steps) < 30

    model, train, val = _setup()  # real validation labels: the same run keeps growing
    result = grow(model, train, val, F.cross_entropy, growc.GrowthConfig(final_epochs=0, epochs=0.5, steps=8))
    assert "validation loss" not in result.report.stop_reason
