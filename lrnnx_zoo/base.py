"""Base classes every layer in the zoo derives from.

``LRNN`` fixes the sequence interface, x: (B, L, H) -> y: (B, L, H), and the choice of
discretization. ``LTI_LRNN`` adds what time-invariant layers share: a kernel for convolution
mode, and a recurrent mode driven by the layer's *step form* (see :mod:`lrnnx_zoo.step_forms`),
so streaming inference and export run the same discretised system.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import sys
import warnings
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .discretization import METHODS, get_discretization
from .shapes import positive_int, stream_rows
from .step_forms import check_step_form, poles_split, same_form, step_form_dtype, unshared

Discretization = Optional[Literal["zoh", "bilinear", "dirac", "async", "no_discretization"]]


class CacheOwner:
    """The mark a streaming cache carries of the module that made it (:func:`cache_owner`). An
    object, not ``id(module)``: CPython reuses a freed object's id, and a new layer accepted a freed
    layer's cache and stepped with its weights (2.0-3.9 off, after 4-17 new layers). A deepcopy or
    pickle of a module and its cache together maps both to one new mark (a copied stream goes on in
    the copy); a copy of either alone gets a mark of its own, so the other refuses it."""

    __slots__ = ("__weakref__",)


def cache_owner(module: nn.Module) -> CacheOwner:
    """``module``'s :class:`CacheOwner`, made at its first cache."""
    owner = module.__dict__.get("_cache_owner")
    if owner is None:
        owner = module.__dict__["_cache_owner"] = CacheOwner()
    return owner


def made_by(module: nn.Module, mark: Any) -> bool:
    """Whether ``mark`` (a cache's "layer" or "model" entry) is ``module``'s :func:`cache_owner`."""
    return mark is not None and mark is module.__dict__.get("_cache_owner")


class StepWeightsGradientWarning(UserWarning):
    """A backward ran through a layer's step output: the layer's weights get no gradient from a step
    (the step form holds their values), so a loss on streamed outputs trains the layers around it and
    leaves the layer's weights as they are."""


def refuse_keywords(who: str, kwargs: Dict[str, Any], takes: str, hint: str) -> None:
    """Raise a TypeError naming every keyword in ``kwargs``. The seed's signatures take ``**kw``
    (``step(x, inference_cache, **kw)``, ``allocate_inference_cache(..., **kwargs)``), which an LTI
    layer has no use for: they were dropped silently, so ``step(x, cache, rate=0.5)`` stepped at rate
    1 and ``allocate_inference_cache(2, dtpye=torch.float64)`` made a float32 cache."""
    if kwargs:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise TypeError(f"{who} takes {takes}, got {'the keyword' if len(kwargs) == 1 else 'keywords'} {given} "
                        f"({hint})")


class LRNN(nn.Module):
    """Abstract linear recurrent layer on (B, L, H) sequences.

    Args:
        discretization: one of ``zoh``, ``bilinear``, ``dirac``, ``async``,
            ``no_discretization``, or None for layers that discretize internally.

    Attributes:
        discretize_fn: ``fn(A, B, dt) -> (A_bar, B_bar)`` for diagonal A, or None.
    """

    #: True when y[:, t] depends on x[:, t+1:] (then the layer cannot stream).
    bidirectional: bool = False
    #: Structure of A that ``discretize_fn`` is chosen for; dense-A layers override it.
    a_structure: str = "diagonal"

    def __init__(self, discretization: Discretization) -> None:
        super().__init__()
        name = type(self).__name__
        if name in ("LRNN", "LTI_LRNN") and type(self).__module__ == __name__:
            # an nn.Module ignores @abstractmethod: the bare class built and failed at its first call
            more = ", discretize, compute_kernel and step_form" if name == "LTI_LRNN" else ""
            raise TypeError(f"{name} is abstract: subclass it and implement forward{more}, or build a "
                            f"registered layer with lrnnx_zoo.create_layer(name, d_model)")
        if discretization is not None and discretization not in METHODS:
            raise ValueError(
                f"unknown discretization {discretization!r}; expected one of {', '.join(METHODS)} or None")
        self.discretization = discretization
        self.discretize_fn = get_discretization(discretization, self.a_structure)

    @abstractmethod
    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H). ``lengths``: (B,) valid lengths of a padded batch."""
        raise NotImplementedError

    if TYPE_CHECKING:  # nn.Module types its __call__ as (...) -> Any; a layer's gives forward's y
        def __call__(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                     lengths: Optional[Tensor] = None, **kwargs: Any) -> Tensor: ...

    def __prepare_scriptable__(self) -> "LRNN":
        # torch.jit.script calls this first: it failed on the source with "Unknown type annotation: 'str'"
        raise refuse_torchscript(type(self).__name__)

    # -- input checking shared by every layer -------------------------------------------------
    def check_input(self, x: Tensor, lengths: Optional[Tensor] = None) -> None:
        """Raise a ValueError that says what was expected if x is not (B, L, d_model)."""
        d = getattr(self, "d_model", None)
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor of shape (B, L, {d}), got {type(x).__name__}")
        check_dense(x, type(self).__name__)
        if x.dim() != 3 or (d is not None and x.shape[-1] != d):
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, length, d_model={d}), "
                f"got {tuple(x.shape)}")
        check_not_traced(type(self).__name__)
        check_floating(x, type(self).__name__)
        check_parameters_for(self, x, type(self).__name__)
        check_lengths(lengths, x.shape[0], x.shape[1])

    def prepare_input(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H), lengths: (B,) or None -> x: (B, L, H) checked (:meth:`check_input`), with
        zeros past each sequence's length. A causal layer's valid outputs cannot depend on the
        padding in exact arithmetic, but an FFT spreads every sample's rounding error (and any NaN or inf) over all outputs, so padding of 1e6 moved
        valid outputs by 1e-2 relative before this."""
        x = float32_under_autocast(x)
        self.check_input(x, lengths)
        return mask_padding(x, lengths)


#: Half precision: no FFT of it on the CPU (bfloat16 on no device), no complex32 arithmetic.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32_under_autocast(x: Tensor) -> Tensor:
    """x in float32 if it is half precision inside a ``torch.autocast`` region, else x unchanged.

    Under autocast a layer receives the previous nn.Linear's bfloat16/float16 output. Its kernel,
    convolution and recurrence compute in float32, as autocast itself does for FFTs (real matrix
    products, e.g. the LRU's projections B u and Re(C x), still run in autocast's dtype): there
    are no half-precision FFTs on the CPU, bfloat16 FFTs nowhere, float16 cuFFT takes power-of-two lengths only, and a kernel with
    |lambda| near 1 in half precision loses its tail. The output is float32; the next nn.Linear
    casts back. Outside autocast a half input is the caller's choice and is checked as given.
    Anything but a tensor is returned as given, for the caller's check to name it."""
    if isinstance(x, Tensor) and x.dtype in HALF_DTYPES and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


