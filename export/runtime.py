"""Stream a step graph through ONNX Runtime with no per-step allocation.

A step graph is tiny (tens of nodes, microseconds of arithmetic), so per-step overhead decides
its speed: thread hand-offs, spinning worker threads, and allocating the input and output tensors
on every call. :class:`OnnxStreamer` runs one thread without spinning and binds numpy buffers
once: x and y are fixed buffers, and the state ping-pongs between two buffers through two
pre-built IOBindings (step k reads buffer k % 2 and writes the other), so a step is one copy in,
one ``run_with_iobinding``, one copy out.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from lrnnx_zoo.shapes import integer, positive_int, stream_rows
from lrnnx_zoo.utf8 import openable

ArrayLike = Any  # numpy array or torch tensor

#: Names fixed by the step-graph contract (docs/export.md, "The step graph").
INPUT_NAMES = ("x", "state")
OUTPUT_NAMES = ("y", "state_out")
META_PREFIX = "lrnnx_zoo."


def session_options(intra_op_threads: int = 1) -> "Any":
    """ONNX Runtime options for tiny per-step graphs: few threads, no spinning, all graph optimisations.

    ``intra_op_threads``: an int >= 0 (numpy ints too; 0 lets ONNX Runtime choose), else a ValueError:
    2.0 failed inside onnxruntime, where OnnxStreamer reported the .onnx file as unloadable, and True
    or -1 were taken."""
    import onnxruntime as ort

    threads = integer(intra_op_threads)
    if threads is None or threads < 0:
        raise ValueError(f"intra_op_threads must be an int >= 0 (ONNX Runtime's intra-op threads; 1 is fastest for "
                         f"one stream of steps, 0 lets ONNX Runtime choose), got {intra_op_threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning pool burns a core between steps and slows neighbours; steps are too short to gain.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def check_batch(batch: Any, dynamic: bool = True) -> Optional[int]:
    """None (a dynamic batch, where ``dynamic``) or a positive int (numpy ints too), else a
    ValueError that says so."""
    if batch is None and dynamic:
        return None
    value = positive_int(batch)
    if value is None:
        raise ValueError(f"batch must be {'None (dynamic) or ' if dynamic else ''}a positive int, got {batch!r}")
    return value


def _to_numpy(x: ArrayLike, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":   # numpy has no bfloat16: .numpy() raised "unsupported ScalarType"
            x = x.float()
        x = x.numpy()
    if isinstance(x, np.ma.MaskedArray):
        # step() streamed the values under the mask, run() called them too large for float32
        if np.ma.getmaskarray(x).any():
            raise ValueError(f"{what} is a masked array with masked values; the graph has no mask: fill them "
                             f"(x.filled(0.0)) or stream each sequence's valid steps only")
        x = x.data
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except ValueError as exc:       # a ragged list: numpy's "inhomogeneous shape after 1 dimensions"
            raise ValueError(f"{what} must be a rectangular array (rows of equal length), got a "
                             f"{type(x).__name__} numpy cannot make one array of ({exc})") from None
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{what} must hold floats (float32 is used), got dtype {x.dtype}")
    return x


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fits_float32(x: np.ndarray) -> bool:
    """Whether every value of x is finite once cast to float32, without copying x (a NaN fails
    both comparisons; a float64 beyond float32's range would become inf). The extremes compare as
    Python floats: in float16 the bound itself rounds to inf, and an infinite float16 input passed."""
    return not x.size or bool(-_FLOAT32_MAX <= float(x.min()) and float(x.max()) <= _FLOAT32_MAX)


def _steps_fit_float32(x: np.ndarray) -> bool:
    """Whether each step's values, x[b, t, :], have a sum of magnitudes within float32's range, the
    rule :meth:`OnnxStreamer.step` applies (run() checked each value alone, and streamed a step of
    three 3e38 values that turned the state infinite and every later output NaN). A NaN, an inf, or
    a float64 beyond float32's range (inf once cast) fails it too: one pass over x for all of them."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.abs(x, dtype=np.float32).sum(axis=-1, dtype=np.float32)).all())


def _non_finite(x: np.ndarray) -> str:
    """Where x holds values that are NaN or infinite as float32 (the error path only)."""
    with np.errstate(over="ignore"):
        bad = np.argwhere(~np.isfinite(x.astype(np.float32)))
    if not len(bad):      # finite values whose magnitudes' sum overflowed float32 (step's check)
        return "values too large for float32 arithmetic (the sum of one step's magnitudes overflows)"
    return f"{len(bad)} NaN or infinite value(s) as float32, the first at index {tuple(bad[0].tolist())}"


def graph_opset(proto: Any) -> Optional[int]:
    """The default (ai.onnx) domain's opset an ONNX ModelProto imports, or None."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _unloadable(path: str, ort_version: str, exc: Exception) -> str:
    """Why onnxruntime could not load ``path``: a file that is not ONNX at all (empty, truncated),
    or an ONNX model newer than this onnxruntime (a graph exported at opset 22+ failed on
    onnxruntime 1.18 with "not a loadable ONNX model (empty, truncated ...)", which it was not)."""
    import onnx

    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        model = None
    if model is None or not model.opset_import or not model.HasField("graph"):   # b"" parses as an empty model
        return f"{path} is not a loadable ONNX model (empty, truncated or not ONNX?): {first}"
    opset = graph_opset(model)
    return (f"onnxruntime {ort_version} cannot load {path}, an ONNX model of opset {opset} and IR version "
            f"{model.ir_version}: a newer onnxruntime, or a graph exported at a lower opset "
            f"(to_onnx(..., opset=N), `lrnnx-zoo export --opset N`), may load it. onnxruntime said: {first}")


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of ``graph`` that may keep its bytes in an external file: initializers,
    sparse initializers, and tensors held by node attributes (Constant's value), subgraphs (If, Loop,
    Scan bodies) included."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield from (sparse.values, sparse.indices)
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _tensors(sub)


def check_external_data(path: str) -> None:
    """Refuse an ONNX file whose tensors name external data outside its own folder, before ONNX Runtime
    opens them: a graph may keep a tensor's bytes in another file (``location``, relative to the .onnx),
    and ONNX Runtime before 1.24 read ``../../etc/passwd`` or ``/home/me/.ssh/id_rsa`` into an initializer
    from wherever the graph said (a downloaded graph's outputs, or its size errors, then carry the file),
    and waited forever on a FIFO. lrnnx-zoo's own graphs are self-contained (no external data); a graph
    whose external files are regular files inside its folder (links resolved) still loads."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:       # not ONNX at all: ONNX Runtime says so, and _unloadable explains it
        return
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    # and the folder of the file the graph's path links to: Hugging Face's cache links a snapshot's
    # model.onnx and model.onnx.data to ../../blobs/<hash>, siblings there (refused as a link out)
    homes = {folder, os.path.dirname(os.path.realpath(path))}
    graphs = [model.graph] + [onnx.helper.make_graph(list(f.node), f.name, [], []) for f in model.functions]
    for graph in graphs:
        for tensor in _tensors(graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = os.path.realpath(os.path.join(folder, location))
            if (not location or os.path.isabs(location)
                    or all(os.path.commonpath([home, target]) != home for home in homes)):
                where = f"{target}, outside the folder {folder}" if location else "nowhere (no location)"
                raise ValueError(
                    f"{path}: tensor {tensor.name!r} keeps its data in the external file {location!r}, which is "
                    f"{where}; refused before ONNX Runtime reads it (a crafted graph reads any file this user may "
                    f"read this way). Expected a self-contained .onnx, as lrnnx_zoo.export.to_onnx and `lrnnx-zoo "
                    f"export` write, or external files inside the graph's folder: re-export the graph from its "
                    f"checkpoint, and do not run graphs from sources you do not trust")
            if not os.path.isfile(target):
                raise ValueError(
                    f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is "
                    f"{'missing' if not os.path.lexists(target) else 'not a regular file (a FIFO, device or folder)'}; "
                    f"expected a regular file beside the graph. Copy the graph with its data files, or re-export it")


#: One NaN or inf in the state reaches every later output, until reset(): refused inputs say so.
_POISON = "a NaN or inf in the state would reach every later output of its sequence until reset()"


#: ``reset()``'s batch when none is given: the graph's fixed batch, else 1 (None itself is refused).
_GRAPH_BATCH: Any = object()


class OnnxStreamer:
    """Run an exported step graph one time step at a time, keeping the state between calls.

    Args:
        path: the .onnx file (with ``lrnnx_zoo.*`` metadata, see docs/export.md).
        intra_op_threads: ONNX Runtime intra-op threads; 1 is fastest for one stream of steps.
        providers: ONNX Runtime execution providers, a name or a sequence of names (default CPU).

    Attributes:
        state_size, d_input, d_output: read from the graph's metadata.
        state_layout: ``[[name, offset, size], ...]``.
        batch: current batch size (set by :meth:`reset`).
        fixed_batch: the graph's batch size if it was exported with a fixed one, else None.

    One streamer is one set of streams with one state: calls from several threads are serialised
    (a lock; without it concurrent steps lost updates), so give each thread its own streamer to
    run streams in parallel (they can share a file).
    """

    def __init__(self, path: Union[str, Path], intra_op_threads: int = 1,
                 providers: Union[str, Sequence[str], None] = None) -> None:
        import onnxruntime as ort

        self.path = os.path.expanduser(os.fspath(path))     # "~/m.onnx", as to_onnx writes it
        self._lock = threading.RLock()
        self._fresh = True          # nothing has set or advanced the state since reset
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no ONNX step graph at {self.path!r} (expected a .onnx file written by "
                                    f"lrnnx_zoo.export.to_onnx or `lrnnx-zoo export`)")
        options = session_options(intra_op_threads)     # outside the try: a bad value is not the file's fault
        # a str is a Sequence[str] to a type checker, and list() of one split it into letters (ONNX Runtime
        # then printed "Unknown Provider Type: C" and fell back to the CPU)
        names = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
        check_external_data(self.path)
        try:
            with openable(self.path) as name:       # (ONNX Runtime opens UTF-8 paths only)
                self.session = ort.InferenceSession(name, options, providers=names)
        except Exception as exc:      # onnxruntime's InvalidProtobuf / Fail: name the file and the likely cause
            raise ValueError(_unloadable(self.path, ort.__version__, exc)) from exc
        self.metadata: Dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.state_size = self._meta_int("state_size")
        self.d_input = self._meta_int("d_input")
        self.d_output = self._meta_int("d_output")
        layout = self.metadata.get(META_PREFIX + "state_layout", "[]")
        try:
            self.state_layout: List[List[Any]] = json.loads(layout)
        except ValueError as exc:
            raise ValueError(f"{self.path}: metadata {META_PREFIX}state_layout must be JSON "
                             f"[[name, offset, size], ...], got {layout[:80]!r}; re-export it") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if set(INPUT_NAMES) - set(inputs) or set(OUTPUT_NAMES) - outputs:
            raise ValueError(f"{self.path} is not a step graph: expected inputs {INPUT_NAMES} and outputs "
                             f"{OUTPUT_NAMES}, found inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        # A chunk graph (lrnnx_zoo.export.to_onnx(..., chunk=T)) takes T steps per call: x (batch, T, d_input).
        chunk = self.metadata.get(META_PREFIX + "chunk")
        self.chunk: Optional[int] = self._meta_int("chunk") if chunk is not None else None
        x_rank = 2 if self.chunk is None else 3
        if len(inputs["x"].shape) != x_rank or (self.chunk is not None and inputs["x"].shape[1] != self.chunk):
            what = "(batch, d_input)" if self.chunk is None else f"(batch, {self.chunk}, d_input)"
            raise ValueError(f"{self.path}: input 'x' has shape {inputs['x'].shape}, but the metadata describes a "
                             f"{'step' if self.chunk is None else 'chunk'} graph taking x {what}; re-export it")
        # Metadata that disagrees with the graph failed at the first step, inside ONNX Runtime.
        # As did a graph taking float16 (onnxconverter_common's float16 conversion, by default):
        # the streamer feeds float32, as the graph contract says.
        for name in INPUT_NAMES:
            if inputs[name].type != "tensor(float)":
                raise ValueError(f"{self.path}: input {name!r} is {inputs[name].type}, but lrnnx-zoo's graphs take "
                                 f"float32 x and state (tensor(float)), which OnnxStreamer feeds; stream the float32 "
                                 f"graph as exported (a float16 copy drifts as it streams: docs/export.md, 'Edge devices')")
        for name, key, size in (("x", "d_input", self.d_input), ("state", "state_size", self.state_size)):
            width = inputs[name].shape[-1] if len(inputs[name].shape) >= 2 else None
            if isinstance(width, int) and width != size:
                raise ValueError(f"{self.path}: metadata {META_PREFIX}{key}={size} disagrees with the graph's "
                                 f"input {name!r} of width {width}; re-export it")
        dim0 = inputs["x"].shape[0]
        self.fixed_batch: Optional[int] = dim0 if isinstance(dim0, int) else None
        self.reset()

    # -- copies --------------------------------------------------------------------------------
    def copy(self, index: Any = None) -> "OnnxStreamer":
        """An independent stream from the same point: the same session (ONNX Runtime sessions serve
        several callers), its own buffers holding a copy of the state, batch and step count. For a
        fork of a stream (e.g. two continuations of one prompt); ``copy.copy`` and ``copy.deepcopy``
        do the same (a shallow copy shared the state buffers, so stepping one moved the other, and
        deepcopy failed on the session's lock).

        index: None (every row), or the rows the copy continues, as for ``SequenceModel.fork_cache``:
        row numbers (row b of the copy goes on from row index[b]; beams reordered or repeated) or a
        bool mask of the batch (the rows kept). A graph exported for a fixed batch keeps it."""
        twin = object.__new__(type(self))
        with self._lock:
            rows = stream_rows(index, self.batch, "OnnxStreamer.copy")
            batch = self.batch if rows is None else rows.numel()
            if self.fixed_batch is not None and batch != self.fixed_batch:
                raise ValueError(f"OnnxStreamer.copy: this graph was exported for batch={self.fixed_batch}, and the "
                                 f"index selects {batch} rows; select {self.fixed_batch}, or re-export without a "
                                 f"fixed batch (to_onnx(..., batch=None))")
            twin.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
            twin._lock = threading.RLock()
            twin._bind(batch)
            state = self._s[self._cur]
            np.copyto(twin._s[0], state if rows is None else state[rows.numpy()])
            twin.steps, twin._fresh = self.steps, self._fresh
        return twin

    __copy__ = copy

    def __deepcopy__(self, memo: Dict[int, Any]) -> "OnnxStreamer":
        return self.copy()

    def __reduce__(self) -> Any:
        raise TypeError(f"an OnnxStreamer holds an ONNX Runtime session, which cannot be pickled; pickle its "
                        f"path ({self.path!r}) and its state (streamer.state, a numpy array), and make a new "
                        f"one with OnnxStreamer(path) and streamer.state = state (streamer.copy() forks a "
                        f"stream in this process)")

    def _meta_int(self, key: str) -> int:
        value = self.metadata.get(META_PREFIX + key)
        if value is None:
            raise ValueError(f"{self.path} lacks metadata {META_PREFIX + key}; re-export it with "
                             f"lrnnx_zoo.export.to_onnx (found keys: {sorted(self.metadata)})")
        if not value.strip().isdigit():
            raise ValueError(f"{self.path}: metadata {META_PREFIX + key} must be an int >= 0, got {value!r}; "
                             f"re-export it with lrnnx_zoo.export.to_onnx")
        return int(value)

    # -- state ---------------------------------------------------------------------------------
    def reset(self, batch: int = _GRAPH_BATCH) -> None:
        """Start new streams: zero state for ``batch`` sequences, and (re)bind the buffers.  Without
        ``batch``: the batch a fixed-batch graph was exported for, else 1."""
        if batch is _GRAPH_BATCH:
            batch = self.fixed_batch if self.fixed_batch is not None else 1
        # reset(True) passed an isinstance check and left the streamer half-rebound and unusable
        batch = check_batch(batch, dynamic=False)
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise ValueError(f"this graph was exported for batch={self.fixed_batch}, got reset(batch={batch}); "
                             f"re-export without a fixed batch (to_onnx(..., batch=None)) to vary it")
        with self._lock:
            self._bind(batch)

    def _bind(self, batch: int) -> None:
        """Allocate and bind the buffers for ``batch`` sequences, then switch to them: everything is made
        first, so a failed allocation (reset(10**6): MemoryError) leaves the streamer as it was (it
        changed the batch and the input buffers first, and then refused every step)."""
        import onnxruntime as ort

        per_call = () if self.chunk is None else (self.chunk,)        # a chunk graph: T steps per call
        x = np.zeros((batch,) + per_call + (self.d_input,), np.float32)
        # step()'s finiteness check: x . ones is x's sum in one BLAS call (0.35 us at batch 1, x.sum() 1 us)
        x_flat, ones = x.reshape(-1), np.ones(x.size, np.float32)
        x_abs = np.empty_like(x_flat)
        y = np.zeros((batch,) + per_call + (self.d_output,), np.float32)
        s = [np.zeros((batch, self.state_size), np.float32) for _ in range(2)]
        ov = ort.OrtValue.ortvalue_from_numpy   # wraps the numpy memory, no copy
        values = [ov(x), ov(y), ov(s[0]), ov(s[1])]
        x_v, y_v, s0, s1 = values
        bindings = []
        for src, dst in ((s0, s1), (s1, s0)):
            b = self.session.io_binding()
            b.bind_ortvalue_input("x", x_v)
            b.bind_ortvalue_input("state", src)
            b.bind_ortvalue_output("y", y_v)
            b.bind_ortvalue_output("state_out", dst)
            bindings.append(b)
        # the same buffers as (batch, steps per call, width) views, for run() over either kind of graph
        steps = self.chunk or 1
        self._x, self._x_flat, self._ones, self._x_abs, self._y = x, x_flat, ones, x_abs, y
        self._x_steps = x.reshape(batch, steps, self.d_input)
        self._y_steps = y.reshape(batch, steps, self.d_output)
        self._s, self._values, self._bindings = s, values, bindings
        self.batch, self.steps, self._fresh = batch, 0, True
        self._cur = 0  # index of the buffer holding the current state

    @property
    def state(self) -> np.ndarray:
        """A copy of the current packed state, (batch, state_size)."""
        with self._lock:    # not a chunk's half-written buffer while another thread runs it
            return self._s[self._cur].copy()

    @state.setter
    def state(self, value: ArrayLike) -> None:
        value = _to_numpy(value, "state")
        if not _fits_float32(value):
            raise ValueError(f"state holds {_non_finite(value)}; not set: {_POISON}")
        with self._lock:        # checked against the batch it is copied into (a reset may come between)
            expected = (self.batch, self.state_size)
            if value.shape != expected:
                hint = (self._batch_advice(value.shape[0], "first ")
                        if value.ndim == 2 and value.shape[1] == self.state_size
                        else "a packed state of every layer, see state_layout")
                raise ValueError(f"state must have shape (batch, state_size)={expected}, got {value.shape}; {hint}")
            np.copyto(self._s[self._cur], value, casting="same_kind")
            self._fresh = False     # run() must now continue this state, not adopt a new batch

    # -- stepping ------------------------------------------------------------------------------
    def _batch_advice(self, batch: int, when: str = "") -> str:
        """What to do about input for ``batch`` sequences when the streamer holds ``self.batch``."""
        if batch < 1:
            return f"it holds no sequences (batch {batch}); pass at least one"
        if self.fixed_batch is not None:   # reset(batch) would be refused
            return (f"this graph is exported for batch={self.fixed_batch}; re-export it without a fixed batch "
                    f"(to_onnx(..., batch=None)) to stream {batch}")
        return f"call reset(batch={batch}) {when}to change the batch"

    def _check_x(self, x: np.ndarray) -> None:
        if x.shape != self._x.shape:
            if self.chunk is not None:
                raise ValueError(f"this is a chunk graph of {self.chunk} steps per call: x_t must have shape (batch="
                                 f"{self.batch}, {self.chunk}, d_input={self.d_input}), got {x.shape}" +
                                 ("" if x.shape[1:] != self._x.shape[1:] else f"; {self._batch_advice(x.shape[0])}"))
            raise ValueError(f"x_t must have shape (batch={self.batch}, d_input={self.d_input}), got "
                             f"{x.shape}" + ("" if x.ndim != 2 or x.shape[1] != self.d_input
                                             else f"; {self._batch_advice(x.shape[0])}"))

    def _advance(self) -> None:
        self.session.run_with_iobinding(self._bindings[self._cur])
        self._cur ^= 1
        self.steps += self.chunk or 1          # time steps, not calls
        self._fresh = False

    def step(self, x_t: ArrayLike) -> np.ndarray:
        """One time step: x_t (batch, d_input), numpy or torch -> y_t (batch, d_output) numpy float32.
        A chunk graph's step is one chunk: x_t (batch, chunk, d_input) -> (batch, chunk, d_output).

        A NaN or infinite x_t, or one whose magnitudes sum beyond float32's range (about 3.4e38: the
        encoder's products would overflow too), is refused (ValueError) before the step, so the state
        stays as it was (stepped, it would turn every later output of its sequence NaN or infinite):
        skip or fill in the sample."""
        x_t = _to_numpy(x_t, "x_t")
        with self._lock:
            self._check_x(x_t)
            if x_t.dtype == np.float32:
                np.copyto(self._x, x_t)
            else:   # a float64 beyond float32's range becomes inf, refused below, without numpy's warning
                with np.errstate(over="ignore"):
                    np.copyto(self._x, x_t, casting="same_kind")
            # one reduction on the float32 copy (a float64 beyond float32's range is inf by now): the
            # sum of magnitudes, since values of both signs cancelled in a plain sum, and 3e38 - 3e38
            # + 3e38 passed and turned the state NaN; errstate: numpy warned of the overflow it reports.
            # The whole buffer's sum bounds each step's; only when it overflows are the steps summed
            # one by one, run()'s rule (two sequences of 2e38 each were refused together, streamed alone)
            with np.errstate(over="ignore", invalid="ignore"):
                fits = (math.isfinite(np.abs(self._x_flat, out=self._x_abs).dot(self._ones))
                        or _steps_fit_float32(self._x_steps))
            if not fits:
                raise ValueError(f"x_t holds {_non_finite(self._x)}; not stepped, the state is as it was "
                                 f"(skip or fill in this sample): {_POISON}")
            self._advance()
            return self._y.copy()

    def run(self, x: ArrayLike) -> np.ndarray:
        """Stream a chunk: x (batch, L, d_input) -> y (batch, L, d_output), continuing from the
        current state. A fresh streamer (no steps and no state set since reset) adopts x's batch size.
        A chunk holding NaN or inf, or a step that :meth:`step` would refuse, is refused whole, before
        any step. A chunk
        graph takes L a multiple of its ``chunk``."""
        x = _to_numpy(x, "x")
        if x.ndim != 3 or x.shape[2] != self.d_input:
            raise ValueError(f"x must have shape (batch, length, d_input={self.d_input}), got {x.shape}")
        T = self.chunk or 1
        if x.shape[1] % T:
            raise ValueError(f"this is a chunk graph of {T} steps per call: x's length must be a multiple of {T}, got "
                             f"{x.shape[1]}; stream the last {x.shape[1] % T} steps through a step graph of the same "
                             f"model (same state layout: step_streamer.state = chunk_streamer.state)")
        if not _steps_fit_float32(x):     # step's rule for every step of x (a NaN, inf or too large value fails it)
            raise ValueError(f"x holds {_non_finite(x)} (sequence, step, feature); nothing was streamed and the "
                             f"state is as it was (fill them in, or stream the steps before them): {_POISON}")
        with self._lock:
            if x.shape[0] != self.batch and self._fresh and x.shape[0] >= 1 and self.fixed_batch is None:
                self.reset(x.shape[0])
            if x.shape[0] != self.batch:    # mid-stream: the state holds self.batch sequences
                raise ValueError(f"x must have shape (batch={self.batch}, length, d_input={self.d_input}), "
                                 f"got {x.shape}; {self._batch_advice(x.shape[0])}")
            out = np.empty((self.batch, x.shape[1], self.d_output), np.float32)
            for t in range(0, x.shape[1], T):
                np.copyto(self._x_steps, x[:, t:t + T], casting="same_kind")
                self._advance()
                out[:, t:t + T] = self._y_steps
            return out

    def __repr__(self) -> str:
        chunk = "" if self.chunk is None else f", chunk={self.chunk}"
        return (f"OnnxStreamer({self.path!r}, d_input={self.d_input}, d_output={self.d_output}, "
                f"state_size={self.state_size}, batch={self.batch}{chunk})")
