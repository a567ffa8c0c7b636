"""Checkpoints: round trips without the model's source, clear errors on damaged or foreign files,
atomic writes, and no way for a checkpoint to name code outside torch."""

from __future__ import annotations

import json
import operator
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import growc
from growc.errors import CheckpointError
from growc.growth.checkpoint import read_metadata, recorded_data


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class Functional(nn.Module):
    """torch.relu, torch.flatten and a residual operator.add, with a conv in front."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc1 = nn.Linear(32, 6)
        self.fc2 = nn.Linear(6, 2)
        self.fc3 = nn.Linear(2, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.flatten(torch.relu(self.conv(x)), 1)
        h = torch.relu(self.fc1(h))
        h = operator.add(h, self.fc3(torch.relu(self.fc2(h))))
        return self.out(h)


class Custom(nn.Module):
    """Not a torch.nn class: a checkpoint cannot describe it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.scale


class WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.custom = Custom()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.custom(torch.relu(self.fc1(x))))


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.fixture
def mlp_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    path = growc.save_checkpoint(tmp_path / "mlp.safetensors", growc.trace(model), {"step": 3, "note": "hi"})
    return model, path


def test_mlp_round_trip(mlp_checkpoint):
    model, path = mlp_checkpoint
    loaded = growc.load(path)
    assert isinstance(loaded, fx.GraphModule)
    assert not loaded.training
    assert_same(model, loaded, torch.randn(9, 6))
    assert read_metadata(path)["extra"] == {"step": 3, "note": "hi"}


def test_functional_residual_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Functional().eval()
    path = growc.save_checkpoint(tmp_path / "f.safetensors", growc.trace(model))
    loaded = growc.load(path)
    targets = {n.target for n in loaded.graph.nodes if n.op == "call_function"}
    assert {torch.relu, torch.flatten, operator.add} <= targets
    assert_same(model, loaded, torch.randn(5, 1, 4, 4))


def test_grown_functional_model_round_trip(tmp_path):
    """After growth the layers have new shapes: the checkpoint must rebuild them as grown."""
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(512, 1, 4, 4)
    y = x.flatten(1)[:, :3].argmax(1)
    data = TensorDataset(x, y)
    config = growc.GrowthConfig(steps=2, final_epochs=1, stat_samples=512, line_search_samples=256)
    result = growc.grow(
        model,
        DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(data, batch_size=256),
        nn.functional.cross_entropy,
        config,
    )
    assert result.report.final["final_params"] > result.report.final["initial_params"]
    assert result.user_model is model
    path = growc.save_checkpoint(tmp_path / "grown.safetensors", result.model)
    loaded = growc.load(path)
    assert loaded.fc2.out_features == loaded.fc3.in_features == model.fc2.weight.shape[0] > 2
    assert_same(result.model.eval(), loaded, x[:17])
    with torch.no_grad():  # without depth growth the user's module is the grown model
        torch.testing.assert_close(model.eval()(x[:17]), loaded(x[:17]), rtol=0, atol=0)


def test_no_temporary_file_is_left(mlp_checkpoint, tmp_path):
    model, path = mlp_checkpoint
    growc.save_checkpoint(path, growc.trace(model))  # overwrite: also atomic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors"]
    growc.load(path)


def test_truncated_checkpoint(mlp_checkpoint, tmp_path):
    _, path = mlp_checkpoint
    data = path.read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.safetensors"):
        growc.load(half)


def test_checkpoint_missing_its_last_bytes(mlp_checkpoint, tmp_path):
    """The header survives, the tensors do not."""
    _, path = mlp_checkpoint
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="short.safetensors"):
        growc.load(short)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"])
def test_random_bytes(tmp_path, content):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="noise.safetensors"):
        growc.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.safetensors"):
        growc.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_plain_safetensors_is_not_a_growc_checkpoint(tmp_path, metadata):
    path = tmp_path / "plain.safetensors"
    save_file(MLP().state_dict(), str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="not a growc checkpoint") as info:
        growc.load(path)
    assert "plain.safetensors" in str(info.value)


