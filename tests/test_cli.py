"""The `growc` command end to end: grow the example, check the report, the ONNX file, the
checkpoint, determinism, and that bad input gets one clear sentence instead of a traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import growc
import growc.api
from growc.cli import app
from growc.data import digits
from growc.userfile import load_user_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_mlp.py"
FAST = ["--steps", "2", "--final-epochs", "1", "--quiet"]

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare with whitespace collapsed."""
    return " ".join(text.split())


def assert_clean_failure(result, *phrases: str) -> str:
    """Non-zero exit, no traceback, no escaped exception, one `error:` line naming `phrases`."""
    output = flat(result.output)
    assert result.exit_code != 0, output
    assert "Traceback" not in result.output
    # CliRunner swallows an uncaught exception (and its traceback): it must not have been one.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert output.count("error:") == 1, output
    for phrase in phrases:
        assert phrase in output, output
    return output


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def val_inputs() -> torch.Tensor:
    return digits()[1].tensors[0]


# --------------------------------------------------------------------------- the full run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """`growc grow examples/digits_mlp.py --out TMP --quiet` with every default, run once; the
    in-memory result (the user's grown model) is captured by wrapping the API function."""
    out = tmp_path_factory.mktemp("digits") / "run"
    captured = {}
    real = growc.api.grow_file

    def spy(*args, **kwargs):
        captured["result"] = real(*args, **kwargs)
        return captured["result"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(growc.api, "grow_file", spy)
        result = run_cli("grow", EXAMPLE, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return out, result, captured["result"]


def test_grow_writes_the_three_files(full_run):
    out, result, _ = full_run
    for name in ("model.onnx", "model.safetensors", "report.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp*")), "a temporary file was left behind"
    assert "done" in result.output


def test_report_has_every_field(full_run):
    out, _, _ = full_run
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert len(steps) >= 2
    assert [s["step"] for s in steps] == list(range(len(steps)))
    for s in steps:
        for key in ("step", "params", "train_loss", "val_loss", "val_accuracy", "widths", "bottlenecks", "grown"):
            assert key in s, key
        assert isinstance(s["params"], int) and s["params"] > 0
        assert np.isfinite(s["train_loss"]) and np.isfinite(s["val_loss"])
        assert 0.0 <= s["val_accuracy"] <= 1.0
        assert set(s["seconds"]) == {"train", "statistics", "solve", "line_search"}
        assert all(v >= 0.0 for v in s["seconds"].values())
        for g in s["grown"]:
            assert g["site"] in s["widths"]
            assert isinstance(g["neurons"], int) and g["neurons"] >= 0
            assert np.isfinite(g["predicted_gain"]) and np.isfinite(g["gamma"])
    # every growth step (all but the final training) assesses every site
    for s in steps[:-1]:
        assert set(s["bottlenecks"]) == set(s["widths"]) >= {"fc1", "fc2"}
        for b in s["bottlenecks"].values():
            assert {"bottleneck", "relative", "significant"} <= set(b)
    assert any(g["neurons"] > 0 for s in steps for g in s["grown"])

    final = report["final"]
    assert final["initial_params"] == steps[0]["params"] == 64 * 2 + 2 + 2 * 2 + 2 + 2 * 10 + 10
    assert final["final_params"] > final["initial_params"], "the model did not grow"
    assert final["final_params"] == steps[-1]["params"]
    assert final["final_val_accuracy"] == steps[-1]["val_accuracy"]
    assert Path(final["onnx_path"]) == out / "model.onnx"
    assert 0.0 <= final["onnx_max_abs_diff"] <= 1e-4
    assert 0.0 <= final["onnx_relative_diff"] <= final["onnx_max_abs_diff"]
    assert report["stop_reason"]


def test_grown_model_reaches_95_percent(full_run):
    out, _, _ = full_run
    final = json.loads((out / "report.json").read_text())["final"]
    assert final["final_val_accuracy"] >= 0.95, final


def test_onnx_runs_at_any_batch_size_and_matches_the_checkpoint(full_run):
    out, _, _ = full_run
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert not isinstance(inp.shape[0], int), f"batch axis is fixed: {inp.shape}"
    loaded = growc.load(out / "model.safetensors")
    x = val_inputs()
    with torch.no_grad():
        expected = loaded(x).numpy()
    for batch in (1, 7, len(x)):
        (got,) = session.run(None, {inp.name: x[:batch].numpy()})
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4, rtol=0)


def test_checkpoint_equals_the_users_grown_model(full_run):
    out, _, result = full_run
    loaded = growc.load(out / "model.safetensors")
    grown = result.model.eval().cpu()  # the grown model (a GraphModule over the user's layers)
    user = result.user_model.eval().cpu()  # the user's DigitsMLP, widened in place
    assert type(user).__name__ == "DigitsMLP"
    mine, theirs = grown.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    assert loaded.fc1.out_features == user.fc1.out_features == result.report.final["widths"]["fc1"]
    assert loaded.fc2.out_features == user.fc2.out_features == result.report.final["widths"]["fc2"]
    x = val_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), grown(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(x), user(x), rtol=0, atol=1e-6)  # no depth growth by default
    # the checkpoint keeps the report
    from growc.growth.checkpoint import read_metadata

    extra = read_metadata(out / "model.safetensors")["extra"]
    assert extra["run"]["finished"] is True
    assert extra["run"]["report"]["final"]["final_params"] == result.report.final["final_params"]


