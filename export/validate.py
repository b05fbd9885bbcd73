"""Check an exported step graph against the PyTorch model it came from.

An exporter hands over a *stream function*: x (B, L, d_input) -> y (B, L, d_output), the
per-step outputs of its runtime driven from a zero state. That is compared with the model's own
(convolution-mode) forward:

- sequence to sequence: every step's output against ``model(x)[:, t]``;
- pooled ("mean" / "last"): step t's output is the model's output on the prefix x[:, :t+1], so
  the final step is compared with ``model(x)`` and a few prefixes with ``model(x[:, :t+1])``.

Default validation sequence: standard normal, batch 2, length 256, seed 0 (``default_sequence``);
pass your own (e.g. a checkpoint's evaluation data) for a check on the data the model will see.
The default tolerance is 1e-4 absolute: float32 step and FFT-convolution evaluations of the same
system agree to ~1e-6..1e-5 on such models (measured), so 1e-4 catches any real mistake (a wrong
state slice or a missing term is off by O(1e-2) or more) without flagging rounding.

The reference is the model's forward evaluated in float64 (a copy of the model converted with
``.double()``), i.e. what its weights compute without rounding; the float32 forward's own distance
from it is reported beside (``forward_float32_error``). A float32 forward is not always the more
accurate side: a model whose kernel was ill-conditioned in float32 (before such kernels were
refined in float64) streamed to within 3e-6 of the float64 forward while its float32 forward was
6.5e-4 away (the shipped classifiers now stream to 2.8e-6 - 5.6e-6 at L=4096, float32 forwards
within 4e-6). A model that cannot run in float64 is compared
with its own forward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lrnnx_zoo.base import HALF_DTYPES, reference_tensor
from lrnnx_zoo.models import ModelConfig
from lrnnx_zoo.step_forms import step_form_dtype

DEFAULT_LENGTH = 256
DEFAULT_BATCH = 2
DEFAULT_SEED = 0
#: Absolute tolerance for float32 graphs (see module docstring).
FLOAT32_TOLERANCE = 1e-4

StreamFn = Callable[[np.ndarray], np.ndarray]


class ValidationError(AssertionError):
    """An exported graph disagrees with its model beyond the tolerance; carries the report."""

    def __init__(self, report: "ValidationReport", why: Optional[str] = None) -> None:
        """``why``: the likely cause, where the caller knows better than the report (an int8 graph of a
        float graph that passed: the quantisation, not the step forms)."""
        own = report.forward_float32_error
        if why is None and own is not None and own >= 0.5 * report.max_abs_error:
            # the model's own float32 forward is as far off: the model, not the graph, is ill-conditioned
            # in float32 on this input (a LayerNorm over two nearly equal features), and the message
            # blamed step_form() without the figure that said so (an audit)
            why = (f"The model's own float32 forward is {own:.3e} from float64 too: it is ill-conditioned in "
                   f"float32 on this input, and the graph computes what the float32 model does. Validate on "
                   f"the data it will see (validation_input=), or raise tolerance= past {own:.1e}.")
        elif why is None:
            why = ("If the model is correct, the layer's step_form() and its forward disagree" +
                   ("" if own is None else f" (the model's float32 forward is {own:.3e} from float64)") + ".")
        super().__init__(
            f"{report.runtime} step graph disagrees with the PyTorch model: max abs error "
            f"{report.max_abs_error:.3e} > tolerance {report.tolerance:.1e} ({report.compared}; "
            f"batch {report.batch}, length {report.length}; per check: "
            f"{json.dumps({k: float(f'{v:.3e}') for k, v in report.errors.items()})}). Not written. {why}")
        self.report = report


@dataclasses.dataclass
class ValidationReport:
    """What was compared and how far apart it was.

    Attributes:
        runtime: which runtime produced the streamed outputs ("onnxruntime", "torchscript", ...).
        max_abs_error: largest |streamed - forward| over all checks.
        tolerance: the bound it was held to.
        errors: max abs error per check ("all steps", "final step", "prefix 64", ...).
        batch, length: of the validation sequence; sequence: "default" or "user".
        compared: a sentence saying what was compared.
        forward_float32_error: max |float32 forward - float64 forward| over the same checks
            (None when the reference is the model's own forward).
    """

    runtime: str
    max_abs_error: float
    tolerance: float
    errors: Dict[str, float]
    batch: int
    length: int
    sequence: str
    compared: str
    forward_float32_error: Optional[float] = None

    @property
    def passed(self) -> bool:
        """Whether the graph's largest difference from the model is within the tolerance."""
        return bool(self.max_abs_error <= self.tolerance)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain JSON-ready values, plus ``passed``."""
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        checks = ", ".join(f"{k}: {v:.2e}" for k, v in self.errors.items())
        own = ("" if self.forward_float32_error is None else
               f"; the model's float32 forward is {self.forward_float32_error:.2e} from float64")
        return (f"validation {status} ({self.runtime}): max abs error {self.max_abs_error:.2e} "
                f"<= {self.tolerance:.0e}? {self.passed}; {self.compared}; batch {self.batch}, length "
                f"{self.length} ({self.sequence} sequence); {checks}{own}")


def default_sequence(d_input: int, length: int = DEFAULT_LENGTH, batch: int = DEFAULT_BATCH,
                     seed: int = DEFAULT_SEED) -> Tensor:
    """The default held-out validation input: standard normal (batch, length, d_input) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, d_input, generator=g, dtype=torch.float32)


