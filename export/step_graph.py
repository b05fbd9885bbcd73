"""The recurrent step graph of a causal :class:`~lrnnx_zoo.models.SequenceModel`.

``build_step_module(model)`` returns one real-valued ``nn.Module``

    forward(x_t: (B, d_input), state: (B, state_size)) -> (y_t: (B, d_output), state': (B, state_size))

that repeats ``SequenceModel.step``: encoder, then per block ``h + mix(form(norm(h)))`` where
``form`` is the layer's own ``step_form()``, the final norm, the pooling, the decoder. All states
live in one packed tensor (block order, then the pooling state), so an exported graph has exactly
two inputs and two outputs whatever the depth. Nothing here knows about any layer family: a layer
takes part only through ``step_form()`` and its ``bidirectional`` flag.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lrnnx_zoo.base import Weights, made_by, reference_tensor, restated_only
from lrnnx_zoo.models import SequenceModel, running_count_step, running_mean_step
from lrnnx_zoo.step_forms import StepFormError, check_step_form, same_form, same_kind, step_form_dtype
from lrnnx_zoo.thread_streams import this_threads_stderr
from lrnnx_zoo.thread_warnings import this_threads_warnings

#: Poolings a step graph can reproduce causally (None = sequence to sequence).
CAUSAL_POOLINGS = (None, "mean", "last")


class ExportError(ValueError):
    """A model that cannot become a step graph; the message says why and what to do."""


#: Device types whose autocast regions :func:`no_autocast` leaves (the graph is traced on the CPU,
#: the validation forward runs on the model's device).
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Leave any ``torch.autocast`` region of the caller while exporting: traced inside one, the
    step graph computed in half precision, and validation ran the model's forward in it."""
    with contextlib.ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def packed_layout(forms: List[nn.Module], pooling: Optional[str], d_model: int) -> Tuple[List[List[Any]], int]:
    """The packed state's layout, ``[[name, offset, size], ...]``, and its width: each layer's step
    form state in block order, then, with mean pooling, the running mean's rounding carry, the
    count's carry, the running mean and the step count (a float, so the graph needs no Python int
    and a streaming runtime keeps it with the rest of the state; models.running_mean_step and
    running_count_step)."""
    layout, offset = [], 0
    for i, form in enumerate(forms):
        size = int(form.state_size)
        layout.append([f"blocks.{i}.layer", offset, size])
        offset += size
    if pooling == "mean":
        layout += [["pool.carry", offset, d_model], ["pool.count_carry", offset + d_model, 1],
                   ["pool.mean", offset + d_model + 1, d_model], ["pool.count", offset + 2 * d_model + 1, 1]]
        offset += 2 * d_model + 2
    return layout, offset


