"""Export of trained models to recurrent step graphs (ONNX Runtime, TorchScript, torch.export).

The names below load their modules on first use: onnx and the exporters cost a second to import,
which the command line (it builds its parser from :mod:`.options`) and plain training need not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports each on first use
    # "name as name": a py.typed package's names re-exported under mypy --strict and pyright (their
    # __all__ below is computed, which neither reads: every one was "not explicitly exported")
    from .chunk_graph import ChunkModule as ChunkModule, build_chunk_module as build_chunk_module
    from .folder import FolderExport as FolderExport, export_folder as export_folder
    from .onnx_export import to_onnx as to_onnx
    from .result import ExportResult as ExportResult
    from .runtime import OnnxStreamer as OnnxStreamer
    from .step_graph import (ExportError as ExportError, StepModule as StepModule,
                             build_step_module as build_step_module, cache_from_state as cache_from_state,
                             packed_layout as packed_layout, state_from_cache as state_from_cache)
    from .torchscript_export import (load_torch_export as load_torch_export, load_torchscript as load_torchscript,
                                     to_torch_export as to_torch_export, to_torchscript as to_torchscript)
    from .validate import (ValidationError as ValidationError, ValidationReport as ValidationReport,
                           validate_stream as validate_stream)

#: Each public name and the submodule that defines it.
_HOME = {
    "to_onnx": "onnx_export", "to_torchscript": "torchscript_export", "to_torch_export": "torchscript_export",
    "OnnxStreamer": "runtime", "build_step_module": "step_graph", "export_folder": "folder",
    "ExportError": "step_graph", "ExportResult": "result", "FolderExport": "folder", "StepModule": "step_graph",
    "ValidationError": "validate", "ValidationReport": "validate", "validate_stream": "validate",
    "state_from_cache": "step_graph", "cache_from_state": "step_graph", "packed_layout": "step_graph",
    "build_chunk_module": "chunk_graph", "ChunkModule": "chunk_graph",
    "load_torchscript": "torchscript_export", "load_torch_export": "torchscript_export",
}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value          # later lookups skip this function
    return value


def __dir__() -> List[str]:
    """The public names and the module's dunders (not its submodules or this file's helpers)."""
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
