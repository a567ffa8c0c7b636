"""What makes the deployed files small: `compact` (names, metadata, zero bias zero-points) leaves
the computation and onnxruntime's int8 kernels intact, a realistic CNN's int8 files are 3.5x
smaller than fp32, and onnxslim's version is kept only when it is smaller and equal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_deploy import one_thread, train_on_digits  # noqa: F401 (one_thread: an autouse fixture)
from torch import nn

import growc
from growc.data import digits
from growc.deploy.compact import compact
from growc.deploy.export import export_onnx
from growc.deploy.pipeline import export_checkpoint
from growc.deploy.quantize import run_onnx
from growc.deploy.slim import slim_file


class DigitsCNN(nn.Module):
    """29k parameters on the 8x8 digits (given flat, as `--data digits` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.flatten(x, 1))


def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    return train_on_digits(DigitsCNN())


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cnn")
    return growc.save_checkpoint(folder / "model.safetensors", growc.trace(trained_cnn()))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_of_a_30k_parameter_cnn_is_3_5x_smaller(cnn_checkpoint: Path, tmp_path: Path, mode: str):
    result = export_checkpoint(cnn_checkpoint, out=tmp_path, int8=mode, latency_repeats=3, standalone=False)
    q = result.int8
    assert q is not None
    print(
        f"{mode}: {result.params_after} params, {q.fp32_bytes} -> {q.int8_bytes} bytes ({q.size_ratio:.2f}x), "
        f"acc {q.fp32_accuracy:.4f} -> {q.int8_accuracy:.4f}"
    )
    assert 28_000 < result.params_after < 30_000
    assert q.fp32_bytes == (tmp_path / "model.onnx").stat().st_size  # the ratio is of the files written
    assert q.size_ratio >= 3.5, (q.fp32_bytes, q.int8_bytes)
    assert q.weight_bits == 7  # the same scores on CPUs with and without VNNI
    assert q.fp32_accuracy > 0.95 and (q.fp32_accuracy - q.int8_accuracy) * 100 <= 0.5
    card = json.loads((tmp_path / "model.int8.card.json").read_text())
    assert card["size_ratio"] == round(q.size_ratio, 3) and card["file_bytes"] == q.int8_bytes
    assert card["float_layers"] == q.float_layers == []  # every layer int8


def _kernels(path: Path) -> set[str]:
    """The op types onnxruntime runs after its graph optimizations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_compact_keeps_outputs_and_int8_kernels(tmp_path: Path):
    """onnxruntime's own static QDQ file, before and after `compact`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = trained_cnn()
    (x, _), (xv, _) = (ds.tensors for ds in digits())
    fp32 = export_onnx(model, [x[:64]], tmp_path / "fp32.onnx").path
    batches = iter([{"input": x[i : i + 64].numpy()} for i in range(0, 256, 64)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    raw = tmp_path / "raw.onnx"
    quantize_static(
        str(fp32), str(raw), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    small = tmp_path / "small.onnx"
    onnx.save(compact(onnx.load(str(raw))), str(small))
    assert small.stat().st_size < raw.stat().st_size - 2000  # names, metadata, bias zero-points
    np.testing.assert_array_equal(run_onnx(raw, [xv]), run_onnx(small, [xv]))
    assert {"QLinearConv", "QGemm"} <= _kernels(small) and _kernels(small) == _kernels(raw)
    graph = onnx.load(str(small)).graph
    assert [v.name for v in graph.input] == ["input"] and [v.name for v in graph.output] == ["output"]
    assert not graph.value_info and all(not n.name and not n.doc_string for n in graph.node)
    inits = {i.name: i for i in graph.initializer}
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    biases = [n for n in dequantized if inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert len(biases) == 3 and all(len(n.input) == 2 for n in biases)  # zero zero-points dropped
    assert all(len(n.input) == 3 for n in dequantized if n not in biases)  # weights keep theirs
    assert max(len(name) for name in inits) <= 2


class ScaledConv(nn.Module):
    """Conv -> per-channel Mul and Add: the exporter keeps them, onnxslim folds them into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x) * self.scale + self.shift)
        return self.head(torch.flatten(x, 1))


def test_export_keeps_the_slimmed_file_when_it_helps(tmp_path: Path):
    pytest.importorskip("onnxslim")
    torch.manual_seed(0)
    model, x = ScaledConv().eval(), torch.rand(32, 1, 8, 8)
    plain = export_onnx(model, [x], tmp_path / "plain.onnx")
    slimmed = export_onnx(model, [x], tmp_path / "slim.onnx", slim=True)
    assert plain.slim is None and slimmed.slim is not None and slimmed.slim.applied, slimmed.slim
    assert slimmed.slim.bytes_after == slimmed.path.stat().st_size < plain.path.stat().st_size
    ops = [n.op_type for n in onnx.load(str(slimmed.path)).graph.node]
    assert "Mul" not in ops and "Add" not in ops
    assert slimmed.max_abs_diff <= 1e-5


@pytest.mark.parametrize("case", ["missing", "raises", "changes_outputs", "not_smaller"])
def test_slim_keeps_the_original_unless_smaller_and_equal(tmp_path: Path, monkeypatch, case: str):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    path = export_onnx(ScaledConv().eval(), [x], tmp_path / "m.onnx").path
    before = path.read_bytes()
    if case == "missing":
        monkeypatch.setitem(sys.modules, "onnxslim", None)  # import onnxslim raises ImportError
    else:
        onnxslim = pytest.importorskip("onnxslim")
        real = onnxslim.slim

        def fake(model, *args, **kwargs):
            if case == "raises":
                raise RuntimeError("shape inference exploded")
            if case == "not_smaller":
                return model
            slimmed = real(model, *args, **kwargs)
            weight = next(i for i in slimmed.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
            weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + 0.1, weight.name))
            return slimmed

        monkeypatch.setattr(onnxslim, "slim", fake)
    result = slim_file(path, [x.numpy()])
    expected = {
        "missing": "not installed",
        "raises": "shape inference exploded",
        "changes_outputs": "changed the outputs",
        "not_smaller": "not smaller",
    }[case]
    assert not result.applied and expected in result.reason, result
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
