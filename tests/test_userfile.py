"""The model-file contract: `model` (instance, class or function), optional `data()` and `loss`,
and the default loss; each checked through the loader and through `growc grow`."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import growc
from growc.cli import app
from growc.errors import GrowcError
from growc.userfile import beside_script, default_loss, load_user_file

FAST = ["--steps", "2", "--final-epochs", "1", "--quiet"]

runner = CliRunner()

NET = """\
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 3)
        self.out = nn.Linear(3, 10)

    def forward(self, x):
        return self.out(self.fc1(x).relu())


"""

# A two-input classifier whose `data()` returns DataLoaders of (x, z, target).
TWO_INPUTS = """\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(2, 3)

    def forward(self, x, z):
        return self.b(torch.relu(self.a(x + z)))


model = Two()


def data():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    s = x + z
    y = (s.sum(1) > 0).long() + (s[:, 0] > 1).long()
    train = TensorDataset(x[:240], z[:240], y[:240])
    val = TensorDataset(x[240:], z[240:], y[240:])
    return DataLoader(train, batch_size=32, shuffle=True, generator=g), DataLoader(val, batch_size=100)
"""

# Regression: float targets of shape (N,) against an output of shape (N, 1), default loss.
REGRESSION = """\
import torch
from torch import nn
from torch.utils.data import TensorDataset


def model():
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]
    return TensorDataset(x[:400], y[:400]), TensorDataset(x[400:], y[400:])
"""


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def grow_cli(path: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["grow", str(path), "--out", str(out), *FAST, *extra])
    assert "Traceback" not in result.output
    return result


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize(
    "tail",
    ["model = Net()\n", "model = Net\n", "def model():\n    return Net()\n"],
    ids=["instance", "class", "function"],
)
def test_model_as_instance_class_or_function(tmp_path, tail):
    user = load_user_file(write(tmp_path, "m.py", NET + tail))
    assert isinstance(user.model, nn.Module) and type(user.model).__name__ == "Net"
    assert user.data is None and user.loss is default_loss
    assert user.model(torch.zeros(2, 64)).shape == (2, 10)


def test_model_function_runs_end_to_end(tmp_path):
    path = write(tmp_path, "m.py", NET + "def model():\n    return Net()\n")
    result = grow_cli(path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = report_of(tmp_path / "out")
    assert report["final"]["data"] == "digits"
    assert set(report["final"]["widths"]) == {"fc1"}


def test_model_instance_is_the_one_grown(tmp_path):
    """`model = Net()`: growc grows that very object (the Python API returns it)."""
    path = write(tmp_path, "m.py", NET + "model = Net()\n")
    result = growc.grow_file(path, out=tmp_path / "out", steps=1, final_epochs=0)
    user_module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(path))
    assert result.user_model is user_module.model


@pytest.mark.parametrize(
    "source, phrase",
    [
        ("model = 3\n", "`model` in"),
        ("def model():\n    return 'not a net'\n", "returned a str"),
        ("model = None\n", "`model` in"),
    ],
)
def test_model_that_is_not_a_module(tmp_path, source, phrase):
    with pytest.raises(GrowcError, match=phrase):
        load_user_file(write(tmp_path, "m.py", source))


def test_model_file_that_is_not_python(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("model = 1\n")
    with pytest.raises(GrowcError, match="model.txt"):
        load_user_file(path)


# --------------------------------------------------------------------------- modules beside the file

# Names unique to this test file: Python keeps an imported module in sys.modules.
SIBLINGS = ("_growc_test_sibling_width", "_growc_test_sibling_data")

MODEL_WITH_SIBLINGS = """\
from torch import nn

from _growc_test_sibling_width import WIDTH


model = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def data():
    from _growc_test_sibling_data import load  # imported lazily, while the run calls data()

    return load()
"""

SIBLING_DATA = """\
import torch
from torch.utils.data import TensorDataset


def load():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(160, 64, generator=g), torch.randint(0, 10, (160,), generator=g)
    return TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:])
