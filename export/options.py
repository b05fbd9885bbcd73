"""The export's user-facing options and their defaults, importable without torch, onnx, onnxruntime
or the exporters: the command line builds its parser from them (importing onnx cost `lrnnx-zoo models`
and every other command 1.3 s), and refuses flags that do not go together before it loads them."""

from __future__ import annotations

from typing import Optional

from lrnnx_zoo.wording import given, name

#: Graph file of each export format.
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "torch-export": "model.pt2"}
FORMATS = tuple(GRAPH_FILES)

#: Steps an export folder's graph is validated over by default: the length at which the issue asks
#: for no drift beyond tolerance. A float32 state's rounding error can grow with the stream until the
#: slowest mode's memory 1/(1-|lam|) is filled: with each pole rounded once a shipped digits
#: classifier's graph was 5.3e-6 from the float64 model after 256 steps and 4.1e-5 after 4096. The
#: split poles (step_forms.split_poles) keep the shipped graphs at 2.8e-6 - 5.6e-6 at both lengths,
#: but a graph exported under split_poles(False), or a plugin's form, can still drift, which the 256
#: steps of to_onnx's default would under-state.
FOLDER_VALIDATION_LENGTH = 4096

#: Single steps timed for an export's latency by default.
DEFAULT_STEPS = 500

# 20 has a single Gelu op (18 spells it as Erf/Mul/Add): ~15 fewer nodes and ~10% less time per
# step for 4 blocks (measured). Needs onnxruntime >= 1.17; pass an older opset for older runtimes.
DEFAULT_OPSET = 20
#: Opsets the pinned exporters and onnxruntime were verified with, end to end: the dynamo exporter
#: writes 18..25 (at 26+ its Gelu fails onnx.checker); below 18 it silently writes 18, so those go
#: through the TorchScript-based exporter, which needs 11 for Flip and stops at 23.
MIN_OPSET, MAX_OPSET, MIN_DYNAMO_OPSET, MAX_LEGACY_OPSET = 11, 25, 18, 23

#: The command line's flag for each of export_folder's arguments (lrnnx_zoo.wording.command_line).
CLI_FLAGS = {"out_dir": "--out", "format": "--format", "quantize": "--quantize", "opset": "--opset",
             "batch": "--batch", "latency_steps": "--latency-steps", "push_to_hub": "--push-to-hub",
             "validation_length": "--validation-length", "rate": "--rate", "chunk": "--chunk"}


def check_format_options(format: str, quantize: Optional[str] = None, opset: Optional[int] = None,
                         batch: Optional[int] = None) -> None:
    """Refuse a ``format`` that is not one of :data:`FORMATS`, or options it does not take
    (``quantize`` and ``opset`` are ONNX's; a TorchScript step takes any batch), with a ValueError
    naming them as the caller wrote them. Needs nothing heavy: ``lrnnx-zoo export`` runs it before
    torch loads (it answered such a usage error after 1.5-6 s)."""
    if format not in FORMATS:
        raise ValueError(f"{name('format')} must be one of {FORMATS}, got {format!r}")
    for key, value in (("quantize", quantize), ("opset", opset)):
        if value is not None and format != "onnx":
            raise ValueError(f"{given(key, value)} applies to ONNX graphs only; drop {name(key)} or use "
                             f"{given('format', 'onnx')} (got {given('format', format)})")
    if batch is not None and format == "torchscript":
        raise ValueError(f"a traced TorchScript step accepts any batch; drop {name('batch')} or use "
                         f"{given('format', 'onnx')} / {given('format', 'torch-export')}")
