"""Grow an MLP with gromo (the TINY method's reference library), for the `peer` suite.

Runs in the gromo virtual environment, never imports growc, and talks JSON:

    python gromo_driver.py SETTINGS.json RESULT.json

SETTINGS names a `torch.save`d file with x_train, y_train, x_test, y_test (the exact tensors
growc trains on) and the run's settings. The protocol, written against gromo 0.1.0's public
container/module API: train `epochs` epochs (Adam on the mean cross-entropy, rebuilt after each
growth because gromo replaces layer objects); a separate statistics pass over `stat_samples`
training samples with a sum-reduced loss (`compute_statistics`); `compute_optimal_updates` on
every growable layer (library defaults, at most max(4, width) new neurons per layer);
`select_best_update` (gromo grows one layer per step: the best first-order improvement); the
amplitude from gromo's own `line_search` on `line_search_samples` training samples through
`extended_forward`; `apply_change`. After `steps` steps, `final_epochs` with a cosine decay.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def _epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> float:
    model.train()
    total, count = 0.0, 0
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


def _widths(model: Any) -> list[int]:
    return [layer.out_features for layer in list(model.layers)[:-1]]


def run(settings: dict[str, Any]) -> dict[str, Any]:
    from gromo.containers.growing_mlp import GrowingMLP
    from gromo.utils.training_utils import compute_statistics
    from gromo.utils.utils import line_search

    torch.set_num_threads(settings.get("threads") or torch.get_num_threads())
    data = torch.load(settings["data"])
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    seed, batch_size, lr = settings["seed"], settings["batch_size"], settings["lr"]
    torch.manual_seed(seed)
    start_width = settings["start_width"]
    model = GrowingMLP(
        x_train.shape[1],
        10,
        hidden_size=start_width,
        number_hidden_layers=settings["hidden_layers"],
        activation=nn.ReLU(),
    )
    train_loader = _loader(x_train, y_train, batch_size, True, seed)
    stat_count = min(settings["stat_samples"], len(x_train))
    stat_loader = _loader(x_train[:stat_count], y_train[:stat_count], batch_size, False, seed)
    ls = min(settings["line_search_samples"], len(x_train))
    ls_x, ls_y = x_train[:ls], y_train[:ls]

    steps: list[dict[str, Any]] = []
    epoch_seconds: list[float] = []
    wall = time.perf_counter()
    for step in range(settings["steps"]):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(settings["epochs"]):
            begin = time.perf_counter()
            loss = _epoch(model, train_loader, optimizer)
            epoch_seconds.append(time.perf_counter() - begin)
        params = sum(p.numel() for p in model.parameters())
        record: dict[str, Any] = {
            "step": step,
            "params": params,
            "widths": _widths(model),
            "train_loss": loss,
            "val_accuracy": _accuracy(model, x_test, y_test),
        }
        seconds: dict[str, float] = {}
        begin = time.perf_counter()
        compute_statistics(model, stat_loader, loss_function=nn.CrossEntropyLoss(reduction="sum"))
        seconds["statistics"] = time.perf_counter() - begin
        begin = time.perf_counter()
        for layer in model.layers[1:]:
            layer.compute_optimal_updates(maximum_added_neurons=max(4, layer.in_features))
        model.reset_computation()
        chosen = model.select_best_update()
        seconds["solve"] = time.perf_counter() - begin
        begin = time.perf_counter()
        layer = model.currently_updated_layer

        @torch.no_grad()
        def cost(gamma: float, layer: Any = layer) -> float:
            layer.scaling_factor = float(gamma)
            model.eval()
            return float(nn.functional.cross_entropy(model.extended_forward(ls_x), ls_y))

        gamma, _ = line_search(cost)
        layer.scaling_factor = float(gamma)
        eigenvalues = layer.eigenvalues_extension
        added = int(eigenvalues.shape[0]) if eigenvalues is not None else 0
        model.apply_change()
        seconds["line_search"] = time.perf_counter() - begin
        record.update(
            seconds=seconds,
            grown_layer=int(chosen),
            neurons=added,
            gamma=float(gamma),
            params_after=sum(p.numel() for p in model.parameters()),
        )
        steps.append(record)
        print(
            f"gromo step {step}: {params:,} params, test acc {record['val_accuracy']:.4f}, layer {chosen} +{added}"
            f" (gamma {gamma:.3g})",
            file=sys.stderr,
            flush=True,
        )

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    final_epochs = settings["final_epochs"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, final_epochs * len(train_loader)))
    for _ in range(final_epochs):
        begin = time.perf_counter()
        _epoch(model, train_loader, optimizer, scheduler)
        epoch_seconds.append(time.perf_counter() - begin)
    wall = time.perf_counter() - wall
    # Units whose incoming weights are all zero (an amplitude of 0 still adds neurons) never
    # receive a gradient under ReLU: counted, since they count as parameters.
    dead = [int((layer.weight.abs().sum(1) == 0).sum()) for layer in list(model.layers)[:-1]]
    return {
        "accuracy": _accuracy(model, x_test, y_test),
        "params": sum(p.numel() for p in model.parameters()),
        "widths": _widths(model),
        "zero_units": dead,
        "epochs": settings["steps"] * settings["epochs"] + final_epochs,
        "seconds": wall,
        "epoch_seconds": epoch_seconds,
        "steps": steps,
        "gromo_version": _version(),
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gromo")
    except Exception:  # noqa: BLE001 - the version is only reported
        return "unknown"


def main() -> int:
    settings = json.loads(Path(sys.argv[1]).read_text())
    result = run(settings)
    Path(sys.argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
