"""FFTConv: any registered SSM kernel as a (long) convolution, with channels, bidirectionality and
state passing (the convolution block of S4, Gu et al. 2022, "Efficiently Modeling Long Sequences
with Structured State Spaces", arXiv:2111.00396, sec. 3.3 and appendix).

For each input channel h and output channel c, with K = kernel(L): (C, H, L) and skip D: (C, H),

    y[c, h, t] = sum_{j <= t} K[c, h, t - j] u[h, j] + D[c, h] u[h, t]                (causal)
               (+ sum_{j >= t} K[C + c, h, j - t] u[h, j]                            (bidirectional))
               (+ K_state[c, h, t]   when a state x_{-1} is given: its zero-input response).

The kernel is any backend of kind "ssm_kernel" (see :mod:`lrnnx_zoo.ssm_kernel`): "s4d", "lru",
and "s4" when that plugin is installed. Two classes:

- :class:`FFTConvS4`: the seed-compatible block; (B, H, L) in, (B, C*H, L) out when ``transposed``.
- :class:`FFTConvLayer`: the uniform registered layer "fftconv", (B, L, H) -> (B, L, H).

Output layout: the (C, H) output channels are flattened channel-major, index c*H + h (as the
kernels' step forms emit them), so ``y.view(B, C, H, L)`` recovers the seed's (B, C, H, L);
``swap_channels=True`` flattens H-major instead, index h*C + c.

State formats: ``default_state`` and ``forward(x, state)`` use the kernel's own state
(*batch, H, S), complex for the diagonal kernels (x_{-1}, the state after the previous sample).
The step form carries the same state as one real vector (batch, state_size); :meth:`FFTConvS4.step`
accepts either and returns the next state in the format it was given (see :func:`pack_state`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx_zoo import hookimpl
from lrnnx_zoo.base import (LTI_LRNN, check_dense, check_flags, check_floating, check_not_traced, check_parameters_for,
                            check_probability, check_size_product, check_sizes, current_form, float32_under_autocast,
                            lasting_tensors, mask_lengths_of_one_stream, mask_padding, needs_autograd, ordinary_tensor,
                            parameter_dtype, refuse_torchscript, tensor_attributes, weights_and_versions)
from lrnnx_zoo.convolution import (blocked_channel_conv, blocked_training_applies, channels_first_conv,
                                   channels_last_conv, circular_conv, conv_size, kernel_taps, reversed_spectrum,
                                   swap_time_and_channels, two_sided_kernel)
from lrnnx_zoo.registry import get_backend
from lrnnx_zoo.ssm_kernel import (SSMKernel, check_rate, kept_in_inference, kernel_final_step_state,
                                  pack_kernel_state, passed_state_dtype, unpack_kernel_state)
from lrnnx_zoo.step_forms import SequentialStepForm, StepForm, build_dtype, step_form_dtype, stored

__all__ = ["FFTConvS4", "FFTConvLayer", "pack_state", "unpack_state", "flip_within_lengths"]


# -- helpers -----------------------------------------------------------------------------------
def flip_within_lengths(u: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Reverse time (last axis) of u: (B, ..., L), each sequence b within its first lengths[b] steps.

    Padding positions t >= lengths[b] stay where they are, so a causal pass over the flipped
    sequence reads the valid samples first and the padding only after them. It is an involution.
    """
    if lengths is None:
        return u.flip(-1)
    L = u.shape[-1]
    t = torch.arange(L, device=u.device)
    n = torch.as_tensor(lengths, device=u.device).reshape(-1, 1)
    idx = torch.where(t < n, n - 1 - t, t)                                   # (B, L)
    idx = idx.reshape(idx.shape[0], *([1] * (u.dim() - 2)), L).expand_as(u)
    return u.gather(-1, idx)


def pack_state(form: StepForm, state: Tensor, kernel: Optional[SSMKernel] = None) -> Tensor:
    """The kernel's state (B, H, S) as the step form's real state (B, state_size)
    (:func:`~lrnnx_zoo.ssm_kernel.pack_kernel_state`, through the skip term this block may add)."""
    return pack_kernel_state(_without_skip(form), state, kernel)