def test_report_command_prints_the_run(full_run):
    out, _, _ = full_run
    result = run_cli("report", out)
    assert result.exit_code == 0, result.output
    assert "stopped:" in result.output
    result = run_cli("report", out / "report.json")
    assert result.exit_code == 0, result.output


def test_inspect_lists_the_sites():
    result = run_cli("inspect", EXAMPLE)
    assert result.exit_code == 0, result.output
    assert "fc1" in result.output and "fc2" in result.output
    assert "is a model output, whose size is fixed" in flat(result.output)
    assert "depth:fc2" in result.output  # depth edges are candidates too


def test_inspect_shows_what_a_residual_stream_ties(tmp_path):
    path = write(
        tmp_path / "res.py",
        """\
        import torch
        from torch import nn


        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Linear(64, 8)
                self.inner, self.back = nn.Linear(8, 16), nn.Linear(16, 8)
                self.out = nn.Linear(8, 10)

            def forward(self, x):
                h = torch.relu(self.stem(x))
                h = h + self.back(torch.relu(self.inner(h)))
                return self.out(h)


        model = Res
        """,
    )
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.output
    from growc.api import candidates_of
    from growc.graph.candidates import describe_ties
    from growc.userfile import load_user_file

    report = candidates_of(load_user_file(path).model)
    stream = next(s for s in report.sites if s.writers)
    assert {stream.producer, *stream.writers} == {"stem", "back"}
    assert set(stream.readers) == {"inner", "out"}
    assert stream.name in result.output and "residual" in result.output
    assert "also writing" in describe_ties(stream)


# --------------------------------------------------------------------------- determinism


def _essentials(report: dict) -> list:
    return [
        (
            s["step"],
            s["params"],
            s["widths"],
            s["train_loss"],
            s["val_loss"],
            s["val_accuracy"],
            [(g["site"], g["neurons"], g["gamma"], g["predicted_gain"]) for g in s["grown"]],
        )
        for s in report["steps"]
    ]


def test_same_seed_same_report(tmp_path):
    reports = []
    for name in ("a", "b"):
        result = run_cli("grow", EXAMPLE, "--out", tmp_path / name, *FAST, "--seed", "3")
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    assert _essentials(reports[0]) == _essentials(reports[1])
    assert reports[0]["final"]["widths"] == reports[1]["final"]["widths"]
    assert len(reports[0]["steps"]) == 3  # two growth steps and the final training


