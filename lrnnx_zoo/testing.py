"""The layer contract kit: every check a registered layer is held to, importable from an installed
lrnnx-zoo (no source checkout; pytest only for :func:`parametrize_with_checks`).

    from lrnnx_zoo.testing import check_layer
    check_layer("ema")               # ContractError naming the layer, the check, expected vs got

In a plugin's own pytest suite, one test per check:

    from lrnnx_zoo.testing import parametrize_with_checks

    @parametrize_with_checks("ema")
    def test_lrnnx_zoo_contract(check):
        check()

lrnnx-zoo's own tests/test_layer_contract.py runs these checks over ``lrnnx_zoo.list_layers()``.
Each check builds its layer with ``create_layer(name, d_model, d_state=d_state, **layer_kwargs)``
under ``torch.manual_seed(0)`` inside ``torch.random.fork_rng``, so the caller's random state is
left as it was. A bidirectional layer (``layer.bidirectional``) sees the future: the checks of
causality and streaming do not apply to it and are left out.

Tolerances: float32 comparisons between modes use 1e-4 relative to max|y| over L=1024: the modes
round differently (FFT vs recurrence) and the error of a float32 FFT of length 2L grows like
eps * log(L) * ||K||_1, about 1e-6..1e-5 here; 1e-4 leaves room without hiding a wrong formula,
which shows up as O(1) errors. float64 over L=256 to 1e-10: a float64 layer's step form is built
from the float64 discretisation in float64 and the cache defaults to the parameters' dtype, so the
modes agree to ~1e-13 (FFT rounding eps * log L), where float32 forms would leave ~1e-6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

import lrnnx_zoo
from lrnnx_zoo.base import LTI_LRNN, tensor_attributes
from lrnnx_zoo.step_forms import check_step_form, step_form_dtype

if TYPE_CHECKING:                     # pytest only where parametrize_with_checks is called
    from pytest import MarkDecorator

__all__ = ["ContractError", "LayerCheck", "check_layer", "layer_checks", "parametrize_with_checks"]


class ContractError(AssertionError):
    """A registered layer broke the contract: ``layer`` (its registry name), ``check`` (the check's
    name, :data:`CHECKS`) and ``detail`` (what was expected and what came back). From
    :func:`check_layer` with several checks failed: ``check`` lists them and ``failures`` holds each."""

    def __init__(self, layer: str, check: str, detail: str, failures: Sequence["ContractError"] = ()) -> None:
        super().__init__(f"layer {layer!r} fails the contract check {check!r}: {detail}")
        self.layer, self.check, self.detail = layer, check, detail
        self.failures: Tuple[ContractError, ...] = tuple(failures) or (self,)

    def __reduce__(self) -> Tuple[Any, ...]:      # picklable (pytest-xdist, multiprocessing)
        return type(self), (self.layer, self.check, self.detail, self.failures if len(self.failures) > 1 else ())


@dataclasses.dataclass(frozen=True)
class LayerCheck:
    """One contract check of one layer: call it to run it (None, or :class:`ContractError`)."""

    layer: str
    name: str
    run: Callable[[], None] = dataclasses.field(repr=False, compare=False)

    @property
    def id(self) -> str:
        """``"{layer}-{name}"``: the pytest id :func:`parametrize_with_checks` gives it."""
        return f"{self.layer}-{self.name}"

    def __call__(self) -> None:
        try:
            with torch.random.fork_rng(devices=[]):
                self.run()
        except ContractError:
            raise
        except AssertionError as exc:
            raise ContractError(self.layer, self.name, str(exc) or "an assertion failed") from exc
        except Exception as exc:          # the layer raised where the check expected it to work
            raise ContractError(self.layer, self.name, f"it raised {type(exc).__name__}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class _Subject:
    """The layer under test: how to build it, and what kind it is (from one probe instance)."""

    name: str
    d_model: int
    d_state: int
    kwargs: Dict[str, Any]
    streaming: bool = True          # not bidirectional: causal, with step mode and step forms
    time_invariant: bool = True     # an LTI_LRNN: refuses integration_timesteps

    def make(self, d_model: Optional[int] = None, d_state: Optional[int] = None) -> Any:
        """A fresh layer (an nn.Module with the registry's interface) in eval mode, its weights from seed 0."""
        torch.manual_seed(0)
        layer = lrnnx_zoo.create_layer(self.name, d_model or self.d_model, d_state=d_state or self.d_state,
                                       **self.kwargs)
        return layer.eval()


def _fail(expected: str, got: str) -> NoReturn:
    raise AssertionError(f"expected {expected}; got {got}")


def _raises(exc_type: Type[BaseException], pattern: str, call: Callable[[], Any], what: str) -> None:
    """Assert that ``call()`` raises ``exc_type`` with a message matching ``pattern`` (re.search)."""
    try:
        call()
    except exc_type as exc:
        if not re.search(pattern, str(exc)):
            _fail(f"{what} to raise {exc_type.__name__} matching {pattern!r}", f"{exc_type.__name__}: {exc}")
        return
    except Exception as exc:
        _fail(f"{what} to raise {exc_type.__name__} matching {pattern!r}", f"{type(exc).__name__}: {exc}")
    _fail(f"{what} to raise {exc_type.__name__} matching {pattern!r}", "no error")


def rel_err(a: Tensor, b: Tensor) -> float:
    """max|a - b| / max|b| (the modes' agreement, module docstring)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_steps(layer: Any, x: Tensor, cache: Any = None) -> Tensor:
    """x: (B, L, H) stepped through ``layer.step`` from ``cache`` (default a fresh one) -> (B, L, H)."""
    cache = layer.allocate_inference_cache(x.shape[0]) if cache is None else cache
    ys = []
    for t in range(x.shape[1]):
        y, cache = layer.step(x[:, t], cache)
        ys.append(y)
    return torch.stack(ys, 1)


# -- the checks -------------------------------------------------------------------------------------
def _shapes(s: _Subject) -> None:
    H = s.d_model
    layer = s.make()
    y = layer(torch.randn(3, 50, H))
    if not (isinstance(y, Tensor) and y.shape == (3, 50, H) and y.dtype == torch.float32):
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        _fail(f"forward(x (3, 50, {H}) float32) to return a float32 Tensor (3, 50, {H})", got)
    if not s.streaming:
        return
    form = layer.step_form()
    size = getattr(form, "state_size", None)
    if not (isinstance(size, int) and size > 0):
        _fail("step_form().state_size an int > 0", repr(size))
    state = torch.zeros(3, size)
    y_t, s_next = form(torch.randn(3, H), state)
    if y_t.shape != (3, H) or s_next.shape != state.shape:
        _fail(f"step_form()(u (3, {H}), s (3, {size})) to return y (3, {H}) and s_next (3, {size})",
              f"y {tuple(y_t.shape)} and s_next {tuple(s_next.shape)}")
    complex_buffers = [n for n, t in form.named_buffers() if t.is_complex()]
    if complex_buffers:
        _fail("step forms to carry real tensors only (ONNX has no complex dtype)", f"complex buffers {complex_buffers}")


def _contiguous(s: _Subject) -> None:
    # A (B, H, L) result handed back as a transposed (B, L, H) view made the next layers (an
    # activation, a Linear) and their backward copy with a row-sized stride: a block of S4D, GELU
    # and Linear trained 1.4x slower at (8, 1024, 128). The training path (grad) is the one that did.
    for grad in (False, True):
        layer = s.make().train(grad)
        x = torch.randn(3, 50, s.d_model, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            y = layer(x)
        if not y.is_contiguous():
            _fail(f"a contiguous y (with grad {'on' if grad else 'off'}; a transposed view slows the next layers)",
                  f"strides {y.stride()} for shape {tuple(y.shape)}")


def _empty_input(s: _Subject) -> None:
    layer = s.make()
    for shape in ((0, 10, s.d_model), (2, 0, s.d_model)):
        x = torch.randn(*shape)
        with torch.no_grad():
            got = tuple(layer(x).shape)
        y = layer(x.requires_grad_())
        if got != shape or tuple(y.shape) != shape:
            _fail(f"an empty x {shape} to give an empty y {shape}", f"{got} (no_grad) and {tuple(y.shape)}")
        y.sum().backward()                              # the graph holds (with zero gradients)
        if x.grad is None or x.grad.shape != x.shape:
            _fail(f"a gradient of shape {shape} for the empty input", repr(None if x.grad is None else x.grad.shape))


def _step_matches_forward(dtype: torch.dtype, L: int, tol: float) -> Callable[[_Subject], None]:
    def check(s: _Subject) -> None:
        layer = s.make().to(dtype)
        x = torch.randn(2, L, s.d_model, dtype=dtype)
        with torch.no_grad():
            y_conv = layer(x)
            y_step = run_steps(layer, x)
            if y_step.dtype != dtype:
                _fail(f"step outputs in the layer's {dtype}", str(y_step.dtype))
            if rel_err(y_step, y_conv) >= tol:
                _fail(f"step-by-step outputs equal to forward's within {tol:g} of max|y| (L={L}, {dtype})",
                      f"{rel_err(y_step, y_conv):.3g}{_form_precision(layer, dtype)}")
            if not hasattr(layer, "prefill"):          # optional: a prompt is stepped through without it
                return
            # a prompt read by prefill, then streamed on: the last 16 steps from its cache
            y_pre, cache = layer.prefill(x[:, :L - 16])
            y_on = run_steps(layer, x[:, L - 16:], cache)
            if rel_err(y_pre, y_conv[:, :L - 16]) >= tol or rel_err(y_on, y_conv[:, L - 16:]) >= tol:
                _fail(f"prefill(x[:, :{L - 16}]) and the 16 steps after it equal to forward's outputs within "
                      f"{tol:g} of max|y| ({dtype})", f"{rel_err(y_pre, y_conv[:, :L - 16]):.3g} (prefill) and "
                      f"{rel_err(y_on, y_conv[:, L - 16:]):.3g} (the steps after it)")
    return check


def _form_precision(layer: Any, dtype: torch.dtype) -> str:
    """Why a layer's steps may miss its forward in ``dtype``: the floating-point tensors its step form,
    built as a cache of that dtype builds it, holds in a narrower dtype ("" when none). A form of a
    plugin's own that stored ``a.float()`` stepped a float64 layer 1e-8 off (float32 coefficients,
    promoted to float64 by the input), which the check reported as a bare number."""
    with step_form_dtype(dtype):
        form = layer.step_form()
    if not isinstance(form, nn.Module):
        return ""
    named = [*form.named_parameters(), *form.named_buffers(),
             *((f"{name} (a plain attribute)", t) for _, name, t in tensor_attributes(form))]
    narrow = [f"{n} {t.dtype}" for n, t in named
              if (t.is_floating_point() or t.is_complex()) and torch.finfo(t.dtype).bits < torch.finfo(dtype).bits]
    if not narrow:
        return ""
    return (f"; its step form, built for a {dtype} cache, holds {', '.join(narrow)}: store each matrix with "
            f"lrnnx_zoo.step_forms.stored(t) (the dtype the cache asks for) rather than in a fixed dtype")


def _causality(s: _Subject) -> None:
    layer = s.make()
    x = torch.randn(2, 64, s.d_model)
    x2 = x.clone()
    x2[:, 40] += 10.0
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    before, after = float((y[:, :40] - y2[:, :40]).abs().max()), float((y[:, 40:] - y2[:, 40:]).abs().max())
    if before > 1e-5:
        _fail("y[:, :40] unchanged (within 1e-5) by a change to x[:, 40] (a causal layer)", f"a change of {before:.3g}")
    if not after > 1e-3:
        _fail("a change to x[:, 40] to reach y[:, 40:] (more than 1e-3)", f"a change of {after:.3g}")


def _lengths(s: _Subject) -> None:
    layer = s.make()
    lengths = torch.tensor([30, 64, 7])
    x = torch.randn(3, 64, s.d_model)
    with torch.no_grad():
        y = layer(x, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = layer(x[b:b + 1, :n])
            torch.testing.assert_close(y[b, :n], alone[0], rtol=1e-5, atol=1e-5, msg=lambda m: (
                f"expected forward(x, lengths={lengths.tolist()})[{b}, :{n}] equal to forward(x[{b}:{b + 1}, :{n}]) "
                f"alone; got {m}"))
            if not torch.all(y[b, n:] == 0):
                _fail(f"zeros past each length (y[{b}, {n}:])", f"max|y| {float(y[b, n:].abs().max()):.3g}")


def _padding(s: _Subject) -> None:
    # An FFT spreads rounding (and NaN/inf) over the whole sequence, so the padding is zeroed
    # before the convolution: huge or NaN padding gives the outputs of zero padding, to float
    # rounding (1e-6 of max|y|), and padded outputs are exactly zero.
    layer = s.make()
    lengths = torch.tensor([9, 32])
    x = torch.randn(2, 32, s.d_model)
    x[0, 9:] = 0.0
    with torch.no_grad():
        y0 = layer(x, lengths=lengths)
        for fill in (1e6, float("nan"), float("inf")):
            xp = x.clone()
            xp[0, 9:] = fill
            y = layer(xp, lengths=lengths)
            if not torch.all(y[0, 9:] == 0):
                _fail(f"zeros past the length 9 whatever the padding holds ({fill})",
                      f"max|y[0, 9:]| {float(y[0, 9:].abs().max()):.3g}")
            err = max(rel_err(y[:, :9], y0[:, :9]), rel_err(y[1], y0[1]))
            if not err < 1e-6:
                _fail(f"padding of {fill} to leave the valid outputs as zero padding does (1e-6 of max|y|)",
                      f"{err:.3g}")


def _gradients(s: _Subject) -> None:
    # tiny float64 sizes: gradcheck differentiates numerically, one input element at a time
    layer = s.make(d_model=3, d_state=4).double()
    x = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-6)
    params = list(layer.named_parameters())
    if not params:          # a layer with fixed coefficients (buffers) has nothing more to check
        return
    grads = torch.autograd.grad(layer(x).square().sum(), [p for _, p in params], allow_unused=True)
    unused = [n for (n, _), g in zip(params, grads) if g is None]
    if unused:
        _fail("a gradient for every parameter from a loss on forward's output", f"none reached {unused}")


def _dtype_conversion(s: _Subject) -> None:
    # A coefficient kept as a plain tensor attribute is left behind by .to() / .double(): the layer
    # then computes with float32 coefficients in a float64 model (promotion hides it) or fails on a GPU.
    layer = s.make()
    for dtype in (torch.float64, torch.float32):
        layer = layer.to(dtype)
        with torch.no_grad():
            y = layer(torch.randn(2, 10, s.d_model, dtype=dtype))
        if y.dtype != dtype:
            _fail(f"a {dtype} y from layer.to({dtype}) on a {dtype} x", str(y.dtype))
        left = [f"{n} ({t.dtype})" for n, t in [*layer.named_parameters(), *layer.named_buffers()]
                if t.is_floating_point() and t.dtype != dtype]
        left += [f"attribute {name!r} of {type(sub).__name__} ({t.dtype}), a plain tensor (make it an "
                 f"nn.Parameter, or a buffer if fixed)" for sub, name, t in tensor_attributes(layer)
                 if (t.is_floating_point() or t.is_complex()) and t.dtype not in (dtype, _complex_of(dtype))]
        if left:
            _fail(f"layer.to({dtype}) to reach every coefficient", f"left behind: {'; '.join(left)}")


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _inference_mode(s: _Subject) -> None:
    # torch.inference_mode() tensors have no version counter (the kernel cache reads it).
    layer = s.make()
    x = torch.randn(2, 40, s.d_model)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        y_inf, y_inf2 = layer(x), layer(x)               # the second call hits any kernel cache
    with torch.no_grad():
        y_after = layer(x)                               # and outside it again
    for what, got in (("first", y_inf), ("second", y_inf2), ("no_grad after inference_mode", y_after)):
        if not torch.equal(got, y):
            _fail(f"forward under torch.inference_mode() ({what} call) equal to forward under no_grad, bit for bit",
                  f"a difference of {float((got - y).abs().max()):.3g}")


def _bad_input(s: _Subject) -> None:
    H = s.d_model
    layer = s.make()
    x = torch.randn(2, 10, H)
    _raises(TypeError, "floating-point input.*torch.int64", lambda: layer(torch.ones(2, 5, H, dtype=torch.long)),
            "an int64 x")
    _raises(ValueError, rf"\(batch, length, d_model={H}\)", lambda: layer(torch.randn(2, 10, H + 1)),
            f"an x of {H + 1} features")
    _raises(ValueError, "d_model", lambda: layer(torch.randn(10, H)), "a 2-d x")
    for bad in (torch.tensor([5.0, 7.5]), torch.tensor([True, False])):
        _raises(TypeError, "lengths must hold integers", lambda: layer(x, lengths=bad), f"lengths={bad.tolist()}")
    _raises(TypeError, "float32 or float64, got torch.float16", lambda: layer(x.half()), "a float16 x")
    if s.time_invariant:
        # A time-invariant layer has one step size for the whole sequence: ignoring
        # integration_timesteps gave the outputs of a uniform grid without a word.
        _raises(ValueError, r"expected integration_timesteps=None, got a tensor of shape \(2, 10\)",
                lambda: layer(x, integration_timesteps=torch.ones(2, 10)), "integration_timesteps (2, 10)")
        layer(x, integration_timesteps=None)
    if s.streaming:
        cache = layer.allocate_inference_cache(2)
        with _own_stream_hint(layer, f"refuse an x_t of another batch or width with a ValueError naming the "
                                     f"shape it expects, (batch=2, d_model={H})"):
            _raises(ValueError, rf"\(batch=2, d_model={H}\)", lambda: layer.step(torch.randn(3, H), cache),
                    "a step with x_t (3, H) on a cache of batch 2")


def _bad_sizes(s: _Subject) -> None:
    for kw in ({"d_model": 0}, {"d_model": -3}, {"d_state": 2.0}, {"d_state": 0}):
        args = {"d_model": s.d_model, "d_state": s.d_state, **s.kwargs, **kw}
        d_model = args.pop("d_model")
        _raises(ValueError, next(iter(kw)), lambda: lrnnx_zoo.create_layer(s.name, d_model, **args),
                f"create_layer({s.name!r}, ...) with {kw}")


def _half_parameters(s: _Subject) -> None:
    # layer.half() / .bfloat16() failed deep inside ("Unsupported dtype BFloat16", "exp_vml_cpu not
    # implemented for 'ComplexHalf'"), with a float32 input and, for the LRU, under autocast too.
    x = torch.randn(2, 10, s.d_model)
    for dtype in (torch.float16, torch.bfloat16):
        layer = s.make().to(dtype)
        _raises(TypeError, rf"computes in float32 or float64, but holds {dtype} parameters", lambda: layer(x),
                f"a layer of {dtype} parameters on the CPU")
        with torch.autocast("cpu", dtype=dtype):
            _raises(TypeError, rf"holds {dtype} parameters", lambda: layer(x.to(dtype)),
                    f"a layer of {dtype} parameters under autocast")
        layer.float()(x)                                   # the way out the message gives


@contextlib.contextmanager
def _own_stream_hint(layer: Any, must: str) -> Iterator[None]:
    """A failed check of a step that is the layer's own (not ``LTI_LRNN``'s) says how to pass it: what
    its step ``must`` do, or subclass LTI_LRNN, whose streaming, derived from ``step_form()``, does it
    for any step form. A plugin with a step of its own was held to messages the README did not state."""
    try:
        yield
    except AssertionError as exc:
        if isinstance(layer, LTI_LRNN):
            raise
        raise AssertionError(f"{exc}. {type(layer).__name__}.step is the layer's own: subclass lrnnx_zoo.LTI_LRNN, "
                             f"whose allocate_inference_cache / step / prefill come from step_form() and do this for "
                             f"any step form (input-dependent gates too), or make the step {must}") from exc


def _coefficients(layer: nn.Module) -> List[Tensor]:
    """The layer's real or complex floating-point parameters, then such buffers (fixed coefficients)."""
    return [t for t in [*layer.parameters(), *layer.buffers()] if t.is_floating_point() or t.is_complex()]