def autocast_active(device_type: str) -> bool:
    """Whether a ``torch.autocast`` region is open on ``device_type`` (never on one autocast does not
    know, such as "meta", where torch raises instead)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def without_autocast(device_type: str) -> ContextManager[Any]:
    """A scope that leaves the caller's ``torch.autocast`` region on ``device_type`` (nothing to
    leave: a no-op). Step forms are built and stepped in it: under autocast their matrix products
    ran in bfloat16, which rounded the form's coefficients and, every step, the state (a stream then
    failed at its second step with "the cache holds torch.bfloat16 state")."""
    if autocast_active(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


#: The dispatch keys that give a view's lazy bits their meaning (a conjugate or negative view, a zero
#: tensor) and count in-place writes (version counters).
_VIEW_KEYS = (torch._C.DispatchKey.Conjugate, torch._C.DispatchKey.Negative, torch._C.DispatchKey.ZeroTensor,
              torch._C.DispatchKey.ADInplaceOrView)


def operator_body() -> ContextManager[Any]:
    """The scope a ``torch.library`` operator's Python body runs its eager code in: ordinary dispatch.

    Called from inside a ``__torch_dispatch__`` mode (AOT autograd's check of custom operators, on a
    compiled graph's first call; FlopCounterMode, DebugMode), an operator's body runs with every key
    above the Python one excluded, Conjugate and Negative among them: their fallbacks, which resolve
    a lazily conjugated or negated view before an operator that does not read those bits, are
    skipped, and such a view is read as its plain data. S4's kernel generated that way (its conjugate
    poles are views) was off by 3.5 where max |y| was 5.4 on the first call of a compiled graph."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not any(excluded.has(key) for key in _VIEW_KEYS):
        return contextlib.nullcontext()
    for key in _VIEW_KEYS:
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def parameter_dtype() -> torch.dtype:
    """The real dtype a layer makes its parameters in: :func:`torch.get_default_dtype`, as nn.Linear
    does, when it is float32 or float64; else float32 (the layers compute in float32 or float64).
    Casts to float32 in the families' constructors left a model built after
    ``torch.set_default_dtype(torch.float64)`` with float32 and float64 parameters mixed: its LRU
    steps refused float64 inputs (the cache followed the float32 ones), and its kernels ran with
    float32-rounded A and dt (step and convolution 5e-8 apart instead of 1e-13)."""
    dtype = torch.get_default_dtype()
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def refuse_torchscript(who: str) -> TypeError:
    """The error for torch.jit.script / torch.jit.trace of ``who``'s convolution mode."""
    return TypeError(
        f"torch.jit cannot compile {who}'s convolution mode: its FFT sizes, kernel lengths and blocks are Python "
        f"ints read from the input's length (a trace would fix them to one length; TorchScript cannot parse the "
        f"code). For TorchScript, export the recurrent step graph: lrnnx_zoo.export.to_torchscript(model, path) "
        f"(or `lrnnx-zoo export --format torchscript`); for a whole-sequence program, torch.export.export(model, "
        f"(x,)) (docs/semantics.md, 'torch.compile')")


def refuse_onnx(who: str) -> TypeError:
    """The error for torch.onnx.export of ``who``'s convolution mode."""
    return TypeError(
        f"torch.onnx.export cannot convert {who}'s convolution mode: it computes with FFTs and complex numbers, "
        f"which ONNX graphs do not have (and FFTs ran ~15x slower in ONNX Runtime than in torch). Export the "
        f"recurrent step graph instead, (x_t, state) -> (y_t, state'), validated against this model: "
        f"lrnnx_zoo.export.to_onnx(model, path) (or `lrnnx-zoo export SRC --out DIR`); "
        f"lrnnx_zoo.export.OnnxStreamer(path).run(x) streams a whole sequence through it")


def check_not_traced(who: str) -> None:
    """Raise :func:`refuse_onnx`'s error inside torch.onnx.export (the dynamo exporter failed after
    tracing, in a 12-line ConversionError about FFT ops naming no way out), and
    :func:`refuse_torchscript`'s while torch.jit.trace records: it failed deep inside with "L must be a
    non-negative int, got tensor(16)"."""
    onnx = sys.modules.get("torch.onnx")        # not imported, not exporting (and not worth importing)
    if onnx is not None and onnx.is_in_onnx_export():
        raise refuse_onnx(who)
    if torch.jit.is_tracing():
        raise refuse_torchscript(who)


def check_dense(x: Any, who: str) -> None:
    """Raise a TypeError naming ``who`` unless x is an ordinary dense (strided) tensor: nested, sparse
    and masked tensors failed deep inside ("NestedTensorImpl doesn't support sizes", "reshape is not
    implemented for sparse tensors", ...). Sequences of several lengths go in padded, with lengths.
    Anything not a tensor passes, for the caller's shape check to name."""
    if not isinstance(x, Tensor):
        return
    kind = ("a nested tensor" if x.is_nested else f"a {x.layout} tensor" if x.layout != torch.strided
            else "a MaskedTensor" if type(x).__name__ == "MaskedTensor" else None)
    if kind is not None:
        raise TypeError(f"{who} expects a dense tensor (torch.strided), got {kind}: pad the sequences to one length "
                        f"(torch.nn.utils.rnn.pad_sequence(..., batch_first=True)) and pass lengths=")


def check_floating(x: Tensor, who: str, autocast_hint: bool = True) -> None:
    """Raise a TypeError naming ``who`` if x is not floating point (the layers are real-valued;
    integers would otherwise be cast silently by some paths and fail deep inside others), or is
    half precision on the CPU, which has neither half-precision FFTs nor complex32 arithmetic.
    ``autocast_hint``: the message offers torch.autocast as the way out (only where ``who``
    accepts half-precision input under autocast: forward, not step)."""
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input (e.g. torch.float32), got {x.dtype}")
    if x.dtype in HALF_DTYPES and x.device.type == "cpu":
        way_out = (f", or run under torch.autocast('cpu', dtype={x.dtype}), where the layers take "
                   f"half-precision activations and compute in float32") if autocast_hint else ""
        raise TypeError(f"{who} on the CPU computes in float32 or float64, got {x.dtype}: convert the "
                        f"input (x.float()){way_out}")


def check_parameters_for(module: nn.Module, x: Tensor, who: str) -> None:
    """:func:`check_parameter_dtype` and :func:`check_device` with one look at the parameters (every
    forward of every layer runs both)."""
    ref = reference_tensor(module)
    _check_parameter_dtype(ref, who)
    _check_device(ref, x, who)


def check_device(module: nn.Module, x: Tensor, who: str) -> None:
    """Raise a ValueError naming ``who`` unless x is on the device of the module's parameters: a meta
    input to a CPU layer failed inside torch ("is not on the expected device meta"), or in one path
    (a batched matmul) returned uninitialised CPU memory."""
    _check_device(reference_tensor(module), x, who)


def _check_device(ref: Tensor, x: Tensor, who: str) -> None:
    if ref.numel() and x.device != ref.device:
        raise ValueError(f"{who}: the input is on {x.device}, the parameters on {ref.device}; move one to the "
                         f"other (x.to({str(ref.device)!r}) or module.to({str(x.device)!r}))")


def check_parameter_dtype(module: nn.Module, who: str) -> None:
    """Raise a TypeError naming ``who`` if the module holds half-precision parameters on the CPU
    (``.half()``, ``.bfloat16()``): its kernels and recurrences would need half-precision FFTs or
    complex32 arithmetic, and failed deep inside ("Unsupported dtype BFloat16", "exp_vml_cpu not
    implemented for 'ComplexHalf'"). Under torch.autocast, too, parameters stay float32."""
    _check_parameter_dtype(reference_tensor(module), who)