def check_validation_input(x: Any, d_input: int, batch: Optional[int] = None) -> Optional[Tensor]:
    """A validation input as a float32 CPU tensor, checked before anything is traced.

    Args:
        x: (B, L, d_input) with B >= 1 and L >= 1, finite (tensor, array or nested lists); or None.
        d_input: the model's input width.
        batch: the batch an export is fixed to, or None (dynamic).
    Returns:
        x as float32; for None: None, or the default sequence at ``batch`` when one is fixed.
    Raises:
        ValueError naming the shape (or the count of non-finite values) given and what was expected.
    """
    if x is None:
        return None if batch is None else default_sequence(d_input, batch=batch)
    x = torch.as_tensor(x, dtype=torch.float32).cpu()
    if x.dim() != 3 or x.shape[-1] != d_input or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"validation input must have shape (batch >= 1, length >= 1, d_input={d_input}), "
                         f"got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):  # else reported as the graph disagreeing (error inf)
        raise ValueError(f"validation input holds {int((~torch.isfinite(x)).sum())} NaN or infinite values; "
                         "pass finite data")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"this export is fixed to batch={batch}, but the validation input has batch "
                         f"{x.shape[0]}; pass a validation input with {batch} sequences")
    return x


def _is_default(x: Any, d_input: int) -> bool:
    """Whether x is the default sequence (at some batch and length), e.g. one an exporter made
    for a fixed batch: the report then says "default", not "user"."""
    x = torch.as_tensor(x)
    return (x.dim() == 3 and x.shape[-1] == d_input and x.dtype == torch.float32
            and torch.equal(x, default_sequence(d_input, x.shape[1], x.shape[0])))