class StepModule(nn.Module):
    """(x_t, state) -> (y_t, state') for a whole SequenceModel; see the module docstring.

    Attributes:
        state_size: width of the packed state; zeros is the initial state.
        d_input, d_output: widths of x_t and y_t.
        state_layout: ``[[name, offset, size], ...]`` in packing order.
        pooling: the source model's pooling (None, "mean" or "last").
        form_owners: "blocks.{i}.layer (LayerClass)" per form (``layer_names``: the classes), for messages.
    """

    def __init__(self, encoder: nn.Module, blocks: List[nn.Module], forms: List[nn.Module],
                 norm: nn.Module, decoder: nn.Module, pooling: Optional[str], d_input: int,
                 d_model: int, d_output: int, layer_names: Optional[List[str]] = None) -> None:
        super().__init__()
        self.encoder, self.norm, self.decoder = encoder, norm, decoder
        self.blocks = nn.ModuleList(blocks)   # each keeps its norm and mix(); the layer is removed
        self.forms = nn.ModuleList(forms)
        self.pooling = pooling
        self.d_input, self.d_model, self.d_output = d_input, d_model, d_output
        self.state_layout, self.state_size = packed_layout(forms, pooling, d_model)
        # Plain Python ints, so tracing bakes the slices in as constants.
        self.slices: List[Tuple[int, int]] = [(offset, size) for _, offset, size in self.state_layout[:len(forms)]]
        self.pool_offset = self.state_layout[len(forms)][1] if pooling == "mean" else self.state_size
        self.form_owners: List[str] = [name if layer_names is None else f"{name} ({layer_names[i]})"
                                       for i, (name, _, _) in enumerate(self.state_layout[:len(forms)])]

    def forward(self, x: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: x (B, d_input), state (B, state_size) -> y (B, d_output), state' (B, state_size)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):    # the graphs have their own checks
            self._check_step_input(x, state)
        h = self.encoder(x)
        new_states = []
        for block, form, (off, size) in zip(self.blocks, self.forms, self.slices):
            z, s = form(block.norm(h), state[:, off:off + size])
            new_states.append(s)
            h = h + block.mix(z)
        h = self.norm(h)
        if self.pooling == "mean":
            h, pool = self.pool_step(h, state[:, self.pool_offset:])
            new_states.append(pool)
        y = self.decoder(h)
        return y, torch.cat(new_states, dim=1)

    def _check_step_input(self, x: Tensor, state: Tensor) -> None:
        """A state of another width was sliced silently (the layers' slices read what fell in them), an
        x of another width failed in the encoder ("mat1 and mat2 shapes cannot be multiplied")."""
        for name, t, width in (("x", x, self.d_input), ("state", state, self.state_size)):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != width:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"StepModule expects {name} of shape (batch, {width}), got {got}")
        if x.shape[0] != state.shape[0] or x.dtype != state.dtype:
            raise ValueError(f"StepModule expects x and state of one batch and dtype, got {tuple(x.shape)} "
                             f"{x.dtype} and {tuple(state.shape)} {state.dtype}")

    def pool_step(self, h: Tensor, pool: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean pooling's step: h (B, d_model), pool (B, 2 d_model + 2) its state -> (the mean so
        far, the next pool state)."""
        d = self.d_model
        carry, count_carry = pool[:, :d], pool[:, d:d + 1]
        mean, count = pool[:, d + 1:2 * d + 1], pool[:, 2 * d + 1:2 * d + 2]
        # compensated (Fast2Sum): three ops on (batch, d_model) keep the mean's digits over 1e7 steps,
        # three on (batch, 1) the count exact past 2**24
        count, count_carry = running_count_step(count, count_carry)
        h, carry = running_mean_step(mean, carry, h, count)
        return h, torch.cat([carry, count_carry, h, count], dim=1)

    def zero_state(self, batch: int = 1) -> Tensor:
        """The initial state, (batch, state_size) zeros."""
        ref = self.encoder.weight if hasattr(self.encoder, "weight") else next(self.parameters())
        return torch.zeros(batch, self.state_size, dtype=ref.dtype, device=ref.device)

    def extra_repr(self) -> str:
        return (f"d_input={self.d_input}, d_output={self.d_output}, state_size={self.state_size}, "
                f"pooling={self.pooling!r}")


#: Batch a dynamic-batch step module is traced at: not 0 or 1 (torch.export specialises those) and
#: not the default validation batch (2), so a batch size baked into the trace fails validation.
TRACE_BATCH = 3


#: Held while an export has process-wide state swapped: sys.stderr (:func:`tracing`) and the exporters'
#: logger levels (``onnx_export._quiet``; its warnings are caught in the exporting thread only), and while
#: onnxruntime quantises (``quantize``).
#: Each swap restores what it found on entry, so two threads' exports overlapping without nesting (A in,
#: B in, A out, B out) restored each other's: sys.stderr stayed A's StringIO (B found it on entry), which
#: kept every later write of the process and showed none; the filters stayed "always", the loggers muted.
#: Re-entrant: one export's swaps nest.
EXPORT_LOCK = threading.RLock()


@contextlib.contextmanager
def tracing(module: nn.Module, exporter: str) -> Iterator[None]:
    """Inside: ``exporter`` (torch.onnx.export, torch.jit.trace, torch.export.export) turns ``module``, a
    step or chunk module, into a graph. Its failure becomes an ExportError naming the layer whose step
    form it failed in, where one is found, and the root cause in one line: a plugin's form using an op
    the format has no counterpart for, a tensor's value in Python (.item(), .numpy()) or its batch size
    as a number came out as pages of exporter traceback naming no layer ("submit a PR to PyTorch").

    What the exporter prints to stderr meanwhile is held back: written out when it succeeds, dropped
    when it fails (torch.export printed the partial graph, ~110 lines for a 2-block model, before the
    error that says what failed). Only this thread's output is held back (:func:`this_threads_stderr`;
    contextlib.redirect_stderr also held back, and on failure dropped, what other threads printed).
    Other threads' exports wait meanwhile (:data:`EXPORT_LOCK`)."""
    try:
        with EXPORT_LOCK, this_threads_stderr() as printed:
            yield
    except ExportError:
        raise
    except Exception as exc:
        chain, e = [], exc
        while e is not None and not any(e is c for c in chain):     # the exporters wrap the error that counts
            chain.append(e)
            e = e.__cause__ or e.__context__
        root = chain[-1]
        lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()] or [""]
        # "... were found:" with the one found; its own full stop dropped, as the message adds one
        line = (" ".join(lines[:2]) if lines[0].endswith(":") else lines[0]).rstrip(".")
        owner = _failing_form(module, chain) or batch_bound_form(module)
        where = f" in {owner}.step_form()'s forward" if owner else ""
        raise ExportError(
            f"{exporter} could not export the step graph{where}: {type(root).__name__}: {line}. A step form is "
            f"exported as the torch ops its forward(u, s) runs: tensor ops the format supports, no tensor's value "
            f"read into Python (.item(), .numpy(), a branch on a value) and no batch size used as a number "
            f"(docs/plugins.md, 'The layer contract')") from exc
    if printed.getvalue():
        sys.stderr.write(printed.getvalue())


