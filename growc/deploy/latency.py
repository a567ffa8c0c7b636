"""Median latency of the ONNX file under onnxruntime against the torch model in eager mode."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

DEFAULT_BATCHES = (1, 32)


@dataclass
class Latency:
    batch: int
    onnxruntime_ms: float
    torch_ms: float


def _batch_of(inputs: Sequence[Tensor], size: int) -> list[Tensor]:
    """`size` rows taken from the examples, repeated when there are fewer."""
    out = []
    for x in inputs:
        x = x.detach().cpu()
        reps = -(-size // x.shape[0])
        out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:size].contiguous())
    return out


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):  # first runs allocate, pick kernels, fill caches
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def measure_latency(
    model: nn.Module,
    onnx_path: str | Path,
    example_inputs: Sequence[Tensor],
    batches: Sequence[int] = DEFAULT_BATCHES,
    repeats: int = 50,
    warmup: int = 5,
) -> list[Latency]:
    """Median milliseconds per call at each batch size, onnxruntime (CPU) and torch eager."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    model = model.eval().to("cpu")
    results = []
    for size in batches:
        tensors = _batch_of(example_inputs, size)
        feeds = {name: np.ascontiguousarray(x.numpy()) for name, x in zip(names, tensors)}

        def run_torch(tensors: list[Tensor] = tensors) -> object:
            with torch.inference_mode():
                return model(*tensors)

        def run_ort(feeds: dict = feeds) -> object:
            return session.run(None, feeds)

        results.append(
            Latency(
                batch=size,
                onnxruntime_ms=median_ms(run_ort, repeats, warmup),
                torch_ms=median_ms(run_torch, repeats, warmup),
            )
        )
    return results
