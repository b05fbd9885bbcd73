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
from typing import Any, Callable, Dict, Optional

import numpy as np
import onnx

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


def _digits_test_set(dataset: Dict[str, Any]):
    from lrnnx_zoo.data import Split, load_digits_sequences
    split = dataset.get("split") or {}
    kw = {k: split[k] for k in ("seed", "n_test") if k in split}
    _, _, x_test, y_test = load_digits_sequences(Split(**kw))
    return x_test.numpy(), y_test.numpy()


#: Evaluation splits we can rebuild from a checkpoint's ``dataset`` record, by data set name.
EVAL_SPLITS: Dict[str, Callable[[Dict[str, Any]], Any]] = {"digits": _digits_test_set}


def streamed_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the final streamed step's argmax over a labelled set, x (N, L, d_input)."""
    streamer = OnnxStreamer(path)
    if streamer.fixed_batch is not None:
        raise ValueError("accuracy evaluation needs a graph with a dynamic batch")
    logits = streamer.run(x)[:, -1]
    return float((logits.argmax(-1) == y).mean())


def accuracy_change(info: Dict[str, Any], float_path: Path, int8_path: Path) -> Optional[Dict[str, Any]]:
    """Test accuracy of the float and int8 streamed graphs on the checkpoint's evaluation split,
    or None when the checkpoint records no split we can rebuild."""
    dataset = info.get("dataset")
    if not isinstance(dataset, dict) or dataset.get("name") not in EVAL_SPLITS:
        return None
    x, y = EVAL_SPLITS[dataset["name"]](dataset)
    acc_f, acc_q = streamed_accuracy(float_path, x, y), streamed_accuracy(int8_path, x, y)
    return {"metric": f"{dataset['name']} test accuracy (streamed, n={len(y)})", "accuracy_float": acc_f,
            "accuracy_int8": acc_q, "accuracy_change": acc_q - acc_f}