def _failing_form(module: nn.Module, chain: List[BaseException]) -> Optional[str]:
    """The owner (``form_owners``) of the step form an exporter failed in: the innermost frame run by
    a form's module (torch.jit.trace, torch.export), or the FX node being converted (torch.onnx: its
    ``nn_module_stack``). None when the failure is not inside a form."""
    step = getattr(module, "step", module)               # a ChunkModule holds its StepModule
    form_lists = [step.forms] + ([module.forms] if module is not step else [])
    index = {id(m): i for forms in form_lists for i, form in enumerate(forms) for m in form.modules()}
    found = None
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None:
            local = tb.tb_frame.f_locals
            candidates = [local.get("self")]
            node = local.get("node")
            if isinstance(node, torch.fx.Node):
                paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            elif isinstance(node, torch._C.Node):                  # the legacy exporter's TorchScript node
                paths = [_scope_path(node.scopeName())]
            else:
                paths = []
            for path in paths:
                with contextlib.suppress(AttributeError, TypeError):
                    candidates.append(module.get_submodule(path))
            for c in candidates:
                if id(c) in index:
                    found = index[id(c)]
            tb = tb.tb_next
    return None if found is None else step.form_owners[found]


def batch_bound_form(module: nn.Module) -> Optional[str]:
    """The owner (``form_owners``) of the first form of a step or chunk module whose trace does not carry
    over to another batch, None if none: traced by torch.jit.trace at TRACE_BATCH and run at batch 2, it
    fails or answers other than the form itself. That is a form using its batch size as a number
    (``int(u.shape[0])``) or a tensor's value in Python: the dynamo exporter then fixed the graph's batch,
    torch.export raised a constraint violation and a TorchScript graph failed validation, each without
    naming the layer. A probe for error messages (milliseconds a form), never run on a good export."""
    step = getattr(module, "step", module)
    chunk = getattr(module, "chunk", None)
    form_lists = [(step.forms, ())] + ([(module.forms, (chunk,))] if module is not step else [])
    for forms, steps in form_lists:
        for form, owner in zip(forms, step.form_owners):
            d_in, size = getattr(form, "d_input", step.d_model), int(form.state_size)
            if _trace_binds_batch(form, [steps + (d_in,), (size,)]):
                return owner
    return None


def batch_bound_note(module: nn.Module) -> str:
    """What a failing graph's message says of :func:`batch_bound_form`'s finding: the layer and why, or ""."""
    owner = batch_bound_form(module)
    return (f"{owner}.step_form() was traced at batch {TRACE_BATCH} and does not run the same at another batch: it "
            f"uses its batch size as a number (e.g. int(u.shape[0])) or reads a tensor's value into Python"
            if owner else "")


def _trace_binds_batch(form: nn.Module, shapes: List[Tuple[int, ...]]) -> bool:
    """Whether ``form``, traced on inputs of ``shapes`` (after the batch) at TRACE_BATCH, fails or disagrees
    with itself at batch 2 (float32 rounding allowed). A form that cannot be traced or run at all is not judged."""
    g = torch.Generator().manual_seed(0)
    traced_at, run_at = ([torch.randn(b, *shape, generator=g) for shape in shapes] for b in (TRACE_BATCH, 2))
    # the TracerWarnings the probe is looking for, dropped in this thread only
    with EXPORT_LOCK, torch.no_grad(), this_threads_warnings():
        try:
            traced = torch.jit.trace(form, tuple(traced_at), check_trace=False)
            want = form(*run_at)
        except Exception:
            return False
        try:
            got = traced(*run_at)
        except Exception:
            return True
    pairs = list(zip(got, want)) if isinstance(got, (tuple, list)) and isinstance(want, (tuple, list)) else []
    return not pairs or any(not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape or
                            not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in pairs)