def _stale_cache(s: _Subject) -> None:
    # Training while streaming, or loading weights into a streaming layer: the cache's step form
    # kept the old weights and stepped on with them, silently. A layer of fixed coefficients (buffers
    # only, as the gradients check allows) has no optimiser step, but can be loaded into or edited.
    probe = s.make()
    if not _coefficients(probe):                    # nothing a change could reach
        return
    trainable = any(True for _ in probe.parameters())
    for change in ("optimizer step", "load_state_dict", "in-place edit")[0 if trainable else 1:]:
        layer = s.make()
        x = torch.randn(2, 8, s.d_model)
        cache = layer.allocate_inference_cache(2)
        with torch.no_grad():
            layer.step(x[:, 0], cache)
        if change == "optimizer step":
            opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
            layer(x).square().sum().backward()
            opt.step()
        elif change == "load_state_dict":
            other = s.make()
            with torch.no_grad():
                _coefficients(other)[0].mul_(0.5)
            layer.load_state_dict(other.state_dict())
        else:
            with torch.no_grad():
                _coefficients(layer)[0].mul_(0.5)
        with torch.no_grad(), _own_stream_hint(layer, (
                "keep lrnnx_zoo.base.weights_and_versions(self) in the cache it makes and, unless "
                "lrnnx_zoo.base.unchanged(those) at a step, raise a RuntimeError saying the layer's weights "
                "changed since this cache was made: call allocate_inference_cache again")):
            _raises(RuntimeError, "weights changed since this cache was made.*allocate_inference_cache",
                    lambda: layer.step(x[:, 1], cache), f"a step on a cache made before an {change}")
            # a new cache steps with the new weights: the convolution's outputs
            torch.testing.assert_close(run_steps(layer, x), layer(x), rtol=1e-4, atol=1e-5, msg=lambda m: (
                f"expected a new cache after an {change} to step as forward runs; got {m}"))