def _check_parameter_dtype(ref: Tensor, who: str) -> None:
    if ref.dtype in HALF_DTYPES and ref.device.type == "cpu":
        raise TypeError(f"{who} on the CPU computes in float32 or float64, but holds {ref.dtype} parameters: "
                        f"convert it (.float()); for half-precision activations keep float32 parameters and run "
                        f"under torch.autocast('cpu', dtype={ref.dtype})")


def lengths_tensor(lengths: Any) -> Tensor:
    """``lengths`` as a tensor where it is: a tensor as given, a list on the CPU. (torch.as_tensor
    moved a CPU tensor to a default device set with torch.set_default_device, away from the data.)"""
    return lengths if isinstance(lengths, Tensor) else torch.as_tensor(lengths, device="cpu")


def check_lengths(lengths: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
    """Raise unless ``lengths`` is None or holds ``batch`` integers in [0, length] (the valid
    lengths of a padded (batch, length, ...) input). Returns the values it checked (under vmap the
    whole batch's), or None: no lengths, or torch.compile tracing (values are not read)."""
    if lengths is None:
        return None
    lengths = lengths_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers (e.g. torch.long), got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape (batch,)=({batch},), got {tuple(lengths.shape)}")
    # values are not checked while torch.compile traces (a data-dependent branch broke the graph:
    # fullgraph=True failed for every family; the eager call checks them); under vmap, those of the
    # whole batch are (.item() of a batched tensor failed per-sample gradients of a padded batch)
    if torch.compiler.is_compiling():
        return None
    values = unwrapped(lengths)
    if bool((values < 0).any()) or bool((values > length).any()):
        raise ValueError(f"lengths must lie in [0, {length}], got {values.tolist()}")
    return values


def check_stream_batch(x: Tensor, who: str) -> None:
    """Raise a ValueError naming ``who`` if x: (B, L, ...) holds no sequence. A prefill's cache is
    the state of B streams, and a cache of none is refused (allocate_inference_cache(0)); an empty
    batch reached that refusal, which named a call the user had not made."""
    if x.shape[0] == 0:
        raise ValueError(f"{who} needs at least one sequence to continue streaming from, got x of shape "
                         f"{tuple(x.shape)}; forward(x) takes an empty batch, a stream cache does not")


def check_sizes(who: str, **sizes: Any) -> Tuple[int, ...]:
    """The sizes as Python ints, in the order given; a ValueError naming ``who`` unless every size is
    an integer >= 1 (d_model=0 would build an empty layer, a float or negative size would fail inside
    torch with no word of which). numpy integers and 0-dim integer tensors count, as torch's own
    modules take them (``nn.Linear(np.int64(16), 4)``): a sweep's ``np.int64(16)`` was refused as not
    "an integer >= 1"."""
    out = []
    for name, value in sizes.items():
        number = positive_int(value)
        if number is None:
            raise ValueError(f"{who} needs {name} to be an integer >= 1, got {value!r}")
        out.append(number)
    return tuple(out)


#: The most elements one tensor a layer's sizes describe may hold (4 GB in float32), checked before
#: it is built: d_model=1 << 40 or l_max=1 << 40 reached the allocator ("you tried to allocate
#: 140737488355328 bytes"), and d_model = d_state = 65536 tried 34 GB. ModelConfig has its own budget.
MAX_TENSOR_ELEMENTS = 10 ** 9


def check_size_product(who: str, **sizes: int) -> None:
    """Raise a ValueError naming ``who`` and the sizes when their product, the element count of one
    tensor the layer builds (d_model x d_state, l_max x d_model x channels), exceeds
    :data:`MAX_TENSOR_ELEMENTS`."""
    count = math.prod(sizes.values())
    if count > MAX_TENSOR_ELEMENTS:
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{who} sizes {shown} describe a tensor of {count:.3g} elements, more than the "
                         f"{MAX_TENSOR_ELEMENTS:.0e} a layer builds; check these sizes")


def check_flags(who: str, **flags: Any) -> None:
    """Raise a TypeError naming ``who`` unless every flag is a bool. Any other value was read for
    its truth, so bidirectional="no" (or "False") silently built a non-causal layer."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{who} needs {name} to be a bool (True or False), got {value!r} "
                            f"({type(value).__name__}); pass {name}=True or {name}=False")


def check_reals(who: str, **values: Any) -> None:
    """Raise a TypeError naming ``who`` unless every value is a real number (not a bool; a 0-dim
    real tensor counts), a ValueError unless it is finite. A string failed deep in a comparison
    with no word of which argument, and max_phase or dt_max = inf built a layer of NaN kernels."""
    for name, value in values.items():
        if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{who} needs {name} to be a real number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"{who} needs {name} to be a finite number, got {value!r}")


def check_probability(who: str, name: str, p: Any) -> None:
    """Raise (as :func:`check_reals`) naming ``who`` and ``name`` unless p is a number in [0, 1)."""
    check_reals(who, **{name: p})
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{who} needs {name} to lie in [0, 1) (a drop probability), got {p!r}")


def needs_autograd(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether a forward must build a graph: grad mode on and an input or parameter requiring it,
    a torch.func transform running (:func:`func_transforms_active`) or forward-mode AD
    (:func:`forward_ad_active`). Layers take inference-only
    fast paths (e.g. blocked_channel_conv) and kernel caches when it is False."""
    return func_transforms_active() or forward_ad_active() or torch.is_grad_enabled() and (
        any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())
        # a buffer swapped for a tensor requiring grad (functional_call of a frozen S4 kernel's
        # log_dt) took the inference path, which has no backward
        or any(b.requires_grad for b in module.buffers()))


def forward_ad_active() -> bool:
    """Whether forward-mode AD runs: a ``torch.autograd.forward_ad.dual_level`` is open (its dual
    tensors, tangents on inputs or weights, need not require grad: the layers take their differentiable
    paths, and no kernel cache keeps a result carrying a tangent), or a torch.func jvp transform
    (``jvp``, ``jacfwd``). Then the hand-written Functions run as their subclasses with a jvp, which
    dynamo cannot trace (never true while compiling)."""
    if torch.compiler.is_compiling():
        return False
    return dual_level_open() or _transform_running(torch._C._functorch.TransformType.Jvp)


