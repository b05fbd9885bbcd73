"""int8 dynamic quantisation of an ONNX step graph, and what it costs in accuracy.

``onnxruntime.quantization.quantize_dynamic`` stores MatMul/Gemm weights as int8 (per tensor)
and quantises their inputs to uint8 at run time; the recurrences themselves (elementwise Mul/Add
on the state) stay float32, so quantisation noise enters the state through B u but is not
compounded by a quantised A.

Tolerance for int8 graphs (``INT8_RELATIVE_TOLERANCE``): 5% of the largest float output. Each
quantised product carries ~0.4% relative rounding (1/255 of the input range, 1/254 of the weight
range); a few of them per block and a few blocks give ~1-2% of the output range, which is what we
measure on random and trained models, so 5% leaves room for that noise and still flags a graph
whose scales are wrong (errors of the order of the outputs themselves).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import onnx
import torch

from .runtime import OnnxStreamer

INT8_RELATIVE_TOLERANCE = 0.05
QUANTIZATION_MODES = ("int8",)


def check_mode(quantize: Optional[str]) -> None:
    if quantize not in (None,) + QUANTIZATION_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZATION_MODES}, got {quantize!r}")


def quantize_int8(float_path: Path, out_path: Path, metadata: Dict[str, str]) -> None:
    """Write the dynamically int8-quantised graph of ``float_path`` to ``out_path`` with ``metadata``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice on pre-processing via the root logger
    try:
        quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(out_path), save_as_external_data=False)


def accuracy_change(info: Dict[str, Any], float_path: Path, int8_path: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint's headline test metric (accuracy, or MSE for forecasters) for the float and
    the int8 streamed graphs, on the split its config records; None when it records none."""
    from lrnnx_zoo.training import checkpoint_data, score
    try:
        data = checkpoint_data(info)
    except ValueError:
        return None
    classify = data.task == "sequence-classification"
    key = "test_accuracy" if classify else "test_mse"

    def streamed(path: Path) -> float:
        streamer = OnnxStreamer(path)
        if streamer.fixed_batch is not None:
            raise ValueError("metric evaluation needs a graph with a dynamic batch")
        out = torch.from_numpy(streamer.run(data.x_test.numpy()))
        return score(out[:, -1] if classify else out, data)[key]   # the last step carries the logits

    f, q = streamed(float_path), streamed(int8_path)
    return {"metric": f"{info['dataset'].get('name', 'test')} {key} (streamed, n={len(data.x_test)})",
            "accuracy_float": f, "accuracy_int8": q, "accuracy_change": q - f}
