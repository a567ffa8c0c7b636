"""The Python API end to end: trace, list sites, grow, export, reload. Runs in a few seconds.

python examples/api_example.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import growc
from growc.data import as_loader, digits

model = nn.Sequential(nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 10))

# Where can it grow? Every hidden dimension with the layers tied to it, and what it cannot grow.
report = growc.candidates_of(model)
for site in report.sites:
    print(f"site {site.name}: {site.producer} -> {site.consumers}, width {site.width(model)}")

# Grow it on scikit-learn's digits (no download); the model is widened in place.
train, val = digits()
result = growc.grow(
    model,
    as_loader(train, batch_size=64, shuffle=True, seed=0),
    as_loader(val, batch_size=256, shuffle=False, seed=0),
    F.cross_entropy,
    growc.GrowthConfig(steps=12, final_epochs=10, seed=0),
)
print("widths:", result.report.final["widths"], "val accuracy:", result.report.final["final_val_accuracy"])

# Ship it: a verified ONNX file and a checkpoint that loads without this script.
out = Path(tempfile.mkdtemp())
x_val = val.tensors[0]
exported = growc.export_onnx(result.model, [x_val[:64]], out / "model.onnx", check_inputs=[x_val])
growc.save_checkpoint(out / "model.safetensors", result.model)
reloaded = growc.load(out / "model.safetensors")
assert torch.allclose(reloaded(x_val), result.model(x_val), atol=1e-6)
print(f"wrote {exported.path} (onnxruntime max |diff| {exported.max_abs_diff:.1e}) and {out / 'model.safetensors'}")