def _scope_path(scope: str) -> str:
    """The submodule path of a TorchScript node's scope name: "pkg.StepModule::/pkg.Form::forms.1" ->
    "forms.1" (each "/"-separated part is "Type::attribute", the attributes from the root down)."""
    return ".".join(a for a in (part.rpartition("::")[2] for part in scope.split("/")) if a)


def _layer_step_form(layer: nn.Module, index: int, d_model: int) -> nn.Module:
    """Ask a layer for its step form, turning every way of not having one into an ExportError."""
    name = type(layer).__name__
    if getattr(layer, "bidirectional", False):
        raise ExportError(
            f"blocks.{index}.layer ({name}) is bidirectional: its output at step t depends on later "
            f"inputs, so it cannot run step by step. Export a model built with bidirectional=False.")
    fn = getattr(layer, "step_form", None)
    if not callable(fn):
        raise ExportError(
            f"blocks.{index}.layer ({name}) has no step_form(); step_form() is required to export a "
            f"step graph. Implement {name}.step_form() returning a StepForm (see lrnnx_zoo.step_forms).")
    try:
        form = fn()
    except NotImplementedError as exc:
        raise ExportError(
            f"blocks.{index}.layer ({name}).step_form() is not implemented; step_form() is required "
            f"to export a step graph. Implement it (see lrnnx_zoo.step_forms).") from exc
    except ValueError as exc:           # a layer saying why it cannot stream as configured
        raise ExportError(f"blocks.{index}.layer ({name}) cannot run step by step: {exc}") from exc
    try:
        check_step_form(form, f"blocks.{index}.layer ({name}).step_form()", d_model)
    except StepFormError as exc:
        raise ExportError(str(exc)) from exc.__cause__
    return form


#: (model, its step module) that :func:`build_step_module` hands back for that very model object in
#: this context (thread) only, within :func:`reusing_step_module`.
_REUSED: contextvars.ContextVar[Optional[Tuple[nn.Module, "StepModule"]]] = contextvars.ContextVar(
    "lrnnx_zoo_reused_step_module", default=None)


@contextlib.contextmanager
def reusing_step_module(model: nn.Module, step: "StepModule") -> Iterator[None]:
    """Inside, in this thread, :func:`build_step_module` of this ``model`` object returns ``step``, built from
    it already, without building it again: an export folder builds the step module for its checks and
    weights file, then calls an exporter that builds it too (a second 0.9-4.6 s for a shipped 4-block
    classifier whose forms each diagonalise and check their system). The model must not change meanwhile."""
    token = _REUSED.set((model, step))
    try:
        yield
    finally:
        _REUSED.reset(token)


