"""Step forms: a layer's discretised system as a small real-valued module.

A step form is an ``nn.Module`` with an int attribute ``state_size`` (and ``d_input``,
``d_output``) whose ``forward(u, s) -> (y, s_next)`` takes u: (B, d_input) and s: (B, state_size)
and returns y: (B, d_output), s_next: (B, state_size). Every matrix is precomputed (the layers
discretise in float64, then cast) and only real tensors and plain ops appear, because ONNX has no
complex dtype. A complex state z = a + ib is carried as the real pair [a, b]:

    a' = Re(lam) a - Im(lam) b + Re(B u),   b' = Im(lam) a + Re(lam) b + Im(B u),
    y  = Re(C z') + D u = Re(C) a' - Im(C) b' + D u.

This is the one implementation of recurrent inference: ``LTI_LRNN.step`` runs it eagerly and
the export pipeline traces it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


class StepForm(nn.Module):
    """Base class: declares the sizes export relies on."""

    state_size: int
    d_input: int
    d_output: int

    def extra_repr(self) -> str:
        return f"d_input={self.d_input}, d_output={self.d_output}, state_size={self.state_size}"


_BUILD_DTYPE: ContextVar[Optional[torch.dtype]] = ContextVar("lrnnx_zoo_step_form_dtype", default=None)


@contextmanager
def step_form_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Step forms built inside store their matrices in ``dtype`` (default: torch's default dtype).

    The matrices are computed in float64 and rounded once on storage, so a float64 layer's step
    form must be built in float64 rather than built in float32 and converted (which would keep
    float32 rounding): ``LTI_LRNN.allocate_inference_cache`` and the blocks' ``setup_step`` build
    theirs in the parameters' dtype.
    """
    token = _BUILD_DTYPE.set(dtype)
    try:
        yield
    finally:
        _BUILD_DTYPE.reset(token)


_SPLIT_POLES: ContextVar[bool] = ContextVar("lrnnx_zoo_split_poles", default=True)


