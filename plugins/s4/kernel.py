"""SSKernelNPLR and HippoSSKernel: the S4 convolution kernel of H normal-plus-low-rank systems.

Parameters per channel h (conjugate-pair halving, M = N/2; see :mod:`plugins.s4.dense`):
w (M,) eigenvalues of the normal part, P (r, M) low-rank term, B (M,), C (C, M), dt. They are stored
as real views (``view_as_real``) because optimisers and safetensors want real tensors.

``C`` holds C~ = (I - A_bar^L)^T C for the internal length L (buffer ``L``), not C itself: the
kernel of length L is then Algorithm 1 without any matrix power ([S4] Algorithm 1, step 1; the
paper learns C~ directly). ``L = 0`` means "no length yet": ``C`` is the plain C and the first
forward converts it. ``double_length`` maps C~_L to C~_2L = (I + A_bar^L)^T C~_L, so the kernel
(of the same underlying C) stays exact while growing. Compiled graphs (and kernels with
``extend_length_in_place = False``) write neither: a longer kernel takes C~ for a covering length on
each call (:meth:`SSKernelNPLR._tilde_for`).

``rate`` is the relative sampling rate: the system (A, B, C, dt) is evaluated with dt / rate,
exactly. At rate 1 the stored C~ is used as is (the fast path); at another rate C is recovered
from C~ and C~ rebuilt for (dt / rate, L) in float64, so a kernel at rate 0.5 equals the kernel
of the same system with dt doubled (the seed reinterprets the stored C~ at the rescaled length,
which is exact only for zoh). Without L the kernel has round(internal L * rate) samples (the same
duration).

Discretisations: ``bilinear`` (default) runs Algorithm 1 (Cauchy + Woodbury + irfft). ``zoh``
has no NPLR form (exp(dt A) is dense), and diagonalising A is not an option (the eigenvectors of
HiPPO matrices are exponentially ill-conditioned, and LagT's A is a single Jordan block), so zoh
builds exp(dt A) densely in float64 and sums C^T A_bar^l B_bar with the two-level Krylov scheme of
:func:`plugins.s4.dense.two_level_kernel`: O(H N^2 sqrt L + H N L), exact to float64 rounding.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor, nn

from lrnnx_zoo import hippo
from lrnnx_zoo.base import (apply_function, check_flags, check_reals, check_size_product, check_sizes,
                            forward_ad_active, func_transforms_active, jvp_variant, needs_autograd, parameter_dtype)
from lrnnx_zoo.optim import check_optim_values, grouped_parameters, set_optim_record
from lrnnx_zoo.registry import get_backend
from lrnnx_zoo.ssm_kernel import (SSMKernel, check_rate, in_graph_operator, keeping_stored_state, kept_in_inference,
                                  passed_state_dtype)

from . import dense
from .generating import bilinear_kernel
from .measures import measure_factors
from .modes import StepModes

__all__ = ["SSKernelNPLR", "HippoSSKernel", "S4Kernel", "optimizer_param_groups"]

_T = TypeVar("_T")

#: Live kernels by id, and the attribute of a C parameter naming its kernel's id (:meth:`SSKernelNPLR._check_shared_C`):
#: an int on the tensor, so that it pickles and torch.utils.swap_tensors accepts it (a weak reference there it refuses).
_KERNELS: "weakref.WeakValueDictionary[int, SSKernelNPLR]" = weakref.WeakValueDictionary()
_C_HOME = "_lrnnx_zoo_kernel"


def _distributed() -> bool:
    """Whether this process is one of several (torch.distributed initialised, world size > 1)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DistributedLengthWarning(RuntimeWarning):
    """An S4 kernel extended its stored C~ in place in one process of several. Ranks whose batches
    have different lengths then hold C~ for different lengths: DistributedDataParallel broadcasts rank
    0's length buffer before each forward (a rank read its C~ with rank 0's length: 0.063 off at lr 0)
    and averages gradients of parameters that mean different things on each rank (replicas 1.5e-3
    apart after two steps). Nothing is wrong while every rank sees the same lengths."""


class UnpairedLengthWarning(UserWarning):
    """``load_state_dict(..., strict=False)`` gave an S4 kernel its ``C`` without its length ``L`` (or
    ``L`` without ``C``): C holds C~ for the stored length, so the kernel reads the loaded C~ with a
    length it was not made for (a parameters-only state dict of a model that had run at L=40 loaded
    into a fresh one: outputs 0.07 off, 0.18 when the receiver had run at L=17), unless both lengths
    agree (e.g. kernels built with the same ``l_max``)."""


def _home_kernel(C: Tensor) -> Optional["SSKernelNPLR"]:
    """The live kernel whose own C ``C`` is (by the id it records), or None."""
    home = _KERNELS.get(C.__dict__.get(_C_HOME, -1))
    return home if home is not None and home._parameters.get("C") is C else None


class _LengthOrigin(NamedTuple):
    """What a chain of length changes started from and what its last change left (:meth:`SSKernelNPLR._note_length_change`)."""

    C_first: Tensor                   # C (C~ for L_first, or the plain C when L_first is 0) before the first change
    L_first: int
    C_after: Tensor                   # C~ and the length the last change left
    L_after: int
    marks: Tuple[Any, ...]            # the discretisation and copies of w, P, log_dt: what A_bar depends on
    stops: Tuple[Tuple[Tensor, int], ...] = ()   # (C~, length) each earlier change of the chain left

    def points(self) -> Tuple[Tuple[Tensor, int], ...]:
        """Every (C, L) of the chain: one system, re-expressed for each length (:meth:`SSKernelNPLR.restated_since`)."""
        return ((self.C_first, self.L_first),) + self.stops + ((self.C_after, self.L_after),)


def _same_values(t: Tensor, mark: Tensor) -> bool:
    """Whether ``t`` holds ``mark``'s values (compared as float64 views: a .double() since keeps them)."""
    return t.shape == mark.shape and torch.equal(t.detach().to(mark.device, torch.float64), mark.to(torch.float64))


def _check_length(L: Any, who: str = "SSKernelNPLR") -> None:
    """An integer >= 0 (symbolic in a traced graph): 2.5, '3' and True failed deep in hippo.power or were taken."""
    if isinstance(L, bool) or not isinstance(L, (int, torch.SymInt)) or L < 0:
        raise ValueError(f"{who} needs L to be an integer >= 0 (the kernel length), got {L!r}")


#: A rank allowed at any d_state (beyond it, rank <= d_state: P adds nothing past rank d_state / 2).
MAX_SMALL_RANK = 8

#: Longest stored kernel length a state_dict may give (2**31 steps: no FFT of it fits a machine).
MAX_LENGTH = 2 ** 31

#: Largest real part allowed for w (the normal part's eigenvalues), keeping the system stable.
W_REAL_MAX = -1e-4


def _as_real(t: Tensor) -> Tensor:
    """complex (...) -> real (..., 2) of :func:`~lrnnx_zoo.base.parameter_dtype` (float32 unless the
    default dtype is float64); .double() on the module makes float64 parameters too."""
    # contiguous: P's (r, S, M) came as a permuted view, and parameters_to_vector or safetensors'
    # save_file of the state_dict refused the strided parameter
    return torch.view_as_real(t.to(torch.promote_types(parameter_dtype(), torch.complex64))).clone(
        memory_format=torch.contiguous_format)