def _read(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return metadata, load_file(str(path))


def _rewrite_architecture(path, edit) -> None:
    metadata, tensors = _read(path)
    arch = json.loads(metadata["architecture"])
    edit(arch)
    metadata["architecture"] = json.dumps(arch)
    save_file(tensors, str(path), metadata=metadata)


def test_checkpoint_cannot_name_code_outside_torch(tmp_path):
    torch.manual_seed(0)
    path = growc.save_checkpoint(tmp_path / "f.safetensors", growc.trace(Functional()))

    def evil(arch):
        for node in arch["nodes"]:
            if node["target"] == "torch:relu":
                node["target"] = "os:system"

    _rewrite_architecture(path, evil)
    with pytest.raises(CheckpointError, match="os:system"):
        growc.load(path)


def test_checkpoint_cannot_name_a_module_outside_torch_nn(mlp_checkpoint):
    _, path = mlp_checkpoint

    def evil(arch):
        arch["modules"]["fc1"]["type"] = "Evil"

    _rewrite_architecture(path, evil)
    with pytest.raises(CheckpointError, match="Evil"):
        growc.load(path)


def test_damaged_metadata(mlp_checkpoint):
    _, path = mlp_checkpoint
    metadata, tensors = _read(path)
    metadata["architecture"] = "{not json"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="damaged"):
        growc.load(path)


def test_weights_that_do_not_fit_the_architecture(mlp_checkpoint):
    _, path = mlp_checkpoint
    metadata, tensors = _read(path)
    tensors["fc1.weight"] = torch.zeros(7, 6)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="do not fit"):
        growc.load(path)


def test_weights_only_checkpoint_loads_into_the_model(tmp_path):
    torch.manual_seed(0)
    model = WithCustom().eval()
    path = growc.save_checkpoint(tmp_path / "w.safetensors", growc.trace(model, ["Custom"]))
    with pytest.raises(CheckpointError, match="load_into"):
        growc.load(path)
    torch.manual_seed(1)
    fresh = growc.load_into(WithCustom().eval(), path)
    assert_same(model, fresh, torch.randn(4, 6))


def test_load_into_resizes_the_users_layers(tmp_path):
    torch.manual_seed(0)
    grown = MLP()
    grown.fc1, grown.fc2 = nn.Linear(6, 9), nn.Linear(9, 4)  # as if fc1 had grown from 5 to 9
    path = growc.save_checkpoint(tmp_path / "grown.safetensors", growc.trace(grown))
    fresh = growc.load_into(MLP(), path)
    assert (fresh.fc1.out_features, fresh.fc2.in_features) == (9, 9)
    assert_same(grown.eval(), fresh.eval(), torch.randn(3, 6))


# --------------------------------------------------------------------------- the data a run was grown on


def test_a_runs_checkpoint_records_its_data(tmp_path):
    """grow(..., checkpoint_extra=...) puts the data spec in every checkpoint it writes, beside
    the resumable state."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    path = tmp_path / "run.safetensors"
    config = growc.GrowthConfig(steps=1, epochs=1, final_epochs=0)
    growc.grow(
        MLP(),
        loader,
        loader,
        nn.functional.cross_entropy,
        config,
        checkpoint=path,
        checkpoint_extra={"data": "mnist:data/mnist.npz"},
    )
    assert recorded_data(path) == "mnist:data/mnist.npz"
    assert "run" in read_metadata(path)["extra"], "the resumable state is still there"


def test_a_checkpoint_without_recorded_data_exports_on_digits(tmp_path):
    """Checkpoints written before growc recorded the data: export falls back to digits."""
    from growc.deploy.pipeline import export_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 10))
    path = growc.save_checkpoint(tmp_path / "old.safetensors", growc.trace(model), {"step": 0})
    assert recorded_data(path) is None
    result = export_checkpoint(path, out=tmp_path / "deploy", latency_repeats=2, standalone=False)
    assert json.loads(result.cards[0].read_text())["data"] == "digits"
    assert result.fp32_accuracy is not None