@contextmanager
def split_poles(enabled: bool) -> Iterator[None]:
    """Whether step forms built inside keep their poles as two numbers, hi + lo (True, the default;
    :func:`stored_split`), or rounded once to the build dtype (False).

    The split costs the per-channel forms four more elementwise passes per step (in ONNX Runtime
    at batch 1: S4D 118 -> 146 us, S4 244 -> 273 us per 4-block step; at batch 64 up to 35% fewer
    steps/s) and keeps long streams 10-80x closer to the float64 model (docs/semantics.md, "Long streams").
    ``with split_poles(False): to_onnx(model, path)`` trades that accuracy back for speed; the
    export's validation then reports the larger error. It applies to the forms built inside it: a
    layer's eager step cache keeps the form it was allocated with, and ``state_from_cache`` hands a
    prefilled state only to a graph built under the same setting.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"split_poles takes True or False, got {enabled!r} ({type(enabled).__name__})")
    token = _SPLIT_POLES.set(enabled)
    try:
        yield
    finally:
        _SPLIT_POLES.reset(token)


def is_step_form(part: object) -> bool:
    """Whether ``part`` is a step form by the contract (an nn.Module with an int ``state_size``),
    subclass of :class:`StepForm` or not: a plugin's own form need not subclass it, and inside a
    :class:`SequentialStepForm` one that did not was run as a stateless map."""
    return isinstance(part, StepForm) or (isinstance(part, nn.Module) and type(getattr(part, "state_size", None)) is int)


class _ComplexSpy(TorchFunctionMode):
    """Notes the first torch function that returns a complex tensor (a step form's trial run)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: Optional[str] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if self.first is None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(t, Tensor) and t.is_complex() for t in outs):
                self.first = getattr(func, "__name__", repr(func))
        return out


class StepFormError(TypeError):
    """A layer's step_form() returned something that breaks the step form contract."""


def check_step_form(form: object, who: str, width: Optional[int] = None) -> None:
    """Raise StepFormError("{who} must return ...: got ...") unless ``form`` is a step form (the module
    docstring's contract). ``width``: the layer's d_model, which d_input and d_output (when declared)
    and the trial step's y must match.

    Beyond the declared sizes, a trial step from zeros at batch 2, then at batch 1, runs without autograd:
    forward must return (y (B, d_output), s_next (B, state_size)) in the dtype it was given and form no
    complex tensor. A form returning y alone unpacked at batch 2 into two rows, a state_size its forward
    disagreed with failed at the second step or deep inside an exporter, and a complex op only in
    torch.onnx ("No ONNX function found").
    Costs two steps, when a cache or a graph is made.
    """
    def refuse(expected: str, cause: Optional[BaseException] = None) -> None:
        raise StepFormError(f"{who} must return {expected}") from cause

    size = getattr(form, "state_size", None)
    if not is_step_form(form) or type(size) is not int or size < 0:
        refuse(f"an nn.Module with an int state_size >= 0; got {type(form).__name__} with state_size={size!r}")
    sizes = {attr: getattr(form, attr, width) for attr in ("d_input", "d_output")}
    for attr, w in sizes.items():
        if width is not None and w != width:
            refuse(f"a form mapping (B, {width}) -> (B, {width}), as the layer does; it has {attr}={w!r}")
    tensors = [t for t in form.state_dict().values() if isinstance(t, Tensor)]
    real_only = ("real tensors and plain ops only (ONNX has no complex dtype: carry a complex z as "
                 "[Re z, Im z], as the forms in lrnnx_zoo.step_forms do)")
    if any(t.is_complex() for t in tensors):
        refuse(f"{real_only}; it holds a complex buffer or parameter")
    d_in = sizes["d_input"]
    if type(d_in) is not int:          # neither a width nor a d_input: nothing to try it on
        return
    ref = next((t for t in tensors if t.is_floating_point()), None)
    like = {"dtype": build_dtype() if ref is None else ref.dtype, "device": None if ref is None else ref.device}
    # batch 2 first (a form returning y alone unpacks there into two rows), then batch 1, the usual
    # stream's: a .squeeze() in a form passed at 2 and failed at batch 1 as the layer's step or
    # final_step_state, and in the exporters as "Dimension out of range"
    for batch in (2, 1):
        _trial_step(form, batch, d_in, size, sizes["d_output"], like, refuse, real_only)


def _trial_step(form: nn.Module, batch: int, d_in: int, size: int, d_output: object, like: Dict[str, Any],
                refuse: Callable[..., None], real_only: str) -> None:
    """One step of ``form`` from zeros at ``batch`` (:func:`check_step_form`), refused as it says."""
    spy = _ComplexSpy()
    u, s = torch.zeros(batch, d_in, **like), torch.zeros(batch, size, **like)
    try:
        with torch.no_grad(), spy:
            out = form(u, s)
    except Exception as exc:
        refuse(f"a form whose forward(u, s) runs on zeros u ({batch}, {d_in}) and s ({batch}, state_size={size}); "
               f"it raised {type(exc).__name__}: {exc}", exc)
    if u._version or s._version:
        # an in-place op on the state (s.mul_(a)) passed validation, and the TorchScript and torch.export
        # graphs then changed the caller's state tensor too (a state kept to branch a stream from)
        changed = " and ".join(name for name, t in (("u", u), ("s", s)) if t._version)
        refuse(f"a form whose forward(u, s) leaves u and s as they were (return new tensors); it changed {changed} "
               f"in place, which exported graphs would do to their caller's tensors")
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        got = (f"{type(out).__name__} of {', '.join(type(t).__name__ for t in out) or 'nothing'}"
               if isinstance(out, (tuple, list)) else type(out).__name__)
        refuse(f"a form whose forward(u, s) returns (y, s_next), two tensors; it returned a {got}")
    y, s_next = out
    d_out = d_output if type(d_output) is int else y.shape[-1]
    if tuple(y.shape) != (batch, d_out) or tuple(s_next.shape) != (batch, size):
        refuse(f"a form whose forward(u ({batch}, {d_in}), s ({batch}, {size})) returns y ({batch}, {d_out}) and "
               f"s_next ({batch}, {size}) (state_size={size}); it returned y {tuple(y.shape)} and s_next "
               f"{tuple(s_next.shape)}")
    if spy.first is not None or y.is_complex() or s_next.is_complex():
        refuse(f"{real_only}; its forward formed a complex tensor ({spy.first or 'its outputs'})")
    if y.dtype != like["dtype"] or s_next.dtype != like["dtype"]:
        # A y in another dtype (a .double() inside forward, an int) failed in the next block ("mat1 and
        # mat2 must have the same dtype") or an exporter's shape inference; a state in another one was
        # blamed on the caller's x at the next step.
        refuse(f"a form whose forward(u, s) returns y and s_next in the dtype of u and s ({like['dtype']}, its "
               f"buffers'); it returned y {y.dtype} and s_next {s_next.dtype}")


def unshared(form: nn.Module, owner: nn.Module) -> nn.Module:
    """``form`` (in place) with each parameter or buffer it shares with ``owner``'s (the layer that
    made it) replaced by a detached copy, kept as a buffer. A plugin's form holding the layer's own
    Parameter (``self.g = layer.g``) was converted with it by ``form.to(dtype)``: a float64 layer's
    allocate_inference_cache(dtype=torch.float32) turned the layer's weight float32, and the cache's
    form followed later weight edits, where a form is a snapshot of the weights it was made from."""
    def storage(t: Tensor) -> Optional[int]:
        try:
            return t.untyped_storage().data_ptr() if t.numel() and not t.is_meta else None
        except (NotImplementedError, RuntimeError):     # a torch.func wrapper has no storage to compare
            return None

    owned = [*owner.parameters(), *owner.buffers()]
    theirs = {storage(t) for t in owned} - {None}
    same = {id(t) for t in owned}
    for module in form.modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and (id(t) in same or storage(t) in theirs):
                module._parameters.pop(name, None)
                module._buffers.pop(name, None)
                module.register_buffer(name, t.detach().clone())
    return form


def same_kind(a: nn.Module, b: nn.Module) -> bool:
    """Whether two step forms are of one class, by its module and qualified name: a plugin's form class
    defined inside its step_form() is a new class object at every call, and two forms of one layer's
    weights were taken for forms of other weights (state_from_cache refused a fresh prefill's cache)."""
    ta, tb = type(a), type(b)
    return ta is tb or (ta.__module__, ta.__qualname__) == (tb.__module__, tb.__qualname__)


def same_form(a: nn.Module, b: nn.Module, rtol: float = 1e-6) -> bool:
    """Whether two step forms are one system to within ``rtol`` of each tensor's largest entry
    (same class, same tensors and shapes): a form rebuilt after a change the system does not see
    (rounding) is, one from trained or other weights is not."""
    sa, sb = a.state_dict(), b.state_dict()
    return same_kind(a, b) and sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and (not sb[k].numel() or
                                        bool((sa[k] - sb[k]).abs().max() <= rtol * sb[k].abs().max()))
        for k in sb)


