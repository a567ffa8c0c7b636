"""Graph growth step by step with the Python API, in your own training loop. Runs in seconds.

A residual MLP on scikit-learn's digits: trace it, list what can grow (the residual stream is
one site tied across three layers), measure every site's expressivity bottleneck, grow a site
you choose, train, let the allocation by gain per parameter choose, train, then freeze and
export.

python examples/api_stepwise.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import growc
from growc.data import as_loader, digits


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 4)
        self.inner, self.back = nn.Linear(4, 2), nn.Linear(2, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.back(torch.relu(self.inner(h)))
        return self.head(torch.relu(h))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader, epochs: int) -> None:
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


torch.manual_seed(0)
train_set, val_set = digits()
loader = as_loader(train_set, batch_size=64, shuffle=True, seed=0)
x_val, y_val = val_set.tensors

grower = growc.Grower(ResidualMLP(), F.cross_entropy, growc.GrowthConfig(seed=0))
for site in grower.candidates.sites:
    print(f"site {site.name}: {growc.describe_ties(site)}")
for layer, why in grower.candidates.skipped:
    print(f"not growable {layer}: {why}")

model = grower.model  # the traced graph: train it, grow it, export it
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
train(model, optimizer, loader, epochs=2)

# The bottlenecks: how much of the loss gradient no update of the existing weights can follow.
for a in grower.measure(loader):
    s = a.summary()
    print(f"{a.site.name:>6}: bottleneck {s['bottleneck']:.3g} ({s['relative']:.0%}), {s['significant']} significant")

# Grow the site of your choice...
(record,) = grower.grow("inner", neurons=4, optimizer=optimizer)
print(
    f"grew inner by {record.neurons}: loss -{record.observed_gain:.4f} (first order predicted -{record.predicted_gain:.4f})"
)
train(model, optimizer, loader, epochs=2)

# ...or let the gain per parameter decide, a few times.
for _ in range(3):
    grower.measure(loader)
    for r in grower.grow(optimizer=optimizer):
        print(f"grew {r.site} by {r.neurons}")
    train(model, optimizer, loader, epochs=2)
train(model, optimizer, loader, epochs=4)

frozen = growc.freeze(model, [x_val[:2]])
print(
    f"frozen: {sum(p.numel() for p in frozen.parameters())} parameters, val accuracy {accuracy(frozen, x_val, y_val):.2%}"
)
out = Path(tempfile.mkdtemp())
exported = growc.export_onnx(frozen, [x_val[:64]], out / "model.onnx", check_inputs=[x_val])
print(f"wrote {exported.path} (onnxruntime max |diff| {exported.max_abs_diff:.1e})")