def _longer_forward(s: _Subject) -> None:
    # S4 keeps C~ = C (I - A^L) for its kernel length and rewrites it in place for a longer input:
    # the version counters move, the system does not, and the stream must not be refused.
    layer = s.make()
    x = torch.randn(1, 40, s.d_model)
    with torch.no_grad():
        cache = layer.allocate_inference_cache(1)
        first = run_steps(layer, x[:, :20], cache)
        layer(torch.randn(1, 300, s.d_model))
        rest = run_steps(layer, x[:, 20:], cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), layer(x), rtol=1e-4, atol=1e-5, msg=lambda m: (
            f"expected a stream to go on, as forward runs, after a longer forward; got {m}"))


def _step_form(s: _Subject) -> None:
    # the contract as the README and DESIGN.md state it (an nn.Module with an int state_size, a real
    # (y, s_next) of the declared sizes), not a StepForm subclass, which a plugin's form need not be
    check_step_form(s.make().step_form(), f"{s.name}.step_form()", s.d_model)


def _model(s: _Subject) -> lrnnx_zoo.SequenceModel:
    torch.manual_seed(0)
    cfg = lrnnx_zoo.ModelConfig(layer=s.name, d_input=3, d_output=5, d_model=s.d_model, n_layers=2,
                                layer_kwargs={"d_state": s.d_state, **s.kwargs})
    return lrnnx_zoo.SequenceModel(cfg).eval()