"""


@pytest.fixture
def model_with_siblings(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "_growc_test_sibling_width.py").write_text("WIDTH = 3\n")
    (folder / "_growc_test_sibling_data.py").write_text(SIBLING_DATA)
    path = write(folder, "model.py", MODEL_WITH_SIBLINGS)
    yield path
    for name in SIBLINGS:
        sys.modules.pop(name, None)


def test_model_file_imports_modules_beside_it(model_with_siblings, tmp_path):
    """As under `python model.py`: a top-level import and one inside data(), through grow,
    inspect and export (whose data() is the model file's, as the checkpoint records)."""
    path_before = list(sys.path)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["grow", str(model_with_siblings), "--out", str(out), "--steps", "1", "--final-epochs", "0", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert sys.modules["_growc_test_sibling_data"].__file__ == str(
        model_with_siblings.parent / "_growc_test_sibling_data.py"
    )
    assert sys.path == path_before, "the model file's folder stays on sys.path after the run"

    inspected = runner.invoke(app, ["inspect", str(model_with_siblings)])
    assert inspected.exit_code == 0, inspected.output

    for name in SIBLINGS:  # export imports them afresh, as a new process would
        sys.modules.pop(name, None)
    exported = runner.invoke(app, ["export", str(out / "model.safetensors"), "--out", str(tmp_path / "deploy")])
    assert exported.exit_code == 0, exported.output
    card = json.loads((tmp_path / "deploy" / "model.card.json").read_text())
    assert card["data"] == str(model_with_siblings)
    assert sys.path == path_before


def test_without_its_folder_the_sibling_is_not_found(model_with_siblings):
    """The same file loaded outside growc's span fails: the test above is not passing by accident."""
    sys.path_importer_cache.clear()
    with pytest.raises(ModuleNotFoundError):
        __import__("_growc_test_sibling_data")
    with beside_script(model_with_siblings):
        assert __import__("_growc_test_sibling_data").load


def test_beside_script_nests_and_restores_sys_path_on_error(tmp_path):
    folder = str(tmp_path.resolve())
    before = list(sys.path)
    with pytest.raises(RuntimeError), beside_script(tmp_path / "model.py"):
        assert sys.path[0] == folder
        with beside_script(tmp_path / "other.py"):
            assert sys.path.count(folder) == 1
        assert sys.path[0] == folder, "the inner span does not take the folder away from the outer one"
        raise RuntimeError("the run failed")
    assert sys.path == before


# --------------------------------------------------------------------------- data


def test_data_datasets_are_used_instead_of_data_option(tmp_path):
    """Datasets from `data()`: `--data foo` would fail if it were looked at."""
    path = write(tmp_path, "reg.py", REGRESSION)
    result = grow_cli(path, tmp_path / "out", "--data", "foo")
    assert result.exit_code == 0, result.output
    assert report_of(tmp_path / "out")["final"]["data"] == "model file"


def test_data_dataloaders_with_two_inputs(tmp_path):
    path = write(tmp_path, "two.py", TWO_INPUTS)
    out = tmp_path / "out"
    result = grow_cli(path, out, "--data", "foo")
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert report["final"]["data"] == "model file"
    assert report["final"]["onnx_max_abs_diff"] <= 1e-4
    assert report["steps"][-1]["val_accuracy"] is not None
    # the ONNX file takes both inputs, at any batch size, and agrees with the checkpoint
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1"]
    loaded = growc.load(out / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for batch in (1, 7):
        x, z = torch.randn(batch, 4, generator=g), torch.randn(batch, 4, generator=g)
        (got,) = session.run(None, {"input_0": x.numpy(), "input_1": z.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, loaded(x, z).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "data_source, phrase",
    [
        ("data = 5\n", "`data` in"),
        ("def data():\n    raise OSError('disk on fire')\n", "OSError: disk on fire"),
        ("def data():\n    return 1\n", "must return (train, val)"),
        (
            "import torch\nfrom torch.utils.data import TensorDataset\n\n\n"
            "def data():\n    d = TensorDataset(torch.zeros(8, 64))\n    return d, d\n",
            "(*inputs, target)",
        ),
        (
            "import torch\nfrom torch.utils.data import TensorDataset\n\n\n"
            "def data():\n    d = TensorDataset(torch.zeros(0, 64), torch.zeros(0).long())\n    return d, d\n",
            "empty",
        ),
        ("def data():\n    return 3, 4\n", "Dataset or a DataLoader"),
        ("def data():\n    return 'train', 'val'\n", "returned a str as its train part: it must return (train, val)"),
    ],
    ids=["not-callable", "raises", "not-a-pair", "no-target", "empty", "not-datasets", "strings"],
)
def test_bad_data_function(tmp_path, data_source, phrase):
    path = write(tmp_path, "m.py", NET + "model = Net\n\n\n" + data_source)
    result = grow_cli(path, tmp_path / "out")
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    output = " ".join(result.output.split())
    assert output.startswith("error:") and phrase in output, output


# --------------------------------------------------------------------------- loss


def test_custom_loss_is_used(tmp_path):
    """A loss 100 above cross-entropy: the report's losses show which one ran."""
    path = write(
        tmp_path,
        "m.py",
        NET
        + "model = Net\n\n\ndef loss(output, target):\n    return nn.functional.cross_entropy(output, target) + 100.0\n",
    )
    assert load_user_file(path).loss is not default_loss
    result = grow_cli(path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    steps = report_of(tmp_path / "out")["steps"]
    assert all(100.0 < s["train_loss"] < 110.0 and 100.0 < s["val_loss"] < 110.0 for s in steps)
    assert steps[-1]["val_accuracy"] is not None


def test_loss_that_is_not_callable(tmp_path):
    with pytest.raises(GrowcError, match="`loss`"):
        load_user_file(write(tmp_path, "m.py", NET + "model = Net\nloss = 'mse'\n"))


def test_default_loss_is_cross_entropy_for_integer_targets():
    torch.manual_seed(0)
    output, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(default_loss(output, target), F.cross_entropy(output, target))


@pytest.mark.parametrize("target_shape", [(6, 1), (6,)])
def test_default_loss_is_mse_for_float_targets(target_shape):
    torch.manual_seed(0)
    output, target = torch.randn(6, 1), torch.randn(target_shape)
    torch.testing.assert_close(default_loss(output, target), F.mse_loss(output, target.reshape(6, 1)))


def test_regression_runs_to_completion(tmp_path):
    out = tmp_path / "out"
    result = grow_cli(write(tmp_path, "reg.py", REGRESSION), out)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert all(s["val_accuracy"] is None for s in report["steps"])
    assert report["final"]["final_val_accuracy"] is None
    assert np.isfinite(report["final"]["final_val_loss"])
    assert report["final"]["onnx_max_abs_diff"] <= 1e-4
    for name in ("model.onnx", "model.safetensors"):
        assert (out / name).is_file()
    # the summary line of a regression run, too, is printed without failing
    assert "done" in result.output


def test_empty_validation_data(tmp_path):
    source = (
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\n\n\n"
        "def data():\n"
        "    train = TensorDataset(torch.rand(64, 64), torch.randint(0, 10, (64,)))\n"
        "    return train, DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0).long()))\n"
    )
    result = grow_cli(write(tmp_path, "m.py", NET + "model = Net\n\n\n" + source), tmp_path / "out")
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "is empty" in result.output
