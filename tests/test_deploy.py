"""The deploy layer: freezing keeps the outputs, the standalone file needs no growc, ONNX and int8
files are checked against torch and the validation data, and `growc export` fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import growc
from growc.cli import app
from growc.data import digits
from growc.deploy.export import export_onnx
from growc.deploy.freeze import freeze, write_standalone
from growc.deploy.pipeline import export_checkpoint
from growc.deploy.quantize import QuantizationError, accuracy, float_layers, quantize, run_onnx, weight_bits

runner = CliRunner()
HIDDEN = 384  # MLP 64-HIDDEN-HIDDEN-10: enough weights for int8 to pay for its scales


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run far faster without intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(torch.flatten(x, 1))


def mlp_with_dead_neurons() -> nn.Module:
    seeded()
    model = nn.Sequential(
        nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10)
    )
    randomize_batchnorm(model)
    with torch.no_grad():
        model[3].weight[:, [2, 7, 9]] = 0.0  # hidden units 2, 7, 9 of the first site are dead
        model[5].weight[:, 4] = 0.0
    return model.eval()


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def test_freeze_drops_dead_neurons_and_folds_batchnorm1d():
    model = mlp_with_dead_neurons()
    x = torch.rand(50, 64)
    before = [p.clone() for p in model.parameters()]
    frozen = freeze(model, example_inputs=[x])
    assert max_diff(model, frozen, x) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm1d) for m in frozen.modules())
    widths = [m.out_features for m in frozen.modules() if isinstance(m, nn.Linear)]
    assert widths == [13, 11, 10]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the input is untouched
    assert isinstance(model[1], nn.BatchNorm1d)


def test_freeze_works_on_a_loaded_checkpoint(tmp_path: Path):
    model = mlp_with_dead_neurons()
    path = growc.save_checkpoint(tmp_path / "ck.safetensors", growc.trace(model))
    loaded = growc.load(path)
    x = torch.rand(20, 64)
    frozen = freeze(loaded)  # no example inputs: (batch, features) is assumed for BatchNorm1d
    assert max_diff(model, frozen, x) < 1e-5
    assert sum(p.numel() for p in frozen.parameters()) < sum(p.numel() for p in model.parameters())


def test_freeze_folds_batchnorm2d_into_conv_and_drops_dead_channels():
    seeded()
    model = ConvNet()
    randomize_batchnorm(model)
    with torch.no_grad():
        model.head[0].weight[:, 2 * 16 : 3 * 16] = 0.0  # channel 2 (16 pooled positions) is read by no one
    model.eval()
    x = torch.rand(30, 64)
    frozen = freeze(model)
    assert max_diff(model, frozen, x) < 1e-5
    kinds = {type(m) for m in frozen.modules()}
    assert nn.BatchNorm2d not in kinds and nn.Dropout not in kinds
    conv = frozen.get_submodule("conv")
    assert conv.bias is not None and conv.out_channels == 5
    assert frozen.get_submodule("head.0").in_features == 5 * 16


def test_freeze_drops_dead_channels_between_convs():
    seeded()
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 10),
    ).eval()
    with torch.no_grad():
        model[3].weight[:, 1] = 0.0
    x = torch.rand(10, 64)
    frozen = freeze(model)
    assert max_diff(model, frozen, x) < 1e-5
    assert frozen.get_submodule("1").out_channels == 3 and frozen.get_submodule("3").in_channels == 3


def test_batchnorm1d_over_a_sequence_axis_is_not_folded():
    """Linear on (N, L, F) then BatchNorm1d(L): the BN normalizes L, not the Linear's features."""
    seeded()
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    randomize_batchnorm(model)
    model.eval()
    x = torch.rand(8, 6, 5)
    frozen = freeze(model, example_inputs=[x])
    assert any(isinstance(m, nn.BatchNorm1d) for m in frozen.modules())
    assert max_diff(model, frozen, x) < 1e-5