def _sequence_model(s: _Subject) -> None:
    # A SequenceModel of two blocks of the layer (the default norm and post): its steps agree with its
    # forward over L=200 (1e-4 of max|y|, as the layer's), and save_pretrained / from_pretrained give
    # the same model, bit for bit (forward, then the first 16 steps, on both).
    model = _model(s)
    x = torch.randn(2, 200, 3)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        loaded = lrnnx_zoo.from_pretrained(model.save_pretrained(Path(tmp) / "m"))
        y, y_loaded = model(x), loaded(x)
        if not torch.equal(y_loaded, y):
            _fail("from_pretrained(save_pretrained(model))(x) equal to model(x) bit for bit",
                  f"a difference of {float((y_loaded - y).abs().max()):.3g}")
        steps = run_steps(model, x)
        if rel_err(steps, y) >= 1e-4:
            _fail("a SequenceModel's steps equal to its forward within 1e-4 of max|y| (L=200)",
                  f"{rel_err(steps, y):.3g}")
        steps_loaded = run_steps(loaded, x[:, :16])
        if not torch.equal(steps_loaded, steps[:, :16]):
            _fail("the loaded model's steps equal to the saved one's bit for bit",
                  f"a difference of {float((steps_loaded - steps[:, :16]).abs().max()):.3g}")


