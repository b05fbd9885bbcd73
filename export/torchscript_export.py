"""Export the step module for libtorch / PyTorch runtimes: TorchScript (.ts) and torch.export (.pt2).

TorchScript is deprecated upstream (since torch 2.11 every ``torch.jit`` call warns): it is
offered for libtorch deployments that still need it, and its warnings are recorded in the result
rather than printed. ``torch.export`` (an ExportedProgram saved with ``torch.export.save``) is the
supported path. Both artifacts have the step-graph signature ``(x_t, state) -> (y_t, state')``,
carry the ``lrnnx_zoo.*`` metadata as an extra file ``lrnnx_zoo.json``, and are validated by
loading the *saved file* back and streaming it from a zero state before being moved into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from lrnnx_zoo.chunk_forms import check_chunk
from lrnnx_zoo.thread_warnings import this_threads_warnings
from lrnnx_zoo.utf8 import is_utf8, openable

from .chunk_graph import ChunkModule, chunk_metadata, chunked
from .graph_size import check_chunk_in_memory
from .onnx_export import _quiet, check_batch, sample_inputs
from .paths import output_location
from .provenance import META_PREFIX, Source, graph_metadata, load_source
from .result import ExportResult
from .step_graph import (TRACE_BATCH, ExportError, StepModule, batch_bound_note, build_step_module,
                         no_autocast, tracing)
from .validate import FLOAT32_TOLERANCE, StreamFn, torch_stream, validate_stream

METADATA_FILE = "lrnnx_zoo.json"


@contextlib.contextmanager
def _temp(path: Path, suffix: Optional[str] = None) -> Iterator[Path]:
    """A hidden temporary sibling of path (torch.export.load wants the .pt2 suffix on it), removed on
    exit unless it was moved into place: a save or validation that fails leaves nothing behind."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{suffix or path.suffix}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _save_archive(tmp: Path, save: Callable[[BinaryIO], None]) -> None:
    """Write an archive with ``save(file)`` through an open file: torch.jit.save and torch.export.save
    given a path name the zip's root folder after that file, here the temporary one
    (``.model.1f3a9c2e.tmp/...``), so two exports of one model were never byte-identical and an
    unzipped artifact showed a hidden folder; given a file object they name it ``archive``."""
    with open(tmp, "wb") as file:
        save(file)


#: Records a TorchScript archive's writer adds itself (copied over, they would be written twice).
_WRITER_RECORDS = (".data/version", ".data/serialization_id", "version")


def _save_torchscript(module: torch.jit.ScriptModule, tmp: Path, extra_files: Dict[str, str]) -> None:
    """Save ``module`` to ``tmp`` as torch.jit.save does, less its debug records.

    torch.jit.save keeps a ``.debug_pkl`` of source ranges beside each class's code: the traced
    Python frames and scripted functions by their paths on the exporting machine
    (/work/main/export/step_graph.py, torch's site-packages: /home/<user>/... elsewhere), shipped to
    every device the graph went to (the ONNX graphs drop theirs: onnx_export.strip_debug_records),
    and 60% of a small model's archive. The archive is copied record by record without them, at its
    own format version; a failing op is then reported in the archive's code, not the exporter's. The
    first save goes to a file beside ``tmp``, read a record at a time: the archive is never whole in
    memory (a chunk graph's can be GBs)."""
    raw = tmp.with_name(tmp.name + ".raw")
    try:
        with open(raw, "wb") as out:           # torch's C++ opens UTF-8 paths only (utf8.openable)
            torch.jit.save(module, out, _extra_files=extra_files)
        # Read through a file object that is closed on leaving the block: a reader given the path kept
        # the file open until the reader was freed, after the unlink below, and Windows deletes no file
        # that is open (PermissionError, WinError 32: every TorchScript export failed there)
        with open(raw, "rb") as source:
            reader = torch._C.PyTorchFileReader(source)
            # where the writer keeps it: ".data/version" from format 6 on, "version" below (a graph of
            # only long-standing ops, e.g. no LayerNorm / GELU, gets an old format)
            version = int(bytes(reader.get_record(".data/version" if reader.has_record(".data/version") else "version")))

            def copy(file: BinaryIO) -> None:
                writer = torch._C.PyTorchFileWriter(file)
                writer.set_min_version(version)
                for name in reader.get_all_records():
                    if not name.endswith(".debug_pkl") and name not in _WRITER_RECORDS:
                        data = reader.get_record(name)
                        writer.write_record(name, data, len(data))
                writer.write_end_of_file()

            _save_archive(tmp, copy)
    finally:
        raw.unlink(missing_ok=True)


