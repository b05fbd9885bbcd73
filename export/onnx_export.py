"""Export a causal model as an ONNX step graph: (x [batch, d_input], state [batch, state_size])
-> (y [batch, d_output], state_out [batch, state_size]), one self-contained file.

Exporter: ``torch.onnx.export(..., dynamo=True)`` by default. Both exporters produce correct
graphs of the step module (plain real ops), measured on the diagonal built-in families: the dynamo exporter's
graphs have about half the nodes (weights become initializers and its optimiser folds the shape
arithmetic; the TorchScript-based one leaves ~50 Constant nodes) at the same run time in ONNX
Runtime, and it is the supported path (the TorchScript-based exporter warns that it will be
removed). It takes ~2 s instead of ~0.1 s; pass ``exporter="legacy"`` for the old one.

The graph is written to a temporary file, checked (``onnx.checker`` full check), streamed in
ONNX Runtime from a zero state and compared with the model's forward (see
:mod:`lrnnx_zoo.export.validate`), and only then moved to ``path``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from lrnnx_zoo.chunk_forms import check_chunk
from lrnnx_zoo.shapes import integer
from lrnnx_zoo.step_forms import onnx_ops
from lrnnx_zoo.thread_warnings import this_threads_warnings
from lrnnx_zoo.utf8 import openable

from .options import DEFAULT_OPSET, MAX_LEGACY_OPSET, MAX_OPSET, MIN_DYNAMO_OPSET, MIN_OPSET
from .paths import output_location
from .provenance import Source, graph_metadata, load_source
from .quantize import (INT8_EXTRA_SEQUENCES, INT8_RELATIVE_TOLERANCE, accuracy_change, check_mode, quantize_int8,
                       stream_all)
from .result import ExportResult
from .runtime import INPUT_NAMES, OUTPUT_NAMES, OnnxStreamer, check_batch, graph_opset
from .chunk_graph import ChunkModule, chunk_metadata, chunked
from .graph_size import check_chunk_in_memory, check_chunk_under, chunk_graph_bytes, tensor_bytes
from .step_graph import (EXPORT_LOCK, TRACE_BATCH, ExportError, StepModule, batch_bound_form, batch_bound_note,
                         build_step_module, no_autocast, tracing)
from .validate import DEFAULT_SEED, FLOAT32_TOLERANCE, ValidationError, default_sequence, validate_stream

#: The oldest onnxruntime that loads and runs the shipped checkpoints' graphs at each opset (written
#: at the lowest IR version the opset allows), measured with onnxruntime 1.15.1 to 1.32.0; opsets
#: below 19 ran on all of them. 1.15 is the oldest with wheels for this Python (3.11).
ONNXRUNTIME_FOR_OPSET = {19: "1.16", 20: "1.17", 21: "1.18", 22: "1.21", 23: "1.23", 24: "1.24", 25: "1.24"}
OLDEST_ONNXRUNTIME_TESTED = "1.15"
EXPORTERS = ("dynamo", "legacy")
#: The largest graph to_onnx writes: one self-contained file, a protobuf message of at most 2 GiB.
ONNX_FILE_LIMIT = 2 ** 31 - 1


def resolve_opset(opset: Optional[int], exporter: str, record: List[str]) -> Tuple[int, str]:
    """(opset, exporter) to use: the default opset for None; an opset the dynamo exporter cannot
    write (below 18) goes to the TorchScript-based one, with a note in ``record``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset is None:
        return DEFAULT_OPSET, exporter
    number = integer(opset)     # a numpy integer from a sweep counts, kept as a Python int
    if number is None or not MIN_OPSET <= number <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}] (verified with this onnx and "
                         f"onnxruntime; default {DEFAULT_OPSET}), got {opset!r}")
    opset = number
    if exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
        record.append(f"note: opset {opset} < {MIN_DYNAMO_OPSET}: written by the TorchScript-based exporter "
                      f"(the dynamo exporter starts at opset {MIN_DYNAMO_OPSET})")
        return opset, "legacy"
    if exporter == "legacy" and opset > MAX_LEGACY_OPSET:
        raise ValueError(f"the legacy exporter writes opsets up to {MAX_LEGACY_OPSET}, got {opset}; "
                         f"use exporter='dynamo' for opsets {MIN_DYNAMO_OPSET}..{MAX_OPSET}")
    return opset, exporter