def _onnx(s: _Subject) -> None:
    # to_onnx validates the graph, streamed in ONNX Runtime, against the model's forward (1e-4
    # absolute) before it writes it; a short validation sequence keeps the check to seconds
    from lrnnx_zoo.export import to_onnx
    model = _model(s)
    with tempfile.TemporaryDirectory() as tmp:
        result = to_onnx(model, Path(tmp) / "m.onnx", validation_input=torch.randn(1, 32, 3))
    if result.validation is None or not result.validation.passed:
        _fail("an ONNX step graph that streams as the model runs", repr(result.validation))


@dataclasses.dataclass(frozen=True)
class _Check:
    run: Callable[[_Subject], None]
    doc: str
    streaming: bool = False         # needs step mode and causality: left out for a bidirectional layer


#: Each check's name (what a :class:`ContractError` reports) and what it holds a layer to.
CHECKS: Dict[str, _Check] = {
    "shapes": _Check(_shapes, "forward (B, L, H) -> a float32 Tensor (B, L, H); the step form's sizes, real buffers"),
    "contiguous": _Check(_contiguous, "forward's output is contiguous, with and without grad"),
    "empty_input": _Check(_empty_input, "an empty batch or sequence gives an empty output, and backward runs"),
    "step_float32": _Check(_step_matches_forward(torch.float32, 1024, 1e-4),
                           "step and prefill agree with forward in float32 (L=1024, 1e-4 of max|y|)", True),
    "step_float64": _Check(_step_matches_forward(torch.float64, 256, 1e-10),
                           "step and prefill agree with forward in float64 (L=256, 1e-10 of max|y|)", True),
    "causality": _Check(_causality, "no output depends on a later input", True),
    "lengths": _Check(_lengths, "a padded batch with lengths gives each sequence's outputs alone, zeros after"),
    "padding": _Check(_padding, "huge, NaN or inf padding never reaches the valid outputs"),
    "gradients": _Check(_gradients, "gradcheck in float64 (tiny sizes); every parameter receives a gradient"),
    "dtype_conversion": _Check(_dtype_conversion, ".to(float64) / .to(float32) reach every coefficient"),
    "inference_mode": _Check(_inference_mode, "torch.inference_mode() gives no_grad's outputs"),
    "bad_input": _Check(_bad_input, "bad inputs (dtype, shape, lengths, integration_timesteps) are refused clearly"),
    "bad_sizes": _Check(_bad_sizes, "create_layer refuses d_model or d_state of 0, -3 or 2.0, naming it"),
    "half_parameters": _Check(_half_parameters, "float16 / bfloat16 parameters are refused clearly on the CPU"),
    "stale_cache": _Check(_stale_cache, "a step refuses a cache made before the weights changed", True),
    "longer_forward": _Check(_longer_forward, "a stream goes on after a longer forward restored the weights", True),
    "step_form": _Check(_step_form, "step_form() keeps the step form contract (check_step_form)", True),
    "sequence_model": _Check(_sequence_model, "a SequenceModel of it steps as it runs and saves / loads bit for bit",
                             True),
    "onnx": _Check(_onnx, "a SequenceModel of it exports to a validated ONNX step graph", True),
}