class _LengthGuard(torch.autograd.Function):
    """``_LengthGuard.apply(C, t)``: identity on t, a trained kernel tensor, that keeps the stored C~
    for the backward, so that autograd checks C~'s version there: a forward on a longer sequence
    rewrites C~ in place for the new internal length (the kernel stays the same), and a graph built
    before that gave gradients for the old parameterisation applied to the new one (``m(x8) +
    m(x40)``: C's gradient 72% off, log_dt's 25%), silently. It is now an error that says what
    happened and what to do. t is C itself when C is trained, else another trained tensor (with C
    frozen and w, P, log_dt trained, w's gradient was 24-77% off, silently, since the guard hung on C
    and a frozen C has no backward)."""

    generate_vmap_rule = True      # an identity: torch.func.vmap batches it as it is

    @staticmethod
    def forward(C: Tensor, t: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        # t None: C itself (dynamo traces no Function given one tensor twice, a graph break per call)
        return C.view_as(C) if t is None else t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        # Separate from forward, so that torch.func transforms (grad, jacrev) can run it.
        ctx.save_for_backward(inputs[0])
        ctx.on_C = inputs[1] is None

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:  # type: ignore[override]
        try:
            ctx.saved_tensors
        except RuntimeError as exc:       # the version check: C~ changed since this graph was built
            raise RuntimeError(
                "S4 kernel: its stored C~ was rewritten between this forward and its backward (a forward on a "
                "longer sequence than the kernel's internal length extends it, or double_length()), so this "
                "graph's gradients belong to the old parameterisation. Run the longest sequence first, or set "
                "the length before training (kernel(L=max_length), or l_max=max_length), or set "
                "extend_length_in_place = False on the kernel (C~ for a longer sequence is then computed on "
                "each call, not stored)") from exc
        return (grad, None) if ctx.on_C else (None, grad)


@jvp_variant
class _LengthGuardJvp(_LengthGuard):
    """:class:`_LengthGuard` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def jvp(ctx, C_t: Optional[Tensor], t_t: Optional[Tensor]) -> Optional[Tensor]:  # type: ignore[override]
        """Forward-mode AD of the identity (a forward-mode tangent is spent within the forward: no
        version to check later)."""
        tangent = C_t if ctx.on_C else t_t
        return None if tangent is None else tangent.view_as(tangent)


class _LengthLock:
    """A re-entrant lock held while a kernel's C~ and internal length are changed or read together.
    A copy or unpickling of its kernel gets a new one (a lock itself cannot be copied)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def __reduce__(self) -> Tuple[Any, Tuple[()]]:
        return _LengthLock, ()


def check_state_pairs(who: str, name: str, N: int) -> None:
    """Raise a ValueError naming ``who`` and its argument ``name`` unless N, the real states of a
    conjugate-pair-halved system, is even (the kernel said "N counts ..." whoever was built with
    d_state: the S4 layer, the S4 block, FFTConvS4 with the s4 kernel)."""
    if N % 2:
        raise ValueError(f"{who} {name} counts real states in conjugate pairs: an even number >= 2, got {N}")


def _first_samples(K: Tensor, L: int) -> Tensor:
    """K[..., :L]. In a compiled graph a copy (index_select): the view's contiguity, which depends on
    whether L is K's whole length, was guarded on (L != Ld), so the length equal to the internal one
    compiled a graph of its own."""
    if torch.compiler.is_compiling():
        return K.index_select(-1, torch.arange(L, device=K.device))
    return K[..., :L]


def _identity_minus_power(A: Tensor, L: int) -> Tensor:
    """I - A^L  (A: (H, N, N) float64)."""
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) - hippo.power(L, A)


def _solve_tilde(c_tilde: Tensor, A: Tensor, L: int, power_t: Optional[Tensor] = None) -> Tensor:
    """c with c^T (I - A^L) = c~^T.   c_tilde: (C, H, N), A: (H, N, N); power_t: (A^L)^T if known."""
    if power_t is None:
        F = _identity_minus_power(A, L).transpose(-1, -2)
    else:
        F = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) - power_t
    if func_transforms_active():
        # torch's batched backward of solve mismatches broadcast batch dims under vmap of grad
        # (per-sample gradients failed: "size of tensor a (2) must match ... b (3)"); spell them out
        F = F.expand(*c_tilde.shape[:-2], *F.shape[-3:])
        return torch.linalg.solve(F, c_tilde.unsqueeze(-1)).squeeze(-1)
    return dense.solve_per_channel(F, c_tilde)       # one factorisation per channel, not per output channel


#: The largest float64 dense result (A_bar with b_bar, a Krylov block) an S4 kernel keeps in its cache:
#: 40 MiB, room for d_model=256 with d_state=128 (34 MB). Larger systems compute it at each use.
DENSE_CACHE_BYTES = 40 << 20