def test_standalone_file_runs_without_growc(tmp_path: Path):
    seeded()
    model = ConvNet()
    randomize_batchnorm(model)
    model.eval()
    x = torch.rand(7, 64)
    frozen = freeze(model)
    folder = tmp_path / "standalone"
    write_standalone(frozen, folder, example_inputs=[x])
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, str(tmp_path / "reference.safetensors"))
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.modules["growc"] = None  # any `import growc` in the generated file fails
        import torch
        from safetensors.torch import load_file
        ns = runpy.run_path({str(folder / "model.py")!r})
        model = ns["load_model"]()
        ref = load_file({str(tmp_path / "reference.safetensors")!r})
        with torch.no_grad():
            diff = (model(ref["x"]) - ref["y"]).abs().max().item()
        assert diff < 1e-5, diff
        print("ok", diff)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
    source = (folder / "model.py").read_text()
    assert "import growc" not in source and "from growc" not in source


def test_onnx_of_frozen_model_matches_torch(tmp_path: Path):
    model = mlp_with_dead_neurons()
    x = torch.rand(40, 64)
    frozen = freeze(model, example_inputs=[x])
    result = export_onnx(frozen, [x], tmp_path / "m.onnx")
    got = run_onnx(result.path, [x])
    with torch.no_grad():
        assert float(abs(got - model(x).numpy()).max()) <= 1e-5


def train_on_digits(model: nn.Module) -> nn.Module:
    """Three epochs of Adam on the digits' training split (flat 64-value inputs)."""
    train, _ = digits()
    x, y = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_digits_mlp() -> nn.Module:
    seeded()
    return train_on_digits(
        nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
    )


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    report = {
        "config": {"strategy": "tiny"},
        "steps": [{"step": 0, "params": 1000, "widths": {"0": 8, "2": 8}, "grown": [{"site": "0", "neurons": 248}]}],
        "final": {"initial_params": 1000, "final_params": 85002, "widths": {"0": 256, "2": 256}},
        "stop_reason": "max steps",
    }
    return growc.save_checkpoint(folder / "model.safetensors", growc.trace(train_digits_mlp()), {"report": report})


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_is_small_and_accurate(digits_checkpoint: Path, tmp_path: Path, mode: str):
    result = export_checkpoint(digits_checkpoint, out=tmp_path, int8=mode, latency_repeats=10)
    q = result.int8
    assert q is not None and q.path.is_file()
    print(
        f"{mode}: {q.fp32_bytes} -> {q.int8_bytes} bytes ({q.size_ratio:.2f}x), acc {q.fp32_accuracy:.4f} -> {q.int8_accuracy:.4f}"
    )
    assert q.size_ratio >= 3.5, (q.fp32_bytes, q.int8_bytes)
    assert result.fp32_accuracy > 0.9
    assert (q.fp32_accuracy - q.int8_accuracy) * 100 <= 0.5
    # 7-bit weights: on x86 CPUs without VNNI onnxruntime's uint8 x int8 kernels sum pairs of
    # products in 16 bits, and 255 * 127 * 2 saturates (this model then lost 1.11 points in both
    # modes under an emulated Haswell CPU); 255 * 64 * 2 does not.
    assert q.weight_bits == 7
    x = digits()[1].tensors[0]
    fp32_out, int8_out = run_onnx(tmp_path / "model.onnx", [x]), run_onnx(q.path, [x])
    # Scores within 1.5% of their range (int8 logits, quantized at the output, are 3.5% off).
    assert np.abs(int8_out - fp32_out).max() <= 0.015 * np.abs(fp32_out).max()
    assert [r.batch for r in result.latency] == [1, 32] and all(r.onnxruntime_ms > 0 for r in result.latency)
    card = json.loads((tmp_path / "model.int8.card.json").read_text())
    assert card["inputs"] == [{"name": "input", "shape": ["batch", 64], "dtype": "float32"}]
    assert card["outputs"][0]["shape"] == ["batch", 10]
    macs = 64 * HIDDEN + HIDDEN * HIDDEN + HIDDEN * 10
    assert card["parameters"] == macs + 2 * HIDDEN + 10
    assert card["multiply_adds_per_sample"] == macs
    assert card["file_bytes"] == q.int8_bytes and card["opset"] == 18
    assert card["float_layers"] == q.float_layers == []  # every layer int8, and the card says so
    assert card["weight_bits"] == 7
    assert card["growc_version"] == growc.__version__
    assert card["growth"]["neurons_added"] == {"0": 248} and card["growth"]["final_params"] == 85002
    assert "divided by 16" in card["preprocessing"]
    fp32_card = json.loads((tmp_path / "model.card.json").read_text())
    assert "float_layers" not in fp32_card
    assert fp32_card["accuracy"] == pytest.approx(result.fp32_accuracy)
    slim = fp32_card["onnxslim"]  # tried (the frozen MLP has nothing to fold): its outcome is on the card
    assert slim["bytes_after"] == fp32_card["file_bytes"] == q.fp32_bytes and slim["reason"]
    assert (tmp_path / "standalone" / "model.py").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def mlp_with_huge_weights_on_a_zero_input(layer: int) -> nn.Module:
    """The digits MLP with weights of 1e4 on an input of `layer` that is 0 for every sample: fp32
    is unchanged, but each output channel's int8 scale is set by the 1e4 and rounds the rest to 0."""
    model = train_digits_mlp()
    with torch.no_grad():
        if layer > 0:  # hidden unit 0 is dead, so it is the zero input of the next layer
            model[layer - 2].weight[0] = 0.0
            model[layer - 2].bias[0] = -1.0
        model[layer].weight[:, 0] = 1e4  # for layer 0: the top-left pixel, 0 in every digit
    return model


