"""Export of trained models to recurrent step graphs (ONNX Runtime, TorchScript, torch.export)."""

from .folder import FolderExport, export_folder
from .onnx_export import to_onnx
from .result import ExportResult
from .runtime import OnnxStreamer
from .step_graph import ExportError, StepModule, build_step_module, state_from_cache
from .torchscript_export import to_torch_export, to_torchscript
from .validate import ValidationError, ValidationReport, validate_stream

__all__ = [
    "to_onnx", "to_torchscript", "to_torch_export", "OnnxStreamer", "build_step_module", "export_folder",
    "ExportError", "ExportResult", "FolderExport", "StepModule", "ValidationError", "ValidationReport",
    "validate_stream", "state_from_cache",
]