class SSKernelNPLR(StepModes, SSMKernel):
    """The kernel K_l = C^T A_bar^l B_bar of H NPLR systems with C output channels each.

    Args:
        L: internal length (C~ is for this length); None or 0: set by the first forward.
        w: (S, M) or (M,) complex, S dividing H (channel h uses row h % S).
        P: (r, S, M) or (r, M) complex.   B: (S, M) or (M,) complex.   C: (C, H, M) complex (plain C).
        log_dt: (H,) real.
        trainable: which of "dt", "A" (w), "P", "B" are parameters (others are buffers): None or
            True = all, False = none, or a dict (missing keys: False, as in the seed).
        lr, wd: learning rate / weight decay recorded for those parameters (``register``); a float
            or a dict keyed like ``trainable``. wd defaults to 0.0 (no decay on SSM parameters).
        discretization: "bilinear" or "zoh".
        backend: name of a registered ("cauchy", name) backend: "auto", "torch", "keops".
    """

    #: Recompute in float64 the (channel, node) entries whose float32 Woodbury step cancels
    #: (generating.REFINE_AMPLIFICATION): Fourier-measure kernels go from ~1e-4 to ~2e-6 relative
    #: error, and float32 gradients from up to 8e-4 to ~5e-5 (log_dt); the check and the refinement
    #: add 1.7 ms (LegS) / 6.5 ms (Fourier) to a 34.6 / 34.1 ms generation at H=256, N=64, L=4096
    #: (2-4% of its forward+backward); set False on an instance to keep float32 throughout.
    refine_ill_conditioned: bool = True

    #: A forward on a sequence longer than the stored C~ covers (or the first forward, with no length
    #: yet) rewrites C~ in place for the covering length (:meth:`_cover`), so later calls need no
    #: matrix power. False on an instance keeps the stored C and length as they are: a longer kernel
    #: then takes C~ for its covering length functionally on every call (:meth:`_tilde_for`), and the
    #: gradients are those of the stored parameters. Compiled graphs always do that (a write to a
    #: parameter, and its bookkeeping, broke the graph and changed what the next call is guarded on).
    extend_length_in_place: bool = True

    def __init__(self, L: Optional[int], w: Tensor, P: Tensor, B: Tensor, C: Tensor, log_dt: Tensor,
                 trainable: Union[None, bool, Dict[str, bool]] = None, lr: Union[None, float, Dict[str, float]] = None,
                 wd: Union[None, float, Dict[str, float]] = 0.0, discretization: str = "bilinear",
                 backend: str = "auto") -> None:
        super().__init__()
        if discretization not in ("bilinear", "zoh"):
            raise ValueError(f"SSKernelNPLR discretization must be 'bilinear' or 'zoh', got {discretization!r}")
        get_backend("cauchy", backend)  # unknown names fail here, listing the valid ones
        w, P, B = (w.unsqueeze(0) if w.dim() == 1 else w), (P.unsqueeze(1) if P.dim() == 2 else P), \
            (B.unsqueeze(0) if B.dim() == 1 else B)
        Ch, H, M = C.shape
        S = w.shape[0]
        if P.shape[1:] != (S, M) or B.shape != (S, M) or w.shape != (S, M) or log_dt.shape != (H,) or H % S:
            raise ValueError(
                f"SSKernelNPLR expects w (S, M), P (r, S, M), B (S, M), C (C, H, M), log_dt (H,) with S dividing "
                f"H; got w {tuple(w.shape)}, P {tuple(P.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, "
                f"log_dt {tuple(log_dt.shape)}")
        self.d_model, self.d_state, self.channels, self.rank = H, 2 * M, Ch, P.shape[0]
        self.discretization, self.backend = discretization, backend
        train = self._per_key(trainable, True if trainable is None else trainable, bool)
        lrs, wds = self._per_key(lr, lr, None), self._per_key(wd, wd, None)
        self.C = nn.Parameter(_as_real(C))
        self.register("log_dt", log_dt.to(parameter_dtype()), train["dt"], lrs["dt"], wds["dt"])
        self.register("w", _as_real(w), train["A"], lrs["A"], wds["A"])
        self.register("P", _as_real(P), train["P"], lrs["P"], wds["P"])
        self.register("B", _as_real(B), train["B"], lrs["B"], wds["B"])
        self.register_buffer("L", torch.tensor(0, dtype=torch.long))
        # A Python copy of the buffer: reading the tensor is a graph break under torch.compile.
        self._length = 0
        self._length_lock = _LengthLock()
        self._remember_home()
        if L is not None:
            _check_length(L)
        if L:
            self._init_C_tilde(L)

    def _remember_home(self) -> None:
        """Note which tensors are this kernel's own C and L: only those are rewritten together
        (:meth:`_writes_length`). By id, which stays unique while the kernel holds them (a weak
        reference made torch.utils.swap_tensors, which load_state_dict and .to can use, refuse them).
        C itself records its kernel (:meth:`_check_shared_C`), unless another live kernel holding it
        did first."""
        C = self._parameters.get("C")
        self.__dict__["_home"] = (id(C), id(self._buffers.get("L")))
        _KERNELS[id(self)] = self
        if C is not None and _home_kernel(C) in (None, self):
            C.__dict__[_C_HOME] = id(self)

    def _check_shared_C(self) -> None:
        """Refuse a C that is another kernel's parameter (weight tying by ``b.kernel.C = a.kernel.C``) while
        the two kernels' lengths differ: C holds C~ for its own kernel's length, and this kernel read it
        with its own (0.21 off, silently). Tie whole kernels (``b.kernel = a.kernel``) instead, which share
        the length too. A substituted C of the same length (torch.func.functional_call with another
        model's parameters and buffers) is fine."""
        C = self._parameters.get("C")
        home = None if C is None or torch.compiler.is_compiling() else _home_kernel(C)
        if home is not None and home is not self and home.length != self.length:
            raise RuntimeError(f"{type(self).__name__}: its C is another S4 kernel's parameter (tied weights), which "
                               f"holds C~ for that kernel's length L={home.length}, while this kernel's length is "
                               f"L={self.length}: C would be read as another system. Tie whole kernels "
                               f"(b.kernel = a.kernel), which share the length, instead of their C")

    def _at_home(self) -> bool:
        """Whether C and L are the kernel's own tensors, not ones substituted for a call (torch.func's
        functional_call with the parameters only: C~ extended in the caller's tensor and the length
        written into the kernel's own buffer left the kernel's C with another C~'s length, 0.44 off)."""
        # .get: a parametrization moves C to parametrizations.C.original (a KeyError here); its value is
        # computed, never the kernel's own to rewrite
        return self.__dict__.get("_home") == (id(self._parameters.get("C")), id(self._buffers.get("L")))

    @staticmethod
    def _per_key(value: Any, default: Any, cast: Any) -> Dict[str, Any]:
        keys = ("dt", "A", "P", "B")
        if isinstance(value, dict):
            unknown = set(value) - set(keys)
            if unknown:
                raise ValueError(f"keys must be among {keys}, got {sorted(unknown)}")
            fill = False if cast is bool else None
            found = {k: value.get(k, fill) for k in keys}
        else:
            found = {k: default for k in keys}
        for key, v in found.items():    # trainable="no" read as True, lr=nan or -1 reached the optimiser
            if cast is bool:
                check_flags("SSKernelNPLR", **{f"trainable[{key!r}]": v})
            else:
                check_optim_values("SSKernelNPLR", **{f"lr / wd [{key!r}]": v})
        return found

    def register(self, name: str, tensor: Tensor, trainable: bool = False, lr: Optional[float] = None,
                 wd: Optional[float] = None) -> None:
        """Register ``tensor`` as a parameter (trainable) or buffer; record lr / wd for the optimizer.

        The record is a dict ``{"lr": ..., "weight_decay": ...}``, kept as the parameter's ``_optim``
        and on this module (see :mod:`lrnnx_zoo.optim`: a deepcopy keeps only the latter), read by
        :func:`optimizer_param_groups`. Buffers get no record (nothing to optimise).
        """
        check_flags(f"{type(self).__name__}.register", trainable=trainable)
        if name in self._parameters or name in self._buffers:
            raise ValueError(f"{type(self).__name__}.register: {name!r} is already registered; it would be "
                             f"replaced silently")
        if trainable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)
        optim = {k: v for k, v in (("lr", lr), ("weight_decay", wd)) if trainable and v is not None}
        set_optim_record(self, name, optim)

    # -- parameters ------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Internal length L of C~ (0: C holds the plain C).

        The buffer ``L`` is the truth, and on the CPU it is read directly (a microsecond; this
        also sees a buffer swapped in by torch.func.functional_call). While torch.compile traces,
        and off the CPU, where reading a tensor stalls the device, the Python copy kept in step
        with it (:meth:`_set_length`, loading, unpickling) is used instead."""
        if self.L.device.type == "cpu" and not torch.compiler.is_compiling():
            try:
                return int(self.L)
            except RuntimeError as exc:   # torch.func.vmap over the buffers: one length per model
                raise RuntimeError(
                    "S4 kernel: its internal length buffer 'L' is batched by torch.func.vmap (e.g. the buffers of "
                    "torch.func.stack_module_state), but the length is one Python int for all models. vmap over the "
                    "parameters only and pass one model's buffers unbatched: functional_call(model, (params, "
                    "dict(model.named_buffers())), x) with in_dims=(0, None)") from exc
        return self._length

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        state_dict, prefix = args[0], args[1]
        L = state_dict.get(prefix + "L")
        if isinstance(L, Tensor) and L.device.type != "meta" and L.numel() == 1 and not (0 <= int(L) <= MAX_LENGTH):
            # a weights file's length is read as C~'s: L=-5 or 10**12 loaded, and the first forward
            # failed in the allocator or in the kernel (an audit of untrusted checkpoints)
            raise ValueError(f"{prefix}L (the kernel's stored length, which C holds C~ for) must be in "
                             f"[0, {MAX_LENGTH}], got {int(L)}")
        has_C, has_L = prefix + "C" in state_dict, prefix + "L" in state_dict
        if has_C != has_L:     # strict=False loads it (torch passes every module strict=True, and checks after)
            given, kept = ("C", "L") if has_C else ("L", "C")
            warnings.warn(f"{prefix}{given} is loaded without {prefix}{kept}, but C holds C~ for the stored length "
                          f"L (now {self.length}): the kernel pairs them, right only if the state dict's source "
                          f"stored the same length (e.g. both built with the same l_max). Load {prefix}C and "
                          f"{prefix}L together (model.state_dict() holds both)", UnpairedLengthWarning, stacklevel=3)
        with self._consistent():                  # C, L and the Python copy change together
            super()._load_from_state_dict(*args, **kwargs)
            self.__dict__.pop("_length_origin", None)  # new weights: no length change to account for
            # and no step form of the old ones: step() stepped on with them silently; now it asks for setup_step
            object.__setattr__(self, "_stepper", None)
            if self.L.device.type != "meta":          # a meta load carries no values
                self._length = int(self.L)            # the buffer was just loaded: keep the Python copy in step
            self._remember_home()                     # assign=True loads new tensors

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # C~ and L read at one moment. The entries share the tensors' memory, as nn.Module's do (EMA
        # code copies into them): one saved while another thread extends C~ can still be torn, so to
        # save a served model, save copy.deepcopy(model), which is taken under the lock (docs/semantics.md, "Threads").
        with self._consistent():
            super()._save_to_state_dict(*args, **kwargs)

    def _own_state(self) -> Dict[str, Any]:
        """The module's state without the original's tensor ids or the dense work of calls in flight
        in other threads (a copy taken during another thread's prefill held it, and the copy's own
        calls in a thread of that id took it for theirs, 0.82 off)."""
        state = super().__getstate__()
        state.pop("_home", None)
        state.pop("_dense_memo", None)
        return state

    def __deepcopy__(self, memo: Dict[int, Any]) -> "SSKernelNPLR":
        """A copy made under the lock that length changes hold: C~ and L were copied without it, and a
        copy taken while another thread extended C~ paired C~ for one length with the other length
        (0.65 off in 3 of 556 copies). The tensors go through ``memo``, so a model copied together
        with its optimiser still shares its parameters with it."""
        with self._consistent():
            twin = type(self).__new__(type(self))
            memo[id(self)] = twin
            twin.__setstate__(copy.deepcopy(self._own_state(), memo))
        return twin

    def __getstate__(self) -> dict:
        """For pickling (torch.save of a whole module, multiprocessing): :meth:`_own_state`. The
        tensors are the kernel's own (shared-memory workers train them; a snapshot made them private
        and broke spawning): a pickle written while another thread extends C~ can be torn, so pickle
        copy.deepcopy(model) of a served model."""
        with self._consistent():
            return self._own_state()

    def _apply(self, fn: Any, recurse: bool = True) -> "SSKernelNPLR":
        super()._apply(fn, recurse)
        self._remember_home()                     # .to(device) makes new buffers (and, by option, parameters)
        return self

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_length" not in self.__dict__:        # a whole-module pickle from before the Python copy existed
            self._length = int(self.L) if self.L.device.type != "meta" else 0
        if "_length_lock" not in self.__dict__:   # ... or from before the lock
            self._length_lock = _LengthLock()
        origin = self.__dict__.get("_length_origin")
        if origin is not None and not (isinstance(origin, _LengthOrigin) and isinstance(origin.stops, tuple)):
            # ... or from before its fields had names (a 4-tuple), or with a dtype where the stops are now
            del self.__dict__["_length_origin"]
        self._remember_home()                     # a copy's own tensors (__getstate__ leaves the original's out)

    def _consistent(self) -> ContextManager[None]:
        """Held while C~ and the internal length change or are read together. One kernel serves
        several threads (a threaded server): a thread generating a kernel while another extended the
        length (a longer input) read the new C~ with the old length, 5-800% off, or both extended it
        at once (a TypeError). Kernel generation on a cache miss and length changes of one kernel take
        turns; a cache hit takes no lock (a cached kernel is the same whatever the internal length).
        Not under torch.compile (dynamo cannot trace a lock; a compiled graph is one thread's)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._length_lock

    def _set_length(self, L: int) -> None:
        self.L.fill_(L)
        self._length = L

    def continuous(self, double: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Effective (w (H, M), P (r, H, M), B (H, M), C (C, H, M), dt (H,)); complex128/float64 if ``double``.

        w's real part is clamped to <= W_REAL_MAX (stability); rows are repeated from S to H.
        ``C`` is the stored tensor: C~ for ``length`` (or the plain C while length is 0).
        """
        real = torch.float64 if double else self.log_dt.dtype
        cx = lambda t: torch.view_as_complex(t.to(real).contiguous())          # noqa: E731
        C, w, P, B, log_dt = self._length_guarded()
        w, P, B = cx(w), cx(P), cx(B)
        w = torch.complex(w.real.clamp(max=W_REAL_MAX), w.imag)
        rep = self.d_model // w.shape[0]
        if rep > 1:
            w, P, B = w.repeat(rep, 1), P.repeat(1, rep, 1), B.repeat(rep, 1)
        return w, P, B, cx(C), torch.exp(log_dt.to(real))

    def _length_guarded(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(C, w, P, B, log_dt) as stored, the first trained one (C first) passed through
        :class:`_LengthGuard` while autograd records: a graph's backward then checks that C~ was not
        rewritten since its forward."""
        tensors = [self.C, self.w, self.P, self.B, self.log_dt]
        if torch.is_grad_enabled():
            for i, t in enumerate(tensors):
                if t.requires_grad:
                    tensors[i] = apply_function(_LengthGuard, self.C, None if i == 0 else t)
                    break
        return tuple(tensors)  # type: ignore[return-value]

    def dense_system(self, rate: float = 1.0) -> Tuple[Tensor, Tensor]:
        """Discretised (A_bar (H, N, N), b_bar (H, N)) in real coordinates, float64, step dt / rate
        (computed once per rate within :meth:`sharing_dense_work`, and in inference cached like the
        kernel: a zoh A_bar is H matrix exponentials, 69 ms a layer at H=128, N=64, and every prefill
        of a length not seen and every step form needs it)."""
        memo = self._shared_work()

        def compute() -> Tuple[Tensor, Tensor]:
            # the shared one where there is one: a first call's length change rewrites C between two
            # uses, which empties the kernel cache, and the second use caches it again without a
            # second matrix exponential
            if memo is not None and ("system", rate) in memo:
                return memo[("system", rate)]
            return self._dense_system(rate)
        system = (self.cached_kernel(("dense_system", rate), compute) if self._caches_dense_work(self.d_state + 1)
                  else compute())
        if memo is not None:
            memo[("system", rate)] = system
        return system

    def _caches_dense_work(self, rows: int) -> bool:
        """Whether an (H, rows, N) float64 result of dense work may go to the kernel cache (which keeps
        results in eager inference only): up to DENSE_CACHE_BYTES (two of each kind are kept, beside
        the step forms' own copy)."""
        return self.d_model * rows * self.d_state * 8 <= DENSE_CACHE_BYTES

    def _system_power(self, A_bar: Tensor, L: int) -> Tensor:
        """A_bar^L for this kernel's rate-1 A_bar (:meth:`dense_system`), computed once per L within
        :meth:`sharing_dense_work` (a first call's length change and :meth:`output_matrix` both need it)."""
        memo = self._shared_work()
        if memo is None:
            return hippo.power(L, A_bar)
        if ("power", L) not in memo:
            memo[("power", L)] = hippo.power(L, A_bar)
        return memo[("power", L)]

    def _krylov_block(self, A_bar: Tensor, b_bar: Tensor, L: int) -> Tuple[Tensor, Tensor]:
        """The Krylov rows (H, T, N) and (A_bar^T) transposed (H, N, N) that state passing over L steps
        uses (:func:`~.dense.advance_state`, T = block_sizes(L)), cached like the dense system in eager
        inference (log2 T squares of A_bar: 12 ms a layer at H=128, N=64, L=64)."""
        T = dense.block_sizes(max(L, 1))[0]

        def compute() -> Tuple[Tensor, Tensor]:
            return dense.krylov_doubling(T, A_bar.transpose(-1, -2).contiguous(), b_bar)
        return self.cached_kernel(("krylov", T), compute) if self._caches_dense_work(self.d_state + T) else compute()

    def _dense_system(self, rate: float) -> Tuple[Tensor, Tensor]:
        w, P, B, _, dt = self.continuous(double=True)
        if self.discretization == "bilinear":
            return dense.bilinear_nplr(w, P, B, dt / rate)
        return dense.discretize(dense.real_matrix(w, P), dense.to_real(B), dt / rate, self.discretization)

    def output_matrix(self, system: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """The plain C (C, H, M) complex128 that C~ stands for: (I - A_bar^L)^T C = C~ (differentiable),
        from the stored C~ and its length, which is all a copy loaded from the state_dict has: the
        step forms built from it are the loaded copy's, bit for bit (:meth:`restated_since` keeps a
        running stream's form when a longer forward re-expresses C~).

        ``system``: this kernel's :meth:`dense_system` at rate 1, where the caller has it: under autograd
        nothing is shared, and a zoh kernel discretised twice (two matrix exponentials of (H, N, N) and
        their backward, 1.0 of a training step's 2.1 s at H=128, N=64, B=8, L=1024).

        In inference it is cached like the kernel (:meth:`~lrnnx_zoo.ssm_kernel.SSMKernel.cached_kernel`,
        for the same parameters and length): A_bar^L costs log2(L) dense float64 squarings (33 ms per
        layer at H=128, N=64, L=4096), and every step form built (each prefill, each
        allocate_inference_cache) needs it."""
        if self.length == 0:
            with self._consistent():              # not while another thread sets the length
                if self.length == 0:
                    return self.continuous(double=True)[3]

        def compute() -> Tensor:
            with self._consistent():
                return locked()

        def locked() -> Tensor:
            # C~ and its length from one moment
            C, length = self.continuous(double=True)[3], self.length
            if length == 0:
                return C
            A_bar, b_bar = self.dense_system() if system is None else system
            memo, power_t = self._shared_work(), None
            if memo is not None:
                # shared work (a prefill, a forward): one chain of squares for A_bar^L and the Krylov
                # block of the state passing and the zoh kernel, or the block alone if A_bar^L is known
                At = A_bar.transpose(-1, -2).contiguous()
                known = memo.get(("power", length))
                if known is None:
                    power_t, rows, AT_t = dense.squaring_chain(At, b_bar, length, memo["T"])
                    memo[("power", length)] = power_t.transpose(-1, -2)
                else:
                    power_t, (rows, AT_t) = known.transpose(-1, -2), dense.krylov_doubling(memo["T"], At, b_bar)
                memo["block"] = (rows, AT_t)
            return dense.output_from_row(_solve_tilde(dense.output_row(C), A_bar, length, power_t))
        return self.cached_kernel(("output_matrix",), compute)

    def _shared_work(self) -> Optional[Dict[Any, Any]]:
        """The results this thread's :meth:`sharing_dense_work` shares, or None: outside it, and under
        autograd, where each use computes anew, as the kernel cache does (a result built without a
        graph, e.g. by the step form under no_grad, cut the state passing's gradient to the parameters)."""
        if torch.compiler.is_compiling():     # Python-side state, as the kernel cache: dynamo broke the graph at get_ident
            return None
        memo = self.__dict__.get("_dense_memo", {}).get(threading.get_ident())
        return None if memo is None or needs_autograd(self) else memo

    @contextmanager
    def sharing_dense_work(self, L: int) -> Iterator[None]:
        """Within: the dense float64 work of a step form and a state passing over L steps is shared
        (a prefill: :meth:`LTI_LRNN.prefill` through the layer's ``prefill_scope``): :meth:`dense_system` runs once, and the squares of A_bar
        that :meth:`output_matrix` needs for A_bar^length (when not cached) also give the Krylov block
        that :meth:`forward_state` of an input of length L needs (log2(T) = 6 of 18 N x N products at
        L = 4096). The parameters must not change within (their results are reused); nested: the outer
        one holds. Only work without autograd is shared (a prefill under autograd computes as outside),
        and each thread has its own scope (another thread's prefill of another length has another block)."""
        if torch.compiler.is_compiling():     # nothing shared in a compiled graph (_shared_work)
            yield
            return
        memos = self.__dict__.setdefault("_dense_memo", {})          # thread id -> that thread's results
        me = threading.get_ident()
        if me in memos:
            yield
            return
        memos[me] = {"T": dense.block_sizes(max(L, 1))[0]}
        try:
            yield
        finally:
            memos.pop(me, None)

    @torch.no_grad()
    def _transform_C(self, factor: Union[Tensor, Callable[[Tensor], Tensor]]) -> None:
        """C <- C with c_r^T replaced by c_r^T factor  (factor: (H, N, N) float64, or a map of the rows)."""
        self.C.copy_(torch.view_as_real(self._transformed_C(factor)).to(self.C.dtype))

    def _transformed_C(self, factor: Union[Tensor, Callable[[Tensor], Tensor]]) -> Tensor:
        """The stored C with each row c_r^T replaced by c_r^T factor: (C, H, M) complex128, differentiable
        (factor: (H, N, N) float64, or a function of the rows (C, H, N) float64 giving c_r^T factor)."""
        c = dense.output_row(self.continuous(double=True)[3])
        if callable(factor):
            return dense.output_from_row(factor(c))
        return dense.output_from_row(dense.per_channel(factor.transpose(-1, -2), c))     # c^T factor

    def _power_by_steps(self, steps: int, products: int) -> bool:
        """Whether c^T A_bar^k for C~ is cheaper by ``steps`` steps of the bilinear A_bar's diagonal plus
        low-rank form (:func:`~.dense.rows_times_power_dplr`, O(H N r) a step per row) than by ``products``
        dense (H, N, N) float64 products (:func:`~.dense.dplr_power_cheaper`): at large N. The first
        forward at H=128, N=512, L=1024 spent 9.8 s squaring the dense A_bar for C~ (N=256: 1.5 s),
        where its kernel takes 0.05 s. Not under autograd (L steps would record L graphs), nor in a
        compiled graph (they would unroll)."""
        return (self.discretization == "bilinear" and not torch.compiler.is_compiling()
                and not needs_autograd(self)
                and dense.dplr_power_cheaper(self.channels, self.d_model, self.d_state, steps, products))

    def _dplr_system(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The rate-1 bilinear A_bar as a diagonal plus low-rank map (:func:`~.dense.bilinear_dplr`), float64."""
        w, P, B, _, dt = self.continuous(double=True)
        return dense.bilinear_dplr(w, P, B, dt)

    def _doubled_by_steps(self, L: int) -> Tuple[Callable[[Tensor], Tensor], int]:
        """(map of the rows c~ -> c~^T F, L') for :meth:`_doubling_factor`'s F and L', by steps of the
        DPLR form: c~ <- c~ + c~^T A_bar^m for m = length, 2 length, ..., L' / 2 (L' - length steps)."""
        length = self.length
        while length < L:
            length *= 2
        system = self._dplr_system()

        def rows(c: Tensor) -> Tensor:
            m = self.length
            while m < length:
                c = c + dense.rows_times_power_dplr(system, c, m)
                m *= 2
            return c
        return rows, length

    def _tilde_factor(self, L: int) -> Union[Tensor, Callable[[Tensor], Tensor]]:
        """I - A_bar^L for :meth:`_transformed_C`: as a map of the rows, by L steps of the DPLR form, where
        :meth:`_power_by_steps` expects that cheaper, else the dense (H, N, N) matrix (A_bar^L shared
        within :meth:`sharing_dense_work`)."""
        if self._power_by_steps(L, dense.power_products(L)):
            system = self._dplr_system()
            return lambda c: c - dense.rows_times_power_dplr(system, c, L)        # c^T (I - A^L)
        A_bar, _ = self.dense_system()
        return torch.eye(A_bar.shape[-1], dtype=A_bar.dtype, device=A_bar.device) - self._system_power(A_bar, L)

    def _doubling(self, L: int) -> Tuple[Union[Tensor, Callable[[Tensor], Tensor]], int]:
        """(F, L'): :meth:`_doubled_by_steps` where :meth:`_doubling_by_steps` expects it cheaper, else
        :meth:`_doubling_factor`'s dense F."""
        if self._doubling_by_steps(L):
            return self._doubled_by_steps(L)
        return self._doubling_factor(self.dense_system()[0], L)

    def _doubling_by_steps(self, L: int) -> bool:
        """:meth:`_power_by_steps` for :meth:`_doubled_by_steps` against :meth:`_doubling_factor`."""
        length, doublings = self.length, 0
        while length < L:
            length, doublings = 2 * length, doublings + 1
        return self._power_by_steps(length - self.length, dense.power_products(self.length) + 2 * doublings - 1)

    @torch.no_grad()
    def _init_C_tilde(self, L: int) -> None:
        """C~ = (I - A_bar^L)^T C  (Algorithm 1, step 1) from the plain C."""
        with self._consistent():
            self._init_C_tilde_locked(L)

    def _init_C_tilde_locked(self, L: int) -> None:
        if self.length:
            raise RuntimeError(f"C already holds C~ for L={self.length}; use double_length() to extend it")
        first = self._length_origin_before_change()
        self._transform_C(self._tilde_factor(L))
        self._set_length(L)
        self._note_length_change(first)

    @torch.no_grad()
    def double_length(self) -> None:
        """L -> 2L with C~ <- (I + A_bar^L)^T C~, since I - A^{2L} = (I - A^L)(I + A^L): the kernel stays exact.

        Not under a concurrent training forward or backward of this kernel (its C~ changes in place;
        inference from other threads is safe)."""
        with self._consistent():
            self._double_length_locked()

    def _double_length_locked(self) -> None:
        if self.length == 0:
            raise RuntimeError("double_length needs an internal length: pass L at construction or call "
                               "forward(L=...) first")
        first = self._length_origin_before_change()
        A_bar, _ = self.dense_system()
        self._transform_C(2 * torch.eye(A_bar.shape[-1], dtype=A_bar.dtype, device=A_bar.device)
                          - _identity_minus_power(A_bar, self.length))     # I + A^L
        self._set_length(2 * self.length)
        self._note_length_change(first)

    @torch.no_grad()
    def _cover(self, L: int) -> None:
        """Make the internal length cover L (rate 1): set it, or double it, if it falls short. The
        check is repeated under the lock: another thread may have extended it meanwhile."""
        if 0 < self.length >= L:
            return
        with self._consistent():
            if self.length == 0:
                self._init_C_tilde_locked(L)
            if self.length < L:
                if _distributed():
                    warnings.warn(f"S4 kernel: extending its stored C~ from length {self.length} to cover {L} in "
                                  f"this process only; under DistributedDataParallel, processes whose batches "
                                  f"have other lengths now hold C~ for other lengths, and the model they train "
                                  f"differs between them. Give the S4 layers l_max=<longest length> (or run one "
                                  f"forward at it before wrapping the model)", DistributedLengthWarning,
                                  stacklevel=3)
                self._extend_length_locked(L)

    def _extend_length_locked(self, L: int) -> None:
        """Double the internal length until it covers L, in one transform of C~: the doublings'
        factors I + A^{2^i L0} are powers of one A_bar, built by squaring, so A_bar is discretised
        once, not once per doubling (64 -> 4096 took six float64 discretisations per layer). Called
        under ``_consistent()`` (:meth:`_cover`)."""
        first = self._length_origin_before_change()
        factor, length = self._doubling(L)
        self._transform_C(factor)
        self._set_length(length)
        self._note_length_change(first)

    def _doubling_factor(self, A_bar: Tensor, L: int) -> Tuple[Tensor, int]:
        """(F, L') with L' = length * 2^k the first doubling of the internal length >= L (> length) and
        F = prod_{i<k} (I + A_bar^{2^i length}), so that F^T C~_length = C~_L' (I - A^{2L} = (I - A^L)(I + A^L)).
        A_bar: (H, N, N) float64 -> F (H, N, N)."""
        eye = torch.eye(A_bar.shape[-1], dtype=A_bar.dtype, device=A_bar.device)
        power, factor, length = hippo.power(self.length, A_bar), None, self.length
        while True:
            step = eye + power                                             # I + A^length
            factor = step if factor is None else factor @ step
            length *= 2
            if length >= L:
                return factor, length
            power = power @ power

    # -- weights digest ----------------------------------------------------------------------------
    def _length_origin_before_change(self) -> Tuple[Tensor, int, Tuple[Tuple[Tensor, int], ...]]:
        """(C, L) to remember before a length change: a change of length keeps the system (C~
        re-expressed for the new length), so :meth:`digest_substitutes` hands the weights digest this
        pair while C and L are still what the change left. Successive changes keep the first pair.
        Third: the (C~, L) the chain's changes have left so far, for :meth:`restated_since`."""
        origin = self.__dict__.get("_length_origin")
        if origin is not None and self._untouched_since(origin):
            return origin.C_first, origin.L_first, origin.stops + ((origin.C_after, origin.L_after),)
        return self.C.detach().clone(), self.length, ()

    def _note_length_change(self, first: Tuple[Tensor, int, Tuple[Tuple[Tensor, int], ...]]) -> None:
        """Remember ``first`` (:meth:`_length_origin_before_change`) with what the change left: C~, the
        length, and the parameters that give C~ its meaning through A_bar (w, P, dt, the discretisation)."""
        C_first, L_first, stops = first
        self._length_origin = _LengthOrigin(C_first, L_first, self.C.detach().clone(), self.length,
                                            self._system_marks(), stops)

    def _system_marks(self) -> Tuple[Any, ...]:
        """The discretisation and copies of w, P and log_dt: what A_bar, and so C~ = (I - A_bar^L)^T C, depends on."""
        return (self.discretization,) + tuple(t.detach().clone() for t in (self.w, self.P, self.log_dt))

    def _untouched_since(self, origin: _LengthOrigin) -> bool:
        """Whether C~, the length and A_bar's parameters are as the last length change left them: then
        ``origin``'s first (C, L) is still this system, and A_bar unchanged (an optimiser step on log_dt
        alone changes the C that a stored C~ stands for)."""
        now = (self.C, self.w, self.P, self.log_dt)
        if any(t.is_meta for t in now) or origin.C_after.is_meta:      # no values to compare
            return False
        return (self.length == origin.L_after and self.discretization == origin.marks[0]
                and _same_values(self.C, origin.C_after)
                and all(_same_values(t, mark) for t, mark in zip(now[1:], origin.marks[1:])))

    def restated_since(self, before: Dict[str, Tensor]) -> bool:
        """Whether this kernel is still the system it was when its own tensors were ``before`` (name
        -> copy, as :func:`~lrnnx_zoo.base.weights_and_versions` took them for a step form), its C~
        only re-expressed for longer lengths since: (C, L) then is a point of the current chain of
        length changes, and every other tensor holds the same values. A running stream then keeps
        its form, bit for bit (:func:`~lrnnx_zoo.base.current_form`): a form rebuilt from the
        re-expressed C~ rounds differently (Fourier, H=4, N=16, 64 -> 1024: C moved 3.1e-5, the form
        4.9e-5 relative), and the stream was refused as if the weights had changed."""
        with self._consistent():                  # C~, its length and the chain from one moment
            origin = self.__dict__.get("_length_origin")
            now = {k: t for k, t in {**self._parameters, **self._buffers}.items() if t is not None}
            if (origin is None or set(before) != set(now) or not {"C", "L"} <= set(now)   # C parametrized: not its own
                    or not self._untouched_since(origin)):
                return False
            if not all(_same_values(now[k], t) for k, t in before.items() if k not in ("C", "L")):
                return False
            C, L = before["C"], before["L"]
            return not L.is_meta and any(int(L) == length and _same_values(C, point)
                                         for point, length in origin.points())

    def digest_substitutes(self) -> Dict[str, Tensor]:
        """{"C", "L"} as they were before this kernel extended its length (running on a longer sequence
        than it had seen), if C and L have not changed since; else nothing. See
        :func:`lrnnx_zoo.hub.weights_digest`: a loaded checkpoint that only ran on longer sequences
        still has its weights, and keeps its metrics when saved or exported."""
        origin = self.__dict__.get("_length_origin")
        if origin is None or not self._untouched_since(origin):
            return {}
        return {"C": origin.C_first, "L": torch.tensor(origin.L_first, dtype=torch.long)}

    # -- convolution mode --------------------------------------------------------------------------
    def forward(self, L: Optional[int] = None, rate: float = 1.0, state: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        """K: (C, H, L) real and, given ``state`` (B, H, M) complex (x_{-1}), K_state: (B, C, H, L).

        Also accepts the seed's argument order ``forward(state=None, rate=1.0, L=None)`` positionally.
        L defaults to the internal length at this rate. At rate 1 a longer L doubles the internal
        length (C~ updated in place, kernel unchanged; in a compiled graph, or with
        :attr:`extend_length_in_place` False, C~ for the doubled length is computed and not stored)
        and a shorter one truncates the internal-length kernel; at another rate the kernel is
        computed for exactly L (module docstring; in a compiled graph for the next power of two).
        Without autograd (inference) the last K is reused while L, rate and every parameter's
        content are unchanged: the kernel costs H N L / 4 Cauchy terms whatever the batch size.
        """
        self._check_shared_C()
        if isinstance(L, Tensor) and L.dim() == 0 and not (L.is_floating_point() or L.is_complex()):
            L = int(L)                            # a 0-d integer tensor is a length, not a state
        if isinstance(L, Tensor) or (L is None and isinstance(state, int)):
            L, state = state, L
        rate = check_rate(rate, "SSKernelNPLR")
        if L is None:
            if self.length == 0:
                raise ValueError("SSKernelNPLR has no internal length yet: call it with L=<kernel length>")
            L = round(self.length * rate)
        _check_length(L)
        if state is not None and (state.dim() != 3 or state.shape[1:] != (self.d_model, self.d_state // 2)):
            # after setup_step("diagonal") default_state gives the step's eigen-coordinates, which
            # state passing does not take: the message sent the user back to the call that made it
            hint = (f"; default_state() gives the diagonal step's (batch, H, N) eigen-coordinates since "
                    f"setup_step('diagonal'): pass torch.zeros(batch, {self.d_model}, {self.d_state // 2}, "
                    f"dtype={self.state_dtype}), or step in another mode (setup_step('linear'))"
                    if getattr(self, "_step_mode", None) == "diagonal" else " (default_state)")
            raise ValueError(f"state must be (batch, H={self.d_model}, N/2={self.d_state // 2}) complex, "
                             f"got {tuple(state.shape)}{hint}")
        if L == 0:                                # an empty kernel (an empty input's): no transform to run
            K = self.C.new_zeros(self.channels, self.d_model, 0)
            return K, (None if state is None else K.new_zeros(state.shape[0], *K.shape))
        if state is not None:
            return self._covering(L, rate, lambda: self._kernel(L, rate, state))
        return self._covering(L, rate, lambda: self.cached_kernel((L, rate), lambda: self._kernel(L, rate, None)[0])), None

    def spectrum(self, L: int, n: int, rate: float = 1.0) -> Tensor:
        """:meth:`SSMKernel.spectrum`, with the internal length set (or extended, under autograd) first:
        set within, C~ rewritten in the first call changed the contents the cache had just looked at,
        and the second call generated the kernel again (zoh at H=64, N=256: 5 s)."""
        with kept_in_inference(self):
            return self._covering(L, rate, lambda: SSMKernel.spectrum(self, L, n, rate))

    def _covering(self, L: int, rate: float, body: Callable[[], _T]) -> _T:
        """``body()`` with the internal length covering L where calls may write it (:meth:`_cover`, rate
        1; the same for zoh, so that C means one thing), C~, the length and its origin put back if the
        body then fails (L=2**33 ran out of memory after the extension, and every later call, L=5 too,
        did the same). Without autograd, the length change and the body share one discretisation and
        one A_bar^L (:meth:`sharing_dense_work`): a zoh kernel's first call took two matrix
        exponentials and two chains of squares (H=64, N=256: 12 of its 16 s). No scope in a compiled
        graph (nothing is shared there)."""
        scope = contextlib.nullcontext() if torch.compiler.is_compiling() else self.sharing_dense_work(L)
        with scope:
            before = None
            if rate == 1.0 and self._writes_length() and not 0 < self.length >= L:
                before = (self.C.detach().clone(), self.length, self.__dict__.get("_length_origin"))
                self._cover(L)
            try:
                return body()
            except BaseException:
                if before is not None:
                    self._restore_length(*before)
                raise

    @torch.no_grad()
    def _restore_length(self, C: Tensor, length: int, origin: Optional[_LengthOrigin]) -> None:
        """Put C~, the length and the length origin back as they were before a length change."""
        with self._consistent():
            self.C.copy_(C)
            self._set_length(length)
            self.__dict__["_length_origin"] = origin

    def _kernel(self, L: int, rate: float, state: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        with self._consistent():                  # C~ and its length from one moment
            return self._kernel_locked(L, rate, state)

    def _kernel_locked(self, L: int, rate: float, state: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        if self.discretization == "zoh":
            return self._zoh(L, rate, state)
        w, P, B, Ct, dt = self.continuous()
        Ld, Ct64 = self._tilde_for(L, rate)
        if Ct64 is not None:
            Ct = Ct64.to(w.dtype)

        def exact() -> Tuple[Tensor, ...]:        # float64 inputs, formed only if some node needs them
            w64, P64, B64, C64, dt64 = self.continuous(double=True)
            return w64, P64, B64, C64 if Ct64 is None else Ct64, dt64 / rate
        K, K_state = bilinear_kernel(w, P, B, Ct, dt / rate, Ld, get_backend("cauchy", self.backend), state, exact,
                                     refine=self.refine_ill_conditioned)
        return _first_samples(K, L), (None if K_state is None else _first_samples(K_state, L))

    def _writes_length(self) -> bool:
        """Whether a forward may rewrite C~ and the internal length (:attr:`extend_length_in_place`;
        never in a compiled graph, nor for one (:func:`~lrnnx_zoo.ssm_kernel.in_graph_operator`), nor inside a
        torch.func transform, which refuses in-place writes to captured tensors: ``grad`` at a new length
        raised "attempted to call in-place operation", nor under forward-mode AD, whose duals would be
        written, nor while C or L is not the kernel's own, :meth:`_at_home`, nor, once there is a length,
        where the calling layer runs without autograd, :func:`~lrnnx_zoo.ssm_kernel.stored_state_kept`:
        the first length is set by any call, as before, so that C holds C~ from then on)."""
        return (self.extend_length_in_place and not torch.compiler.is_compiling() and not func_transforms_active()
                and not forward_ad_active() and not in_graph_operator() and self._at_home()
                and (self.length == 0 or not keeping_stored_state()))

    def _tilde_for(self, L: int, rate: float) -> Tuple[int, Optional[Tensor]]:
        """(Ld, C~) for a kernel of L >= 1 samples at ``rate``: Algorithm 1 runs at length Ld >= L (its
        first L samples are the length-L kernel) with C~ for Ld, complex128 (C, H, M), or None for the
        stored C~ (Ld = the internal length, which covers L).

        * rate != 1: C~ for (dt / rate, Ld) from the plain C (:meth:`output_tilde`), Ld = L; in a
          compiled graph Ld = the next power of two (below).
        * rate 1, stored C~ too short (not extended in place, :attr:`extend_length_in_place`): from the
          stored C~ by the doubling factor, Ld = the internal length doubled until it covers L (the
          length eager extends C~ to, and the same float64 product, so the same float32 kernel); with no
          length yet, (I - A_bar^Ld)^T C with Ld the next power of two >= L.

        Why powers of two in a compiled graph: A_bar^Ld is built by squaring along Ld's bits and
        Algorithm 1 takes (Ld + 1) // 2 nodes, so Ld is a Python int there, and a graph holds for the
        lengths whose comparisons with it come out the same: L itself would make one graph per length,
        a power of two one per range (2^(k-1), 2^k] (a power with a symbolic exponent would need a fixed
        ~31 squarings every call, several times the kernel's own cost)."""
        compiling = torch.compiler.is_compiling()
        if rate != 1.0:                           # exact at dt / rate: C~ for (dt / rate, Ld) from the plain C
            Ld = dense.power_of_two_at_least(L) if compiling else L
            return Ld, self.output_tilde(rate, Ld)
        if 0 < self.length >= L:
            return self.length, None
        if self.length == 0:
            Ld = dense.power_of_two_at_least(L)
            return Ld, self._transformed_C(self._tilde_factor(Ld))
        factor, Ld = self._doubling(L)
        return Ld, self._transformed_C(factor)

    def output_tilde(self, rate: float, L: int) -> Tensor:
        """C~ = (I - A_r^L)^T C for the system at dt / rate (A_r its A_bar) and length L: (C, H, M)
        complex128, from the plain C (:meth:`output_matrix`), in float64."""
        A_r, _ = self.dense_system(rate)
        c = dense.output_row(self.output_matrix())
        return dense.output_from_row(dense.per_channel(_identity_minus_power(A_r, L).transpose(-1, -2), c))

    @torch.no_grad()
    def resample_(self, rate: float) -> None:
        """:meth:`SSMKernel.resample_` (dt <- dt / rate), with C~ rebuilt for the new step: C~ depends on
        dt through A_bar^L. The internal length becomes round(length * rate) (at least 1), the length
        of the same duration, as ``forward(L=None, rate)`` has it; C~ for it is :meth:`output_tilde`."""
        rate = check_rate(rate, f"{type(self).__name__}.resample_")
        with self._consistent():                  # C~ and the length change together
            length = self.length
            if length:
                length = max(1, round(length * rate))
                C_tilde = self.output_tilde(rate, length)
            super().resample_(rate)
            if length:
                self.C.copy_(torch.view_as_real(C_tilde).to(self.C.dtype))
                self._set_length(length)
            self.__dict__.pop("_length_origin", None)   # new weights: no earlier length to hash
            object.__setattr__(self, "_stepper", None)   # a step form of the old step

    def _zoh(self, L: int, rate: float, state: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Dense float64 zoh kernel (module docstring). In a compiled graph it is computed for the
        internal length where that covers L (rate 1), else for the next power of two >= L, and
        truncated to L: Krylov block sizes from L itself made a graph per length (see :meth:`_tilde_for`)."""
        A_bar, b_bar = self.dense_system(rate)
        c = dense.output_row(self.output_matrix(system=(A_bar, b_bar) if rate == 1.0 else None))
        dtype = self.log_dt.dtype
        Lz = L
        if torch.compiler.is_compiling():
            Lz = self.length if rate == 1.0 and 0 < self.length >= L else dense.power_of_two_at_least(L)
        block = (self._shared_work() or {}).get("block") if rate == 1.0 else None   # output_matrix's
        if block is not None and block[0].shape[-2] != dense.block_sizes(Lz)[0]:     # for another T
            block = None
        K = _first_samples(dense.two_level_kernel(A_bar, b_bar, c, Lz, block), L).to(dtype)
        if state is None:
            return K, None
        x = dense.per_channel(A_bar, dense.to_real(state.to(torch.complex128)))   # A_bar x_{-1}
        return K, _first_samples(dense.two_level_kernel(A_bar, x, c, Lz), L).to(dtype)

    def forward_state(self, u: Tensor, state: Tensor) -> Tensor:
        """The state x_{L-1} after u: (B, H, L) from x_{-1} = state (B, H, N/2), exactly (float64: squares
        of the dense A_bar, or L steps of its diagonal plus low-rank form where cheaper, :meth:`_steps_cheaper`),
        in :func:`~lrnnx_zoo.ssm_kernel.passed_state_dtype` (a real float64 state gave complex64)."""
        block = (self._shared_work() or {}).get("block")
        x0 = dense.to_real(state.to(torch.complex128))
        if block is None and self._steps_cheaper(u, x0):
            w, P, B, _, dt = self.continuous(double=True)
            x = dense.advance_state_dplr(dense.bilinear_dplr(w, P, B, dt), u.double(), x0)
        else:
            A_bar, b_bar = self.dense_system()
            if block is None and not torch.compiler.is_compiling():
                block = self._krylov_block(A_bar, b_bar, u.shape[-1])
            x = dense.advance_state(A_bar, b_bar, u.double(), x0, block)
        # contiguous: the Horner scheme's (H, B) layout came back, and a compiled forward, guarding on
        # the strides of the state it was given (default_state's), compiled again for the next chunk
        return dense.from_real(x).to(passed_state_dtype(state)).contiguous()

    def _steps_cheaper(self, u: Tensor, x: Tensor) -> bool:
        """Whether :meth:`forward_state` steps the bilinear system's diagonal plus low-rank form
        (:func:`~.dense.advance_state_dplr`) rather than square the dense A_bar: for bilinear kernels,
        where that is expected to be faster (:func:`~.dense.dplr_state_cheaper`; large N, short
        inputs: a prefill of 64 steps at H=N=256 took 0.52 s a layer in squares), in eager inference.
        Under autograd the L steps would record L graphs of small ops; in a compiled graph they would
        unroll."""
        B, H, L = u.shape
        return (self.discretization == "bilinear" and not torch.compiler.is_compiling()
                and not needs_autograd(self, u, x) and dense.dplr_state_cheaper(B, H, x.shape[-1], L))

    def extra_repr(self) -> str:
        return (f"H={self.d_model}, N={self.d_state}, channels={self.channels}, rank={self.rank}, "
                f"L={self.length}, discretization={self.discretization!r}, backend={self.backend!r}")


class HippoSSKernel(SSKernelNPLR):
    """SSKernelNPLR initialised from a HiPPO measure (w, P, B from its registered initializer,
    ``hippo.nplr`` for the built-in ones; C ~ CN(0, 1);
    dt log-uniform in [dt_min, dt_max]).

    Args:
        H: channels.  N: state size (even).  L: internal length (None: first forward).
        measure: an initializer registered for "s4" (:mod:`.measures`): legs, legt (rank >= 2),
            fourier, lagt, tlagt, glagt (alpha = 0), or one a plugin adds.
        rank: low-rank size.  channels: outputs per channel.  n_ssm: distinct (w, P, B) copies (default H).
        trainable, lr, wd, discretization, backend: as for :class:`SSKernelNPLR`.
        mode: "nplr" (the only one; diagonal kernels are the S4D family).
        measure_args: extra arguments of the measure (e.g. beta for lagt).
    """

    def __init__(self, H: int, N: int = 64, L: Optional[int] = None, measure: str = "legs", rank: Optional[int] = None,
                 channels: int = 1, dt_min: float = 0.001, dt_max: float = 0.1,
                 trainable: Union[None, bool, Dict[str, bool]] = None, lr: Union[None, float, Dict[str, float]] = None,
                 mode: str = "nplr", measure_args: Optional[Dict[str, Any]] = None, n_ssm: Optional[int] = None,
                 wd: Union[None, float, Dict[str, float]] = 0.0, discretization: str = "bilinear",
                 backend: str = "auto") -> None:
        if mode != "nplr":
            raise ValueError(f"HippoSSKernel supports mode='nplr' only, got {mode!r}; for diagonal kernels use the "
                             f"S4D family (create_layer('s4d', ...) or kernel_type='s4d')")
        H, N, channels = check_sizes("HippoSSKernel", H=H, N=N, channels=channels)
        check_size_product("HippoSSKernel", H=H, N=N, channels=channels)
        rank = hippo.default_rank(measure) if rank is None else rank
        rank, = check_sizes(type(self).__name__, rank=rank)     # a float rank failed inside torch.zeros
        if rank > max(N, MAX_SMALL_RANK):
            # a low-rank correction P (rank, N/2) of the N/2 complex modes gains nothing past rank N/2
            # (small ranks allowed whatever N: LegT's 2 at N=2, a test matrix's 3), and a config.json's
            # rank=5e6 allocated 2.2 GB before its weights were compared with it (an audit)
            raise ValueError(f"{type(self).__name__} needs rank <= max(d_state, {MAX_SMALL_RANK}) = "
                             f"{max(N, MAX_SMALL_RANK)} (a low-rank correction of the N/2 = {N // 2} complex "
                             f"modes), got rank={rank}")
        if L is not None:
            L, = check_sizes("HippoSSKernel", L=L)
            check_size_product("HippoSSKernel", L=L, H=H, channels=channels)
        check_state_pairs(type(self).__name__, "d_state" if isinstance(self, S4Kernel) else "N", N)
        check_reals(type(self).__name__, dt_min=dt_min, dt_max=dt_max)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{type(self).__name__} needs 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        n_ssm = H if n_ssm is None else n_ssm
        n_ssm, = check_sizes("HippoSSKernel", n_ssm=n_ssm)     # 4.0 or True failed inside expand()
        if H % n_ssm:
            raise ValueError(f"n_ssm must divide H={H}, got {n_ssm}")
        w, P, B = measure_factors(measure, N, rank, measure_args)
        check_stable_normal_part(measure, measure_args, w)
        log_dt = torch.rand(H, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(channels, H, N // 2, dtype=torch.complex64)     # each part N(0, 1/2)
        super().__init__(L, w.expand(n_ssm, -1), P.unsqueeze(1).expand(-1, n_ssm, -1), B.expand(n_ssm, -1), C,
                         log_dt, trainable=trainable, lr=lr, wd=wd, discretization=discretization, backend=backend)
        self.measure = measure


def check_stable_normal_part(measure: str, measure_args: Optional[Dict[str, Any]], w: Tensor) -> None:
    """Refuse a measure whose normal part has eigenvalues with Re w > 0 (beyond rounding): the kernel's
    stability clamp (Re w <= :data:`W_REAL_MAX`) would replace them, and the layer would run another
    system than the measure's A = V (diag(w) - P^H P) V^H. HiPPO-tlagt and -glagt have Re w = -beta / 2
    (with P = ones / sqrt(2)): at beta = -0.5 the clamp moved the slowest pole of A from -0.184 to
    -0.435, silently. (Re w = 0, as LegT's and Fourier's, is the clamp's usual case.)"""
    if w.device.type == "meta" or w.numel() == 0:
        return
    top = float(w.real.max())
    if top > 1e-9 * max(1.0, float(w.abs().max())):
        args = f" with measure_args={measure_args}" if measure_args else ""
        hint = " (tlagt and glagt: Re w = -beta / 2, so beta >= 0)" if measure in ("tlagt", "glagt") else ""
        raise ValueError(f"S4 measure {measure!r}{args} has a normal part with eigenvalues up to Re w = {top:.3g} > 0, "
                         f"which the kernel's stability clamp (Re w <= {W_REAL_MAX}) would replace: the layer would "
                         f"not run this measure's system. Choose arguments whose normal part is stable{hint}")


class S4Kernel(HippoSSKernel):
    """HippoSSKernel under the ``SSMKernel`` constructor convention ``cls(d_model, d_state, channels=1, **kw)``;
    registered as the ("ssm_kernel", "s4") backend (e.g. for ``FFTConvS4(kernel_type="s4")``)."""

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, **kwargs: Any) -> None:
        super().__init__(d_model, N=d_state, channels=channels, **kwargs)


def optimizer_param_groups(model: nn.Module, base_lr: float, base_wd: Optional[float] = None) -> List[Dict[str, Any]]:
    """Optimizer parameter groups honouring the records left by ``register``.

    Parameters without a record go to one group with ``base_lr`` / ``base_wd``; the others are
    grouped by their (lr, weight_decay), a missing entry falling back to the base value. With
    ``base_wd`` None (the default) groups without a recorded weight decay take the optimizer's own
    (``AdamW(optimizer_param_groups(m, 1e-3), weight_decay=0.05)`` decays them by 0.05; a default of
    0.0 here set every group's decay and silently overrode the optimizer's argument).
    Frozen parameters (requires_grad False) are left out. Pass the result to any torch optimizer.
    (:func:`lrnnx_zoo.optim.grouped_parameters` with one default for every parameter.)
    """
    return grouped_parameters(model, lambda p: (base_lr, base_wd))