def unpack_state(form: StepForm, s: Tensor, like: Tensor, kernel: Optional[SSMKernel] = None) -> Tensor:
    """Inverse of :func:`pack_state`: s: (B, state_size) -> a state shaped and typed like ``like``."""
    return unpack_kernel_state(_without_skip(form), s, like, kernel)


def _unknown_arguments(cls: type, args: Dict[str, Any]) -> list:
    """The names in ``args`` that no ``__init__`` along cls's MRO names, following ``**kwargs`` to
    the base class (S4Kernel passes them on); all of them if that chain ends in ``**kwargs``.
    (Every argument given was called rejected: a valid d_state beside a stray 'dropout'.)"""
    known = set()
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters.values()
        known |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params) or klass is object:
            unknown = sorted(a for a in args if a not in known)
            return unknown or sorted(args)
    return sorted(args)


def _without_skip(form: StepForm) -> StepForm:
    return form.form if isinstance(form, _SkipStepForm) else form


class _SkipStepForm(StepForm):
    """Adds the skip term D[c, h] u[h] to a kernel step form that has no D of its own."""

    def __init__(self, form: StepForm, D: Tensor) -> None:
        super().__init__()
        self.form = form
        self.state_size, self.d_input, self.d_output = form.state_size, form.d_input, form.d_output
        self.register_buffer("D", stored(D).clone())   # (C, H)

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        y, s_next = self.form(u, s)
        return y + (self.D * u.unsqueeze(1)).reshape(u.shape[0], -1), s_next


