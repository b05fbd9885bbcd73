"""int8 dynamic quantisation of an ONNX step graph, and what it costs in accuracy.

``onnxruntime.quantization.quantize_dynamic`` stores MatMul/Gemm weights as int8 (per tensor)
and quantises their inputs to uint8 at run time. Only the backbone's dense layers (encoder,
per-block linear/GLU, decoder) are quantised; every node that reads a step form's matrices (the
StepModule's ``forms.*``: the layers' discretised systems) stays float32. A step form may hold
its transition matrix in a MatMul (a fused diagonal form does), and int8 cannot hold eigenvalues
within 1e-3 of the unit circle: quantising one shipped classifier's that way cost 1.1 points of
accuracy and a 2.2 output error, where keeping the forms float32 cost nothing measurable.

Dynamic quantisation scales each activation tensor by its range over the whole batch, so a
sequence's int8 output depends on the sequences streamed beside it: the output error and the
accuracy are measured one sequence at a time (a fixed-batch graph: its batch at a time), as deployed.

Tolerance for int8 graphs (``INT8_RELATIVE_TOLERANCE``): 5% of the largest float output. Each
quantised product carries ~0.4% relative rounding (1/255 of the input range, 1/254 of the weight
range); a few of them per block and a few blocks give ~1-2% of the output range, which is what we
measure on random and trained models, so 5% leaves room for that noise and still flags a graph
whose scales are wrong (errors of the order of the outputs themselves).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
import torch

from .runtime import OnnxStreamer
from .step_graph import EXPORT_LOCK

INT8_RELATIVE_TOLERANCE = 0.05
#: Standard normal sequences the int8 graph is checked on besides the validation input, each held to the
#: tolerance: a model whose int8 error was 4.3% of its outputs on the default sequences was 7-12% off
#: on three fresh ones (a fuzzer); the error varies that much from one sequence to the next.
INT8_EXTRA_SEQUENCES = 6
#: Where the StepModule keeps the layers' step forms (their tensors' names in the graph).
STEP_FORM_PREFIX = "forms."
QUANTIZATION_MODES = ("int8",)


def check_mode(quantize: Optional[str]) -> None:
    if quantize not in (None,) + QUANTIZATION_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZATION_MODES}, got {quantize!r}")


class QuantizerAdviceFilter(logging.Filter):
    """Drops the records below ERROR that onnxruntime's own code logs from the thread that made this
    filter (where records carry no thread, from any thread); other records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a record to drop: below ERROR, logged from onnxruntime's files, in this thread."""
        ours = record.thread is None or record.thread == self.thread
        from_onnxruntime = f"{os.sep}onnxruntime{os.sep}" in (record.pathname or "")
        return not (ours and from_onnxruntime and record.levelno < logging.ERROR)


