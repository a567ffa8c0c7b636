"""Suite-wide settings.

torch's ONNX exporter rebuilds onnxscript's table of ATen translations on every export, about
1.2 s on the 2-core CI machine, and the suite exports about a hundred models. The table is a
pure function of the installed onnxscript (it lists functions registered at import), so the
suite builds it once. Exports themselves are unchanged; where torch or onnxscript no longer
have this layout, nothing is patched and the suite is only slower.
"""

from __future__ import annotations

import functools
import importlib


def _build_the_torchlib_table_once() -> None:
    try:
        from torch.onnx._internal import _lazy_import

        apis = _lazy_import.onnxscript_apis
        name = getattr(apis, "_name", None) or apis.__name__
        module = importlib.import_module(name)
        table = module.get_torchlib_ops
    except (ImportError, AttributeError):
        return
    if not hasattr(table, "cache_info"):
        module.get_torchlib_ops = functools.cache(table)


_build_the_torchlib_table_once()
