"""Optional graph simplification with onnxslim, kept only when it pays and changes nothing.

onnxslim folds what the exporter leaves behind (a Conv followed by a per-channel Mul/Add, Pad
into Conv, redundant Reshape/Transpose chains, repeated subexpressions). It is optional: without
the package (`pip install growc[slim]`) the file stays as exported. With it, the slimmed file
replaces the original only when it is smaller after the same `compact` clean-up, passes
`onnx.checker` and gives the original's onnxruntime outputs on the check inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from growc.deploy.compact import compact

#: Largest |slimmed - original| onnxruntime difference accepted: folding a Mul into a Conv's
#: weights rounds differently in the last bits, anything more is a changed model.
SLIM_MAX_ABS_DIFF = 1e-5


@dataclass
class SlimResult:
    applied: bool
    reason: str
    bytes_before: int
    bytes_after: int  # the size of the file kept

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _run(path: Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def slim_file(path: str | Path, inputs: Sequence[np.ndarray]) -> SlimResult:
    """Replace the ONNX file at `path` by its onnxslim version if that is smaller and gives the
    same outputs on `inputs`; otherwise leave it as it is. Never raises for a slimming failure:
    the reason is in the result."""
    import onnx

    path = Path(path)
    before = path.stat().st_size

    def kept(reason: str) -> SlimResult:
        return SlimResult(applied=False, reason=reason, bytes_before=before, bytes_after=before)

    try:
        import onnxslim
    except ImportError:
        return kept("onnxslim is not installed (pip install onnxslim)")
    candidate = path.with_name(path.name + ".slim.onnx")
    try:
        sink = io.StringIO()
        logging.getLogger("onnxslim").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            slimmed = onnxslim.slim(onnx.load(str(path)))
        if slimmed is None:
            return kept("onnxslim returned no model")
        onnx.save(compact(slimmed), str(candidate))
        after = candidate.stat().st_size
        if after >= before:
            return kept(f"not smaller ({after} bytes vs {before})")
        onnx.checker.check_model(str(candidate), full_check=True)
        reference, got = _run(path, inputs), _run(candidate, inputs)
        if [a.shape for a in reference] != [b.shape for b in got]:
            return kept("changed the output shapes")
        diff = max((float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(reference, got)), default=0.0)
        if not diff <= SLIM_MAX_ABS_DIFF:
            return kept(f"changed the outputs (max abs diff {diff:.2e})")
        os.replace(candidate, path)
        return SlimResult(
            applied=True, reason=f"{before - after} bytes smaller", bytes_before=before, bytes_after=after
        )
    except Exception as exc:  # onnxslim is an optimization: any failure keeps the original
        return kept(f"onnxslim failed: {_first_line(exc)}")
    finally:
        candidate.unlink(missing_ok=True)