def dual_level_open() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open."""
    return torch.autograd.forward_ad._current_level >= 0


#: Each hand-written autograd Function's subclass with a jvp (:func:`jvp_variant`).
_JVP_VARIANTS: Dict[type, type] = {}


def jvp_variant(cls: Optional[type] = None, *, keep: Optional[Callable[[tuple, Any], tuple]] = None) -> Any:
    """Class decorator: ``cls`` is its base Function with a jvp, which :func:`apply_function` runs under
    forward-mode AD. A separate class because dynamo cannot trace a Function that defines a jvp
    (torch.compile broke every training graph 12-25 times at them).

    ``keep(inputs, output)``: the tensors the jvp reads, for a base Function with a separate
    ``setup_context``; the variant's runs the base's, then ``ctx.save_for_forward`` on them."""
    def register(variant: type) -> type:
        base = variant.__bases__[0]
        if keep is not None:
            def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
                base.setup_context(ctx, inputs, output)
                ctx.save_for_forward(*keep(inputs, output))
            variant.setup_context = staticmethod(setup_context)
        _JVP_VARIANTS[base] = variant
        return variant
    return register if cls is None else register(cls)


def apply_function(function: type, *args: Any) -> Any:
    """``function.apply(*args)``, through its :func:`jvp_variant` while :func:`forward_ad_active`.

    Where autograd would record nothing (grad mode off, or no tensor argument requiring grad; no
    torch.func transform; not while torch.compile traces), a Function with a separate
    ``setup_context`` (a forward without ctx) runs its forward directly: the same computation,
    without Function.apply's per-call cost, which binds the arguments through inspect.signature
    (diagonal_scan at (1, 64, 64) complex64, one thread: 200 -> 145 us)."""
    if forward_ad_active():
        return _JVP_VARIANTS.get(function, function).apply(*args)
    # is_compiling first: dynamo cannot trace the comparison of the two setup_context functions
    if (not torch.compiler.is_compiling() and not func_transforms_active()
            and function.setup_context is not torch.autograd.Function.setup_context
            and not (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args))):
        return function.forward(*args)
    return function.apply(*args)


def values_only(t: Tensor) -> Tensor:
    """t without autograd history (``t.detach()``), keeping a forward-mode tangent it carries under a
    ``torch.autograd.forward_ad.dual_level``: detach() drops that too, and a stream cache holding the
    state's value alone gave dual inputs' steps the tangent of their own step only (1.5e-2 to 3.7e-1 off
    from the second step on). A tangent is the derivative of the value, the size of the state: keeping
    it costs no growing graph. (Under torch.func.jvp detach() keeps the tangent itself.)"""
    if dual_level_open():
        primal, tangent = torch.autograd.forward_ad.unpack_dual(t)
        if tangent is not None:
            return torch.autograd.forward_ad.make_dual(primal.detach(), tangent.detach())
    return t.detach()


def func_transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running. Its tensors are
    wrappers: a kernel cache must not keep them past the call, and the in-place inference paths
    cannot write a batched (vmap) result into a plain buffer ("Batching rule not implemented for
    aten::equal", "inplace arithmetic ... is not possible"), so the differentiable path runs."""
    return torch._C._are_functorch_transforms_active()


def vmap_active() -> bool:
    """Whether a torch.func.vmap runs (alone or around / inside other transforms): value-dependent
    choices (nonzero, item) cannot be batched there."""
    return _transform_running(torch._C._functorch.TransformType.Vmap)


def unwrapped(t: Tensor) -> Tensor:
    """``t`` without torch.func's wrappers (vmap's batching, grad's tracking): under vmap, the values
    of the whole batch, which Python may read (``bool``, ``.tolist()``) to check them."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _transform_running(kind: Any) -> bool:
    """Whether a torch.func transform of this ``TransformType`` is on the stack."""
    stack = torch._C._functorch.get_interpreter_stack() if func_transforms_active() else None
    return bool(stack) and any(i.key() == kind for i in stack)


def valid_steps(lengths: Tensor, L: int, device: torch.device) -> Tensor:
    """(B, L) bool: True at t < lengths[b], the steps of a padded batch that are not padding."""
    return torch.arange(L, device=device)[None, :] < torch.as_tensor(lengths, device=device)[:, None]


def mask_padding(y: Tensor, lengths: Optional[Tensor], time_dim: int = 1) -> Tensor:
    """Zero y[b, t] for t >= lengths[b]; y: (B, L, ...) (time_dim 1) or (B, H, L) (time_dim 2).
    A select, not a product, so a NaN or inf in the padding does not survive."""
    if lengths is None:
        return y
    keep = valid_steps(lengths, y.shape[time_dim], y.device)                          # (B, L)
    if time_dim == 2:
        keep = keep.unsqueeze(1)
    return torch.where(keep.reshape(keep.shape + (1,) * (y.dim() - keep.dim())), y, 0.0)


def right_aligned(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """x: (B, L, ...) with each sequence's first ``lengths[b]`` steps moved to the end and zeros
    before them. A linear time-invariant system started from a zero state stays there under zero
    input, so its state after the last step of the right-aligned input is its state after step
    ``lengths[b]`` of the padded one: one pass gives every sequence's own final state."""
    if lengths is None:
        return x
    L = x.shape[1]
    t = torch.arange(L, device=x.device)
    shift = (L - torch.as_tensor(lengths, device=x.device)).unsqueeze(1)        # (B, 1)
    index = (t - shift) % L                                                     # step t takes x[t - shift]
    taken = x.gather(1, index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(x.shape))
    keep = (t >= shift).reshape(shift.shape[0], L, *(1,) * (x.dim() - 2))
    return torch.where(keep, taken, 0.0)


def mask_lengths_of_one_stream(u: Tensor, lengths: Optional[Tensor], state: Optional[Tensor],
                               time_dim: int) -> Tensor:
    """``u`` with the padding past ``lengths`` zeroed (checked by :func:`check_lengths`), for layers
    that also pass a state on: with lengths, the next state would be the state after the whole
    padded input, not after each sequence's last sample, so lengths and a state together are
    refused."""
    if lengths is None:
        return u
    if state is not None:
        raise ValueError("state passing needs sequences of one length: with lengths, the next state would be "
                         "the state after the whole padded input, not after each sequence's last sample")
    check_lengths(lengths, u.shape[0], u.shape[time_dim])
    return mask_padding(u, lengths, time_dim=time_dim)