@torch.no_grad()
def build_step_module(model: SequenceModel) -> StepModule:
    """Build the float32 step module of a causal SequenceModel (eval mode; dropout is identity).

    Args:
        model: the source model; it is copied, never changed.
    Returns:
        a :class:`StepModule` in eval mode on the CPU, its weights frozen (requires_grad False).
    Raises:
        ExportError: a bidirectional layer, a layer without ``step_form()``, or a pooling that is
            not causal.
    """
    reused = _REUSED.get()
    if reused is not None and reused[0] is model:
        return reused[1]
    config = getattr(model, "config", None)
    needed = ("encoder", "blocks", "norm", "decoder", "config")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise ExportError(f"expected a SequenceModel (with {', '.join(needed)}); got "
                          f"{type(model).__name__} without {', '.join(missing)}")
    pooling = config.pooling
    if pooling not in CAUSAL_POOLINGS:
        raise ExportError(f"pooling {pooling!r} is not causal; a step graph supports pooling in "
                          f"{CAUSAL_POOLINGS}. Re-train or rebuild the model with one of them.")
    mismatches = getattr(model, "config_mismatches", None)
    found = mismatches(sizes_only=True) if callable(mismatches) else []
    if found:
        # the graph's sizes and metadata come from the config: a decoder replaced by hand failed in
        # ONNX's shape inference ("Inferred shape and existing shape differ"), after the trace. A layer
        # swapped into a block by hand streams as its own step form says (the plugin fuzzer's models)
        raise ExportError(f"the model's modules disagree with model.config, which the graph's sizes and metadata "
                          f"are read from: {'; '.join(found)}. Change a head with model.reconfigure(d_output=...) "
                          f"(or d_input=...), which keeps the config in step")
    model = copy.deepcopy(model).float().cpu().eval()
    forms, blocks = [], []
    layer_names = [type(block.layer).__name__ for block in model.blocks]
    for i, block in enumerate(model.blocks):
        with step_form_dtype(torch.float32):
            form = _layer_step_form(block.layer, i, config.d_model)
        forms.append(form.float().eval())
        # Keep the block for its norm and mix() (which may be overridden); the layer's weights
        # are folded into the step form, so drop it to keep them out of the graph's state_dict.
        del block.layer
        blocks.append(block)
    step = StepModule(model.encoder, blocks, forms, model.norm, model.decoder, pooling,
                      config.d_input, config.d_model, config.d_output, layer_names)
    # Frozen: saved with requires_grad, a loaded .ts / .pt2 returned a state that required grad, and a
    # stream fed it back without torch.no_grad() (any libtorch loop without a NoGradGuard) chained
    # every step into one autograd graph (~44 MB per 1000 steps for a shipped forecaster).
    return step.eval().requires_grad_(False)


@torch.no_grad()
def state_from_cache(model: SequenceModel, cache: Dict[str, Any], graph: Any = None) -> Tensor:
    """The step graph's packed state (B, state_size), float32, of a stream the model ran in torch:
    ``cache`` from ``model.prefill(x)`` (or ``allocate_inference_cache`` and ``step``). Layers'
    states in block order, then mean pooling's rounding carries, running mean and step count
    (the layout of :class:`StepModule`). Read a prompt in one convolution-mode pass and go on in ONNX Runtime::

        y, cache = model.prefill(prompt)
        streamer.reset(prompt.shape[0]); streamer.state = state_from_cache(model, cache, graph=streamer)

    Each layer's cached step form is checked against the one this release builds the graph from
    (same form to float32 rounding). A graph written by another release, or on another machine, may
    hold its states in another layout under the same names and sizes (a step form diagonalised by
    an eigendecomposition lives in the eigenbasis LAPACK picked, which a change of 1e-16 in the
    matrix can move: such graphs of older releases continued 0.3-0.5 off); pass ``graph=`` (an
    :class:`~.runtime.OnnxStreamer`, a path to the .onnx / .ts / .pt2, or a loaded .ts / .pt2 module)
    to have the graph itself checked (:func:`check_graph_continues`): it must continue one of the
    model's streams as the model does, else an :class:`ExportError` says to re-export it.
    :func:`cache_from_state` goes the other way.
    """
    _check_model(model, "state_from_cache")
    _check_cache_layout(model, cache, "state_from_cache")
    if graph is not None:
        check_graph_continues(model, graph, "state_from_cache")
    parts = [layer_cache["lrnn_state"] for layer_cache in cache["layers"]]
    if model.config.pooling == "mean":
        mean = cache["pool_mean"]
        count = torch.as_tensor(cache["t"], device=mean.device).long().expand(mean.shape[0], 1)
        high = count.float()                                  # the count as the float32 state holds it,
        parts += [cache["pool_carry"], (count - high.long()).to(mean.dtype),     # and what that rounds off
                  mean, high.to(mean.dtype)]
    return torch.cat(parts, 1).float().cpu()            # a model has at least one block: parts is not empty