def _subject(name: str, d_model: int, d_state: int, layer_kwargs: Dict[str, Any]) -> _Subject:
    # the probe's initialisation draws from a fork: layer_checks (parametrize_with_checks at collection,
    # check_layer) leaves the caller's random stream as it was, as the checks themselves do
    with torch.random.fork_rng(devices=[]):
        probe = lrnnx_zoo.create_layer(name, d_model, d_state=d_state, **layer_kwargs)
    return _Subject(name, d_model, d_state, dict(layer_kwargs), streaming=not getattr(probe, "bidirectional", False),
                    time_invariant=isinstance(probe, LTI_LRNN))


def layer_checks(name: str, d_model: int = 16, d_state: int = 8, *, onnx: bool = True,
                 **layer_kwargs: Any) -> List[LayerCheck]:
    """The contract checks (:data:`CHECKS`) that apply to the registered layer ``name``, each a
    :class:`LayerCheck` to call; ``onnx=False`` leaves out the ONNX export (the slowest, a few
    seconds). The layer is built as ``create_layer(name, d_model, d_state=d_state, **layer_kwargs)``
    (``gradients`` at d_model=3, d_state=4). A layer that cannot be built gives one check,
    ``create``, that raises why."""
    try:
        subject = _subject(name, d_model, d_state, layer_kwargs)
    except Exception as exc:
        def cannot(exc: Exception = exc) -> None:
            raise AssertionError(f"expected create_layer({name!r}, {d_model}, d_state={d_state}, **{layer_kwargs!r}) "
                                 f"to build the layer; it raised {type(exc).__name__}: {exc}") from exc
        return [LayerCheck(name, "create", cannot)]
    return [LayerCheck(name, check, functools.partial(c.run, subject)) for check, c in CHECKS.items()
            if (subject.streaming or not c.streaming) and (onnx or check != "onnx")]