def quantize_int8(float_path: Path, out_path: Path, metadata: Dict[str, str],
                  proto: Optional[onnx.ModelProto] = None) -> None:
    """Write the dynamically int8-quantised graph of ``float_path`` to ``out_path`` with ``metadata``.
    ``proto``: the graph already in memory (spares reading it back to find the step-form nodes)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    proto = proto or onnx.load(str(float_path))
    # quantize_dynamic logs advice on pre-processing via the root logger: a filter drops it, where
    # setting the root level (every thread's loggers inherit it) muted the whole process meanwhile
    # and, put back, undid a level another thread set meanwhile
    quiet = QuantizerAdviceFilter()
    root.addFilter(quiet)
    had_handlers, level = bool(root.handlers), root.level
    try:
        with EXPORT_LOCK:       # quantisations take turns, as before (onnxruntime's quantizer is not known to be thread-safe)
            quantize_dynamic(without_weight_shapes(proto), str(out_path), weight_type=QuantType.QInt8,
                             nodes_to_exclude=step_form_nodes(proto))
    finally:
        root.removeFilter(quiet)
        # a root level set meanwhile: an application's basicConfig(level=...), whose handler looks like
        # the implicit one (basicConfig sets the level on the root, not on its handler)
        if not had_handlers and root.level == level:
            _drop_implicit_handler(root)
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(out_path), save_as_external_data=False)


def _drop_implicit_handler(root: logging.Logger) -> None:
    """Take off ``root`` the handler that ``logging.warning()`` / ``logging.info()`` (module-level calls,
    as onnxruntime's quantizer makes) add with ``logging.basicConfig()`` when the root logger has none:
    left there, an application's own ``logging.basicConfig(level=..., format=...)`` afterwards did nothing
    (it configures only a root without handlers) and every record of the process reaching the root was
    printed in logging's default format. Called only where the root had no handler before the quantizer
    ran and its level is still the one it had then, and only a handler of basicConfig's defaults is taken
    off (a plain StreamHandler, default format, no level): one an application configured with a format, a
    file or a root level meanwhile stays (a bare ``basicConfig()`` in another thread during the
    quantisation is indistinguishable and goes too)."""
    for handler in list(root.handlers):
        fmt = getattr(handler.formatter, "_fmt", None)
        if type(handler) is logging.StreamHandler and fmt == logging.BASIC_FORMAT and handler.level == logging.NOTSET:
            root.removeHandler(handler)
            handler.close()


def without_weight_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` with no value_info entry for an initializer (each carries its own shape).

    The dynamo exporter records every weight's shape in value_info too. onnxruntime's quantizer
    before 1.32 transposes a Gemm's weight in place when it rewrites the Gemm as a MatMul, and its
    shape inference then failed on the stale record ("Inferred shape and existing shape differ in
    dimension 0: (1) vs (64)"): int8 export failed with every onnxruntime from 1.18 to 1.31."""
    weights = {t.name for t in proto.graph.initializer}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    kept = [v for v in copy.graph.value_info if v.name not in weights]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(kept)
    return copy


def stream_all(streamer: OnnxStreamer, x: np.ndarray, batch: Optional[int] = None) -> np.ndarray:
    """Stream every sequence of x (N, L, d_input) from a zero state -> (N, L, d_output), ``batch`` at
    a time (default: all at once); a graph fixed to batch b takes them b at a time, the last group
    padded with zero sequences. A chunk graph of T steps per call takes L padded with zero steps to
    a multiple of T, their outputs dropped (a checkpoint's test split of 128 steps, chunks of 7)."""
    b = streamer.fixed_batch or batch or len(x)
    T, length = streamer.chunk or 1, x.shape[1]
    if length % T:      # after the steps kept: a causal graph's outputs there do not see them
        x = np.concatenate([x, np.zeros((x.shape[0], T - length % T) + x.shape[2:], x.dtype)], 1)
    parts = []
    for i in range(0, len(x), max(b, 1)):
        part = x[i:i + b]
        short = b - len(part)
        if short:
            part = np.concatenate([part, np.zeros((short,) + part.shape[1:], part.dtype)])
        streamer.reset(b)
        parts.append(streamer.run(part)[:b - short, :length])
    return np.concatenate(parts) if parts else np.zeros((0, length, streamer.d_output), np.float32)


def step_form_nodes(proto: onnx.ModelProto) -> List[str]:
    """Names of the nodes that read a step form's tensors (initializers named ``forms.<i>.*``).

    quantize_dynamic rewrites a Gemm as a MatMul named ``<gemm>_MatMul`` before it looks at the
    names to exclude, so a Gemm is excluded under that name too (a step form's nn.Linear was quantised)."""
    forms = {i.name for i in proto.graph.initializer if i.name.startswith(STEP_FORM_PREFIX)}
    readers = [n for n in proto.graph.node if forms.intersection(n.input)]
    return [n.name for n in readers] + [n.name + "_MatMul" for n in readers if n.op_type == "Gemm"]


def accuracy_change(info: Dict[str, Any], float_path: Path, int8_path: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint's headline test metric (accuracy, or MSE for forecasters) for the float and
    the int8 streamed graphs, on the split its config records; None when it records none."""
    from lrnnx_zoo.training import checkpoint_data, score
    try:
        data = checkpoint_data(info)
    except (ValueError, TypeError):      # TypeError: a spec of another JSON shape ("params": "x")
        return None
    classify = data.task == "sequence-classification"
    key = "test_accuracy" if classify else "test_mse"

    def streamed(streamer: OnnxStreamer, batch: Optional[int] = None) -> float:
        out = torch.from_numpy(stream_all(streamer, data.x_test.numpy(), batch))
        return score(out[:, -1] if classify else out, data)[key]   # the last step carries the logits

    # int8 activations get one scale per tensor, shared by the sequences streamed together: streamed
    # as one batch, each sequence's int8 output depended on all the others (a shipped classifier: 98.33% vs
    # 98.61% one by one). So the int8 graph streams them one at a time (a fixed batch b at a time).
    int8 = OnnxStreamer(int8_path)
    f, q = streamed(OnnxStreamer(float_path)), streamed(int8, batch=1)
    how = "one sequence at a time" if int8.fixed_batch is None else f"{int8.fixed_batch} sequences at a time"
    return {"metric": f"{info['dataset'].get('name', 'test')} {key} (streamed, n={len(data.x_test)}; int8 {how})",
            "accuracy_float": f, "accuracy_int8": q, "accuracy_change": q - f}
