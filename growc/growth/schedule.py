"""The training of a growth run: the passes between growth steps and the final phase.

How long each phase trains (whole epochs or a fraction of one), the learning-rate policy (constant
while growing, a cosine decay over the final phase), and when the plateau trigger ends a phase early.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from growc.errors import GrowcWarning
from growc.growth.config import GrowthConfig
from growc.growth.observer import Observer
from growc.growth.train import LossFn, evaluate, train_epoch


def epoch_chunks(epochs: float, batches: int | None) -> list[int | None]:
    """A phase of `epochs` epochs as passes over the loader: None for a whole epoch, a number of
    batches for the fraction that remains (at least one batch). Data without a length (an
    iterable data set) cannot be cut into fractions: the phase rounds up to whole epochs."""
    whole = int(epochs)
    chunks: list[int | None] = [None] * whole
    if epochs - whole > 1e-9:
        if batches is None:
            warnings.warn(
                f"epochs={epochs:g} asks for a fraction of an epoch, but the training data has no length: "
                f"training {whole + 1} whole epoch(s) between steps instead (give a Dataset with a length, "
                "or whole --epochs)",
                GrowcWarning,
                stacklevel=2,
            )
            return [None] * (whole + 1)
        chunks.append(max(1, round((epochs - whole) * batches)))
    return chunks


@dataclass
class Trainer:
    """What every training phase of a run shares."""

    train_loader: Iterable
    val_loader: Iterable
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    device: torch.device
    config: GrowthConfig
    observer: Observer

    @property
    def batches(self) -> int | None:
        return len(self.train_loader) if hasattr(self.train_loader, "__len__") else None

    def phase(self, model: nn.Module, step: int, final: bool, seconds: dict[str, float]) -> tuple[float, float]:
        """Training before a growth step, or the final phase; returns the last pass's mean loss and
        the epochs trained (the plateau trigger may end the phase early). Adds to seconds["train"]."""
        config = self.config
        epochs = config.final_epochs if final and config.final_epochs is not None else config.epochs
        batches = self.batches
        chunks = epoch_chunks(epochs, batches)
        # Learning-rate policy: constant while growing (new and old neurons share it, Adam's
        # per-entry scaling adapts to each), then a cosine decay to 0 over the final training.
        scheduler = None
        if final and epochs and batches is not None:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(1, round(epochs * batches))
            )
        plateau = config.trigger == "plateau" and not final
        train_loss, best_val, trained = math.nan, math.inf, 0.0
        for epoch, chunk in enumerate(chunks):
            train_loss = self._pass(model, step, epoch, len(chunks), seconds, scheduler, chunk)
            trained += 1.0 if chunk is None or not batches else chunk / batches
            if plateau and epoch < len(chunks) - 1:
                plain = getattr(model, "module", model)  # under DDP, the module it wraps
                val = evaluate(plain, self.val_loader, self.loss_fn, self.device)[0]
                if val > best_val * (1 - config.plateau_tolerance):
                    break
                best_val = min(best_val, val)
        return (train_loss if epochs else 0.0), trained

    def _pass(
        self,
        model: nn.Module,
        step: int,
        epoch: int,
        epochs: int,
        seconds: dict[str, float],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        max_batches: int | None,
    ) -> float:
        """One pass over the training data (its first `max_batches` batches, when given)."""
        self.observer.epoch_start(step, epoch, epochs, max_batches or self.batches or 0)

        def after_backward(index: int, size: int) -> None:
            self.observer.batch_end()

        start = time.perf_counter()
        loss = train_epoch(
            model, self.train_loader, self.loss_fn, self.optimizer, self.device, after_backward, scheduler, max_batches
        )
        seconds["train"] += time.perf_counter() - start
        self.observer.epoch_end(step, epoch, loss)
        return loss
