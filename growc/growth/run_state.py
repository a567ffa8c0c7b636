"""What a growth run needs to continue exactly where it stopped, stored in its checkpoint.

Besides the model (weights + architecture), a checkpoint of a run holds: the loop's counters and
the report so far (JSON metadata), the optimizer's state (tensors, by parameter name, so they
reattach to the rebuilt model), and the random generators' states (global torch, the training
loader's, the strategy's, CUDA's). Restoring all of them makes a resumed run compute what the
uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, fx

from growc.errors import CheckpointError
from growc.growth.checkpoint import STATE_PREFIX
from growc.growth.report import GrowthReport


@dataclass
class RunState:
    step: int = 0  # the next step to run
    final: bool = False  # the next phase is the final training
    finished: bool = False
    barren: int = 0  # consecutive steps with no significant gain anywhere
    initial_params: int = 0
    initial_flops: int = 0  # multiply-adds per sample before growth
    elapsed: float = 0.0  # seconds spent in earlier sessions of this run
    report: GrowthReport = field(default_factory=lambda: GrowthReport(config={}))

    def to_json(self) -> dict:
        data = asdict(self)
        data["report"] = self.report.to_dict()
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        data = dict(data)
        data["report"] = GrowthReport.from_dict(data.get("report", {}))
        return cls(**data)


def _generator_of(loader) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def pack(
    graph: fx.GraphModule, optimizer: torch.optim.Optimizer, loader, strategy_generator: torch.Generator
) -> tuple[dict[str, Tensor], dict]:
    """(tensors, JSON) holding the optimizer and the random states."""
    names = {id(p): n for n, p in graph.named_parameters()}
    state = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{STATE_PREFIX}optim/{order[index]}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(order[index], {})[key] = value
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": [order[i] for i in g["params"]]}
        for g in state["param_groups"]
    ]
    tensors[f"{STATE_PREFIX}rng/torch"] = torch.get_rng_state()
    tensors[f"{STATE_PREFIX}rng/strategy"] = strategy_generator.get_state()
    if (generator := _generator_of(loader)) is not None:
        tensors[f"{STATE_PREFIX}rng/loader"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[f"{STATE_PREFIX}rng/cuda"] = torch.cuda.get_rng_state()
    return tensors, {"optimizer_groups": groups, "optimizer_scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, graph: fx.GraphModule, tensors: dict[str, Tensor], meta: dict
) -> None:
    """Load the packed state into `optimizer`, which must hold the same parameters (by name)."""
    params = dict(graph.named_parameters())
    groups = meta["optimizer_groups"]
    # Rebuild the groups (a run that inserted blocks has more than one) in the saved order.
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for group in groups:
        try:
            optimizer.add_param_group(
                {**{k: v for k, v in group.items() if k != "params"}, "params": [params[n] for n in group["params"]]}
            )
        except KeyError as exc:
            raise CheckpointError(f"the checkpoint's optimizer names parameter {exc}, which its model lacks") from None
    order = [n for group in groups for n in group["params"]]
    state = {}
    for index, name in enumerate(order):
        entries = dict(meta["optimizer_scalars"].get(name, {}))
        prefix = f"{STATE_PREFIX}optim/{name}/"
        entries.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if entries:
            state[index] = entries
    device_state = optimizer.state_dict()
    device_state["state"] = state
    optimizer.load_state_dict(device_state)


def restore_random_states(tensors: dict[str, Tensor], loader, strategy_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors[f"{STATE_PREFIX}rng/torch"])
    strategy_generator.set_state(tensors[f"{STATE_PREFIX}rng/strategy"])
    if (generator := _generator_of(loader)) is not None and f"{STATE_PREFIX}rng/loader" in tensors:
        generator.set_state(tensors[f"{STATE_PREFIX}rng/loader"])
    if f"{STATE_PREFIX}rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{STATE_PREFIX}rng/cuda"])