@torch.no_grad()
def cache_from_state(model: SequenceModel, state: Any, graph: Any = None) -> Dict[str, Any]:
    """A cache of ``model`` whose stream goes on from a step graph's packed state: the inverse of
    :func:`state_from_cache`. ``state``: (B, state_size), a tensor or numpy array, e.g. an
    ``OnnxStreamer``'s ``state`` (a stream moved from ONNX Runtime back to PyTorch) or a state saved
    to resume a stream after a restart::

        saved = state_from_cache(model, cache)                # (B, state_size) float32
        ...
        cache = cache_from_state(model, saved); y, cache = model.step(x, cache)

    The layout is the graph's (:func:`packed_layout`), checked against each layer's step form as
    :func:`state_from_cache` does; ``graph=`` (the graph the state comes from) checks the graph
    itself, as there. The packed state is float32: a float64 model's stream comes back with its
    state rounded to float32.
    """
    _check_model(model, "cache_from_state")
    if graph is not None:
        check_graph_continues(model, graph, "cache_from_state")
    if not isinstance(state, Tensor):
        try:
            state = torch.as_tensor(state)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"cache_from_state expects a packed state (batch, state_size) as a tensor or array, "
                            f"got {type(state).__name__}") from None
    forms = [_graph_form(block.layer, i, model.config.d_model) for i, block in enumerate(model.blocks)]
    layout, size = packed_layout(forms, model.config.pooling, model.config.d_model)
    if state.dim() != 2 or state.shape[0] < 1 or state.shape[1] != size or not state.is_floating_point():
        raise ValueError(f"cache_from_state expects a real packed state of shape (batch >= 1, state_size={size}) "
                         f"for this model (layout {[name for name, _, _ in layout]}), got {tuple(state.shape)} "
                         f"{state.dtype}")
    if not bool(torch.isfinite(state).all()):
        raise ValueError("cache_from_state: the packed state holds NaN or infinite values; a stream cannot go on "
                         "from it")
    cache = model.allocate_inference_cache(state.shape[0])
    _check_cache_layout(model, cache, "cache_from_state", forms)
    part = {name: state[:, offset:offset + width] for name, offset, width in layout}
    for i, layer_cache in enumerate(cache["layers"]):
        ref = layer_cache["lrnn_state"]
        layer_cache["lrnn_state"] = part[f"blocks.{i}.layer"].to(device=ref.device, dtype=ref.dtype, copy=True)
    if model.config.pooling == "mean":
        ref = cache["pool_mean"]
        cache["pool_carry"] = part["pool.carry"].to(device=ref.device, dtype=ref.dtype, copy=True)
        cache["pool_mean"] = part["pool.mean"].to(device=ref.device, dtype=ref.dtype, copy=True)
        # the count as a float and what rounding to float32 cut off (state_from_cache), both integers
        count = part["pool.count"].double().round().long() + part["pool.count_carry"].double().round().long()
        if bool((count < 0).any()):
            raise ValueError(f"cache_from_state: the packed state's step count is negative ({count.flatten().tolist()})")
        cache["t"] = count.to(ref.device)
    return cache


#: check_graph_continues: how far the graph's outputs and next state may lie from the model's own
#: step, relative to the larger of 1 and their largest magnitude. Both run in float32 (a float64 model is
#: rounded once): 1e-7..1e-6 apart over the probe's steps; a graph keeping its states in another layout
#: was 0.2-0.6 apart. An int8 graph's dense layers are up to 5% off (the export's bound): 0.1 for those.
GRAPH_CONTINUES_TOLERANCE = 1e-3
INT8_GRAPH_CONTINUES_TOLERANCE = 0.1
_PROBE_WARMUP = 8   # model steps that make the probe's state before the compared ones
_PROBE_STEPS = 16   # steps compared (a chunk graph: whole chunks, at least one); a state in another
                    # layout drifts further from the model's at each step (an eigenbasis graph of an
                    # older release: 0.009 after one step, 0.1 after 16)