def test_int8_beyond_tolerance_keeps_the_previous_file(tmp_path: Path):
    """The broken layer is the middle one: keeping the first and last in float cannot help."""
    model = mlp_with_huge_weights_on_a_zero_input(2)
    _, val = digits()
    x, y = val.tensors
    fp32 = export_onnx(model, [x], tmp_path / "m.onnx").path
    int8 = tmp_path / "m.int8.onnx"
    int8.write_bytes(b"previous int8 file")
    with pytest.raises(QuantizationError, match="points below fp32 .* first and last layers in float"):
        quantize(fp32, int8, "dynamic", [x], y, tolerance=0.5)
    assert int8.read_bytes() == b"previous int8 file"
    assert accuracy(run_onnx(fp32, [x]), y) > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_keeps_the_first_layer_in_float_when_that_is_what_it_takes(tmp_path: Path, mode: str):
    model = mlp_with_huge_weights_on_a_zero_input(0)
    train, val = digits()
    x, y = val.tensors
    assert float(train.tensors[0][:, 0].abs().max()) == 0 == float(x[:, 0].abs().max())
    fp32 = export_onnx(model, [x], tmp_path / "m.onnx").path
    q = quantize(fp32, tmp_path / "m.int8.onnx", mode, [x], y, [train.tensors[0]], tolerance=0.5)
    print(f"{mode}: kept {q.float_layers}, {q.size_ratio:.2f}x, acc {q.fp32_accuracy:.4f} -> {q.int8_accuracy:.4f}")
    assert q.float_layers == [f"{'Gemm' if mode == 'static' else 'MatMul'} 1 of 3"]
    assert float_layers(q.path) == q.float_layers
    assert (q.fp32_accuracy - q.int8_accuracy) * 100 <= 0.5 and q.fp32_accuracy > 0.9
    assert q.size_ratio > 2.5  # the other two layers are int8


def flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_export(digits_checkpoint: Path, tmp_path: Path):
    result = runner.invoke(app, ["export", str(digits_checkpoint), "--out", str(tmp_path), "--int8", "dynamic"])
    assert result.exit_code == 0, result.output
    assert "latency" in result.output and "smaller" in flat(result.output)
    for name in ("model.onnx", "model.card.json", "model.int8.onnx", "model.int8.card.json"):
        assert (tmp_path / name).is_file(), name


