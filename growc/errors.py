"""Errors that reach the user: one sentence that says what is wrong and what to do."""

from __future__ import annotations

import tempfile
from pathlib import Path


class GrowcError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class TraceError(GrowcError):
    """torch.fx could not trace the model."""


class CheckpointError(GrowcError):
    """A file is not a readable growc checkpoint."""


class ExportError(GrowcError):
    """The model could not be exported or the exported file disagrees with torch."""


class GrowcWarning(UserWarning):
    """Something growc accepts but that is likely a mistake; the CLI prints it as one line."""


def check_writable_folder(folder: Path, option: str = "--out") -> None:
    """Create `folder` (and its parents) and write and remove a probe file in it, so an output
    folder that cannot hold results is one sentence before any work, not an error after it."""
    if folder.exists() and not folder.is_dir():
        raise GrowcError(f"{option} '{folder}' is a file, not a folder: give a folder path (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".growc-probe-"):
            pass  # created and removed: the folder takes new files
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise GrowcError(
            f"{option} '{folder}' cannot be written ({reason}): choose a folder you can write to"
        ) from None