def _strip_stack_traces(program: torch.export.ExportedProgram) -> None:
    """Drop every node's ``stack_trace`` (in place): torch.export.save writes each one into the
    archive's model.json, the exporting machine's source paths on every device the graph went to
    (16% of a small model's .pt2). The nodes keep their module paths (``nn_module_stack``)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)


def load_torchscript(path: Union[str, Path]) -> torch.jit.ScriptModule:
    """Load a TorchScript step module (its upstream deprecation warnings silenced in the calling thread
    only: :func:`~lrnnx_zoo.thread_warnings.this_threads_warnings`).

    A .ts is code: torch.jit.load compiles and runs the TorchScript source the archive carries, so load
    only files you made or trust, and stream graphs from elsewhere as ONNX (:class:`~.runtime.OnnxStreamer`)."""
    with this_threads_warnings(None, DeprecationWarning), this_threads_warnings(None, FutureWarning):
        with openable(path) as name:
            return torch.jit.load(name, map_location="cpu")


def load_torch_export(path: Union[str, Path]) -> torch.nn.Module:
    """Load a .pt2 step program as a callable module (x_t, state) -> (y_t, state') that checks its
    inputs (:class:`CheckedStep`).

    A .pt2 is code, not data: torch.export.load unpickles parts of the archive with weights_only=False
    (its sample inputs after a weights_only attempt fails, pickled weights and constants) and evaluates
    the graph's symbolic shapes with sympy, so a crafted .pt2 runs what it likes. Load only files you
    made or trust; stream graphs from elsewhere as ONNX (:class:`~.runtime.OnnxStreamer`).
    :func:`read_metadata` runs first here and reads a file's metadata without loading it, so a .pt2
    without lrnnx_zoo's metadata is refused before anything in it is unpickled; that is no safety
    check (anyone can add the metadata)."""
    meta = read_metadata(path)
    sizes = {k: int(meta.get(META_PREFIX + k, 0)) for k in ("state_size", "d_input", "chunk")}
    fixed = str(meta.get(META_PREFIX + "batch", "dynamic"))     # "dynamic", or the batch it is fixed to
    if is_utf8(str(path)):
        program = torch.export.load(str(path))
    else:                                   # torch's C++ opens UTF-8 paths only, and warns at a /dev/fd path
        with open(path, "rb") as f:
            program = torch.export.load(f)
    return CheckedStep(program.module(), **sizes, batch=int(fixed) if fixed.isdigit() else 0)


#: What :func:`read_metadata` reads of an archive's metadata entry at most (it holds some hundred bytes).
MAX_METADATA_BYTES = 1 << 20


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The ``lrnnx_zoo.*`` metadata stored in a .ts or .pt2 artifact (whatever its file name).

    Read from the archive's ``extra/lrnnx_zoo.json`` entry (both formats are zip archives that keep
    extra files there): nothing else in the file is loaded. Loading the artifact to read it ran
    torch.export.load, which unpickles the weights with weights_only=False (code in a crafted file
    runs), or torch.jit.load, which compiles the archive's code: metadata of a file from anywhere
    is now safe to read, and costs no model load.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:      # it escaped as zipfile's own "File is not a zip file"
        raise ValueError(f"{path} is not a zip archive: expected a .ts or .pt2 step graph written by lrnnx_zoo.export "
                         f"(to_torchscript / to_torch_export)") from None
    with archive:
        entries = [n for n in archive.namelist() if n.partition("/")[2] == f"extra/{METADATA_FILE}"]
        if not entries:
            raise ValueError(f"{path} holds no extra/{METADATA_FILE}: expected a .ts or .pt2 step graph written by "
                             f"lrnnx_zoo.export (to_torchscript / to_torch_export)")
        with archive.open(entries[0]) as entry:     # read no further than a metadata file can be
            raw = entry.read(MAX_METADATA_BYTES + 1)
    if len(raw) > MAX_METADATA_BYTES:
        # a 2 MB archive whose entry inflates to 2 GiB grew the process by 4.3 GB before failing in json
        raise ValueError(f"{path}: its extra/{METADATA_FILE} holds over {MAX_METADATA_BYTES // 1024} KiB (lrnnx_zoo "
                         f"writes about 1 KiB); not read further. Expected a .ts or .pt2 step graph written by "
                         f"lrnnx_zoo.export (to_torchscript / to_torch_export): re-export it from its checkpoint")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:      # ValueError: UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"{path}: its extra/{METADATA_FILE} is not JSON ({exc}); expected the metadata "
                         f"lrnnx_zoo.export writes: re-export it from its checkpoint") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its extra/{METADATA_FILE} holds a JSON {type(meta).__name__}, expected an object "
                         f"of lrnnx_zoo.* keys: re-export it from its checkpoint")
    return meta


def _finish(step: Union[StepModule, ChunkModule], model: torch.nn.Module, tmp: Path, path: Path, fmt: str,
            loader: Any, metadata: Dict[str, str], validate: bool, x: Optional[Tensor], tolerance: float,
            record: List[str]) -> ExportResult:
    report = None
    if validate:
        loaded = loader(tmp)
        report = validate_stream(_failing_run_named(torch_stream(loaded, step.state_size, getattr(step, "chunk", None)),
                                                    fmt, record, step), model, x, tolerance, fmt)
    os.replace(tmp, path)
    return ExportResult(path=str(path), format=fmt, metadata=metadata, state_size=step.state_size,
                        d_input=step.d_input, d_output=step.d_output, state_layout=step.state_layout,
                        validation=report, graph={"bytes": os.path.getsize(path)}, warnings=record)


def _failing_run_named(stream: StreamFn, fmt: str, record: List[str], step: torch.nn.Module) -> StreamFn:
    """``stream`` whose failure inside the saved graph is an ExportError with its cause in one line, the
    layer whose form does not carry over to another batch (:func:`~.step_graph.batch_bound_note` of
    ``step``, the step or chunk module saved) and what tracing warned of: a step form that read a
    tensor into Python (.numpy()) traced into a constant of the trace's batch, and validation failed as
    a page of TorchScript interpreter traceback."""
    def run(x: np.ndarray) -> np.ndarray:
        try:
            return stream(x)
        except RuntimeError as exc:                 # torch.jit.Error too
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            cause = lines[-1] if "TorchScript" in lines[0] else lines[0]     # the interpreter's own error comes last
            warned = [w for w in record if w.startswith("TracerWarning")]
            blame = batch_bound_note(step)
            raise ExportError(f"the {fmt} graph fails on the validation input of shape {x.shape}: {cause}. Not "
                              f"written." + (f" {blame}." if blame else "") +
                              (f" Tracing warned: {warned[0]}" if warned else "")) from exc
    return run


def to_torchscript(model_or_checkpoint: Source, path: Union[str, Path], validate: bool = True,
                   validation_input: Optional[Tensor] = None, tolerance: float = FLOAT32_TOLERANCE,
                   revision: Optional[str] = None, token: Optional[Union[str, bool]] = None,
                   chunk: Optional[int] = None) -> ExportResult:
    """Trace the step module with ``torch.jit.trace`` and save it (.ts), validated before it is written.

    TorchScript is deprecated upstream (torch >= 2.11 warns on every ``torch.jit`` call); the
    warnings are recorded in ``result.warnings``. Prefer :func:`to_torch_export`. The traced
    module works for any batch size (the step has no batch-dependent branch; the trace is made
    at batch 3 and validated at the validation input's batch).

    Args: as :func:`~lrnnx_zoo.export.to_onnx` (no opset / quantize / fixed batch): ``validation_input``
    (B, L, d_input), the artifact's step (x_t (batch, d_input), state (batch, state_size)) ->
    (y_t (batch, d_output), state').
    """
    chunk = None if chunk is None else check_chunk(chunk)
    with output_location(path, "path", example="model.ts") as path, no_autocast():
        model, info = load_source(model_or_checkpoint, revision=revision, token=token)
        step = build_step_module(model)
        if chunk is not None:        # before the chunk forms' gigabytes
            check_chunk_in_memory(step, chunk)
        metadata = graph_metadata(step, model, info, {"format": "torchscript", "batch": "dynamic",
                                                      **chunk_metadata(chunk)})
        step, x = chunked(step, validation_input, chunk)
        record: List[str] = []
        with _temp(path) as tmp:
            with _quiet(record), torch.no_grad():
                with tracing(step, "torch.jit.trace"):
                    traced = torch.jit.trace(step, sample_inputs(step, TRACE_BATCH), check_trace=False)
                # in eval mode, as its traced step is: a new module trains, and a .ts saved so was
                # refused by torch.jit.freeze ("only implemented for modules in eval mode")
                checked = CheckedStep(traced, step.state_size, step.d_input, getattr(step, "chunk", None) or 0)
                traced = torch.jit.script(checked.eval())
                _save_torchscript(traced, tmp, {METADATA_FILE: json.dumps(metadata)})
            with _quiet(record), torch.no_grad():       # apart, so that validation sees what tracing warned
                return _finish(step, model, tmp, path, "torchscript", load_torchscript, metadata, validate,
                               x, tolerance, record)


def _dtype_name(t: Tensor) -> str:
    """t's dtype as Python prints it, also in TorchScript (where a dtype formats as an int)."""
    for dtype, name in ((torch.float64, "float64"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
                        (torch.int64, "int64"), (torch.int32, "int32"), (torch.bool, "bool")):
        if t.dtype == dtype:
            return name
    return "float32" if t.dtype == torch.float32 else "not float32"


def step_input_problem(x: Tensor, state: Tensor, d_input: int, state_size: int, chunk: int, batch: int = 0) -> str:
    """What is wrong with the inputs of a .ts / .pt2 step graph (chunk 0) or chunk graph of
    ``chunk`` steps, or "" when nothing is: x: (B, d_input) or (B, chunk, d_input), state:
    (B, state_size), both float32 (a step graph's weights are float32), B the ``batch`` a program
    is fixed to (0: any). Scriptable, so a .ts runs the same checks in libtorch."""
    if chunk > 0:
        if x.dim() != 3 or x.size(1) != chunk or x.size(2) != d_input:
            return "x must have shape (batch, {}, {}), got {}".format(chunk, d_input, list(x.shape))
    elif x.dim() != 2 or x.size(1) != d_input:
        return "x must have shape (batch, {}), got {}".format(d_input, list(x.shape))
    if state.dim() != 2 or state.size(0) != x.size(0) or state.size(1) != state_size:
        return "state must have shape (batch={}, state_size={}), got {}".format(x.size(0), state_size,
                                                                               list(state.shape))
    if batch > 0 and x.size(0) != batch:      # else torch's bare "Guard failed: x.size()[0] == 2"
        return ("x must have shape (batch={}, ...), got {}; this graph is exported for batch={}; re-export it "
                "without a fixed batch (to_torch_export(..., batch=None)) to stream {}").format(
                    batch, list(x.shape), batch, x.size(0))
    if x.dtype != torch.float32 or state.dtype != torch.float32:
        return "x and state must be float32 (the graph's weights are), got {} and {}".format(
            _dtype_name(x), _dtype_name(state))
    return ""


class CheckedStep(torch.nn.Module):
    """A step (or chunk) graph behind :func:`step_input_problem`'s checks, called as ``(x, state)``
    (by name too). Scripted around a traced .ts (a trace records the shapes it saw as constants: a
    state 85 wide into an 82-wide graph was sliced and stepped, silently), so the checks run in
    libtorch too and a refusal arrives in Python as ``torch.jit.Error`` (a RuntimeError); around a
    loaded .pt2 program, which alone guards only the sizes it was exported with (an x of another
    rank failed with "tuple index out of range", a float64 one in its first matmul, and ``x=``,
    ``state=`` were refused as a keyword mismatch).

    inner: the traced step, or ``torch.export.load(path).module()``; chunk 0 for a step graph;
    batch: the batch a .pt2 program is fixed to, 0 for any (a traced .ts takes any)."""

    def __init__(self, inner: torch.nn.Module, state_size: int, d_input: int, chunk: int = 0,
                 batch: int = 0) -> None:
        super().__init__()
        self.inner, self.state_size, self.d_input, self.chunk = inner, state_size, d_input, chunk
        self.batch = batch

    def forward(self, x: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():        # in Python anything may come; a script's inputs are typed
            _check_tensors(x, state)
        problem = step_input_problem(x, state, self.d_input, self.state_size, self.chunk, self.batch)
        if problem != "":
            raise ValueError(problem)
        return self.inner(x, state)


@torch.jit.unused
def _check_tensors(x: Any, state: Any) -> None:
    if not isinstance(x, Tensor) or not isinstance(state, Tensor):
        raise TypeError(f"x and state must be torch tensors, got {type(x).__name__} and {type(state).__name__}")


def to_torch_export(model_or_checkpoint: Source, path: Union[str, Path], batch: Optional[int] = None,
                    validate: bool = True, validation_input: Optional[Tensor] = None,
                    tolerance: float = FLOAT32_TOLERANCE, revision: Optional[str] = None,
                    token: Optional[Union[str, bool]] = None, chunk: Optional[int] = None) -> ExportResult:
    """Export the step module with ``torch.export.export`` and save it (.pt2), validated before it is written.

    The batch dimension is dynamic unless ``batch`` is given. Load it with :func:`load_torch_export`
    (its inputs checked; ``torch.export.load(path).module()`` is the bare program).

    Args: as :func:`~lrnnx_zoo.export.to_onnx` (no opset / quantize).
    """
    batch = check_batch(batch)
    chunk = None if chunk is None else check_chunk(chunk)
    with output_location(path, "path", example="model.pt2") as path, no_autocast():
        model, info = load_source(model_or_checkpoint, revision=revision, token=token)
        step = build_step_module(model)
        if chunk is not None:        # before the chunk forms' gigabytes
            check_chunk_in_memory(step, chunk)
        metadata = graph_metadata(step, model, info, {"format": "torch-export", "batch": str(batch or "dynamic"),
                                                      **chunk_metadata(chunk)})
        # before the seconds of tracing
        step, x = chunked(step, validation_input, chunk, batch)
        record: List[str] = []
        dims = None
        if batch is None:
            b = torch.export.Dim("batch")
            dims = ({0: b}, {0: b})
        with _temp(path, ".pt2") as tmp:
            with _quiet(record), torch.no_grad():
                with tracing(step, "torch.export.export"):
                    program = torch.export.export(step, sample_inputs(step, batch or TRACE_BATCH), dynamic_shapes=dims)
                _strip_stack_traces(program)
                extra = {METADATA_FILE: json.dumps(metadata)}
                _save_archive(tmp, lambda file: torch.export.save(program, file, extra_files=extra))
            return _finish(step, model, tmp, path, "torch-export", load_torch_export, metadata, validate,
                           x, tolerance, record)