def _graph_runner(graph: Any) -> Tuple[Any, Optional[int], Optional[int], int, Dict[str, str], str]:
    """(run(x (B, T, d_input), state (B, S)) -> (y, state') as float32 numpy, chunk, fixed batch,
    state_size, metadata, name) of an OnnxStreamer, a .onnx / .ts / .pt2 path, or a loaded .ts / .pt2
    module (a module without metadata: a step graph of any batch)."""
    import os

    import numpy as np

    from .provenance import META_PREFIX
    from .runtime import OnnxStreamer
    from .torchscript_export import load_torch_export, load_torchscript, read_metadata
    meta: Dict[str, str] = {}
    if isinstance(graph, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(graph))
        if path.endswith(".onnx"):
            graph = OnnxStreamer(path)
        elif path.endswith((".ts", ".pt2")):
            meta = read_metadata(path)
            graph = load_torchscript(path) if path.endswith(".ts") else load_torch_export(path)
        else:
            raise ValueError(f"graph= expects an OnnxStreamer, a loaded .ts / .pt2 module or the path of a .onnx, "
                             f".ts or .pt2 step graph, got the path {path!r}")
    if isinstance(graph, OnnxStreamer):
        streamer = graph

        def run_onnx(x: Any, state: Any) -> Tuple[Any, Any]:
            probe = streamer.copy()          # the caller's stream is left as it was
            probe.reset(x.shape[0])
            probe.state = state
            return probe.run(x), probe.state

        return (run_onnx, streamer.chunk, streamer.fixed_batch, streamer.state_size, dict(streamer.metadata),
                streamer.path)
    if callable(graph) and isinstance(getattr(graph, "state_size", None), int):
        module = graph
        chunk = int(meta.get(META_PREFIX + "chunk", getattr(module, "chunk", 0) or 0)) or None
        fixed = str(meta.get(META_PREFIX + "batch", getattr(module, "batch", 0) or "dynamic"))

        def run_torch(x: Any, state: Any) -> Tuple[Any, Any]:
            xt, st = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(state))
            ys = []
            for t in range(0, xt.shape[1], chunk or 1):
                y, st = module(xt[:, t:t + chunk] if chunk else xt[:, t], st)
                ys.append(y if chunk else y[:, None])
            return torch.cat(ys, 1).numpy(), st.numpy()

        return (run_torch, chunk, int(fixed) if fixed.isdigit() else None, int(module.state_size), meta,
                type(module).__name__)
    raise TypeError(f"graph= expects an OnnxStreamer, a loaded .ts / .pt2 module (load_torchscript / "
                    f"load_torch_export) or the path of a .onnx, .ts or .pt2 step graph, got {type(graph).__name__}")