def version_of(t: Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by every in-place change: optimiser steps, load_state_dict,
    in-place edits under no_grad); None for an inference tensor, which has none and cannot be
    changed in place outside inference mode."""
    return None if t.is_inference() else t._version


class Weights(NamedTuple):
    """What a step form was built from (:func:`weights_and_versions`)."""
    #: where the module keeps each tensor: a submodule's ``_parameters``, ``_buffers`` or ``__dict__``, and the name
    slots: Tuple[Tuple[Dict[str, Any], str], ...]
    tensors: Tuple[Tensor, ...]
    #: (:func:`version_of`, data pointer) of each (:func:`versions`)
    marks: List[Tuple[Optional[int], int]]
    #: copies of their values (None while torch.compile traces)
    copies: Optional[Tuple[Tensor, ...]]
    #: in a one-element list, the :func:`optimizer_steps` count at which the values last equalled the copies
    seen: List[int]

#: Optimiser steps taken in this process since streaming was first used (a global step hook).
_OPTIMIZER_STEPS = [0]
_OPTIMIZER_HOOK: List[Any] = []


def optimizer_steps() -> int:
    """How many torch optimiser steps this process has taken since the first call (which registers a
    global ``torch.optim`` step hook counting them). torch's fused optimisers (``AdamW(fused=True)``,
    ...) change the parameters in place without moving their version counters: a running stream
    stepped on with the old weights after one (1.08 off where outputs reach 1.25)."""
    if not _OPTIMIZER_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def count(*_: Any) -> None:
            _OPTIMIZER_STEPS[0] += 1
        _OPTIMIZER_HOOK.append(register_optimizer_step_post_hook(count))
    return _OPTIMIZER_STEPS[0]


def plain_settings(module: nn.Module) -> Tuple[Tuple[str, Any], ...]:
    """The plain public attributes (str, int, float, bool, None) of ``module`` and its submodules,
    ``training`` aside: what a step form may depend on beside the tensors (a kernel's discretization,
    backend)."""
    plain = (str, int, float, bool, type(None))
    # a copy of each __dict__: iterating a live one failed when another thread added an attribute
    # meanwhile (S4's first length change; "dictionary changed size during iteration")
    return tuple((f"{prefix}.{k}", v) for prefix, sub in module.named_modules()
                 for k, v in sorted(vars(sub).copy().items())
                 if not k.startswith("_") and k != "training" and isinstance(v, plain))


def weights_and_versions(module: nn.Module) -> Weights:
    """The module's parameters and buffers, the slots they sit in, and their marks now (:func:`versions`).

    Also its submodules' public tensor attributes: torch.nn.utils.prune and the hook-based
    weight_norm / spectral_norm keep the weight a layer applies as a plain attribute, recomputed (a
    new tensor) by a forward pre-hook from parameters the step form never reads; a form built from
    the old one was kept after forwards had replaced it (S4D streams 2e-2 off forward)."""
    slots = tuple((owner, name) for sub in module.modules() for owner in (sub._parameters, sub._buffers)
                  for name, t in owner.items() if t is not None)
    slots += tuple((sub.__dict__, name) for sub, name, _ in tensor_attributes(module))
    tensors = tuple(owner[name] for owner, name in slots)
    if torch.compiler.is_compiling():
        return Weights(slots, tensors, versions(tensors), None, [0])
    with lasting_tensors():
        copies = tuple(t.detach().clone() for t in tensors)
    return Weights(slots, tensors, versions(tensors), copies, [optimizer_steps()])


def tensor_attributes(module: nn.Module) -> Iterator[Tuple[nn.Module, str, Tensor]]:
    """(submodule, name, tensor) of each public tensor attribute of ``module`` and its submodules that
    is neither a parameter nor a buffer: the weight torch.nn.utils.prune and the hook-based
    weight_norm / spectral_norm compute from their parameters at each forward."""
    for sub in module.modules():
        for name, t in list(vars(sub).items()):     # a copy: another thread may add an attribute meanwhile
            if isinstance(t, Tensor) and not name.startswith("_"):
                yield sub, name, t


def versions(tensors: Sequence[Tensor]) -> List[Tuple[Optional[int], int]]:
    """(:func:`version_of`, data pointer) of each tensor. The version sees in-place changes, the
    pointer a tensor's data replaced under the same object (``p.data = t``, ``torch.utils.swap_tensors``).
    Neither sees an in-place edit through ``p.data`` (it has a version counter of its own)."""
    try:
        return [(t._version, t.data_ptr()) for t in tensors]
    except RuntimeError:                  # an inference tensor among them
        return [(version_of(t), t.data_ptr()) for t in tensors]


def contents_equal(tensors: Sequence[Tensor], copies: Sequence[Tensor]) -> bool:
    """Whether each tensor equals its copy (made with ``t.detach().clone()``) in dtype, device and
    every value: what no version counter sees (``p.data`` edits, other processes' writes to shared
    memory). At memory speed; hashing cost 140 us for an S4D kernel's parameters (H=128, N=64)."""
    return len(tensors) == len(copies) and all(
        t.dtype == c.dtype and t.device == c.device and torch.equal(t.detach(), c) for t, c in zip(tensors, copies))


def unchanged(weights: Weights, contents: bool = False) -> bool:
    """Whether the module that ``weights`` were taken from still holds those tensors, unchanged. A
    per-step check (3 us for a layer's six parameters). The slots catch tensors replaced by new
    ones: load_state_dict(assign=True) (the meta-device idiom), ``layer.D = nn.Parameter(...)``;
    after an optimiser step anywhere in the process (:func:`optimizer_steps`), or always with
    ``contents``, the values are compared with the copies (a fused optimiser, a ``p.data`` edit and
    another process's write move no version counter)."""
    slots, tensors, marks, copies, seen = weights
    # The slots only under torch.compile (dynamo guards on what they hold): it cannot compare data
    # pointers, and reads versions as data-dependent values, so either check broke the graph of every
    # compiled step and left SequenceModel.step's loop over blocks eager. A compiled step does not see
    # weights changed in place: make a new cache after changing them, as step's docstring says.
    if torch.compiler.is_compiling():
        return all(owner.get(name) is t for (owner, name), t in zip(slots, tensors))
    try:                        # one loop, no intermediate lists: this runs at every step of every layer
        for (owner, name), t, (version, pointer) in zip(slots, tensors, marks):
            if owner.get(name) is not t or t._version != version or t.data_ptr() != pointer:
                return False
    except RuntimeError:        # an inference tensor among them (no version counter)
        if not (all(owner.get(name) is t for (owner, name), t in zip(slots, tensors)) and versions(tensors) == marks):
            return False
    if copies is not None and (contents or seen[0] != _OPTIMIZER_STEPS[0]):
        if not contents_equal(tensors, copies):
            return False
        seen[0] = _OPTIMIZER_STEPS[0]
    return True


def current_form(module: nn.Module, form: nn.Module, weights: Weights, build: Callable[[], nn.Module],
                 dtype: torch.dtype, stale: Callable[[], str]) -> Tuple[nn.Module, Weights]:
    """The step form to go on with, and the weights' versions it stands for (``weights``, as
    :func:`weights_and_versions` gave them when ``form`` was built from ``module``).

    Unchanged weights (:func:`unchanged`): ``form`` and ``weights`` as given. Weights changed in place
    or replaced since (trained, loaded, edited) made ``form`` stale, and it stepped on with the
    old ones, silently: that raises RuntimeError(``stale()``; a callable, so that no message is
    formatted at every step), not rebuilt under a running state (some
    forms, S4's diagonal one, keep it in coordinates that move with the weights). A change the
    system does not see keeps ``form`` where a submodule says so (:func:`restated_only`: S4 rewriting
    its C~ for a longer kernel), else rebuilds ``build()`` (in ``dtype``,
    :func:`~lrnnx_zoo.step_forms.step_form_dtype`) equal to rounding (:func:`~lrnnx_zoo.step_forms.same_form`);
    either is returned with the new versions.
    """
    if unchanged(weights):
        return form, weights
    if restated_only(module, weights):
        return form, weights_and_versions(module)
    try:
        with lasting_tensors(), step_form_dtype(dtype):   # not a decorator: 2 us at every step
            fresh = build()
    except Exception as exc:              # e.g. S4's diagonal form of the new weights too inaccurate
        raise RuntimeError(f"{stale()} (the form of the new weights could not be built either: "
                           f"{type(exc).__name__}: {exc})") from exc
    if not same_form(fresh, form):
        raise RuntimeError(stale())
    return fresh, weights_and_versions(module)


def restated_only(module: nn.Module, weights: Weights) -> bool:
    """Whether ``module`` is still the system ``weights`` (:func:`weights_and_versions`) were taken
    from, every change since made by a submodule that re-expressed its own tensors for the same
    system: one with a ``restated_since(before)`` method (``before``: name -> copy of its own
    parameters and buffers then) that says so (S4 rewrites its stored C~ for a longer kernel). Every
    other tensor must be the one taken, with the same values. Not while torch.compile traces (no copies)."""
    slots, tensors, _, copies, _ = weights
    if copies is None:
        return False
    restating = {id(owner): sub for sub in module.modules() if callable(getattr(sub, "restated_since", None))
                 for owner in (sub._parameters, sub._buffers)}
    befores: Dict[int, Tuple[nn.Module, Dict[str, Tensor]]] = {}
    for (owner, name), t, copy in zip(slots, tensors, copies):
        sub = restating.get(id(owner))
        if sub is not None:
            befores.setdefault(id(sub), (sub, {}))[1][name] = copy
        elif owner.get(name) is not t or not contents_equal((t,), (copy,)):
            return False
    return bool(befores) and all(sub.restated_since(before) for sub, before in befores.values())