def check_layer(name: str, d_model: int = 16, d_state: int = 8, *, onnx: bool = True,
                **layer_kwargs: Any) -> List[str]:
    """Run every contract check (:func:`layer_checks`) on the registered layer ``name``.

    Returns:
        the names of the checks, all passed (run from a shell or a notebook, a passing layer used to
        show nothing at all, which read as if nothing had run).
    Raises:
        ContractError (an AssertionError): ``layer``, ``check`` and what was expected vs what came
            back; with several checks failed, one error listing each (``failures``).
    """
    failures, names = [], []
    for check in layer_checks(name, d_model, d_state, onnx=onnx, **layer_kwargs):
        names.append(check.name)
        try:
            check()
        except ContractError as exc:
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise ContractError(name, ", ".join(f.check for f in failures),
                            "".join(f"\n- {f.check}: {f.detail}" for f in failures), failures)
    return names


def parametrize_with_checks(names: Union[str, Iterable[str]], d_model: int = 16, d_state: int = 8, *,
                            onnx: bool = True, **layer_kwargs: Any) -> "MarkDecorator":
    """A ``pytest.mark.parametrize("check", ...)`` over :func:`layer_checks` of each layer in ``names``
    (ids ``"{layer}-{check}"``): decorate a test taking ``check`` and calling ``check()``. Needs pytest."""
    import pytest                     # here: importing this module needs no pytest
    names = [names] if isinstance(names, str) else list(names)
    checks = [c for n in names for c in layer_checks(n, d_model, d_state, onnx=onnx, **layer_kwargs)]
    return pytest.mark.parametrize("check", [pytest.param(c, id=c.id) for c in checks])