def rewrite_checkpoint(src: Path, dst: Path, architecture: str | None = None, tensors: dict | None = None) -> None:
    """A copy of a growc checkpoint with its architecture JSON or some tensors replaced."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if architecture is not None:
        metadata["architecture"] = architecture
    save_file({**stored, **(tensors or {})}, str(dst), metadata=metadata)


def layer_norm_checkpoint(folder: Path) -> Path:
    """LayerNormalization entered ONNX at opset 17."""
    seeded()
    model = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    return growc.save_checkpoint(folder / "layer_norm.safetensors", growc.trace(model))


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing", "no checkpoint"),
        ("text", "not a readable safetensors file"),
        ("plain_safetensors", "not a growc checkpoint"),
        ("truncated", "safetensors"),
        ("damaged_metadata", "metadata of"),
        ("unknown_architecture", "cannot be rebuilt"),
        ("wrong_shapes", "do not fit its architecture"),
        ("opset", "opset 6"),
        ("op_needs_newer_opset", "opset 16 cannot express LayerNormalization (opset 17+)"),
        ("int8_mode", "unknown --int8 mode"),
    ],
)
def test_cli_export_bad_input(digits_checkpoint: Path, tmp_path: Path, case: str, phrase: str):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"earlier {name}".encode() for name in ("model.onnx", "model.card.json", "model.int8.onnx")}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    path, args = tmp_path / "input.safetensors", []
    if case == "missing":
        path = tmp_path / "nothing.safetensors"
    elif case == "text":
        path.write_text("not a checkpoint")
    elif case == "plain_safetensors":
        save_file({"w": torch.zeros(2)}, str(path))
    elif case == "truncated":
        path.write_bytes(digits_checkpoint.read_bytes()[:-1000])
    elif case == "damaged_metadata":
        with safe_open(str(digits_checkpoint), framework="pt") as f:
            rewrite_checkpoint(digits_checkpoint, path, architecture=f.metadata()["architecture"][:-10])
    elif case == "unknown_architecture":
        rewrite_checkpoint(digits_checkpoint, path, architecture=json.dumps({"nodes": 5}))
    elif case == "wrong_shapes":
        rewrite_checkpoint(digits_checkpoint, path, tensors={"0.weight": torch.zeros(3, 3)})
    elif case == "op_needs_newer_opset":
        path, args = layer_norm_checkpoint(tmp_path), ["--opset", "16"]
    else:
        path = digits_checkpoint
        args = ["--opset", "6"] if case == "opset" else ["--int8", "int4"]
    result = runner.invoke(app, ["export", str(path), "--out", str(out), *args])
    output = flat(result.output)
    assert result.exit_code != 0, output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert output.count("error:") == 1 and phrase in output, output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # nothing added, nothing changed


def test_int8_calibration_samples_span_a_label_sorted_training_set():
    """Data files are often sorted by label: calibration must not see one class only."""
    from torch.utils.data import TensorDataset

    from growc.deploy.pipeline import CALIBRATION_SAMPLES, _take

    labels = torch.arange(10).repeat_interleave(200)  # 2,000 samples, sorted by label
    data = TensorDataset(torch.randn(2000, 4), labels)
    _, first = _take(data, CALIBRATION_SAMPLES)
    _, spread = _take(data, CALIBRATION_SAMPLES, spread=True)
    assert set(first.tolist()) == {0, 1, 2}
    assert set(spread.tolist()) == set(range(10)) and len(spread) == CALIBRATION_SAMPLES


@pytest.mark.parametrize("bits", [7, 8])
def test_weight_bits_reads_what_the_quantizer_wrote(digits_checkpoint: Path, tmp_path: Path, bits: int, monkeypatch):
    """7-bit weights lie in [-64, 64] (255 * 64 * 2 fits the 16-bit pair sums of CPUs without
    VNNI); 8-bit ones use the whole int8 range."""
    import onnx
    from onnx import numpy_helper

    import growc.deploy.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "WEIGHT_BITS", (bits,))
    result = export_checkpoint(digits_checkpoint, out=tmp_path, int8="static", latency_repeats=1, standalone=False)
    model = onnx.load(str(result.int8.path))
    largest = max(
        int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and int(np.prod(t.dims)) > 1
    )
    assert (largest <= 64) == (bits == 7) and largest >= 63
    assert weight_bits(result.int8.path) == result.int8.weight_bits == bits


def test_standalone_file_of_a_forward_that_reads_shapes(tmp_path: Path):
    """`b, t, _ = x.shape` (attention heads) is `getattr(x, "shape")` in the traced graph: the
    standalone file imports that builtin like torch's functions, and computes the same."""
    import runpy

    sys.path.insert(0, str(Path(__file__).parent))
    from zoo import PreNormTransformer, inputs_for

    seeded()
    model = PreNormTransformer().eval()
    x = inputs_for(model)[0]
    folder = tmp_path / "standalone"
    write_standalone(freeze(model), folder, example_inputs=[x])
    source = (folder / "model.py").read_text()
    assert "import growc" not in source and "from growc" not in source and "from builtins import getattr" in source
    loaded = runpy.run_path(str(folder / "model.py"))["load_model"]()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