# -- the seed-compatible block -----------------------------------------------------------------
class FFTConvS4(nn.Module):
    """FFT convolution with the kernel of a registered SSM (seed API of lrnnx / S4's FFTConv).

    Args:
        d_model: H input channels.
        l_max: kernel length. None: a global kernel as long as each input. An int: a kernel of
            that length at rate 1, of the same duration at other rates (round(l_max * rate) taps, as
            S4's); shorter than the input it is a finite-window convolution. Steps and state
            passing run the untruncated system: they agree with it over a stream's first l_max
            samples only (state passing refuses a longer input; it takes shorter chunks).
        channels: C outputs per input channel; the output has C*H channels.
        swap_channels: flatten the (C, H) output H-major (h*C + c) instead of channel-major (c*H + h).
        transposed: x is (B, H, L) (True) or (B, L, H) (False); y follows the same convention.
        dropout: dropout on the output (training only).  tie_dropout: one mask per (batch, channel),
            shared by every time step.  drop_kernel: dropout on the kernel entries (training only).
        kernel_type: name of a registered ("ssm_kernel", name) backend; default "s4d".
        param_config: dict of kernel constructor arguments (d_state, init, dt_min, ...).
        kernel: alias of ``kernel_type`` (seed compatibility).
        bidirectional: the kernel gets 2*C channels; the second C run over the reversed sequence
            and are added to the first C, so y[t] sees the whole input (non-causal; no streaming).
            The reverse direction starts at u[t] (sum_{j >= t}); the standalone ``S4`` layer's
            starts at u[t + 1], as the S4 reference's does.
        **kernel_args: more kernel constructor arguments (override ``param_config``).

    Shapes: x (B, H, L) -> y (B, C*H, L) if transposed, else (B, L, H) -> (B, L, C*H).
    """

    sequence_layer = True       # training.param_groups: its own parameters at ssm_lr, without decay

    def __init__(self, d_model: int, l_max: Optional[int] = None, channels: int = 1,
                 swap_channels: bool = False, transposed: bool = True, dropout: float = 0.0,
                 tie_dropout: bool = False, drop_kernel: float = 0.0, kernel_type: Optional[str] = None,
                 param_config: Optional[Dict[str, Any]] = None, kernel: Optional[str] = None,
                 bidirectional: bool = False, **kernel_args: Any) -> None:
        super().__init__()
        if kernel_type is not None and kernel is not None and kernel_type != kernel:
            raise ValueError(f"kernel_type={kernel_type!r} and kernel={kernel!r} disagree; `kernel` is an alias "
                             f"of `kernel_type`: give one of them")
        d_model, channels = check_sizes("FFTConvS4", d_model=d_model, channels=channels)
        check_flags("FFTConvS4", swap_channels=swap_channels, transposed=transposed, tie_dropout=tie_dropout,
                    bidirectional=bidirectional)
        if l_max is not None:
            l_max, = check_sizes("FFTConvS4", l_max=l_max)
            check_size_product("FFTConvS4", l_max=l_max, d_model=d_model, channels=channels)
        check_probability("FFTConvS4", "dropout", dropout)
        check_probability("FFTConvS4", "drop_kernel", drop_kernel)
        self.d_model, self.H, self.L, self.channels = d_model, d_model, l_max, channels
        self.swap_channels, self.transposed, self.bidirectional = swap_channels, transposed, bidirectional
        self.dropout, self.tie_dropout, self.drop_kernel = dropout, tie_dropout, drop_kernel
        self.kernel_type = kernel_type or kernel or "s4d"
        cls = get_backend("ssm_kernel", self.kernel_type)   # unknown names list the registered kernels
        if param_config is not None and not isinstance(param_config, dict):
            raise TypeError(f"FFTConvS4 needs param_config to be a dict of kernel arguments or None, got "
                            f"{param_config!r} ({type(param_config).__name__})")
        args = {**(param_config or {}), **kernel_args}
        try:
            self.kernel: SSMKernel = cls(d_model, channels=channels * (2 if bidirectional else 1), **args)
        except TypeError as exc:
            raise TypeError(f"kernel {self.kernel_type!r} ({cls.__name__}) rejected the arguments "
                            f"{_unknown_arguments(cls, args)}: {exc}. It takes {inspect.signature(cls.__init__)}") from exc
        self.D = nn.Parameter(torch.randn(channels, d_model, dtype=parameter_dtype()))
        self._step: Optional[StepForm] = None

    @property
    def d_output(self) -> int:
        """Width of the output: channels * d_model (flattened c*H + h, or h*C + c with swap_channels)."""
        return self.channels * self.d_model

    # -- convolution mode --------------------------------------------------------------------
    def forward(self, x: Tensor, state: Optional[Tensor] = None, rate: float = 1.0,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """x: (B, H, L) if transposed else (B, L, H) -> (y, next_state).

        y: (B, C*H, L) / (B, L, C*H) (see the module docstring for the channel order).
        state: (B, H, S) kernel state x_{-1} (``default_state``), or None. next_state: the state
        after the last sample (``kernel.forward_state``), or None when ``state`` is None.
        rate: relative sampling rate of x (the kernel uses dt / rate); state passing needs rate 1.
        lengths: (B,) valid lengths: x past them is read as zeros, so the reverse direction of a
            bidirectional block starts at each sequence's own end (as if each were reversed
            within its length); the outputs past them are not masked.
        """
        u = self._to_bhl(x)
        # always here: l_max * rate is rounded below (nan, inf and tensors failed there), and the
        # kernel's own check ran only when its cache missed (a warm one took rate=True, and failed on
        # a tensor of rates with "Boolean value of Tensor ... is ambiguous")
        rate = check_rate(rate, "FFTConvS4")
        B, H, L = u.shape
        if lengths is not None:               # a float or too large one failed in gather, or was taken as given
            u = mask_lengths_of_one_stream(u, lengths, state, time_dim=2)
            x = u if self.transposed else u.transpose(1, 2)
        if state is not None:
            self._check_streamable("state passing")
            state = ordinary_tensor(state)
            if rate != 1.0:
                raise ValueError(f"state passing runs the system at rate 1 (forward_state has no rate); "
                                 f"got rate={rate}. Pass state=None to evaluate at another rate")
            if self.L is not None and self.L < L:
                # Chunks of at most l_max samples pass, but run the untruncated system: beyond l_max
                # samples of a stream they leave forward's window (1-18% off it at l_max=10, L=30).
                raise ValueError(f"state passing needs the kernel to cover the input: l_max={self.L} < L={L}. "
                                 f"Use l_max=None to stream; chunks of at most l_max samples follow the "
                                 f"untruncated system, which agrees with this block's forward over the first "
                                 f"l_max={self.L} samples of a stream only")
            self._check_kernel_state(state, B, "FFTConvS4")     # else a broadcast error in the kernel
        Lk = kernel_taps(L, self.L, rate)
        if self._inference_conv(x, state):
            return self._blocked_forward(x, L, Lk, rate), None
        with kept_in_inference(self, x):     # a long request leaves a stored length as it was
            K, K_state = self.kernel.checked_forward(L=Lk, rate=rate, state=state)   # (C', H, Lk)
        if self.training and self.drop_kernel > 0:
            K = F.dropout(K, self.drop_kernel, training=True)
        C, n = self.channels, conv_size(L, Lk)
        # Bidirectional, both directions share one transform pair on the circle (two_sided_kernel,
        # as inference's reversed_spectrum). With lengths, x past them is zero, so the reverse
        # direction's sum starts at each sequence's own end without flipping each sequence.
        k = two_sided_kernel(K[:C], K[C:], n) if self.bidirectional else K[:C]
        if self._blocked_training(x, K, state):
            # the convolution's blocked training path makes the same transforms, products and sums
            # per channel (D u and D's gradient included) as the whole-tensor one below: the same bits
            if not self.transposed:
                return channels_last_conv(x, k, n, skip=self.D).flatten(2), None           # channel-major
            return self._output_dropout(self._flatten(channels_first_conv(x, k, n, skip=self.D))), None
        if not self.transposed:     # contiguous copies, not transposed views (convolution.channels_last_conv)
            u = swap_time_and_channels(x)
        y = circular_conv(u.unsqueeze(1), k, n, L)                           # (B, C, H, L)
        y = y + self.D.unsqueeze(-1) * u.unsqueeze(1)
        if K_state is not None:
            y = y + K_state
        y = self._output_dropout(self._flatten(y))                            # (B, C*H, L)
        next_state = None if state is None else self.kernel.forward_state(u, state)
        return (y if self.transposed else swap_time_and_channels(y)), next_state

    if TYPE_CHECKING:  # nn.Module types its __call__ as (...) -> Any; this one gives forward's outputs
        __call__ = forward

    def _output_dropout(self, y: Tensor) -> Tensor:
        """Dropout of the (B, C*H, L) output in training, its mask tied along time if tie_dropout."""
        if self.training and self.dropout > 0:
            shape = y.shape[:2] + (1,) if self.tie_dropout else y.shape
            keep = torch.rand(shape, device=y.device) >= self.dropout
            y = y * keep.to(y.dtype) / (1 - self.dropout)
        return y

    def _blocked_training(self, x: Tensor, K: Tensor, state: Optional[Tensor]) -> bool:
        """Whether a training forward can take the convolution's blocked path
        (:func:`~lrnnx_zoo.convolution.channels_first_conv`, or
        :func:`~lrnnx_zoo.convolution.channels_last_conv` for (B, L, H) in and (B, L, C*H) out
        channel-major): no state, and a CPU graph it serves (eager or compiled). Channels-last, no
        output dropout either: its mask is drawn in the (B, C*H, L) layout."""
        channels_last_ok = not (self.swap_channels and self.channels > 1) and not (self.training and self.dropout > 0)
        return (self.transposed or channels_last_ok) and state is None and blocked_training_applies(x, K, self.D)

    def _inference_conv(self, x: Tensor, state: Optional[Tensor]) -> bool:
        """Whether forward can take the blocked inference convolution: no graph, no state, no dropout."""
        dropping = self.training and (self.drop_kernel > 0 or self.dropout > 0)
        return state is None and not dropping and isinstance(self.kernel, SSMKernel) and not needs_autograd(self, x)

    def _blocked_forward(self, x: Tensor, L: int, Lk: int, rate: float) -> Tensor:
        """Inference forward through :func:`~lrnnx_zoo.convolution.blocked_channel_conv`.

        The reverse direction sum_{j>=t} K1_{j-t} u_j is K1 reversed on the same circle
        (:func:`~lrnnx_zoo.convolution.reversed_spectrum`, no delay).
        """
        n = conv_size(L, Lk)
        Kf = self.kernel.spectrum(Lk, n, rate)                              # (C', H, n//2+1)
        C = self.channels
        if self.bidirectional:
            Kf = Kf[:C] + reversed_spectrum(Kf[C:], n)
        y = blocked_channel_conv(x, Kf, n, time_dim=2 if self.transposed else 1, skip=self.D)
        if self.transposed:                                                 # (B, C, H, L)
            return self._flatten(y)
        # (B, L, C, H): channel-major flattening is a view; swap_channels wants H-major
        y = y.transpose(2, 3) if self.swap_channels else y
        return y.reshape(y.shape[0], L, self.d_output)

    def __prepare_scriptable__(self) -> "FFTConvS4":
        raise refuse_torchscript("FFTConvS4")

    def _to_bhl(self, x: Tensor) -> Tensor:
        check_dense(x, "FFTConvS4")
        ok = isinstance(x, Tensor) and x.dim() == 3 and x.shape[1 if self.transposed else 2] == self.d_model
        if not ok:
            want = f"(batch, d_model={self.d_model}, length)" if self.transposed else \
                f"(batch, length, d_model={self.d_model})"
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FFTConvS4(transposed={self.transposed}) expects x of shape {want}, got {got}")
        check_not_traced("FFTConvS4")
        x = float32_under_autocast(x)
        check_floating(x, "FFTConvS4")
        check_parameters_for(self, x, "FFTConvS4")
        return x if self.transposed else x.transpose(1, 2)

    def _flatten(self, y: Tensor) -> Tensor:
        """(B, C, H, ...) -> (B, C*H, ...) channel-major, or H-major with swap_channels."""
        if self.swap_channels:
            y = y.transpose(1, 2)
        return y.reshape(y.shape[0], self.d_output, *y.shape[3:])

    def _check_kernel_state(self, state: Any, batch: int, who: str, packed_size: Optional[int] = None) -> None:
        """Raise unless ``state`` is a kernel state of shape (batch, H, S), as ``default_state(batch)``
        makes it (or, given ``packed_size``, say that the step form's real state is accepted too)."""
        expected = (batch, *self.kernel.default_state(0).shape[1:])
        if isinstance(state, Tensor) and state.shape == expected:
            return
        got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
        packed = "" if packed_size is None else f", or the step form's real state (batch, state_size) = " \
                                                f"{(batch, packed_size)}"
        raise ValueError(f"{who} expects a state of shape (batch, H, S) = {expected}, as default_state({batch}) "
                         f"makes it{packed}, got {got}")

    def _check_streamable(self, what: str) -> None:
        if self.bidirectional:
            raise ValueError(f"{what} is impossible for a bidirectional FFTConvS4: its output at t depends on "
                             f"the future inputs. Use bidirectional=False to stream")

    @torch.no_grad()
    def resample_(self, rate: float) -> None:
        """Make this block, in place, its system sampled at ``rate``: the kernel's
        (:meth:`~lrnnx_zoo.ssm_kernel.SSMKernel.resample_`), and a window l_max of the same duration,
        :func:`~lrnnx_zoo.convolution.kernel_taps` of it at that rate (round(l_max * rate), at least 1).
        Then ``forward(x)`` equals the old ``forward(x, rate=rate)``."""
        rate = check_rate(rate, "FFTConvS4.resample_")
        self.kernel.resample_(rate)
        if self.L is not None:
            self.L = kernel_taps(math.inf, self.L, rate)      # the window's taps, whatever the input's length
        self._mark_stale()                            # the old system's step form

    # -- recurrent mode ----------------------------------------------------------------------
    def default_state(self, *batch_shape: int, device: Optional[torch.device] = None) -> Tensor:
        """Zero kernel state (*batch_shape, H, S) for ``forward(x, state)`` and ``step``."""
        self._check_streamable("state passing")
        s = self.kernel.default_state(*batch_shape)
        return s if device is None else s.to(device)

    def step_form(self) -> StepForm:
        """The discretised system with the skip D, (B, H) -> (B, C*H) channel-major (no swap)."""
        self._check_streamable("step mode")
        form = self.kernel.step_form
        if "D" in inspect.signature(form).parameters:
            return form(D=self.D)
        return _SkipStepForm(form(), self.D)

    def setup_step(self) -> None:
        """Precompute the step form from the current parameters (call again after they change),
        in their dtype (of ordinary tensors, also under inference_mode: :func:`~lrnnx_zoo.base.lasting_tensors`)."""
        with lasting_tensors(), step_form_dtype(self.D.dtype):
            form = self.step_form()
        # Kept out of the module tree: a validation-time setup_step must not add keys to the
        # state_dict (strict loading failed both ways); a device move or cast drops it (_apply).
        object.__setattr__(self, "_step", form)
        object.__setattr__(self, "_step_weights", weights_and_versions(self))
        object.__setattr__(self, "_step_stale", False)

    def _mark_stale(self) -> None:
        """New weights (load_state_dict, resample_): a step form in use is dropped, and step() refuses
        the old stream until setup_step() (it rebuilt the form silently and stepped the old state on with
        the new weights, 2.5 off). A flag, not a sentinel object: it survives copies and pickles."""
        if self._step is not None or self.__dict__.get("_step_stale"):
            object.__setattr__(self, "_step_stale", True)
        object.__setattr__(self, "_step", None)

    def _apply(self, fn, recurse=True):
        # .to(device), .cuda(), .double(), ... move and cast the parameters; the step form, kept
        # out of the module tree, would keep the old device and dtype (a device-mismatch error at
        # the next step after model.cuda()), so it is rebuilt for the moved parameters. Dropped, a
        # running stream lost its weight check: after a no-op .cpu(), load_state_dict, resample_ and
        # in-place edits stepped the old state on with the new weights (1.3-2.1 off, silently).
        running = self._step is not None and not self.__dict__.get("_step_stale")
        if running:
            try:        # weights changed since setup_step: the stream belongs to the old system
                current_form(self, self._step, self._step_weights, self.step_form, self.D.dtype, lambda: "")
            except RuntimeError:
                running = False
                object.__setattr__(self, "_step_stale", True)
        out = super()._apply(fn, recurse)
        object.__setattr__(self, "_step", None)
        if running:
            try:
                self.setup_step()       # the same system, moved: the stream goes on
            except Exception:           # e.g. a dtype the step forms do not take: step() says so
                pass
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # New weights: a step form built (by setup_step or a first step) from the old ones kept
        # stepping with them, silently (off by O(1) after load_state_dict); then a rebuilt one stepped
        # the old weights' state on with the new (2.5 off, silently). step() now asks for setup_step.
        super()._load_from_state_dict(*args, **kwargs)
        self._mark_stale()

    def step(self, x: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One time step (no dropout).  x: (B, H) -> y: (B, C*H) (channel order as in forward).

        state: the kernel state (B, H, S) (``default_state``, or a next_state of ``forward``),
        or the step form's packed real state (B, state_size); the next state comes back in the
        same format and dtype (a real (B, H, S) state of a kernel whose state is complex is read as
        complex of its precision, and its next state is complex). The step runs in the parameters'
        precision whatever the state's. Runs ``setup_step`` on first use.
        """
        self._check_streamable("step mode")
        if self.__dict__.get("_step_stale"):
            raise RuntimeError("FFTConvS4.step: its weights were replaced since setup_step() (load_state_dict, "
                               "resample_, or changed before a .to()), so a state from before belongs to another "
                               "system; call setup_step() again and restart the stream from default_state(batch)")
        if self._step is None:
            self.setup_step()
        else:
            form, weights = current_form(
                self, self._step, self._step_weights, self.step_form, self.D.dtype,
                lambda: "FFTConvS4.step: its weights changed since setup_step() (an optimiser step or an in-place "
                "edit), so its step form is stale; call setup_step() again and restart the stream from "
                "default_state(batch)")
            object.__setattr__(self, "_step", form)
            object.__setattr__(self, "_step_weights", weights)
        form = self._step
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FFTConvS4.step expects x of shape (batch, d_model={self.d_model}), got {got}")
        if x.dtype != self.D.dtype:
            # An integer x was cast silently, a float64 x on a float32 form promoted to float32 precision.
            check_floating(x, "FFTConvS4.step", autocast_hint=False)
            raise TypeError(f"FFTConvS4.step: its step form holds {self.D.dtype}, as its parameters, got x of "
                            f"{x.dtype}; convert x (x.to({self.D.dtype})) or the module (.to({x.dtype}))")
        packed = isinstance(state, Tensor) and state.dim() == 2 and not state.is_complex()
        if not (packed and state.shape == (x.shape[0], form.state_size)):
            # A kernel state of another shape but as many entries (H and S swapped, (B, 1, H*S)) was
            # packed in a scrambled layout and stepped on, 0.36-1.3 off relative, without a word.
            self._check_kernel_state(state, x.shape[0], "FFTConvS4.step", form.state_size)
        if not packed and not state.is_complex() and self.kernel.default_state(0).is_complex():
            # A real (B, H, S) state (torch.zeros(B, H, S)) of a kernel whose state is complex: its next
            # state has imaginary parts, which unpacking into the real dtype given dropped (steps from
            # torch.zeros were 51% off with the s4d kernel, 27% with lru; the s4 kernel failed on it).
            state = state.to(passed_state_dtype(state))
        # In the form's precision, the next state in the given one's dtype (passed_state_dtype): a packed
        # float64 state promoted the diagonal forms' arithmetic and failed in the dense form's matmul
        s = state.to(self.D.dtype) if packed else pack_state(form, state, self.kernel)
        y, s_next = form(x, s)
        if self.swap_channels:
            y = y.reshape(-1, self.channels, self.d_model).transpose(1, 2).reshape(-1, self.d_output)
        return y, (s_next.to(state.dtype) if packed else unpack_state(form, s_next, state, self.kernel))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, l_max={self.L}, channels={self.channels}, kernel={self.kernel_type!r}, "
                f"transposed={self.transposed}, bidirectional={self.bidirectional}")


# -- the uniform registered layer --------------------------------------------------------------
class FFTConvLayer(LTI_LRNN):
    """The registered layer "fftconv": (B, L, H) -> (B, L, H).

    y = W flatten_c(FFTConvS4(x)) + b when channels > 1 or bidirectional (a Linear C*H -> H mixing
    the channels), else the FFTConvS4 output itself.

    Args:
        d_model: H.  d_state: the kernel's d_state.  kernel_type: registered "ssm_kernel" name.
        channels: C.  bidirectional: non-causal (cannot stream).  l_max: kernel length (None: global).
        **kernel_args: more kernel constructor arguments (init, dt_min, backend, r_max, ...).
    """

    def __init__(self, d_model: int, d_state: int = 64, kernel_type: str = "s4d", channels: int = 1,
                 bidirectional: bool = False, l_max: Optional[int] = None, **kernel_args: Any) -> None:
        super().__init__(None)
        d_model, d_state = check_sizes("fftconv", d_model=d_model, d_state=d_state)   # FFTConvS4 checks channels
        check_size_product("fftconv", d_model=d_model, d_state=d_state)
        check_flags("fftconv", bidirectional=bidirectional)     # before FFTConvS4 would name itself
        self.d_model, self.d_state, self.bidirectional = d_model, d_state, bidirectional
        self.conv = FFTConvS4(d_model, l_max=l_max, channels=channels, transposed=False, kernel_type=kernel_type,
                              bidirectional=bidirectional, param_config={"d_state": d_state, **kernel_args})
        self.mix = (nn.Linear(channels * d_model, d_model, dtype=parameter_dtype())
                    if channels > 1 or bidirectional else None)

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H); lengths: (B,) valid lengths (padding outputs are zero)."""
        x = float32_under_autocast(x)
        self.check_input(x, lengths)
        self.check_timesteps(integration_timesteps)
        y, _ = self.conv(x, lengths=lengths)        # FFTConvS4 zeroes x past the lengths itself
        if self.mix is not None:
            # in the wider of y's and the weights' dtypes, as the convolution (a float64 input to a
            # float32 layer failed here with "mat1 and mat2 must have the same dtype")
            w, b = self.mix.weight, self.mix.bias
            y = self.mix(y) if y.dtype == w.dtype else F.linear(y, w.to(y.dtype), b.to(y.dtype))
        return mask_padding(y, lengths)

    def resample_(self, rate: float) -> Dict[str, Any]:
        """:meth:`FFTConvS4.resample_`; returns the new window {"l_max": ...} when the layer has one
        (a constructor argument, counted in samples)."""
        self.conv.resample_(rate)
        return {} if self.conv.L is None else {"l_max": self.conv.L}

    def discretize(self) -> Any:
        """The kernel's discrete system (its own ``discretize``; family-specific tuple)."""
        fn = getattr(self.conv.kernel, "discretize", None)
        if fn is None:
            raise NotImplementedError(f"kernel {self.conv.kernel_type!r} exposes no discretize()")
        return fn()

    def compute_kernel(self, L: int, rate: float = 1.0) -> Tensor:
        """The kernel forward convolves a length-L input with: K: (C, H, L), or (2C, H, L) for a
        bidirectional layer (second half: reverse direction); with l_max, zero after its window's
        :func:`~lrnnx_zoo.convolution.kernel_taps` taps (forward never reads those)."""
        K = self.conv.kernel(L=L, rate=rate)[0]
        taps = kernel_taps(L, self.conv.L, rate)
        # the untruncated kernel was returned: its taps past l_max were not the layer's (forward's are 0)
        return K if taps >= L else F.pad(K[..., :taps], (0, L - taps))

    def step_form(self) -> StepForm:
        """SequentialStepForm(kernel step form with D, copy of the channel-mixing Linear)."""
        if self.bidirectional:
            raise ValueError("a bidirectional fftconv layer cannot stream or be exported as a step graph: "
                             "its output at t depends on later inputs. Build it with bidirectional=False")
        if self.conv.L is not None:
            raise ValueError(f"an fftconv layer with l_max={self.conv.L} cannot stream: its forward convolves with "
                             f"the kernel cut to {self.conv.L} taps, which a recurrence does not do (its impulse "
                             f"response never ends), so steps beyond {self.conv.L} would disagree. "
                             f"Build it with l_max=None to stream or export")
        core = self.conv.step_form()
        if self.mix is None:
            return core
        # A copy of the mix (a subclass adding a low-rank term keeps it), in the build dtype as the core's
        # matrices (in the layer's own, a float64 cache of a float32 layer failed in its matmul). A pruned
        # or hook-based weight_norm mix holds a computed (non-leaf) weight, which deepcopy refuses: such
        # attributes are copied as plain tensors.
        computed = {id(t): t.detach().clone() for _, _, t in tensor_attributes(self.mix) if t.grad_fn is not None}
        mix = copy.deepcopy(self.mix, computed).requires_grad_(False).to(build_dtype())
        return SequentialStepForm(core, mix)

    def prefill_scope(self, L: int) -> ContextManager[Any]:
        """The kernel's :meth:`~lrnnx_zoo.ssm_kernel.SSMKernel.sharing_dense_work` (S4's A_bar and its
        squares serve the step form and the state passing)."""
        share = getattr(self.conv.kernel, "sharing_dense_work", None)   # a third-party kernel may lack it
        return share(L) if share is not None else contextlib.nullcontext()

    def final_step_state(self, u: Tensor, lengths: Optional[Tensor], form: nn.Module) -> Tensor:
        """The kernel's state passing (one pass over u), packed for the kernel's step form (the
        first part of ``form`` when a channel mix follows it): u: (B, L, H), lengths: (B,) or None ->
        (B, state_size)."""
        core = form.parts[0] if isinstance(form, SequentialStepForm) else form
        return kernel_final_step_state(self.conv.kernel, _without_skip(core), u, lengths)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, mix={self.mix is not None}"


@hookimpl
def lrnnx_zoo_register_layers(registry) -> None:
    registry.add_layer("fftconv", FFTConvLayer)