@torch.no_grad()
def check_graph_continues(model: SequenceModel, graph: Any, who: str = "check_graph_continues") -> None:
    """Raise an :class:`ExportError` unless ``graph`` (an OnnxStreamer, a .onnx / .ts / .pt2 path or a
    loaded .ts / .pt2 module) continues ``model``'s streams: from the packed state of a stream the model
    ran (8 steps of standard-normal input at the graph's batch, 1 if dynamic) the next 16 steps (a
    chunk graph: whole chunks) must give the model's outputs and packed state to
    :data:`GRAPH_CONTINUES_TOLERANCE`. A graph keeping its states in another layout (written by another
    release or on another machine) or made from other weights fails, so :func:`state_from_cache` and
    :func:`cache_from_state` never hand a stream to a graph that reads it otherwise."""
    from .provenance import META_PREFIX
    from .validate import runnable_copy
    run, chunk, batch, state_size, meta, name = _graph_runner(graph)
    made = (f"written by lrnnx-zoo {meta.get(META_PREFIX + 'version', '(unrecorded version)')} from "
            f"{meta.get(META_PREFIX + 'source', '(unrecorded source)')}")
    redo = ("re-export the graph from this model (lrnnx_zoo.export.export_folder, or `lrnnx-zoo export`) and use "
            "that one")
    ref = runnable_copy(model)
    forms = [_graph_form(block.layer, i, ref.config.d_model) for i, block in enumerate(ref.blocks)]
    layout, size = packed_layout(forms, ref.config.pooling, ref.config.d_model)
    if state_size != size:
        raise ExportError(f"{who}: the graph {name} ({made}) holds a state of {state_size} numbers, this model's "
                          f"packed state has {size} ({[n for n, _, _ in layout]}): they are not one layout; {redo}")
    steps = _PROBE_STEPS if chunk is None else chunk * -(-_PROBE_STEPS // chunk)
    rows = batch or 1
    dtype = reference_tensor(ref).dtype
    xs = torch.randn(rows, _PROBE_WARMUP + steps, ref.config.d_input, generator=torch.Generator().manual_seed(0))
    cache = ref.allocate_inference_cache(rows)
    ys = []
    for t in range(_PROBE_WARMUP + steps):
        if t == _PROBE_WARMUP:
            start = state_from_cache(ref, cache)
        y, cache = ref.step(xs[:, t].to(dtype), cache)
        ys.append(y)
    want_y = torch.stack(ys[_PROBE_WARMUP:], 1).float().cpu().numpy()
    want_state = state_from_cache(ref, cache).numpy()
    got_y, got_state = run(xs[:, _PROBE_WARMUP:].numpy(), start.numpy())
    scale = max(1.0, float(abs(want_y).max()), float(abs(want_state).max()))
    err = max(float(abs(got_y - want_y).max()), float(abs(got_state - want_state).max())) / scale
    tol = (INT8_GRAPH_CONTINUES_TOLERANCE if meta.get(META_PREFIX + "quantization", "none") != "none"
           else GRAPH_CONTINUES_TOLERANCE)
    if not err <= tol:
        raise ExportError(f"{who}: the graph {name} ({made}) does not continue this model's streams: from the packed "
                          f"state of one of them its step is {err:.2g} (relative) away from the model's own step, at "
                          f"most {tol:g} expected, so it reads the state in another layout (a graph exported by "
                          f"another lrnnx-zoo release or on another machine) or holds other weights; {redo}")


def _graph_form(layer: nn.Module, index: int, d_model: int) -> nn.Module:
    """The float32 step form a step graph holds for blocks.{index}.layer."""
    with step_form_dtype(torch.float32):
        return _layer_step_form(layer, index, d_model)


def _kept_through_restatement(layer: nn.Module, layer_cache: Dict[str, Any], form: nn.Module) -> bool:
    """Whether the cache's step form is one its stream kept while the layer re-expressed its weights
    for the same system (:func:`~lrnnx_zoo.base.restated_only`: a kernel's stored output matrix
    rewritten for a longer kernel): it rounds otherwise than ``form``, the graph's, built from the
    rewritten weights (5e-5 relative, where same_form allows 1e-6), in the same state layout (its
    kind, size and tensors)."""
    cached, weights = layer_cache["step_form"], layer_cache.get("weights")
    return (isinstance(weights, Weights) and same_kind(form, cached)
            and form.state_size == getattr(cached, "state_size", None)
            and form.state_dict().keys() == cached.state_dict().keys() and restated_only(layer, weights))


def _check_model(model: Any, who: str) -> None:
    """A TypeError unless ``model`` is a SequenceModel: a checkpoint's name or a cache given first failed
    with "'str' object has no attribute '__dict__'", and None as "a cache made by another model"."""
    if not isinstance(model, SequenceModel):
        raise TypeError(f"{who} expects the SequenceModel the stream belongs to (load a checkpoint with "
                        f"lrnnx_zoo.from_pretrained first), got {type(model).__name__}")


def _check_cache_layout(model: SequenceModel, cache: Dict[str, Any], who: str,
                        forms: Optional[List[nn.Module]] = None) -> None:
    """Raise an ExportError unless ``cache`` is the model's, each layer's part of it a state and a
    step form, and each cached step form the one a step graph of the model holds (``forms``, else
    built), so that the packed state's layout is each layer's state."""
    if not isinstance(cache, dict) or not made_by(model, cache.get("model")):
        raise ExportError(f"{who}: expected a cache of this model (model.prefill(x) or model.allocate_inference_cache"
                          f"(batch)), got " + ("one made by another model" if isinstance(cache, dict) else type(cache).__name__))
    for i, (block, layer_cache) in enumerate(zip(model.blocks, cache["layers"])):
        name = type(block.layer).__name__
        if not isinstance(layer_cache, dict) or "lrnn_state" not in layer_cache or "step_form" not in layer_cache:
            got = sorted(layer_cache) if isinstance(layer_cache, dict) else type(layer_cache).__name__
            raise ExportError(f"{who}: blocks.{i}.layer ({name}) keeps its stream in a cache without 'lrnn_state' and "
                              f"'step_form' (got {got}), so its state has no place in a step graph's state")
        cached = layer_cache["step_form"]
        form = forms[i] if forms is not None else _graph_form(block.layer, i, model.config.d_model)
        dtype = layer_cache["lrnn_state"].dtype
        if dtype != torch.float32:
            # A float64 stream's form holds its poles once, the graph's float32 one as hi + lo (other
            # buffers): compared with the form of the stream's precision, and with the graph's by its
            # kind and state size, which fix the state's layout.
            fits = same_kind(form, cached) and form.state_size == getattr(cached, "state_size", None)
            with step_form_dtype(dtype):
                form = _layer_step_form(block.layer, i, model.config.d_model)
        else:
            fits = True
        form = form.to(layer_cache["lrnn_state"].device)
        if not fits or not (same_form(form, cached) or _kept_through_restatement(block.layer, layer_cache, form)):
            raise ExportError(f"{who}: blocks.{i}.layer ({name}): the cache's step form is not the one a step graph of "
                              f"the model's current weights holds (weights changed since, or another step form was "
                              f"chosen); prefill again")