def test_zero_steps_does_not_grow(tmp_path):
    result = run_cli("grow", EXAMPLE, "--out", tmp_path, "--steps", "0", "--final-epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "report.json").read_text())["final"]
    assert final["final_params"] == final["initial_params"]


# --------------------------------------------------------------------------- bad input


def test_missing_model_file(tmp_path):
    result = run_cli("grow", tmp_path / "nope.py", "--out", tmp_path / "out", "--quiet")
    assert_clean_failure(result, "no model file at", "nope.py")
    assert not (tmp_path / "out").exists()


def test_file_without_model(tmp_path):
    path = write(tmp_path / "empty.py", "x = 1\n")
    assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", "--quiet"), "defines no `model`")


def test_model_that_raises_in_its_constructor(tmp_path):
    path = write(
        tmp_path / "raises.py",
        """\
        from torch import nn


        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                raise ValueError("no weights for you")


        model = Broken
        """,
    )
    output = assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", "--quiet"), "ValueError")
    assert "no weights for you" in output and "line 7" in output


def test_model_file_with_a_syntax_error(tmp_path):
    path = write(tmp_path / "syntax.py", "def model(:\n    pass\n")
    assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", "--quiet"), "SyntaxError", "syntax.py")


def test_model_file_that_fails_on_import(tmp_path):
    path = write(tmp_path / "imports.py", "import growc_no_such_package\nmodel = None\n")
    assert_clean_failure(
        run_cli("grow", path, "--out", tmp_path / "o", "--quiet"), "ModuleNotFoundError", "growc_no_such_package"
    )


def test_data_that_does_not_fit_the_model(tmp_path):
    path = write(
        tmp_path / "ten.py",
        """\
        from torch import nn

        model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 10))
        """,
    )
    output = assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", "--quiet"), "(64,)")
    assert "first layer" in output


def test_output_that_does_not_fit_the_targets(tmp_path):
    path = write(
        tmp_path / "five.py",
        """\
        from torch import nn

        model = nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 5))
        """,
    )
    assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", "--quiet"), "the loss cannot compare")


def test_model_that_fx_cannot_trace(tmp_path):
    path = write(
        tmp_path / "branchy.py",
        """\
        from torch import nn


        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(64, 4)
                self.out = nn.Linear(4, 10)

            def forward(self, x):
                h = self.fc1(x).relu()
                if h.sum() > 0:
                    h = h * 2
                return self.out(h)


        model = Branchy
        """,
    )
    assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", *FAST), "could not trace", "--leaf")


BRANCHY_SUBMODULE = """\
import torch
from torch import nn


class Gate(nn.Module):
    def forward(self, h):
        if h.mean() > 0:  # data-dependent: fx cannot trace this
            return h * 2
        return h


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(64, 4), Gate(), nn.Linear(4, 4)
        self.out = nn.Linear(4, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(self.gate(torch.relu(self.fc1(x))))))


model = Model
"""


def test_data_dependent_submodule_names_the_leaf_and_grows_with_it(tmp_path):
    path = tmp_path / "gated.py"
    path.write_text(BRANCHY_SUBMODULE)
    message = flat(assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", *FAST), "could not trace"))
    assert "gated.py:7" in message and "--leaf gate" in message  # the line, and the way out
    sites = {s.name for s in growc.api.candidates_of(load_user_file(path).model, leaf_modules=["gate"]).sites}
    assert sites == {"fc2"}  # fc1 feeds the opaque gate: left intact; fc2 grows around it
    # With the leaf the run traces and grows; the branch on a tensor's value cannot become an
    # ONNX graph, and the error says so after the checkpoint is safe.
    message = flat(
        assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", "--leaf", "gate", *FAST), "growth finished")
    )
    assert "data-dependent control flow" in message and "torch.where" in message
    assert json.loads((tmp_path / "o" / "report.json").read_text())["final"]["final_params"] > 0
    assert growc.load_into(load_user_file(path).model, tmp_path / "o" / "model.safetensors") is not None


def test_untraceable_submodule_as_a_leaf_grows_and_exports(tmp_path):
    """A branch fx cannot trace but export can (on the input's rank): with --leaf the whole
    run completes, ONNX included."""
    path = tmp_path / "ranked.py"
    path.write_text(
        BRANCHY_SUBMODULE.replace("if h.mean() > 0:  # data-dependent: fx cannot trace this", "if h.dim() == 2:")
    )
    assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", *FAST), "could not trace", "--leaf gate")
    result = run_cli("grow", path, "--out", tmp_path / "o", "--leaf", "gate", *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.onnx").is_file()


def test_concrete_args_must_be_name_equals_literal(tmp_path):
    result = run_cli("grow", EXAMPLE, "--out", tmp_path / "o", "--concrete", "x", *FAST)
    assert_clean_failure(result, "--concrete takes NAME=VALUE")


def test_model_with_nothing_to_grow(tmp_path):
    path = write(tmp_path / "linear.py", "from torch import nn\n\nmodel = nn.Linear(64, 10)\n")
    assert_clean_failure(run_cli("grow", path, "--out", tmp_path / "o", *FAST), "no growth site")


def test_unknown_data_set(tmp_path):
    result = run_cli("grow", EXAMPLE, "--data", "foo", "--out", tmp_path / "o", "--quiet")
    assert_clean_failure(result, "unknown data set 'foo'", "digits")


def test_mnist_without_a_path(tmp_path):
    result = run_cli("grow", EXAMPLE, "--data", "mnist", "--out", tmp_path / "o", "--quiet")
    assert_clean_failure(result, "mnist:PATH")


def test_mnist_with_a_missing_file(tmp_path):
    missing = tmp_path / "mnist.npz"
    result = run_cli("grow", EXAMPLE, "--data", f"mnist:{missing}", "--out", tmp_path / "o", "--quiet")
    assert_clean_failure(result, "no mnist file")


@pytest.mark.parametrize(
    "option, phrase",
    [
        (["--optimizer", "adamw"], "unknown optimizer 'adamw'"),
        (["--strategy", "magic"], "unknown strategy 'magic'"),
        (["--device", "toaster"], "unknown device 'toaster'"),
    ],
)
def test_unknown_setting(tmp_path, option, phrase):
    result = run_cli("grow", EXAMPLE, *option, "--out", tmp_path / "o", "--quiet")
    assert_clean_failure(result, phrase)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path):
    result = run_cli("grow", EXAMPLE, "--device", "cuda", "--out", tmp_path / "o", "--quiet")
    assert_clean_failure(result, "--device cpu")


def test_opset_the_exporter_cannot_write(tmp_path):
    """The exporter silently fell back to opset 18 while the report said 3."""
    result = run_cli("grow", EXAMPLE, "--opset", "3", "--out", tmp_path, "--steps", "1", "--final-epochs", "0")
    assert_clean_failure(result, "opset 3")
    assert not (tmp_path / "model.onnx").exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_of_a_folder_without_report(tmp_path):
    assert_clean_failure(run_cli("report", tmp_path), "no report.json", "--out")


def test_report_of_a_damaged_report(tmp_path):
    (tmp_path / "report.json").write_text('{"steps": [')
    assert_clean_failure(run_cli("report", tmp_path), "not valid JSON")


@pytest.mark.parametrize(
    "name, source, phrase",
    [("missing.py", None, "no model file at"), ("syntax.py", "model = (\n", "SyntaxError")],
)
def test_the_real_command_fails_cleanly(tmp_path, name, source, phrase):
    """Through `python -m growc`, i.e. growc.cli.main, not only the typer app."""
    path = tmp_path / name
    if source is not None:
        path.write_text(source)
    proc = subprocess.run(
        [sys.executable, "-m", "growc", "grow", str(path), "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert phrase in flat(proc.stderr)
    assert flat(proc.stderr).count("error:") == 1


def test_inspect_an_onnx_file_shows_its_io_and_latency(tmp_path):
    from growc.deploy.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(64, 5), torch.nn.ReLU(), torch.nn.Linear(5, 10))
    export_onnx(model, [torch.randn(4, 64)], tmp_path / "m.onnx")
    result = run_cli("inspect", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "['batch', 64]" in text and "['batch', 10]" in text and "Gemm x2" in text
    assert "onnxruntime (now)" in text
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert_clean_failure(run_cli("inspect", tmp_path / "bad.onnx"), "is not a valid ONNX model")


# --------------------------------------------------------------------------- a fresh machine (issue 12)

ONE_STEP = ["--steps", "1", "--final-epochs", "0", "--quiet"]
READ_ONLY = Path("/proc/self/growc-out")  # not writable, even by root
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


def test_out_naming_an_existing_file(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    assert_clean_failure(run_cli("grow", EXAMPLE, "--out", taken, *ONE_STEP), "is a file, not a folder")
    assert taken.read_text() == "keep me"


@needs_proc
def test_out_that_cannot_be_written_fails_before_training():
    result = run_cli("grow", EXAMPLE, "--out", READ_ONLY / "run", "--steps", "1", "--final-epochs", "0")
    assert_clean_failure(result, "cannot be written", "choose a folder you can write to")
    assert "growth sites" not in result.output and "step 0" not in result.output, "it trained first"


@needs_proc
def test_export_out_that_cannot_be_written(full_run):
    out, _, _ = full_run
    result = run_cli("export", out / "model.safetensors", "--out", READ_ONLY / "deploy")
    assert_clean_failure(result, "--out", "cannot be written")


def test_max_params_below_the_starting_size(tmp_path):
    out = tmp_path / "out"
    result = run_cli("grow", EXAMPLE, "--out", out, "--max-params", "100", *ONE_STEP)
    assert_clean_failure(result, "--max-params 100 is below the model's starting size (166 parameters)")
    assert not out.exists()


def test_more_outputs_than_classes_is_warned_once(tmp_path):
    path = write(
        tmp_path / "wide_head.py",
        """\
        from torch import nn

        model = nn.Sequential(nn.Linear(64, 3), nn.ReLU(), nn.Linear(3, 12))
        """,
    )
    result = run_cli("grow", path, "--out", tmp_path / "out", "--steps", "0", "--final-epochs", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert flat(result.output).count("the model has 12 outputs but the data has 10 classes") == 1, result.output
    # a head that fits the data: no warning
    fits = run_cli("grow", EXAMPLE, "--out", tmp_path / "fits", "--steps", "0", "--final-epochs", "0", "--quiet")
    assert fits.exit_code == 0 and "warning" not in fits.output


def test_export_of_an_onnx_file_says_what_to_give(full_run):
    out, _, _ = full_run
    result = run_cli("export", out / "model.onnx", "--out", out / "never")
    assert_clean_failure(result, "is an ONNX file, not a growc checkpoint", "model.safetensors", "growc inspect")
    assert not (out / "never").exists()


def test_export_uses_the_data_the_run_was_grown_on(tmp_path):
    """A run on 20-feature data from the model file's data(): export without --data uses it
    (the default digits would not fit the model)."""
    path = write(
        tmp_path / "twenty.py",
        """\
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        model = nn.Sequential(nn.Linear(20, 3), nn.ReLU(), nn.Linear(3, 4))


        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(200, 20, generator=g)
            y = (x[:, :4].argmax(1)).long()
            return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])
        """,
    )
    out = tmp_path / "out"
    assert run_cli("grow", path, "--out", out, *ONE_STEP).exit_code == 0
    result = run_cli("export", out / "model.safetensors", "--out", tmp_path / "deploy")
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "deploy" / "model.card.json").read_text())
    assert card["data"] == str(path)
    assert card["accuracy"] is not None
    # --data still wins: digits does not fit, and says so
    wrong = run_cli("export", out / "model.safetensors", "--out", tmp_path / "d2", "--data", "digits")
    assert_clean_failure(wrong, "does not accept --data digits")


INTERRUPTING = """\
import torch
from torch import nn
from torch.utils.data import Dataset

model = nn.Sequential(nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 10))


class Interrupting(Dataset):
    \"\"\"Ctrl-C arrives while the first epoch reads its samples.\"\"\"

    def __init__(self, n, stop_after=None):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
        self.reads, self.stop_after = 0, stop_after

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        if self.stop_after is not None and self.reads > self.stop_after:
            raise KeyboardInterrupt
        return self.x[i], self.y[i]


def data():
    return Interrupting(512, stop_after=STOP), Interrupting(64)
"""


def test_ctrl_c_before_the_first_step_says_nothing_was_kept(tmp_path):
    path = write(
        tmp_path / "stops.py", "STOP = 700\n" + INTERRUPTING
    )  # after the checks (576 reads), in step 0's epoch
    out = tmp_path / "out"
    result = run_cli("grow", path, "--out", out, *ONE_STEP)
    output = assert_clean_failure(result, "before the first growth step completed", "nothing was kept")
    assert result.exit_code == 130
    assert "--resume" not in output
    assert not (out / "model.safetensors").exists()


def test_ctrl_c_after_a_step_names_its_checkpoint(tmp_path):
    path = write(tmp_path / "stops.py", "STOP = 1300\n" + INTERRUPTING)  # in the epoch of step 1
    out = tmp_path / "out"
    result = run_cli("grow", path, "--out", out, "--steps", "3", "--final-epochs", "0", "--quiet")
    assert_clean_failure(result, "the last completed step's checkpoint is", "--resume")
    assert (out / "model.safetensors").is_file()


def test_default_out_is_ignored_by_git(tmp_path, monkeypatch):
    """The README's first command must not dirty a clone: the default --out is git-ignored."""
    monkeypatch.chdir(tmp_path)
    result = run_cli("grow", EXAMPLE, "--steps", "0", "--final-epochs", "0", "--quiet")
    assert result.exit_code == 0, result.output
    written = Path("runs") / "digits_mlp" / "model.onnx"
    assert (tmp_path / written).is_file()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("git or the repository is not available")
    check = subprocess.run(["git", "check-ignore", "-q", str(written)], cwd=ROOT, capture_output=True)
    assert check.returncode == 0, f"{written} is not ignored by .gitignore"


LONG_SITE_NAMES = """\
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a_rather_long_feature_extractor_name = nn.Linear(8, 2)
        self.classifier_head = nn.Linear(2, 3)

    def forward(self, x):
        return self.classifier_head(torch.relu(self.a_rather_long_feature_extractor_name(x)))


model = Net


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :3].argmax(1)
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])
"""


def test_piped_output_at_80_columns_is_whole(tmp_path):
    """Piped (not a terminal) at 80 columns: no progress bars' blank lines, no number cut to '…'
    (a long site name folds instead)."""
    path = write(tmp_path / "long_names.py", LONG_SITE_NAMES)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "growc",
            "grow",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "1",
            "--final-epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "step 0" in text and "bottleneck" in text and "step 1" in text
    assert "…" not in text, text
    assert "\n\n\n" not in text, text  # no run of blank lines
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_step_table_keeps_every_number_whole(full_run, columns):
    """The real run's first step at several terminal widths: each number shown whole (columns
    are dropped on a narrow terminal, never digits)."""
    from rich.console import Console

    from growc.cli import _step_rows, step_table

    record = full_run[2].report.steps[0]
    console = Console(width=columns, record=True, file=io.StringIO())
    console.print(step_table(record, columns))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= columns
    cells = text.split()
    for row in _step_rows(record):
        for number in row[1:3] + row[5:]:  # width, bottleneck, added, gamma, gains: never dropped
            assert number in cells, (number, text)