def build_dtype() -> torch.dtype:
    """The dtype step forms built now store their matrices in (:func:`step_form_dtype`)."""
    return _BUILD_DTYPE.get() or torch.get_default_dtype()


def chosen_build_dtype() -> Optional[torch.dtype]:
    """The dtype of the innermost :func:`step_form_dtype` around this call, or None outside one."""
    return _BUILD_DTYPE.get()


def poles_split() -> bool:
    """Whether forms built now split their poles (:func:`split_poles`): part of what a shared form
    is keyed on, since the setting changes the form but no tensor's version."""
    return _SPLIT_POLES.get()


def stored(t: Tensor) -> Tensor:
    """t (...) as a step form stores it: a detached, contiguous copy (same shape) in the build dtype (:func:`step_form_dtype`).
    Always a copy: a float64 layer's skip D was stored as the parameter itself, so an in-place edit of
    D changed every cache's form with it, where a form is a snapshot of the weights it was made from."""
    return t.detach().to(build_dtype(), memory_format=torch.contiguous_format, copy=True)


def stored_split(t: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """t (float64) stored as hi + lo, two numbers of the build dtype: hi = stored(t), lo = stored(t - hi),
    lo None when the build dtype is float64 (nothing is cut off) or inside ``split_poles(False)``. For a pole lam: rounded once to
    float32 it is off by ~6e-8, which a mode of memory 1 / (1 - |lam|) multiplies into a fixed
    output error over a long stream; hi + lo keeps it to ~1e-15."""
    hi = stored(t)
    return hi, (None if hi.dtype == torch.float64 or not poles_split() else stored(t - hi.double()))


def register_split(module: nn.Module, name: str, rows: Tensor) -> None:
    """Register ``rows`` (float64) on ``module`` as the buffers ``name`` (hi) and ``name + "_lo"``
    (:func:`stored_split`; None when nothing is cut off), the pair :func:`rotate` takes."""
    hi, lo = stored_split(rows)
    module.register_buffer(name, hi)
    module.register_buffer(name + "_lo", lo)


def poles_need_split(lam: Tensor) -> bool:
    """Whether rounding the poles lam (complex) once to the build dtype errs, for some mode, by more
    than :data:`SLOW_POLE_ERROR` of its state over its memory: |lam - round(lam)| > SLOW_POLE_ERROR (1 - |lam|).
    False inside ``split_poles(False)`` (speed chosen) and where the rounding is exact (a float64 build,
    a pole of exactly 1)."""
    if not poles_split() or lam.is_meta:        # meta: no values to judge, the fused default
        return False
    lam = lam.detach().to(torch.complex128)
    hi = torch.complex(stored(lam.real).double(), stored(lam.imag).double())
    return bool(((lam - hi).abs() > SLOW_POLE_ERROR * (1 - lam.abs())).any())


def rotate(z: Tensor, re: Tensor, im: Tensor, re_lo: Optional[Tensor], im_lo: Optional[Tensor],
           rest: Tensor) -> Tensor:
    """lam * z + rest on the packed [Re z; Im z] z: (batch, 2, ...) (the halves on dim 1), lam as rows
    [Re lam; Re lam] and [-Im lam; Im lam] (+ their lo parts, see :func:`stored_split`): the complex
    product is a swap of the halves. The small terms are summed first, into ``rest``, so that they
    are not rounded away."""
    flipped = z.flip(1)
    if re_lo is not None:
        rest = rest + (z * re_lo + flipped * im_lo)
    return z * re + flipped * im + rest


_onnx_ops = False       # set by onnx_ops(); read on every step, so a plain module global


@contextmanager
def onnx_ops() -> Iterator[None]:
    """Step forms traced inside write their sums in the ops ONNX Runtime runs fastest
    (:func:`sum_rows`); ``lrnnx_zoo.export`` traces its ONNX graphs under it.

    A process-wide flag rather than a ContextVar (torch.compile cannot trace ContextVar.get) or
    ``torch.onnx.is_in_onnx_export()`` (~4 us a call inside a step: 3% of an eager S4D step).
    Eager steps of other threads during an export take the same ops: the same results to float
    rounding, not bit for bit (their sums are ordered otherwise: a 200-step float32 S4D stream moved
    by 2.9e-6), and a little slower.
    """
    global _onnx_ops
    previous, _onnx_ops = _onnx_ops, True
    try:
        yield
    finally:
        _onnx_ops = previous


def sum_rows(t: Tensor, rows: int) -> Tensor:
    """t: (..., rows, W) summed over its rows -> (..., W); inside :func:`onnx_ops` written as the
    product ones(rows) @ t, the same sum in the op ONNX Runtime runs fastest. ``rows`` is
    t.shape[-2] as a Python int, so that the TorchScript-based exporter bakes the ones in as a
    constant instead of computing them from the traced shape (47 more nodes in the shipped
    forecaster's opset-17 graph).

    Measured at batch 1, one thread: ONNX Runtime's ReduceSum over an axis that is not innermost
    took a slow path: (1, 2, 32, 128) over axes 1, 2: 5.3 us against 1.3 us as this MatMul;
    (1, 2, 2, 32, 128) over axis 1 (two rows): 22 us against 2.2 us. The benchmark's 4-block step
    graphs (bench_export): S4D 148 -> 131 us, S4 274 -> 196 us. Eager torch is the other way
    round (its matmul with a row of ones made those steps 10% slower), so it sums.
    """
    if _onnx_ops:
        return torch.ones(rows, dtype=t.dtype, device=t.device) @ t      # (rows,) @ (..., rows, W): no squeeze
    return t.sum(-2)


#: DiagonalStepForm fuses up to this many matrix entries. Measured per step in ONNX Runtime, 4 LRU
#: blocks, fused vs elementwise (interleaved): d_model=32, N=32: 23 vs 33 us; 64/64: 29 vs 35 us;
#: 128/64 (65,536 entries, 256 KiB): 52.6 vs 61.5 us at batch 1 (6% slower at batch 64);
#: 160/96 (123,904): 70.0 vs 74.5 us at batch 1 but 14% slower at batch 64; 96/128: slower at both.
FUSE_LIMIT = 1 << 16

#: The fused DiagonalStepForm rounds each pole once. A mode of memory 1 / (1 - |lam|) turns that rounding
#: delta into an error of about |delta| / (1 - |lam|) of its state once a stream fills its memory
#: (|delta| * t before, t steps in). Where some mode's exceeds this, the default is the unfused form, whose
#: poles are split (hi + lo): LRU r in [0.99999, 1], 65,536 steps, 1.1e-3 of max|y| from float64 fused
#: (the same with float64 arithmetic on the float32 W: the pole, not the matmul), 6.7e-6 split. The
#: fused matrix plus a lo term added to its result did not help (9.3e-4): the lo term, ~3e-8 |x|, is below
#: half an ulp of the state it is added to, where the unfused form sums it with B u first (:func:`rotate`).
#: The price: an eager step of 31 instead of 10 us (H=32, N=32, one thread), in ONNX Runtime ~1.4x.
SLOW_POLE_ERROR = 1e-3


class DiagonalStepForm(StepForm):
    """x' = lam * x + B u,  y = Re(C x') + D u  with a diagonal (complex) lam shared by all inputs.

    Args:
        lam: (M,) complex discrete eigenvalues.
        B: (M, H_in) complex discrete input matrix.
        C: (H_out, M) complex output matrix (fold any conjugate-pair factor 2 into it).
        D: (H_out,) skip connection (H_in == H_out) or (H_out, H_in), or None.
        fuse: one matmul per step (below); default when the matrix has at most FUSE_LIMIT entries and
            no pole is too slow for one rounding (:func:`poles_need_split`).
    State layout: [Re x (M), Im x (M)], so state_size = 2M.

    In row-vector form s' = s P + u Q and y = s' R + u S, so one matrix gives both outputs:

        [s', y] = [s, u] @ [[P, P R], [Q, Q R + S]],

    with P the real (2M, 2M) form of diag(lam), Q = [Re B; Im B]^T, R = [Re C, -Im C]^T. At the
    widths of edge models (2M + H of a few hundred) one matmul costs less than the dozen
    elementwise ops it replaces, in ONNX Runtime and eager torch alike, since there per-op
    overhead, not arithmetic, dominates.

    Unfused, lam is kept as hi + lo (:func:`stored_split`): an LRU block with r in [0.999, 0.99999]
    (d_model=32, N=32) streams 16,384 steps of biased noise within 5.8e-7 of max|y| from its
    float64 form instead of 1.4e-5. Fused, the matmul's own roundings of the state (its sum over
    2M + H terms) dominate: a lo correction on top only took that case from 1.5e-5 to 1.2e-5, so
    the fused form keeps one float32 lam inside W. Not for poles so close to the unit circle that this
    one rounding outweighs the rest (:data:`SLOW_POLE_ERROR`): their default is unfused.
    """

    def __init__(self, lam: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                 fuse: Optional[bool] = None) -> None:
        super().__init__()
        M = lam.shape[-1]
        if lam.dim() != 1 or B.shape[0] != M or C.shape[-1] != M:
            raise ValueError(f"DiagonalStepForm expects lam (M,), B (M, H_in), C (H_out, M); got "
                             f"{tuple(lam.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
        self.state_size, self.d_input, self.d_output = 2 * M, B.shape[1], C.shape[0]
        self.M = M
        c128 = torch.complex128
        lam, B, C = lam.to(c128), B.to(c128), C.to(c128)
        Q = torch.cat([B.real, B.imag], 0).T                                      # (H_in, 2M)
        R = torch.cat([C.real, -C.imag], 1).T                                     # (2M, H_out)
        if D is None:
            S = torch.zeros(self.d_input, self.d_output, dtype=torch.float64, device=B.device)
        else:
            S = torch.diag(D.double()) if D.dim() == 1 else D.double().T
        if fuse is None:
            fuse = (2 * M + self.d_input) * (2 * M + self.d_output) <= FUSE_LIMIT and not poles_need_split(lam)
        self.fused = fuse
        if self.fused:
            lr, li = torch.diag(lam.real), torch.diag(lam.imag)
            P = torch.cat([torch.cat([lr, li], 1), torch.cat([-li, lr], 1)], 0)  # s @ P = lam * s
            W = torch.cat([torch.cat([P, P @ R], 1), torch.cat([Q, Q @ R + S], 1)], 0)
            self.register_buffer("W", stored(W))                                   # (2M + H_in, 2M + H_out)
            return
        register_split(self, "lam_re", torch.stack([lam.real, lam.real]))           # (2, M)
        register_split(self, "lam_im", torch.stack([-lam.imag, lam.imag]))
        self.register_buffer("B_pair", stored(Q))
        self.register_buffer("C_pair", stored(R))
        self.register_buffer("D", None if D is None else stored(S))

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: u (batch, H_in), s (batch, 2M) = [Re x, Im x] -> (y (batch, H_out), s' (batch, 2M))."""
        if self.fused:
            z = torch.cat([s, u], dim=1) @ self.W
            return z[:, self.state_size:], z[:, :self.state_size]
        x = s.reshape(-1, 2, self.M)                 # [Re x; Im x]: the complex product is a swap
        x = rotate(x, self.lam_re, self.lam_im, self.lam_re_lo, self.lam_im_lo,
                   (u @ self.B_pair).reshape(-1, 2, self.M))
        s_next = x.reshape(-1, self.state_size)
        y = s_next @ self.C_pair
        if self.D is not None:
            y = y + u @ self.D
        return y, s_next


def _check_skip(who: str, D: Optional[Tensor], channels: int, H: int) -> None:
    """A per-channel form's skip D: None or (channels, H). Another shape broadcast silently (a (4, 4) D
    for 4 channels gave y of (8, 4) at batch 2)."""
    if D is not None and tuple(D.shape) != (channels, H):
        raise ValueError(f"{who} expects D of shape (channels={channels}, H={H}) or None, got {tuple(D.shape)}")


def pack_modes(x: Tensor) -> Tensor:
    """The channels-last layout of the per-channel modal forms (:class:`ChannelDiagonalStepForm`,
    :class:`ChannelDPLRStepForm`): x: (batch, H, N) complex (or real: zero imaginary parts) ->
    s: (batch, 2 * N * H), which viewed as (batch, 2, N, H) is [Re x; Im x] with the channel last."""
    parts = (x.real, x.imag) if x.is_complex() else (x, torch.zeros_like(x))
    return torch.stack(parts, 1).transpose(2, 3).reshape(x.shape[0], 2 * x.shape[1] * x.shape[2])


def unpack_modes(s: Tensor, H: int) -> Tensor:
    """Inverse of :func:`pack_modes`: s: (batch, 2 * N * H) -> x: (batch, H, N) complex of s's precision.
    Under torch.compile contiguous: the transposed layout, handed back as a step's next state, failed
    dynamo's stride guard of the fresh state's graph (a compiled S4 / FFTConvS4 step compiled twice)."""
    x = s.reshape(s.shape[0], 2, -1, H).transpose(2, 3)
    x = torch.complex(x[:, 0], x[:, 1])
    return x.contiguous() if torch.compiler.is_compiling() else x


class ChannelDiagonalStepForm(StepForm):
    """Per-channel (single-input) diagonal systems, one per input channel h (S4D, S4 diagonal mode):

        x'[h, n] = lam[h, n] x[h, n] + B[h, n] u[h],   y[c, h] = Re(sum_n C[c, h, n] x'[h, n]) + D[c, h] u[h].

    Args:
        lam, B: (H, N) complex, or real (a real system, e.g. a decay; its imaginary parts are zero).
        C: (Ch, H, N) complex or real.  D: (Ch, H) or None.
    Output is flattened channel-major: y: (batch, Ch * H).

    State: (batch, 2 * N * H), viewed as s = [Re x; Im x]: (batch, 2, N, H), mode-major with the
    channel last (:func:`pack_modes` / :func:`unpack_modes` convert from and to x: (batch, H, N)). The complex
    product is s' = s * [Re lam; Re lam] + flip(s) * [-Im lam; Im lam] + u [Re B; Im B]: six passes
    over the state, the fewest elementwise ops we found for ONNX Runtime and eager torch alike.
    Stored in float32, lam is kept as two numbers, hi + lo (:func:`stored_split`, :func:`rotate`):
    four more passes, but a pole rounded once is off by ~6e-8, which a mode of memory
    1 / (1 - |lam|) multiplies into a fixed output error (digits-s4d's blocks after 4096 steps:
    1.0e-5 - 1.5e-5 of max|y|, 0.8e-6 - 1.1e-6 split; ONNX Runtime step at batch 1 +24%).
    Channels last make the input's broadcast over modes and the output's sum over them run along
    contiguous rows of H: with channels first (rows of N) the graph of the benchmark's 4-block S4D
    made 1.2x fewer steps per second at batch 64 in ONNX Runtime and 1.1x eager, the same at batch 1.
    """

    def __init__(self, lam: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None) -> None:
        super().__init__()
        H, N = lam.shape
        if B.shape != (H, N) or C.dim() != 3 or C.shape[1:] != (H, N):
            raise ValueError(f"ChannelDiagonalStepForm expects lam, B (H, N) and C (Ch, H, N); got "
                             f"{tuple(lam.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
        _check_skip("ChannelDiagonalStepForm", D, C.shape[0], H)
        lam, B, C = (t.to(torch.complex128) for t in (lam, B, C))   # real ones too (.imag needs complex)
        self.H, self.N, self.channels = H, N, C.shape[0]
        self.state_size, self.d_input, self.d_output = 2 * H * N, H, self.channels * H

        def modes_first(t: Tensor) -> Tensor:                        # (..., H, N) -> (..., N, H)
            return t.transpose(-1, -2)

        register_split(self, "lam_re", modes_first(torch.stack([lam.real, lam.real])))   # (2, N, H)
        register_split(self, "lam_im", modes_first(torch.stack([-lam.imag, lam.imag])))
        self.register_buffer("B_pair", stored(modes_first(torch.stack([B.real, B.imag]))))       # (2, N, H)
        self.register_buffer("C_pair", stored(modes_first(torch.stack([C.real, -C.imag], 1))))   # (Ch, 2, N, H)
        self.register_buffer("D", None if D is None else stored(D))

    pack, unpack = staticmethod(pack_modes), staticmethod(unpack_modes)
    channel_layout = "last"     # per-channel LTI, state (batch, 2N, H): chunk_forms.ChannelChunkForm

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: u (batch, H), s (batch, 2 * N * H) (:func:`pack_modes`' layout) -> (y (batch, Ch * H)
        channel-major, s' (batch, 2 * N * H))."""
        x = s.reshape(-1, 2, self.N, self.H)
        x = rotate(x, self.lam_re, self.lam_im, self.lam_re_lo, self.lam_im_lo,
                   u.reshape(-1, 1, 1, self.H) * self.B_pair)
        if self.channels == 1:    # no channel axis: 3 graph nodes fewer per block (100 -> 88 for the
            y = sum_rows((x * self.C_pair[0]).reshape(-1, 2 * self.N, self.H), 2 * self.N)     # benchmark's 4-block S4D)
            return (y if self.D is None else y + self.D[0] * u), x.reshape(-1, self.state_size)
        y = sum_rows((x.unsqueeze(1) * self.C_pair).reshape(-1, self.channels, 2 * self.N, self.H), 2 * self.N)  # (batch, Ch, H)
        if self.D is not None:
            y = y + self.D * u.unsqueeze(1)
        return y.reshape(-1, self.d_output), x.reshape(-1, self.state_size)


class ChannelDenseStepForm(StepForm):
    """Per-channel dense systems: x'[h] = A[h] x[h] + B[h] u[h],  y[c, h] = Re(C[c, h] x'[h]) + D[c, h] u[h].

    Args:
        A: (H, N, N) real or complex.  B: (H, N).  C: (Ch, H, N).  D: (Ch, H) or None.
    A complex system is carried with the real block matrix [[Re A, -Im A], [Im A, Re A]].
    State: (batch, H * n) with n = N (real A) or 2N (complex A), channel by channel.

    The step runs as x' = x + (A - I) x + B u with A - I formed before rounding (buffer ``dA``):
    a slow system (small dt, A near I) keeps the digits of A - I that a rounded A loses. Storing
    A made float32 steps of S4 LegS/Fourier (N=64) at dt = 1e-5 drift from the float64 kernel by
    1.3e-4 / 1.4e-4 of max|y| after 16384 steps (error growing ~L); with A - I it is 2.7e-6 /
    3.5e-6. Speed: the same at S4 sizes, +7% (23 -> 24.6 us) for 8 channels of one state each.
    """

    def __init__(self, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None) -> None:
        super().__init__()
        H, N, _ = A.shape
        if B.shape != (H, N) or C.dim() != 3 or C.shape[1:] != (H, N):
            raise ValueError(f"ChannelDenseStepForm expects A (H, N, N), B (H, N), C (Ch, H, N); got "
                             f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
        _check_skip("ChannelDenseStepForm", D, C.shape[0], H)
        if A.is_complex() or B.is_complex() or C.is_complex():
            A, B, C = A.to(torch.complex128), B.to(torch.complex128), C.to(torch.complex128)
            A = torch.cat([torch.cat([A.real, -A.imag], -1), torch.cat([A.imag, A.real], -1)], -2)
            B = torch.cat([B.real, B.imag], -1)
            C = torch.cat([C.real, -C.imag], -1)
        self.H, self.n, self.channels = H, A.shape[-1], C.shape[0]
        self.state_size, self.d_input, self.d_output = H * self.n, H, self.channels * H
        self.register_buffer("dA", stored(A - torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)))  # (H, n, n)
        self.register_buffer("B", stored(B))          # (H, n)
        self.register_buffer("C", stored(C))          # (Ch, H, n)
        self.register_buffer("D", None if D is None else stored(D))

    channel_layout = "first"    # per-channel LTI, state (batch, H, n): chunk_forms.ChannelChunkForm

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: u (batch, H), s (batch, H * n) channel by channel -> (y (batch, Ch * H)
        channel-major, s' (batch, H * n)); n = N (real A) or 2N (complex A)."""
        x = s.reshape(-1, self.H, self.n)
        # (A - I) x as rows, one (batch, n) x (n, n) product per channel: dA @ x.unsqueeze(-1) made torch
        # copy dA for every batch row (H=128, n=64, one thread, eager: 672 -> 149 us a step at batch 1,
        # 120 -> 1.2 ms at batch 64; ONNX Runtime, which loops its matrix-vector products: 103 -> 90 us,
        # 3.8 -> 1.5 ms).
        x_next = torch.addcmul(x, self.B, u.unsqueeze(-1)) + (x.transpose(0, 1) @ self.dA.transpose(1, 2)).transpose(0, 1)
        y = (x_next.unsqueeze(1) * self.C).sum(-1)                      # (batch, Ch, H)
        if self.D is not None:
            y = y + self.D * u.unsqueeze(1)
        return y.reshape(-1, self.d_output), x_next.reshape(-1, self.state_size)


class ChannelDPLRStepForm(StepForm):
    """Per-channel bilinear step of a diagonal-plus-low-rank system on a conjugate-halved state.

    For each channel h, with the complex state z in C^M carried as [Re z, Im z], the bilinear
    step of S4 ([S4] Sec. 3.3, eq. 11: x' = A1 (A0 x + B u), both factors DPLR):

        v  = d0 * z - sum_r U0_r Re(G0_r . z) + b u          (A0 z + b u)
        z' = d1 * v - sum_r U1_r Re(G1_r . v)                (A1 v)
        y  = Re(c . z') + D u

    The maps z -> d z - U Re(G . z) are real-linear (what a rank-r term on a conjugate-pair-halved
    state looks like; "." sums products without conjugation). Their product is one such map of
    rank 2r, which is what runs:

        rho  = Re(G~ . z),        G~ = [G0; G1 * d0]                               (2r reals)
        z'   = d z - sum_k U~_k rho_k + b~ u,   d = d1 d0,  U~ = [d1 U0 - U1 c; U1],  b~ = A1 b
        y_c  = Re((C_c d) . z) - sum_k Re(C_c . U~_k) rho_k + (Re(C_c . b~) + D_c) u

    with c_sr = Re(G1_s . U0_r). The readouts G~ and C d share one pass over the state, and y
    needs no pass over z': 17 state-sized passes per step instead of 30 for the two factors
    applied in turn (ONNX Runtime and eager alike), and four more for d kept as hi + lo in float32
    (:func:`stored_split`; digits-s4's blocks after 4096 steps of biased noise: 1.4e-6 - 8.7e-6 of
    max|y| from float64 with d rounded once, 0.4e-6 - 1.3e-6 split). Cost O(M r) per channel and step.

    Args:
        d0, d1, b: (H, M) complex.  U0, G0, U1, G1: (H, r, M) complex.  C: (Ch, H, M) complex
        (fold conjugate-pair factors into it).  D: (Ch, H) or None.
    State (batch, 2 * M * H): [Re z; Im z] channels last, the layout of
    :class:`ChannelDiagonalStepForm` (:meth:`pack` / :meth:`unpack`); with channels first (per
    channel [Re z, Im z]) the 4-block S4 graph made 1.25x fewer steps/s at batch 64 in ONNX Runtime.
    Output (batch, Ch*H) channel-major.
    """

    pack, unpack = staticmethod(pack_modes), staticmethod(unpack_modes)
    channel_layout = "last"     # per-channel LTI, state (batch, 2M, H): chunk_forms.ChannelChunkForm

    def __init__(self, d0: Tensor, U0: Tensor, G0: Tensor, b: Tensor, d1: Tensor, U1: Tensor, G1: Tensor,
                 C: Tensor, D: Optional[Tensor] = None) -> None:
        super().__init__()
        H, M = d0.shape
        r = U0.shape[1]
        shapes_ok = (d1.shape == b.shape == (H, M) and U0.shape == G0.shape == U1.shape == G1.shape == (H, r, M)
                     and C.dim() == 3 and C.shape[1:] == (H, M))
        if not shapes_ok:
            raise ValueError("ChannelDPLRStepForm expects d0, d1, b (H, M); U0, G0, U1, G1 (H, r, M); "
                             "C (Ch, H, M); got "
                             f"{[tuple(t.shape) for t in (d0, U0, G0, b, d1, U1, G1, C)]}")
        _check_skip("ChannelDPLRStepForm", D, C.shape[0], H)
        self.H, self.M, self.channels, self.rank = H, M, C.shape[0], 2 * r
        self.state_size, self.d_input, self.d_output = 2 * H * M, H, self.channels * H
        c128 = torch.complex128
        d0, U0, G0, b, d1, U1, G1, C = (t.to(c128) for t in (d0, U0, G0, b, d1, U1, G1, C))

        def dot(X: Tensor, Y: Tensor) -> Tensor:          # Re(X . Y) over M, batched, kept complex-typed
            return (X.unsqueeze(-2) * Y.unsqueeze(-3)).sum(-1).real.to(c128)

        d = d1 * d0
        c = dot(G1, U0)                                                            # (H, r, r): c[s, r]
        U_mix = torch.cat([d1.unsqueeze(1) * U0 - torch.einsum("hsm,hsr->hrm", U1, c), U1], 1)  # (H, 2r, M)
        G_mix = torch.cat([G0, G1 * d0.unsqueeze(1)], 1)                           # (H, 2r, M)
        b_mix = d1 * b - torch.einsum("hsm,hs->hm", U1, dot(G1, b.unsqueeze(1)).squeeze(-1))
        Cd = C * d                                                                 # (Ch, H, M)
        E = torch.einsum("chm,hkm->chk", C, U_mix).real                           # (Ch, H, 2r)
        Du = torch.einsum("chm,hm->ch", C, b_mix).real + (0 if D is None else D.double())
        # Re(X . z) = [Re X, -Im X] . [Re z; Im z]: the readouts as one (2r + Ch, 2M, H) block.
        readout = torch.cat([G_mix, Cd.transpose(0, 1)], 1)                        # (H, 2r + Ch, M)
        readout = torch.cat([readout.real, -readout.imag], -1)                     # (H, 2r + Ch, 2M)

        def rows(top: Tensor, bottom: Tensor) -> Tensor:     # two (..., H, M) -> (..., 2, M, H)
            return torch.stack([top, bottom], -3).transpose(-1, -2)

        self.register_buffer("readout", stored(readout.permute(1, 2, 0)))                 # (2r + Ch, 2M, H)
        # d * z on [Re z; Im z]: z * [Re d; Re d] + flip(z) * [-Im d; Im d] (see ChannelDiagonalStepForm)
        register_split(self, "d_re", rows(d.real, d.real))                                # (2, M, H)
        register_split(self, "d_im", rows(-d.imag, d.imag))
        U_k = U_mix.transpose(0, 1)                                                       # (2r, H, M)
        self.register_buffer("U", stored(rows(U_k.real, U_k.imag)))                       # (2r, 2, M, H)
        self.register_buffer("b", stored(rows(b_mix.real, b_mix.imag)))                   # (2, M, H)
        self.register_buffer("E", stored(E.permute(0, 2, 1)))                               # (Ch, 2r, H)
        self.register_buffer("D", stored(Du))                                              # (Ch, H)

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: u (batch, H), s (batch, 2 * M * H) (:func:`pack_modes`' layout) -> (y (batch, Ch * H)
        channel-major, s' (batch, 2 * M * H))."""
        H, M, k = self.H, self.M, self.rank
        z = s.reshape(-1, 1, 2 * M, H)
        q = (z * self.readout).sum(2)                                     # (batch, 2r + Ch, H)
        rho, yz = q[:, :k], q[:, k:]
        z = z.reshape(-1, 2, M, H)
        low = sum_rows((rho.reshape(-1, k, 1, 1, H) * self.U).reshape(-1, k, 2 * M * H), k).reshape(-1, 2, M, H)
        z_next = rotate(z, self.d_re, self.d_im, self.d_re_lo, self.d_im_lo, u.reshape(-1, 1, 1, H) * self.b - low)
        y = yz - (rho.unsqueeze(1) * self.E).sum(2) + self.D * u.unsqueeze(1)    # (batch, Ch, H)
        return y.reshape(-1, self.d_output), z_next.reshape(-1, self.state_size)


_INPUT_WIDTH, _OUTPUT_WIDTH = ("d_input", "in_features"), ("d_output", "out_features")


def _end_width(parts: Iterable[nn.Module], near: Tuple[str, ...], far: Tuple[str, ...]) -> int:
    """The width at one end of a chain, ``parts`` walked from that end: the first declared width (its
    ``near`` names first), reached through step forms that declare none, which keep their input's width
    (the contract: u and y (B, H)), so a plugin's bare form may sit anywhere in the chain."""
    for part in parts:
        for name in near + far:
            if hasattr(part, name):
                return int(getattr(part, name))
        if not is_step_form(part):
            break
    raise ValueError(f"cannot tell the width of {type(part).__name__}: give it a {near[0]!r} attribute")


class SequentialStepForm(StepForm):
    """Chain stateless maps and step forms: used to wrap a layer's pre/post processing around
    its core system while keeping one packed state.

    Args:
        parts: modules applied in order; those that are StepForms consume a slice of the state.
    """

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.offsets = []
        off = 0
        for p in parts:
            size = int(getattr(p, "state_size", 0)) if is_step_form(p) else 0
            self.offsets.append((off, size))
            off += size
        self.state_size = off
        self.d_input = _end_width(parts, _INPUT_WIDTH, _OUTPUT_WIDTH)
        self.d_output = _end_width(reversed(parts), _OUTPUT_WIDTH, _INPUT_WIDTH)

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """The parts in order: u (batch, d_input), s (batch, state_size) -> (y (batch, d_output),
        s' (batch, state_size)), each step form advancing its own slice of s (:func:`run_parts`)."""
        return run_parts(self.parts, self.offsets, u, s)


def run_parts(parts: Iterable[nn.Module], offsets: Iterable[Tuple[int, int]], u: Tensor, s: Tensor
              ) -> Tuple[Tensor, Tensor]:
    """Apply ``parts`` in order to u: a StepForm (or chunk form) on its slice (offset, size) of the
    packed state s, any other module as a stateless map; returns (output, next packed state)."""
    states = []
    for p, (off, size) in zip(parts, offsets):
        if is_step_form(p):
            u, s_p = p(u, s[:, off:off + size])
            states.append(s_p)
        else:
            u = p(u)
    return u, (torch.cat(states, dim=1) if states else s)