@contextlib.contextmanager
def _onnx_log_as_found() -> Iterator[None]:
    """Leave torch's C++ ONNX log as the caller had it. The legacy exporter switches it on for the rest of
    the process (its ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``, always true,
    not its result) and, when it fails, prints the whole traced graph through it to stdout, ~100 lines
    before the one-line ExportError that says what failed (step_graph.tracing). Unless the caller had
    the log on, what it writes during an export is dropped and it is off again after."""
    C = torch._C
    log, is_on, set_on = (getattr(C, n, None) for n in ("_jit_onnx_log", "_jit_is_onnx_log_enabled",
                                                         "_jit_set_onnx_log_enabled"))
    if log is None or is_on is None or set_on is None or is_on():
        yield
        return
    C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        C._jit_onnx_log = log
        set_on(False)


@contextlib.contextmanager
def _quiet(record: List[str]) -> Iterator[None]:
    """Collect the calling thread's upstream warnings (kept in the result, not shown) and silence the
    exporters' chatter. The warnings are caught in this thread only (:func:`this_threads_warnings`):
    ``catch_warnings`` here took every other thread's warnings into the export's list (none shown) and
    on exit undid filters set meanwhile. The logger levels are process-wide, so other threads' exports
    wait meanwhile (:data:`~.step_graph.EXPORT_LOCK`)."""
    chatter = {n: logging.ERROR for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")}
    # a form the tracer cannot follow (a branch on a value) had these print its whole traced graph and
    # error lines to stderr, before the one-line ExportError that says what failed (step_graph.tracing)
    chatter.update(dict.fromkeys(("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor"),
                                 logging.CRITICAL))
    loggers = [logging.getLogger(n) for n in chatter]
    with EXPORT_LOCK:
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(chatter[lg.name])
        caught: Set[str] = set()
        try:
            with this_threads_warnings(lambda category, text: caught.add(
                    f"{category.__name__}: {(text.splitlines() or [''])[0]}")):
                yield
            record.extend(sorted(caught))
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def feature_shapes(step: Union[StepModule, ChunkModule]) -> Dict[str, Tuple[int, ...]]:
    """The shape after the batch of each of the graph's inputs and outputs, by name: x (d_input,),
    y (d_output,) (with (chunk,) in front for a chunk module), state and state_out (state_size,)."""
    steps = (step.chunk,) if isinstance(step, ChunkModule) else ()
    return {"x": steps + (step.d_input,), "state": (step.state_size,), "y": steps + (step.d_output,),
            "state_out": (step.state_size,)}


def sample_inputs(step: Union[StepModule, ChunkModule], batch: int) -> Tuple[Tensor, Tensor]:
    """Example (x_t, state) for tracing (x (batch, chunk, d_input) for a chunk module); non-zero so
    no branch can be specialised on zeros."""
    g = torch.Generator().manual_seed(0)
    f32 = torch.float32                                  # whatever torch's default dtype is
    shapes = feature_shapes(step)
    return (torch.randn((batch,) + shapes["x"], generator=g, dtype=f32),
            torch.randn((batch,) + shapes["state"], generator=g, dtype=f32))


def _too_large(what: str, size: float) -> ExportError:
    return ExportError(f"{what} holds {size / 1e6:.4g} MB of weights, more than one ONNX file holds "
                       f"({ONNX_FILE_LIMIT / 1e6:.4g} MB: protobuf's limit); export it with to_torchscript or "
                       f"to_torch_export (`--format torchscript` / `torch-export`), which have no such limit")


def check_model_fits(model: nn.Module) -> None:
    """Refuse a model whose weights outside its sequence layers (encoder, norms, GLUs, decoder: they go
    into a step graph as they are) already pass :data:`ONNX_FILE_LIMIT`, before its step forms are
    built (3-4x the layers' weights at the peak) and traced: a 2 GiB graph spent minutes and GBs, then
    failed with protobuf's "Failed to serialize proto" (a scale audit)."""
    layers = [block.layer for block in getattr(model, "blocks", ())]
    outside = tensor_bytes(model, layers)
    if outside > ONNX_FILE_LIMIT:
        raise _too_large("the part of the model outside its sequence layers (encoder, norms, GLUs, decoder)", outside)


def check_graph_size(step: StepModule, T: Optional[int]) -> None:
    """Refuse a chunk graph of T steps whose weights exceed :data:`ONNX_FILE_LIMIT` (protobuf messages
    stop at 2 GiB), before its chunk module is built: the chunk forms' matrices grow as T^2 (a
    per-channel one T (T + 2N) per channel: 4 per-channel blocks of d_model=256, N=64 hold 1.3 GB at
    T=512), so their weights are a T^2 + b T + c, found exactly from the modules of 1, 2 and 3 steps.
    Checked on the built module, a chunk no file holds was refused after the build: the forecaster
    at chunk=3000 after 26 s and 12.5 GB at the peak, at chunk=5000 not in 5 minutes. Then the chunk
    against this machine's memory (:func:`~.graph_size.check_chunk_in_memory`), as for the other
    formats. ``T`` None: the step graph's own weights (its step forms and the model's other weights),
    before it is traced."""
    if T is None:
        size = tensor_bytes(step)
        if size > ONNX_FILE_LIMIT:
            raise _too_large("the step graph of this model", size)
        return
    total = chunk_graph_bytes(step)
    check_chunk_under(total, T, ONNX_FILE_LIMIT, f"more than one ONNX file holds ({ONNX_FILE_LIMIT / 1e6:.3g} MB)",
                      "the model alone is too large for one file")
    check_chunk_in_memory(step, T, total)


def export_graph(step: Union[StepModule, ChunkModule], opset: int = DEFAULT_OPSET, batch: Optional[int] = None,
                 exporter: str = "dynamo", record: Optional[List[str]] = None) -> onnx.ModelProto:
    """The ONNX graph of a step (or chunk) module (no metadata yet); dynamic batch unless ``batch`` is given."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    args = sample_inputs(step, batch or TRACE_BATCH)
    record = record if record is not None else []
    names = dict(input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), opset_version=opset)
    # onnx_ops: the step forms' sums as the ops ONNX Runtime runs fastest (step_forms.sum_rows)
    with _quiet(record), _onnx_log_as_found(), torch.no_grad(), onnx_ops(), \
            tracing(step, f"torch.onnx.export ({exporter} exporter)"):
        if exporter == "dynamo":
            dims = None
            if batch is None:
                b = torch.export.Dim("batch")
                dims = ({0: b}, {0: b})
            program = torch.onnx.export(step, args, None, dynamo=True, dynamic_shapes=dims, verbose=False,
                                        optimize=True, external_data=False, **names)
            proto = program.model_proto
        else:
            import io
            axes = None if batch is not None else {n: {0: "batch"} for n in INPUT_NAMES + OUTPUT_NAMES}
            buf = io.BytesIO()
            torch.onnx.export(step, args, buf, dynamo=False, dynamic_axes=axes, do_constant_folding=True, **names)
            proto = onnx.load_from_string(buf.getvalue())
    if batch is None:
        # A step form that uses its batch size as a number makes the dynamo exporter fall back to a
        # graph fixed to the traced batch, with no error.
        fixed = [v.name for v in list(proto.graph.input) + list(proto.graph.output)
                 if v.type.tensor_type.shape.dim[0].dim_value]
        if fixed:
            owner = batch_bound_form(step)
            who = f"{owner}.step_form()" if owner else "the step module"
            raise ExportError(
                f"a dynamic batch was asked for (batch=None), but the exported graph fixes the batch of "
                f"{fixed} to {TRACE_BATCH}, the batch it was traced at: {who} uses its batch size "
                f"as a constant (e.g. int(u.shape[0]) in a step form). Make it batch-agnostic, or export "
                f"a fixed batch (batch=N)")
    pin_feature_dims(proto, feature_shapes(step))
    strip_debug_records(proto)
    proto.ir_version = min(proto.ir_version, lowest_ir_version(proto))
    return proto


def pin_feature_dims(proto: onnx.ModelProto, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Write every dimension after the batch of the graph's inputs and outputs as the number it is
    (``shapes``: :func:`feature_shapes`, by name), in place. The TorchScript-based exporter left some symbolic:
    onnxruntime reported a state_out of ['batch', 'Concatstate_out_dim_1'] for about one graph in three
    (opset 17, or exporter="legacy"), where the contract and config.json say [batch, state_size]."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        size = shapes[value.name]
        if len(dims) != 1 + len(size):
            raise ExportError(f"the exported graph's {value.name} has {len(dims)} dimensions, expected (batch, "
                              f"{', '.join(map(str, size))})")
        for dim, n in zip(list(dims)[1:], size):
            if not dim.HasField("dim_value") or dim.dim_value != n:
                dim.dim_value = n          # (dim_value and dim_param are one field: this clears the name)


def lowest_ir_version(proto: onnx.ModelProto) -> int:
    """The lowest ONNX IR version that holds the graph's opsets. The dynamo exporter stamps its own
    onnx's IR version (10) whatever the opset, and onnxruntime refuses an IR newer than it knows:
    1.17 failed on an opset-20 graph ("Unsupported model IR version: 10, max supported IR version:
    9"), though it implements opset 20, and so did 1.15-1.17 at opset 18."""
    return onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)


def onnxruntime_needed(opset: int) -> str:
    """The oldest onnxruntime known to run a graph of ``opset`` in [MIN_OPSET, MAX_OPSET] (see
    ONNXRUNTIME_FOR_OPSET; below 19, the oldest one tested)."""
    return ONNXRUNTIME_FOR_OPSET.get(opset, OLDEST_ONNXRUNTIME_TESTED)


def strip_debug_records(proto: onnx.ModelProto) -> None:
    """Drop the dynamo exporter's debugging records (in place): every node's stack trace, FX node
    and module path, and the ExportedProgram's signature. They named the exporting machine's
    source paths on every device the graph went to, and were 41% of a shipped forecaster's file."""
    graph = proto.graph
    del graph.metadata_props[:]
    for entries in (graph.node, graph.input, graph.output, graph.value_info, graph.initializer):
        for entry in entries:
            del entry.metadata_props[:]


def graph_stats(proto: onnx.ModelProto, path: Union[str, Path]) -> Dict[str, Any]:
    """Size on disk, node count and per-op counts of a graph."""
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {"bytes": os.path.getsize(path), "nodes": len(proto.graph.node),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "opset": graph_opset(proto),
            "ir_version": proto.ir_version,
            "initializers": len(proto.graph.initializer)}


def write_onnx(proto: onnx.ModelProto, path: Union[str, Path], metadata: Dict[str, str]) -> None:
    """Attach metadata, save as one self-contained file (no external data), and run the full checker."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    with openable(path) as name:                # (the checker's C++ takes UTF-8 paths only)
        onnx.checker.check_model(name, full_check=True)


def onnx_stream(path: Union[str, Path], batch: Optional[int] = None, step: Optional[torch.nn.Module] = None
                ) -> Callable[[np.ndarray], np.ndarray]:
    """Stream function for validation: a fresh OnnxStreamer run from a zero state, ``batch``
    sequences at a time (default: all at once; a fixed-batch graph takes its own batch). ``step``: the
    step or chunk module exported, whose batch-bound form (:func:`~.step_graph.batch_bound_note`) a
    failure names (the opset <= 17 exporter's graph of such a form fails here, naming no layer)."""
    streamer = OnnxStreamer(path)

    def stream(x: np.ndarray) -> np.ndarray:
        try:
            return stream_all(streamer, x, batch)
        except RuntimeError as exc:         # ONNX Runtime failing inside the graph
            why = (step is not None and batch_bound_note(step)) or (
                f"A graph that runs only at the batch it was traced at ({TRACE_BATCH} for a dynamic batch) "
                f"uses its batch size as a constant (e.g. int(u.shape[0]) in a step form)")
            raise ExportError(
                f"the exported graph fails in ONNX Runtime on the validation input of shape {x.shape}: "
                f"{str(exc).splitlines()[0]} ... Not written. {why}") from exc

    return stream


def _temp_path(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}.tmp")


def to_onnx(model_or_checkpoint: Source, path: Union[str, Path], opset: Optional[int] = None,
            batch: Optional[int] = None, quantize: Optional[str] = None, validate: bool = True,
            validation_input: Optional[Tensor] = None, tolerance: float = FLOAT32_TOLERANCE,
            exporter: str = "dynamo", revision: Optional[str] = None,
            token: Optional[Union[str, bool]] = None, chunk: Optional[int] = None) -> ExportResult:
    """Export a causal model's step graph to ONNX, validated before it is written.

    Args:
        model_or_checkpoint: a SequenceModel, a checkpoint folder, a shipped name or a Hub repo id.
        path: the .onnx file to write (one self-contained file).
        opset: ONNX opset in [11, 25] (default 20, see onnx_export.DEFAULT_OPSET); below 18 the
            TorchScript-based exporter writes it.
        batch: fix the batch size; None (default) leaves it dynamic.
        quantize: None or "int8" (dynamic int8 quantisation of MatMul/Gemm weights).
        validate: stream the graph and compare with the model's forward before writing.
        validation_input: (B, L, d_input) sequence for validation; default a random normal
            (2, 256, d_input) sequence (see :mod:`~lrnnx_zoo.export.validate`).
        tolerance: max abs error for the float32 graph (int8 graphs: see :mod:`~lrnnx_zoo.export.quantize`).
        exporter: "dynamo" (default) or "legacy" (TorchScript-based torch.onnx exporter, opsets 11..23).
        revision, token: passed to ``from_pretrained`` for Hub repo ids.
        chunk: write a chunk graph of this many steps per call instead, x (batch, chunk, d_input) ->
            y (batch, chunk, d_output) with the step graph's state (:mod:`~lrnnx_zoo.export.chunk_graph`);
            validated on a sequence whose length is a multiple of it (the default one is lengthened).
    Returns:
        an :class:`~lrnnx_zoo.export.result.ExportResult`; ``quantization`` holds the int8 report.
    Raises:
        ExportError (a model that cannot stream), ValidationError (the graph disagrees with the model).
    """
    check_mode(quantize)
    batch = check_batch(batch)
    chunk = None if chunk is None else check_chunk(chunk)
    record: List[str] = []
    opset, exporter = resolve_opset(opset, exporter, record)
    with output_location(path, "path") as path, no_autocast():
        model, info = load_source(model_or_checkpoint, revision=revision, token=token)
        check_model_fits(model)
        step = build_step_module(model)
        extra: Dict[str, Any] = {"format": "onnx", "opset": str(opset), "batch": str(batch or "dynamic"),
                                 "quantization": quantize or "none"}
        metadata = graph_metadata(step, model, info, {**extra, **chunk_metadata(chunk)})
        # before the seconds of tracing (and the chunk forms' gigabytes)
        check_graph_size(step, chunk)
        step, x = chunked(step, validation_input, chunk, batch)
        proto = export_graph(step, opset, batch, exporter, record)
        tmp_float, tmp_q = _temp_path(path, "float"), _temp_path(path, "int8")
        try:
            write_onnx(proto, tmp_float, {**metadata, "lrnnx_zoo.quantization": "none"})
            report = (validate_stream(onnx_stream(tmp_float, step=step), model, x, tolerance, "onnxruntime")
                      if validate else None)
            final, qreport = tmp_float, None
            if quantize == "int8":
                quantize_int8(tmp_float, tmp_q, metadata, proto)
                with openable(tmp_q) as name:
                    onnx.checker.check_model(name, full_check=True)
                qreport = _int8_report(model, info, tmp_float, tmp_q, x, validate)
                if qreport["size_warning"]:
                    record.append(f"warning: {qreport['size_warning']}")
                final = tmp_q
            stats = graph_stats(onnx.load(str(final)), final)
            stats.update(exporter=exporter, float_nodes=len(proto.graph.node))
            os.replace(final, path)
        finally:
            for tmp in (tmp_float, tmp_q):
                if tmp.exists():
                    tmp.unlink()
    return ExportResult(path=str(path), format="onnx", metadata=metadata, state_size=step.state_size,
                        d_input=step.d_input, d_output=step.d_output, state_layout=step.state_layout,
                        validation=report, quantization=qreport, graph=stats, warnings=record)


def _int8_report(model: torch.nn.Module, info: Dict[str, Any], float_path: Path, int8_path: Path,
                 x: Optional[Tensor], validate: bool) -> Dict[str, Any]:
    """Output error of the int8 graph against the model (held to the int8 tolerance when
    validating), plus the accuracy change on the checkpoint's evaluation split if it has one."""
    x = x if x is not None else default_sequence(model.config.d_input)
    x = torch.as_tensor(x, dtype=torch.float32)
    # beside the validation input, independent sequences of its length (seeds after the default's): checked
    # on one sample, a model 7-12% off on most sequences passed at 4.3% (quantize.INT8_EXTRA_SEQUENCES)
    extra = default_sequence(model.config.d_input, x.shape[1], INT8_EXTRA_SEQUENCES, DEFAULT_SEED + 1)
    x = torch.cat([x, extra])
    scale = float(np.abs(onnx_stream(float_path)(x.numpy())).max())
    tolerance = INT8_RELATIVE_TOLERANCE * scale
    # One sequence at a time, as for the accuracy (see quantize.py): streamed as one batch, each
    # sequence's int8 error depended on the sequences beside it. Every sequence is held to the tolerance.
    report = validate_stream(onnx_stream(int8_path, batch=1), model, x, tolerance, "onnxruntime-int8",
                             raise_on_failure=False)
    if validate and not report.passed:
        # the float graph passed validation just before, so the step forms are not to blame (the
        # default message's cause): int8 costs this model more than the tolerance
        raise ValidationError(report, why=(
            f"The float32 graph passed; int8 quantisation of the dense layers (encoder, blocks, decoder) costs this "
            f"model more than {INT8_RELATIVE_TOLERANCE:.0%} of its largest output ({scale:.3g}). Export it without "
            f"quantize, or validate on the data it will see (validation_input=)."))
    float_bytes, int8_bytes = os.path.getsize(float_path), os.path.getsize(int8_path)
    out: Dict[str, Any] = {"mode": "int8 dynamic (onnxruntime.quantization.quantize_dynamic, QInt8 weights)",
                           "max_abs_error": report.max_abs_error, "tolerance": tolerance,
                           "relative_tolerance": INT8_RELATIVE_TOLERANCE, "output_scale": scale,
                           "sequences": int(x.shape[0]), "validation": report.to_dict(),
                           "float_bytes": float_bytes, "int8_bytes": int8_bytes, "size_warning": None}
    if int8_bytes > float_bytes:
        # the scales, zero points and quantise nodes outweigh what int8 saves on small dense layers
        out["size_warning"] = (f"the int8 graph is larger than the float32 one ({int8_bytes:,} vs {float_bytes:,} "
                               f"bytes): quantisation pays off only for dense layers large enough that their int8 "
                               f"weights save more than its scales and quantise nodes add; the float32 graph is "
                               f"smaller and exact")
    acc = accuracy_change(info, float_path, int8_path)
    out.update(acc or {"metric": None, "accuracy_float": None, "accuracy_int8": None, "accuracy_change": None})
    return out