def prefix_lengths(length: int) -> List[int]:
    """Prefix lengths checked for pooled models (the full length is checked separately)."""
    return sorted({n for n in (1, length // 4, length // 2) if 0 < n < length})


@torch.no_grad()
def validate_stream(stream: StreamFn, model: nn.Module, x: Optional[Tensor] = None,
                    tolerance: float = FLOAT32_TOLERANCE, runtime: str = "runtime",
                    raise_on_failure: bool = True) -> ValidationReport:
    """Compare a runtime's streamed outputs with ``model``'s forward.

    Args:
        stream: x (B, L, d_input) float32 numpy -> per-step y (B, L, d_output), from a zero state.
        model: the source SequenceModel (its ``config.pooling`` decides what is compared).
        x: validation input (B, L, d_input); default ``default_sequence(d_input)``.
        tolerance: max abs error allowed.
        runtime: name used in the report.
        raise_on_failure: raise :class:`ValidationError` when the error exceeds the tolerance.
    Returns:
        the :class:`ValidationReport`.
    """
    if not isinstance(getattr(model, "config", None), ModelConfig):     # (stream, x) swapped: 'Tensor' ... 'config'
        raise TypeError(f"validate_stream expects the source SequenceModel as model, got {type(model).__name__}")
    cfg = model.config
    # A negative or NaN tolerance failed every graph as "disagrees with the PyTorch model".
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance must be a finite number >= 0 (max abs error allowed), got {tolerance!r}")
    sequence = "user" if x is not None and not _is_default(x, cfg.d_input) else "default"
    x = default_sequence(cfg.d_input) if x is None else check_validation_input(x, cfg.d_input)
    # The forwards run on copies: exporting must leave the model as it was (a layer's forward may
    # update its own buffers, e.g. a kernel that extends a stored length-dependent matrix in place).
    own_model = runnable_copy(model)
    # A float64 model's own forward is the reference: there is no float32 forward to report on.
    exact = float64_copy(model) if reference_tensor(own_model).dtype != torch.float64 else None
    streamed = np.asarray(stream(x.numpy()), dtype=np.float64)
    B, L = x.shape[:2]
    expected_shape = (B, L, cfg.d_output)
    if streamed.shape != expected_shape:
        raise ValueError(f"{runtime} streamed outputs of shape {streamed.shape}, expected {expected_shape}")
    # (output of the stream, the input whose forward it should equal) per check
    if cfg.pooling is None:
        checks = {"all steps": (streamed, x)}
    else:
        checks = {"final step": (streamed[:, -1], x)}
        checks.update({f"prefix {n}": (streamed[:, n - 1], x[:, :n]) for n in prefix_lengths(L)})
    reference = exact or own_model
    errors, own = {}, 0.0
    for name, (out, xs) in checks.items():
        want = _forward(reference, xs)
        errors[name] = float(np.abs(out - want).max()) if np.isfinite(out).all() else float("inf")
        if exact is not None:
            own = max(own, float(np.abs(_forward(own_model, xs) - want).max()))
    against = "model(x) in float64" if reference_tensor(reference).dtype == torch.float64 else "model(x)"
    compared = (f"per-step outputs vs {against}" if cfg.pooling is None else
                f"{cfg.pooling}-pooled outputs: final step vs {against}, prefixes on x[:, :n]")
    report = ValidationReport(runtime=runtime, max_abs_error=max(errors.values()), tolerance=tolerance,
                              errors=errors, batch=int(B), length=int(L), sequence=sequence, compared=compared,
                              forward_float32_error=own if exact is not None else None)
    if raise_on_failure and not report.passed:
        own = report.forward_float32_error
        # which layer, asked of the float64 copy only (in float32 a correct ill-conditioned layer could be named)
        culprit = None if exact is None or own >= 0.5 * report.max_abs_error else disagreeing_layer(exact)
        raise ValidationError(report, why=culprit and f"{culprit}: its step_form() and its forward disagree.")
    return report


#: Steps, and relative error, of :func:`disagreeing_layer`'s comparison of each layer's form with its forward.
LAYER_CHECK_STEPS, LAYER_CHECK_TOLERANCE = 64, 1e-4


@torch.no_grad()
def disagreeing_layer(model: nn.Module) -> Optional[str]:
    """The first block whose layer's step form, stepped from zeros over a random input, is further than
    LAYER_CHECK_TOLERANCE (relative) from the layer's own forward, as "blocks.{i}.layer (Class), off by
    ...", or None. Asked when a graph fails validation: the message said "the layer's step_form() and its
    forward disagree" without saying which of a model's layers (a plugin's one among built-in ones)."""
    g = torch.Generator().manual_seed(DEFAULT_SEED)
    for i, block in enumerate(getattr(model, "blocks", [])):
        layer = block.layer
        try:
            ref = reference_tensor(layer)
            x = torch.randn(1, LAYER_CHECK_STEPS, model.config.d_model, generator=g, dtype=torch.float64).to(ref)
            y = layer(x)
            with step_form_dtype(ref.dtype):
                form = layer.step_form().to(ref)
            s, ys = torch.zeros(1, form.state_size).to(ref), []
            for t in range(LAYER_CHECK_STEPS):
                y_t, s = form(x[:, t], s)
                ys.append(y_t)
            off = float((torch.stack(ys, 1) - y).abs().max() / y.abs().max().clamp_min(1e-30))
        except Exception:       # a layer this check cannot run (no float64, own streaming methods): not named
            continue
        if not off <= LAYER_CHECK_TOLERANCE:
            return f"blocks.{i}.layer ({type(layer).__name__}), {off:.1e} (relative) off its forward stepped alone"
    return None


#: Peak bytes of a forward per (sequence, step, d_model channel), with a margin: the shipped models' float64
#: forwards rose 38-62 bytes per one more such value at L=4096 (float32: about half).
FORWARD_BYTES = 64
#: The most memory one forward call over validation sequences may take: the sequences go through the
#: model this many bytes' worth at a time (a forward of 4096 sequences of 4096 steps took 30 GB at once).
FORWARD_SLICE_BYTES = 2 ** 28


def _forward(model: nn.Module, xs: Tensor) -> np.ndarray:
    """model(xs) on the model's own device and dtype, as float64 numpy; a few sequences at a time
    (each sequence's output is its own, so slicing the batch changes nothing but the peak memory)."""
    ref = reference_tensor(model)
    rows = max(1, FORWARD_SLICE_BYTES // (xs.shape[1] * model.config.d_model * FORWARD_BYTES))
    return np.concatenate([model(xs[i:i + rows].to(ref.device, ref.dtype)).double().cpu().numpy()
                           for i in range(0, xs.shape[0], rows)])


def validation_bytes(config: Any, batch: int, length: int, state_size: int) -> int:
    """(``config``: anything with d_input, d_model and d_output, a ModelConfig or a StepModule.) About the memory a validation run of ``batch`` sequences of ``length`` steps holds at its peak
    (:func:`validate_stream`): per sequence step, the input in float32, its float32 magnitudes (the
    streamer's finiteness check), its finiteness mask and float64 copies, per input feature; the streamed
    outputs (float32, gathered, float64), the float32 and float64 forwards' outputs (sliced, then joined) and
    their difference, per output feature; the states (float32, a few copies); and a slice of each forward
    (:data:`FORWARD_SLICE_BYTES`). The shipped forecaster's export at batch 4096 and 4096 steps (2.0 GB by
    this count) peaked at 4.2 GB resident, the process's own ~1 GB included: the check's margin covers it."""
    forward = min(batch * length * config.d_model * FORWARD_BYTES, FORWARD_SLICE_BYTES)
    return batch * _sequence_bytes(config, length, state_size) + 2 * forward


def _sequence_bytes(config: Any, length: int, state_size: int) -> int:
    """:func:`validation_bytes`'s share of one sequence, the forward left out."""
    return length * (24 * config.d_input + 64 * config.d_output) + 16 * state_size


def check_validation_memory(config: Any, batch: int, length: int, state_size: int,
                            length_advice: str) -> None:
    """Refuse a validation run that would need more than half this machine's memory (the rest is the
    export's and the system's), before its input is allocated: ``--batch 1000000`` allocated 16 GB of
    input and died in the allocator ("can't allocate memory") or ran for minutes. ``length_advice``:
    how the caller shortens the sequences (``validation_length=N`` or a shorter validation_input). The
    machine's physical memory, as for chunk graphs (:func:`~lrnnx_zoo.export.graph_size.physical_memory`)."""
    from lrnnx_zoo.wording import given, name

    from .graph_size import physical_memory, readable_size

    memory = physical_memory()
    need = validation_bytes(config, batch, length, state_size)
    if memory is None or need <= memory / 2:
        return
    fits = int((memory / 2 - 2 * FORWARD_SLICE_BYTES) // _sequence_bytes(config, length, state_size))
    advice = f"a smaller {name('batch')} (at most {fits} at this length)" if fits >= 1 else "a smaller batch"
    raise ValueError(f"{given('batch', batch)} needs about {readable_size(need)} ({need:,} bytes) to validate "
                     f"the graph on {batch} sequences of {length} steps, more than half this machine's "
                     f"{readable_size(memory)} of memory; pass {advice}, or {length_advice}")


def runnable_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of model whose forward runs: the model itself on its device and in its
    dtype, except that a half-precision (float16 / bfloat16) model on the CPU is converted to
    float32, the precision its step graph computes in (the CPU layers refuse half precision)."""
    copied = copy.deepcopy(model).eval()
    ref = reference_tensor(copied)
    if ref.dtype in HALF_DTYPES and ref.device.type == "cpu":
        copied = copied.float()
    return copied


def float64_copy(model: nn.Module) -> Optional[nn.Module]:
    """An eval-mode float64 copy of model on the CPU, or None when it cannot be made or run."""
    try:
        exact = copy.deepcopy(model).double().cpu().eval()
        d_input = model.config.d_input
        exact(torch.zeros(1, 2, d_input, dtype=torch.float64))
        return exact
    except Exception:           # a third-party layer without float64 support: compare as it is
        return None


# Serialises one_torch_thread's reads and writes of torch's process default thread count (below).
_THREAD_COUNT_LOCK = threading.Lock()


def _in_fresh_thread(work: Callable[[], Any]) -> Any:
    """``work()``'s result, run in a new thread (one whose torch thread count is still unset: there
    torch.get_num_threads reads the process default and torch.set_num_threads sets it)."""
    out: List[Any] = []
    helper = threading.Thread(target=lambda: out.append(work()), name="lrnnx-thread-count", daemon=True)
    helper.start()
    helper.join()
    if not out:
        raise RuntimeError("reading or setting torch's default thread count in a helper thread failed "
                           "(its error is printed above)")
    return out[0]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded in the calling thread: a step is microseconds of work, and handing
    it to a thread pool costs more than it saves (on a loaded machine, ~50x more: measured 17 ms vs
    0.35 ms per step).

    ``torch.set_num_threads`` sets the calling thread's count and also the process default that every
    thread takes at its first torch call; only the first is wanted here. So the default is read in a
    new thread before and put back from one after each change: threads starting meanwhile (a server's
    new workers) get the process's count, not 1 for good, and leaving does not write this thread's
    count over a default another thread set meanwhile. Other threads' counts are their own throughout."""
    with _THREAD_COUNT_LOCK:
        default = _in_fresh_thread(torch.get_num_threads)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        _in_fresh_thread(lambda: torch.set_num_threads(default))
    try:
        yield
    finally:
        with _THREAD_COUNT_LOCK:
            default = _in_fresh_thread(torch.get_num_threads)   # as it is now: another thread may have set it
            torch.set_num_threads(before)
            _in_fresh_thread(lambda: torch.set_num_threads(default))


def torch_stream(step_module: Callable[[Tensor, Tensor], Any], state_size: int,
                 chunk: Optional[int] = None) -> StreamFn:
    """A stream function over any callable (x_t, state) -> (y_t, state') of torch tensors
    (a StepModule, a loaded TorchScript module, a torch.export program's module); with ``chunk``,
    over a chunk module's (x (B, chunk, d), state) -> (y (B, chunk, d'), state') (the length a multiple of it)."""

    @torch.no_grad()
    def stream(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        state = torch.zeros(xt.shape[0], state_size, dtype=torch.float32)
        ys = []
        with one_torch_thread():
            if chunk is None:
                for t in range(xt.shape[1]):
                    y, state = step_module(xt[:, t], state)
                    ys.append(y)
                return torch.stack(ys, 1).numpy()
            for t in range(0, xt.shape[1], chunk):
                y, state = step_module(xt[:, t:t + chunk], state)
                ys.append(y)
        return torch.cat(ys, 1).numpy()

    return stream
