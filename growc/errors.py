"""Errors that reach the user: one sentence that says what is wrong and what to do."""


class GrowcError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class TraceError(GrowcError):
    """torch.fx could not trace the model."""


class CheckpointError(GrowcError):
    """A file is not a readable growc checkpoint."""


class ExportError(GrowcError):
    """The model could not be exported or the exported file disagrees with torch."""