@contextlib.contextmanager
def lasting_tensors() -> Iterator[None]:
    """A no_grad scope whose new tensors are ordinary ones even inside ``torch.inference_mode()``,
    for what a cache keeps beyond the call that makes it (step forms, states). Inference tensors
    cannot be saved for backward: a cache made under inference_mode (the usual way to prefill a
    prompt) failed at its next step outside it with an input requiring grad ("Inference tensors
    cannot be saved for backward"), as any SequenceModel's step has. Outside inference mode: no_grad."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():   # inference_mode(False) turns grad on
            yield
    else:
        with torch.no_grad():
            yield


def ordinary_tensor(t: Any) -> Any:
    """t, or a copy of it if t is an inference tensor (made under ``torch.inference_mode()``) and
    inference mode is off now: a state passed back to a layer is a value, but autograd cannot save an
    inference tensor, so state passing under autograd from a state that an inference-mode forward
    returned failed ("Inference tensors cannot be saved for backward"). Anything else: as given.

    While torch.compile traces, a copy whatever t is: dynamo cannot ask ``is_inference()`` (a graph
    break at every state passing), and without the copy the compiled backward failed as above."""
    if torch.compiler.is_compiling():
        return t.clone() if isinstance(t, Tensor) else t
    if isinstance(t, Tensor) and t.is_inference() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def reference_tensor(module: nn.Module) -> Tensor:
    """The tensor whose device and dtype a module's recurrent state follows: its first floating
    (or complex) parameter, else its first such buffer (a layer with fixed, non-trained
    coefficients keeps them in buffers), else an empty float tensor on the CPU."""
    tensors = itertools.chain(module.parameters(), module.buffers())   # every forward asks: no lists
    found = next((t for t in tensors if t.is_floating_point() or t.is_complex()), None)
    return torch.empty(0) if found is None else found


class LTI_LRNN(LRNN):
    """Abstract linear time-invariant layer: x_k = A x_{k-1} + B u_k,  y_k = Re(C x_k) + D u_k.

    Subclasses implement :meth:`discretize`, :meth:`compute_kernel` and :meth:`step_form`;
    the recurrent interface (:meth:`allocate_inference_cache`, :meth:`step`) is derived from
    the step form, so convolution mode and step mode are two evaluations of one system.
    """

    def __init__(self, discretization: Discretization) -> None:
        if discretization == "async":
            raise ValueError(
                "async discretization needs a time-varying (LTV) layer: a time-invariant layer has one "
                "kernel for the whole sequence. Use 'zoh', 'bilinear', 'dirac' or 'no_discretization'.")
        super().__init__(discretization)

    def prepare_input(self, x: Tensor, lengths: Optional[Tensor] = None,
                      integration_timesteps: Optional[Tensor] = None) -> Tensor:
        """:meth:`LRNN.prepare_input` (x: (B, L, H), lengths: (B,) or None -> x: (B, L, H)), refusing
        ``integration_timesteps`` (:meth:`check_timesteps`)."""
        x = super().prepare_input(x, lengths)
        self.check_timesteps(integration_timesteps)
        return x

    def check_timesteps(self, integration_timesteps: Optional[Tensor]) -> None:
        """Raise a ValueError unless ``integration_timesteps`` (per-step dt, e.g. (B, L), which only
        time-varying layers take) is None: a time-invariant layer has one step for
        the whole sequence (its kernel), so per-step timesteps cannot be honoured; ignoring them
        gave the outputs of a uniform grid without a word."""
        if integration_timesteps is not None:
            got = (f"a tensor of shape {tuple(integration_timesteps.shape)}" if isinstance(integration_timesteps, Tensor)
                   else type(integration_timesteps).__name__)
            raise ValueError(f"{type(self).__name__} is time-invariant (one step size for every sample): expected "
                             f"integration_timesteps=None, got {got}. Resample the input to a uniform grid")

    @torch.no_grad()
    def resample_(self, rate: float) -> Dict[str, Any]:
        """Make this layer, in place, the same continuous-time system sampled at ``rate`` (the
        input's relative sampling rate: rate 2 has twice the samples per unit time, so the step
        becomes dt / rate). Returns the constructor arguments that change with it (a window
        counted in samples), for the model's config; {} when none do.

        Default: hand the rate to the layer's SSM kernel (its ``kernel`` attribute,
        :meth:`~lrnnx_zoo.ssm_kernel.SSMKernel.resample_`). A layer without one has no timescale
        the zoo knows of: a NotImplementedError names it. Layers with per-sample poles may override
        this (the LRU reads them as a zero-order-hold sampling, :meth:`~lrnnx_zoo.plugins.lru.LRU.resample_`)."""
        kernel = getattr(self, "kernel", None)
        if not callable(getattr(kernel, "resample_", None)):
            raise NotImplementedError(
                f"{type(self).__name__} has no timescale the zoo can resample: LTI_LRNN.resample_ hands the "
                f"rate to the layer's SSM kernel (a `kernel` attribute with resample_), and this layer has "
                f"none. A layer keeping its own step dt (log_dt) needs a resample_(rate) method of its own; for "
                f"per-sample (already discrete) poles, retrain it on data at the new sampling rate")
        kernel.resample_(rate)
        return {}

    @abstractmethod
    def discretize(self) -> Tuple[Tensor, Any, Tensor]:
        """Return the discrete (A_bar, B_bar, C) of the layer."""
        raise NotImplementedError

    @abstractmethod
    def compute_kernel(self, *args: Any, **kwargs: Any) -> Any:
        """Return what convolution mode needs for a length-L sequence (family specific)."""
        raise NotImplementedError

    @abstractmethod
    def step_form(self) -> nn.Module:
        """Return the discretised system as a real-valued step module (see step_forms.StepForm)."""
        raise NotImplementedError

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1,
                                 dtype: Optional[torch.dtype] = None, **kwargs: Any) -> Dict[str, Any]:
        """Cache for :meth:`step`: the precomputed step form, a zero state (B, state_size) and the
        form's dtype (a state put in of another dtype steps in it and comes back in its own).

        ``max_seqlen`` is unused (an LTI system has one set of matrices for every step).
        ``dtype``: of the form and the state; default the parameters' (or, for a layer without
        parameters, its buffers'): a float64 layer steps in float64, its form rounded from the
        float64 discretisation once. The device is theirs too.
        """
        who = f"{type(self).__name__}.allocate_inference_cache"
        refuse_keywords(who, kwargs, "batch_size, max_seqlen and dtype", "the cache is made on the layer's device: "
                        "move the layer with .to()")
        batch_size, max_seqlen = check_sizes(who, batch_size=batch_size, max_seqlen=max_seqlen)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{who} needs dtype to be a floating torch.dtype (e.g. torch.float32) or None, "
                            f"got {dtype!r}")
        ref = reference_tensor(self)
        dtype = dtype or ref.real.dtype          # a complex coefficient's real counterpart
        name = type(self).__name__
        if dtype in HALF_DTYPES and ref.device.type == "cpu":
            # forward refused half parameters, step ran in them: bfloat16 S4D steps were 0.165 off float32
            check_parameter_dtype(self, who)
            raise TypeError(f"{who} on the CPU steps in float32 or float64, got dtype={dtype}")
        # The form of the last cache, while the weights are those it was built from: caches share it,
        # as forks do (a form is never changed, only replaced). Each cache built its own before: 50
        # streams of a 4-block LRU (d_model 128) held 52 MB of forms for 0.1 MB of states, S4's 76 MB.
        # Keyed also on what no tensor version sees: the plain settings (discretization, backend, ...)
        # and split_poles (a form made inside split_poles(False) was handed to later default caches:
        # an S4D stream of 16384 steps 2.9e-5 off float64 instead of 2.3e-6).
        compiling = torch.compiler.is_compiling()
        key = None if compiling else (dtype, ref.device, plain_settings(self), poles_split())
        # And on the contents: an edit through ``p.data`` or by another process (Hogwild on shared
        # memory) moves no version, and new streams were handed the old weights' form (LRU 0.2 off).
        memo = self.__dict__.get("_form_memo")
        if memo is not None and not compiling and memo[0] == key and unchanged(memo[1], contents=True):
            weights, form = memo[1], memo[2]       # the record too: its copies serve every cache of the form
        else:
            weights = weights_and_versions(self)
            with lasting_tensors(), step_form_dtype(dtype), without_autocast(ref.device.type):
                try:
                    form = self.step_form()
                except NotImplementedError as exc:   # the abstract method's: a bare NotImplementedError
                    if str(exc):
                        raise
                    raise NotImplementedError(
                        f"{name}.step_form() is not implemented: step mode (allocate_inference_cache, step, "
                        f"prefill) and export run a layer's step form; implement it (docs/plugins.md, 'The layer contract')"
                    ) from exc
                check_step_form(form, f"{name}.step_form()", getattr(self, "d_model", None))
                form = unshared(form, self).to(device=ref.device, dtype=dtype)
            if not compiling:
                self.__dict__["_form_memo"] = (key, weights, form)
        with lasting_tensors():
            state = torch.zeros(batch_size, form.state_size, device=ref.device, dtype=dtype)
        # "layer": whose cache it is; another layer's stepped silently with that layer's weights
        return {"step_form": form, "lrnn_state": state, "weights": weights, "dtype": dtype,
                "layer": cache_owner(self)}

    def __getstate__(self) -> Dict[str, Any]:
        """The module's state without the shared step form (:meth:`allocate_inference_cache`'s memo):
        a pickle or deepcopy of the layer builds its own at its first cache."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_form_memo"}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "LTI_LRNN":
        # The memo's form and weight copies are of the tensors before a move or cast: dropped, not
        # left holding a copy of every weight on the device a model.cpu() meant to free.
        self.__dict__.pop("_form_memo", None)
        return super()._apply(fn, recurse)

    def prefill(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        """Read a prompt in convolution mode and return the cache a stream continues from.

        x: (B, L, H) -> (y, cache): y = ``forward(x, lengths=lengths)`` (B, L, H), and the cache of
        :meth:`allocate_inference_cache` (B) holding the state after each sequence's last valid step
        (step L, or ``lengths[b]``), so that :meth:`step` goes on as if it had stepped through x.
        The state costs one pass over x (:meth:`final_step_state`), not L steps. The cache is in y's
        precision (float64 for a float64 x, as forward promotes it), and steps take x of that dtype.
        """
        L = x.shape[1] if isinstance(x, Tensor) and x.dim() == 3 else 1          # forward says what it expects
        with self.prefill_scope(L):
            y = self(x, lengths=lengths)
            check_stream_batch(x, f"{type(self).__name__}.prefill")
            # in the precision forward computed in: a float64 prompt to a float32 layer gives a float64
            # y and cache, so that the stream goes on with float64 steps (a float32 cache refused them)
            dtype = y.dtype if y.dtype == torch.float64 else None
            if torch.compiler.is_compiling() or "torch._dynamo" in sys.modules:
                # torch.compile in use: the step forms are built untraced (one graph break, not ~18 per
                # S4 block; also where dynamo runs this frame eagerly, calls from it traced on their own)
                from lrnnx_zoo.untraced import allocate_inference_cache
                cache = allocate_inference_cache(self, x.shape[0], dtype)
            else:
                cache = self.allocate_inference_cache(x.shape[0], dtype=dtype)
            state = cache["lrnn_state"]
            u = mask_padding(float32_under_autocast(x), lengths).to(state.dtype)
            with without_autocast(u.device.type):
                final = self.final_step_state(u, None if lengths is None else torch.as_tensor(lengths, device=u.device),
                                              cache["step_form"])
        if final.shape != state.shape:
            raise RuntimeError(f"{type(self).__name__}.final_step_state returned shape {tuple(final.shape)}, expected the "
                               f"step form's state (batch, state_size) = {tuple(state.shape)}")
        # Values only, as step keeps them: the state's graph held the whole prompt's autograd graph for
        # as long as the cache lived (a prefill outside no_grad: ~50 MB a cache for 8192 steps at
        # d_model 64, ~120 MB for S4 at 100 steps), and a fork or deepcopy of the cache failed on it.
        final = final.to(state.dtype)      # (no detach without a graph: one more compiled graph for nothing)
        cache["lrnn_state"] = values_only(final) if final.requires_grad else final
        return y, cache

    def prefill_scope(self, L: int) -> ContextManager[Any]:
        """The scope :meth:`prefill` runs its forward, step form and state passing over L steps in: a
        layer whose parts share costly work opens its kernel's (S4: one discretisation and one chain of
        squares of its dense A_bar, ``SSMKernel.sharing_dense_work``). Default: nothing shared."""
        return contextlib.nullcontext()

    def final_step_state(self, u: Tensor, lengths: Optional[Tensor], form: nn.Module) -> Tensor:
        """The state of ``form`` (this layer's step form, just built) after u: (B, L, H) from a zero
        state, at step ``lengths[b]`` of each sequence (L when None): (B, state_size).

        This default steps ``form`` through u, so it holds for any step form; the families
        override it with their kernel's state passing (one pass over u instead of L steps)."""
        s = u.new_zeros(u.shape[0], form.state_size)
        final = s
        for t in range(u.shape[1]):
            _, s = form(u[:, t], s)
            final = s if lengths is None else torch.where((lengths == t + 1).unsqueeze(1), s, final)
        return final

    def step(self, x: Tensor, inference_cache: Dict[str, Any], **kwargs: Any) -> Tuple[Tensor, Dict[str, Any]]:
        """One recurrent step.  x: (B, H) -> y: (B, H); the cache's state is advanced.

        The cache keeps the state's value, not its autograd history (the step form's matrices are
        constants too): y's graph covers this step only, and a long stream needs no ``no_grad()``
        to run in constant memory. Under ``torch.autocast`` a half-precision x (the previous
        nn.Linear's output) is stepped in float32, as forward computes (:func:`float32_under_autocast`)."""
        refuse_keywords(f"{type(self).__name__}.step", kwargs, "x and the cache", "a cache steps the system it was "
                        "made for: for another rate, a new cache of model.at_rate(r) or of a layer built at it")
        x = float32_under_autocast(x)
        d = getattr(self, "d_model", None)
        state, form = self._stream_of(inference_cache, "step")
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}.step expects a torch.Tensor of shape (batch={state.shape[0]}, "
                            f"d_model={d}), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[0] != state.shape[0] or (d is not None and x.shape[1] != d):
            raise ValueError(f"{type(self).__name__}.step expects x of shape (batch={state.shape[0]}, d_model={d}), "
                             f"got {tuple(x.shape)}")
        if x.dtype != state.dtype or x.device != state.device:
            # An int input was cast silently by some step forms, a float64 one on a float32 cache
            # failed inside the LRU's matmul and was silently promoted by the others.
            who = f"{type(self).__name__}.step"
            check_floating(x, who, autocast_hint=False)
            raise TypeError(f"{who}: the cache holds {state.dtype} state on {state.device}, got x of {x.dtype} on "
                            f"{x.device}; convert x (x.to({state.dtype})) or allocate the cache with "
                            f"allocate_inference_cache(batch_size, dtype={x.dtype}) on x's device")
        if autocast_active(x.device.type):    # the form built and stepped in the cache's precision
            with without_autocast(x.device.type):
                y, state = self._advance(x, inference_cache, state, form)
        else:                                 # (no context manager on the common path: 1 us a layer)
            y, state = self._advance(x, inference_cache, state, form)
        # Values only: a state with autograd history chained each step's graph to the next, so a
        # stream stepped outside no_grad() grew without bound (46 KB a step for a 3-block S4D).
        inference_cache["lrnn_state"] = values_only(state) if isinstance(state, Tensor) and state.requires_grad else state
        if torch.compiler.is_compiling():
            # a fresh cache's strides: the LRU's fused form returns a view into a wider row (strides
            # (16, 1) for a (1, 8) state, which contiguous() leaves), and dynamo, guarding on strides,
            # retraced the compiled step at its second step
            inference_cache["lrnn_state"] = inference_cache["lrnn_state"].clone(memory_format=torch.contiguous_format)
        elif y.requires_grad and not func_transforms_active() and any(p.requires_grad for p in self.parameters()):
            y.register_hook(self._warn_weights_get_no_gradient)
        return y, inference_cache

    def _stream_of(self, inference_cache: Dict[str, Any], what: str) -> Tuple[Tensor, nn.Module]:
        """(state, step form) of a cache this layer made, checked (on every step: the messages, which
        name ``what``, the method asking, are built only when a check fails)."""
        try:
            state, form = inference_cache["lrnn_state"], inference_cache["step_form"]
        except (KeyError, TypeError, IndexError):
            got = sorted(inference_cache) if isinstance(inference_cache, dict) else type(inference_cache).__name__
            raise ValueError(f"{type(self).__name__}.{what} needs the cache that {type(self).__name__}."
                             f"allocate_inference_cache(batch_size) returns (keys 'step_form', 'lrnn_state'), "
                             f"got {got}") from None
        owner = inference_cache.get("layer")
        if owner is not None and not made_by(self, owner):
            raise ValueError(f"{type(self).__name__}.{what}: this cache was made by another layer (its "
                             f"allocate_inference_cache or prefill), or copied apart from this one, and stepping it "
                             f"would run other weights; make one with this layer's allocate_inference_cache("
                             f"batch_size), copy a layer and its cache together (copy.deepcopy((layer, cache))), or "
                             f"fork a stream with fork_cache(cache)")
        if not isinstance(state, Tensor) or state.dim() != 2 or state.shape[1] != form.state_size:
            # A state of the wrong size failed inside the step form ("mat1 and mat2 shapes cannot be
            # multiplied", "shape '[-1, 2, 4, 6]' is invalid").
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"{type(self).__name__}.{what}: the cache's 'lrnn_state' must have shape (batch, "
                             f"state_size={form.state_size}), as allocate_inference_cache(batch_size) makes it; "
                             f"got {got}")
        return state, form

    def fork_cache(self, inference_cache: Dict[str, Any], index: Any = None) -> Dict[str, Any]:
        """A stream that goes on from ``inference_cache``'s state on its own: stepping the fork
        leaves the original as it is, and the other way round (beam search, several continuations
        of one prompt, a checkpoint of a stream to return to).

        index: None (every row), or the rows the fork continues: a 1-D sequence or tensor of row
        numbers (row b of the fork goes on from row index[b]; rows may repeat, for beams, or be
        left out), or a 1-D bool mask of the batch (the rows kept, in order).
        Returns a cache of this layer with one row per index entry, or per True entry of a mask (the
        batch, with index None).

        The state is copied (rows selected) and the rest shared: the step form and the record of
        the weights it was made from, which :meth:`step` replaces rather than changes, so a
        change of weights is seen by each stream at its next step as before. (``copy.deepcopy`` of
        a cache alone copies its owner's mark too, so no layer takes the copy.)
        """
        state, _ = self._stream_of(inference_cache, "fork_cache")
        rows = stream_rows(index, state.shape[0], f"{type(self).__name__}.fork_cache", state.device)
        fork = dict(inference_cache)
        fork["lrnn_state"] = state.clone() if rows is None else state.index_select(0, rows)
        return fork

    def _warn_weights_get_no_gradient(self, grad: Tensor) -> None:
        """A backward through a step's output: the layer's weights get nothing from it (the step form
        holds their values), silently, while the layers around it train."""
        warnings.warn(f"{type(self).__name__}.step: a backward through a step's output gives no gradient to the "
                      f"layer's weights (its step form holds their values), only to its input, so they stay as "
                      f"they are while the layers around them train; train with forward (the layer's or "
                      f"SequenceModel's), which differentiates every weight (for the input's gradient alone, "
                      f"nothing is wrong)", StepWeightsGradientWarning)

    def _advance(self, x: Tensor, inference_cache: Dict[str, Any], state: Tensor, form: nn.Module
                 ) -> Tuple[Tensor, Tensor]:
        """(y, next state) of :meth:`step`'s checked x and state, with the step form made current."""
        dtype = inference_cache.get("dtype", state.dtype)     # the step form's
        if "weights" in inference_cache:
            form, inference_cache["weights"] = current_form(
                self, form, inference_cache["weights"],
                lambda: unshared(self.step_form(), self).to(device=state.device, dtype=dtype), dtype,
                lambda: f"{type(self).__name__}.step: the layer's weights changed since this cache was made (an "
                f"optimiser step, load_state_dict or an in-place edit), so its step form is stale; make a new cache "
                f"with allocate_inference_cache(batch_size) (for a SequenceModel: model.allocate_inference_cache) "
                f"and restart the stream")
            inference_cache["step_form"] = form
        if state.dtype != dtype:
            # A state put in the cache in another dtype: stepped in the form's precision and handed back in
            # its own (passed_state_dtype), as every kernel does. The LRU's matmul failed on it ("expected
            # m1 and m2 to have the same dtype"), S4's dense form too, the diagonal forms promoted it.
            y, next_state = form(x.to(dtype), state.to(dtype))
            return y.to(x.dtype), next_state.to(state.dtype)
        return form(x, state)

