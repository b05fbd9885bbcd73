"""The S4 layer: seed-style ``S4`` (transposed, returns (y, state)) and the registered uniform layer.

Both compute  y = K * u + D u  with K from :class:`~plugins.s4.kernel.HippoSSKernel` by FFT
convolution ([S4] Sec. 3.3); ``S4`` adds the standalone layer's activation, dropout and output
linear (C*H -> H channel mixing), while :class:`S4Layer` is the plain SSM the backbone wraps.

Bidirectional: the kernel gets 2C channels; the second C act anti-causally,
y_t += sum_j K1_j u_{t+1+j} (the seed's construction: K1 reversed at the end of one circular
convolution, so both directions cost one FFT pair).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from lrnnx_zoo.base import (LTI_LRNN, check_dense, check_device, check_flags, check_floating, check_not_traced,
                            check_probability, check_reals, check_size_product, check_sizes, float32_under_autocast,
                            mask_lengths_of_one_stream, mask_padding, needs_autograd, ordinary_tensor, parameter_dtype,
                            refuse_torchscript)
from lrnnx_zoo.convolution import (blocked_channel_conv, blocked_training_applies, channels_first_conv,
                                   channels_last_conv, circular_conv, fast_fft_size, kernel_taps, reversed_spectrum,
                                   swap_time_and_channels, two_sided_kernel)
from lrnnx_zoo.ssm_kernel import check_rate, kept_in_inference, kernel_final_step_state
from lrnnx_zoo.step_forms import StepForm

from . import dense
from .kernel import HippoSSKernel, check_state_pairs
from .nn import Activation, DropoutNd, LinearActivation

__all__ = ["S4", "S4Layer", "ssm_circle", "ssm_conv", "ssm_spectrum"]


def ssm_conv(u: Tensor, k: Tensor, bidirectional: bool = False, D: Optional[Tensor] = None) -> Tensor:
    """y = K * u (+ D u):  u (B, H, L), k (C, H, Lk) (2C if bidirectional), D (C, H) -> (B, C, H, L).

    Causal part y_t = sum_{j<=t} K0_j u_{t-j}; the anti-causal part (bidirectional) adds
    sum_j K1_j u_{t+1+j} (see :func:`ssm_circle`). The transforms are the core's
    :func:`~lrnnx_zoo.convolution.circular_conv`.
    """
    k, n = ssm_circle(k, u.shape[-1], bidirectional, D)
    if blocked_training_applies(u, k):    # the same bits, streamed through the cache in blocks
        return channels_first_conv(u, k, n)
    return circular_conv(u.unsqueeze(1), k, n, u.shape[-1])


def ssm_circle(k: Tensor, L: int, bidirectional: bool = False, D: Optional[Tensor] = None) -> Tuple[Tensor, int]:
    """The kernel of :func:`ssm_conv` laid on its circle: (k' (C, H, <= n), n) for inputs of L steps.

    The anti-causal half K1 (bidirectional) goes reversed at the end of an n >= L + Lk circle
    (:func:`~lrnnx_zoo.convolution.two_sided_kernel`, delay 1), so that one circular convolution
    adds sum_j K1_j u_{t+1+j}; D joins the kernel's lag 0 (one FFT
    pair computes K * u + D u).
    """
    Lk = k.shape[-1]
    if bidirectional:
        n = fast_fft_size(L + Lk)
        k = two_sided_kernel(*k.chunk(2, dim=0), n, delay=1)
    else:
        n = fast_fft_size(L + Lk - 1)
    if D is not None:
        # padded rather than cat(k[..., :1] + D, k[..., 1:]): a slice of one tap (L = 2) has a layout of its
        # own, which bound torch.export programs of a dynamic length to L != 2
        k = k + nn.functional.pad(D.unsqueeze(-1), (0, k.shape[-1] - 1))
    return k, n


def ssm_spectrum(kernel: nn.Module, L: int, Lk: int, rate: float = 1.0, bidirectional: bool = False
                 ) -> Tuple[Tensor, int]:
    """The spectrum :func:`ssm_conv` multiplies by, for inference: (Kf (C, H, n // 2 + 1), n).

    The kernel's own spectrum is cached (``SSMKernel.spectrum``). The anti-causal half is K1
    reversed and ending at the circle's last sample (:func:`~lrnnx_zoo.convolution.reversed_spectrum`
    with delay 1), so no time-domain kernel is rebuilt.
    """
    n = fast_fft_size(L + Lk) if bidirectional else fast_fft_size(L + Lk - 1)
    Kf = kernel.spectrum(Lk, n, rate)
    if not bidirectional:
        return Kf, n
    k0, k1 = Kf.chunk(2, dim=0)
    return k0 + reversed_spectrum(k1, n, delay=1), n


class S4(nn.Module):
    """Standalone-S4 layer (seed signature).

    Args:
        d_model: H.  d_state: N.  l_max: kernel length (None: the input's length).
        channels: C SSM outputs per channel, mixed back to H by the output linear.
        bidirectional: add an anti-causal kernel (no streaming), summed from the next step on,
            sum_j K1_j u_{t+1+j}, as the S4 reference's standalone layer does; FFTConv's reverse
            direction starts at u_t (the SSM run backwards), so the two differ by K1_0 u_t.
        activation: after the SSM (default gelu; "glu" halves the C*H outputs).
        postact: activation of the output linear (e.g. "glu").
        dropout / tie_dropout: dropout after the activation, one mask per (batch, channel) if tied.
        transposed: u is (B, H, L) (True) or (B, L, H).
        initializer, weight_norm: of the output linear.
        **kernel_args: :class:`HippoSSKernel` arguments (measure, rank, dt_min, dt_max,
            trainable, lr, wd, discretization, backend, measure_args, n_ssm).
    """

    sequence_layer = True       # training.param_groups: its own parameters at ssm_lr, without decay

    def __init__(self, d_model: int, d_state: int = 64, l_max: Optional[int] = None, channels: int = 1,
                 bidirectional: bool = False, activation: Optional[str] = "gelu", postact: Optional[str] = None,
                 dropout: float = 0.0, transposed: bool = True, tie_dropout: bool = False,
                 initializer: Optional[str] = None, weight_norm: bool = False, **kernel_args: Any) -> None:
        super().__init__()
        d_model, d_state, channels = check_sizes("S4", d_model=d_model, d_state=d_state, channels=channels)
        check_size_product("S4", d_model=d_model, d_state=d_state, channels=channels)
        check_flags("S4", bidirectional=bidirectional, transposed=transposed, tie_dropout=tie_dropout,
                    weight_norm=weight_norm)
        check_probability("S4", "dropout", dropout)
        # the kernel checks its own arguments too, but would name HippoSSKernel, not S4
        check_reals("S4", **{k: kernel_args[k] for k in ("dt_min", "dt_max") if k in kernel_args})
        check_state_pairs("S4", "d_state", d_state)
        if l_max is not None:
            l_max, = check_sizes("S4", l_max=l_max)
            check_size_product("S4", l_max=l_max, d_model=d_model, channels=channels)
        self.h, self.n, self.L, self.channels = d_model, d_state, l_max, channels
        self.bidirectional, self.transposed = bidirectional, transposed
        # a keyword neither S4 nor its kernel takes (the reference code's verbose=, hyper_act=) failed
        # as "HippoSSKernel.__init__() got an unexpected keyword argument", naming a class the caller never used
        taken = [k for k in inspect.signature(HippoSSKernel.__init__).parameters if k not in ("self", "H", "N", "L",
                                                                                                "channels")]
        unknown = sorted(set(kernel_args) - set(taken))
        if unknown:
            raise TypeError(f"S4 got unexpected keyword arguments {unknown}: it passes extra keywords to its "
                            f"kernel, HippoSSKernel, which takes {', '.join(taken)}")
        self.D = nn.Parameter(torch.randn(channels, d_model, dtype=parameter_dtype()))
        self.kernel = HippoSSKernel(d_model, N=d_state, L=l_max, channels=channels * (2 if bidirectional else 1),
                                    **kernel_args)
        if activation == "glu" and (channels * d_model) % 2:
            raise ValueError(f"activation='glu' halves the C*H={channels * d_model} SSM outputs, which must be even")
        # On the channel axis of (B, C*H, L) (forward) and (B, C*H) (step): a GLU here halves the
        # SSM's outputs, never time.
        self.activation = Activation(activation, dim=1)
        if dropout > 0:
            self.dropout: nn.Module = DropoutNd(dropout) if tie_dropout else nn.Dropout(dropout)
        else:
            self.dropout = nn.Identity()
        d_ssm = d_model * channels // (2 if activation == "glu" else 1)
        self.output_linear = LinearActivation(d_ssm, d_model, transposed=transposed,
                                              initializer=initializer, activation=postact, activate=True,
                                              weight_norm=weight_norm)

    @property
    def d_output(self) -> int:
        """Width of the output: d_model (H)."""
        return self.h

    @property
    def d_state(self) -> int:
        """N, the state size of each channel's system (the layer holds H * N/2 complex states)."""
        return self.n

    @property
    def state_to_tensor(self) -> Callable[[Tensor], Tensor]:
        """Maps a state (..., H, S) to a flat (..., H*S) tensor."""
        return lambda state: state.reshape(*state.shape[:-2], -1)

    def __prepare_scriptable__(self) -> "S4":
        raise refuse_torchscript("S4")

    def forward(self, u: Tensor, rate: float = 1.0, state: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        """u: (B, H, L) if transposed else (B, L, H) -> (y of the same layout, next_state).

        next_state is the state after u (B, H, N/2) when ``state`` is given, else None.
        rate: the input's sampling rate relative to training's; the kernel uses dt / rate (rate 0.5:
        half as many samples per unit time, dt doubled; the reference S4 code multiplies dt by rate).
        lengths: (B,) valid lengths of a padded batch, or None; u past them is read as zeros, so a
        bidirectional layer's reverse direction starts at each sequence's own end (as FFTConvS4).
        Other keyword arguments are accepted and ignored, as by the seed.
        """
        axis = 1 if self.transposed else 2
        check_dense(u, "S4")
        if not isinstance(u, Tensor) or u.dim() != 3 or u.shape[axis] != self.h:
            want = f"(batch, d_model={self.h}, length)" if self.transposed else f"(batch, length, d_model={self.h})"
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"S4(transposed={self.transposed}) expects u of shape {want}, got {got}")
        check_not_traced("S4")
        u = float32_under_autocast(u)
        check_floating(u, "S4")
        check_device(self, u, "S4")
        rate = check_rate(rate, "S4")
        if u.dtype != self.D.dtype:     # its linear layers, like nn.Linear, take their own dtype only
            raise TypeError(f"S4 has {self.D.dtype} parameters and got a {u.dtype} input: convert one to the "
                            f"other (u.to({self.D.dtype}) or module.to({u.dtype}))")
        if state is not None and rate != 1.0:
            # the kernel's response to the state ran at dt / rate, the next state at dt (off by 0.2 at rate 0.5)
            raise ValueError(f"state passing runs the system at rate 1 (forward_state has no rate); got rate={rate}. "
                             f"Pass state=None to evaluate at another rate")
        if state is not None and self.L is not None and u.shape[-1 if self.transposed else 1] > self.L:
            raise ValueError(f"state passing needs the kernel to cover the input: l_max={self.L} < "
                             f"L={u.shape[-1 if self.transposed else 1]}; use l_max=None, or chunks of at most "
                             f"l_max samples (the chunks then follow the untruncated system)")
        if state is not None and self.bidirectional:
            raise ValueError("state passing needs a causal layer; this S4 is bidirectional "
                             "(bidirectional=False to stream)")
        if state is not None and (not isinstance(state, Tensor) or state.dim() == 0 or state.shape[0] != u.shape[0]):
            # the kernel checks the rest of its shape; a wrong batch failed in a broadcast
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"S4 expects a state of shape (batch={u.shape[0]}, H, N/2) (default_state(batch)), "
                             f"got {got}")
        L = u.shape[-1 if self.transposed else 1]
        u = mask_lengths_of_one_stream(u, lengths, state, time_dim=2 if self.transposed else 1)
        state = ordinary_tensor(state)
        # at least the lag-0 tap (an empty kernel left the transform shorter than the input: l_max=1,
        # rate=0.3 failed in the convolution)
        Lk = kernel_taps(L, self.L, rate)
        if state is None and not needs_autograd(self, u) and self._elementwise_after_conv():
            Kf, n = ssm_spectrum(self.kernel, L, Lk, rate, self.bidirectional)
            y = blocked_channel_conv(u, Kf, n, time_dim=2 if self.transposed else 1, skip=self.D)
            CH = self.channels * self.h
            y = y.reshape(u.shape[0], CH, L) if self.transposed else y.reshape(u.shape[0], L, CH)
            return self.output_linear(self.dropout(self.activation(y))), None
        with kept_in_inference(self, u):     # a long request leaves a stored length as it was
            k, k_state = self.kernel(L=Lk, rate=rate, state=state)
        if state is None and not self.transposed and self._elementwise_after_conv() and blocked_training_applies(u, k):
            # channels_last_conv's blocked path: the convolution of the whole-tensor path below (the
            # same bits) streamed through the cache, and no layout copies (fwd+bwd at (8, 1024, 128):
            # 35.2 -> 31.1 ms). The activation then runs on (B, L, C*H), where its vectorised and
            # scalar loops split the elements differently: an ulp of difference at most.
            k, n = ssm_circle(k, L, self.bidirectional, self.D)
            y = channels_last_conv(u, k, n)                                    # (B, L, C, H)
            return self.output_linear(self.dropout(self.activation(y.flatten(2)))), None
        if not self.transposed:     # contiguous copies, not transposed views (convolution.channels_last_conv)
            u = swap_time_and_channels(u)
        B, H, L = u.shape
        y = ssm_conv(u, k, self.bidirectional, self.D)                         # (B, C, H, L)
        next_state = None
        if state is not None:
            y = y + k_state
            next_state = self.kernel.forward_state(u, state)
        y = self.dropout(self.activation(y.reshape(B, self.channels * H, L)))
        if not self.transposed:
            y = swap_time_and_channels(y)
        return self.output_linear(y), next_state

    if TYPE_CHECKING:  # nn.Module types its __call__ as (...) -> Any; this one gives forward's outputs
        __call__ = forward

    def _elementwise_after_conv(self) -> bool:
        """The activation and dropout act elementwise (so on any layout): not a GLU, no tied
        dropout mask in training."""
        return not isinstance(self.activation, nn.GLU) and (not self.training or isinstance(self.dropout, nn.Identity))

    # -- recurrent mode ------------------------------------------------------------------------
    def setup_step(self, mode: str = "dense", tol: Optional[float] = None) -> None:
        """Precompute the kernel's step form from the current parameters
        (:meth:`~lrnnx_zoo.plugins.s4.modes.StepModes.step_form`): ``mode`` "dense", "linear" (bilinear
        only), "diagonal" (a DiagonalAccuracyError when its predicted error exceeds ``tol``, default
        1e-4: LegS systems in float32 usually do) or "auto" (diagonal when accurate enough, else linear
        or dense)."""
        if self.bidirectional:
            raise ValueError("a bidirectional S4 cannot step: its output depends on future inputs")
        self.kernel.setup_step(mode, tol)

    def step(self, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """u: (B, H), state from :meth:`default_state` -> (y (B, H), next_state). Call setup_step first.

        The step runs the untruncated system: with ``l_max`` set, ``forward`` convolves with the
        kernel's first l_max taps, so a stream equals ``forward`` over its first l_max samples and
        then follows the system past the window (as state passing in chunks does)."""
        y, next_state = self.kernel.step(u, state)                  # (B, C, H)
        y = (y + self.D * u.unsqueeze(1)).reshape(u.shape[0], -1)
        y = self.activation(y)
        y = self.output_linear(y.unsqueeze(-1)).squeeze(-1) if self.transposed else self.output_linear(y)
        return y, next_state

    def default_state(self, *batch_shape: int, device: Optional[torch.device] = None) -> Tensor:
        """The zero state: (*batch_shape, H, N/2) complex (the kernel's), on ``device`` if given."""
        s = self.kernel.default_state(*batch_shape)
        return s if device is None else s.to(device)

    def extra_repr(self) -> str:
        return (f"d_model={self.h}, d_state={self.n}, l_max={self.L}, channels={self.channels}, "
                f"bidirectional={self.bidirectional}, transposed={self.transposed}")


class S4Layer(LTI_LRNN):
    """S4 (NPLR HiPPO kernel) as a registered layer: (B, L, H) -> (B, L, H),  y = K * u + D u.

    Args:
        d_model: H.  d_state: N (even).  measure, rank, measure_args: HiPPO initialisation (rank None:
            the measure's minimum, 2 for legt, else 1).
        discretization: "bilinear" (Algorithm 1) or "zoh" (dense float64 kernel).
        dt_min, dt_max: initial step range.  l_max: internal kernel length (None: set by the first input).
        bidirectional: add an anti-causal kernel (no step mode).  backend: ("cauchy", name) backend.
        trainable, lr, wd, n_ssm: see :class:`~plugins.s4.kernel.SSKernelNPLR`.
    ``step_form()`` picks the diagonal form when its predicted float32 error is below 5e-5 (the "auto"
    default of :meth:`~plugins.s4.modes.StepModes.step_form`), else the exact O(N) linear (DPLR) form
    (bilinear) or the dense form (zoh).
    """

    a_structure = "dense"

    def __init__(self, d_model: int, d_state: int = 64, measure: str = "legs", rank: Optional[int] = None,
                 discretization: str = "bilinear", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 l_max: Optional[int] = None, bidirectional: bool = False, backend: str = "auto",
                 trainable: Any = None, lr: Any = None, wd: Any = 0.0, measure_args: Optional[Dict[str, Any]] = None,
                 n_ssm: Optional[int] = None) -> None:
        d_model, d_state = check_sizes("S4Layer", d_model=d_model, d_state=d_state)
        check_size_product("S4Layer", d_model=d_model, d_state=d_state)
        check_flags("S4Layer", bidirectional=bidirectional)
        check_reals("S4Layer", dt_min=dt_min, dt_max=dt_max)
        check_state_pairs("S4Layer", "d_state", d_state)
        if l_max is not None:
            l_max, = check_sizes("S4Layer", l_max=l_max)
            check_size_product("S4Layer", l_max=l_max, d_model=d_model)
        if discretization not in ("bilinear", "zoh"):
            raise ValueError(f"S4 supports discretization 'bilinear' or 'zoh', got {discretization!r}")
        super().__init__(discretization)
        self.d_model, self.d_state, self.bidirectional = d_model, d_state, bidirectional
        self.kernel = HippoSSKernel(d_model, N=d_state, L=l_max, measure=measure, rank=rank,
                                    channels=2 if bidirectional else 1, dt_min=dt_min, dt_max=dt_max,
                                    trainable=trainable, lr=lr, wd=wd, measure_args=measure_args, n_ssm=n_ssm,
                                    discretization=discretization, backend=backend)
        self.D = nn.Parameter(torch.randn(d_model, dtype=parameter_dtype()))

    def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(A_bar (H, N, N), B_bar (H, N), C (C, H, N)) in real coordinates, float64 (see plugins.s4.dense)."""
        A_bar, b_bar = self.kernel.dense_system()
        return A_bar, b_bar, dense.output_row(self.kernel.output_matrix())

    def compute_kernel(self, L: int, rate: float = 1.0) -> Tensor:
        """K: (C, H, L) real (C = 2 if bidirectional: causal, anti-causal)."""
        return self.kernel(L=L, rate=rate)[0]

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H); padding beyond ``lengths`` is zeroed (and ignored)."""
        x = self.prepare_input(x, lengths, integration_timesteps)
        if not needs_autograd(self, x):
            Kf, n = ssm_spectrum(self.kernel, x.shape[1], x.shape[1], 1.0, self.bidirectional)
            y = blocked_channel_conv(x, Kf, n, skip=self.D.unsqueeze(0))[:, :, 0]
            return mask_padding(y, lengths)
        k, n = ssm_circle(self.compute_kernel(x.shape[1]), x.shape[1], self.bidirectional, self.D.unsqueeze(0))
        return mask_padding(channels_last_conv(x, k[0], n), lengths)

    def step_form(self) -> StepForm:
        """One step of the discretised NPLR system plus D u as a form, u (batch, H) -> y (batch, H):
        the kernel's "auto" step (:meth:`~plugins.s4.modes.StepModes.step_form`). A bidirectional
        layer has none (ValueError)."""
        if self.bidirectional:
            raise ValueError("a bidirectional S4 layer cannot stream (its output depends on future inputs); "
                             "build it with bidirectional=False to export or step it")
        return self.kernel.step_form("auto", D=self.D.unsqueeze(0))

    def prefill_scope(self, L: int) -> ContextManager[Any]:
        """The step form and the state passing share their dense work
        (:meth:`~plugins.s4.kernel.SSKernelNPLR.sharing_dense_work`)."""
        return self.kernel.sharing_dense_work(L)

    def final_step_state(self, u: Tensor, lengths: Optional[Tensor], form: nn.Module) -> Tensor:
        """The kernel's state passing (dense, float64), in ``form``'s layout (``kernel.pack_state``:
        dense, DPLR or eigen-coordinates)."""
        return kernel_final_step_state(self.kernel, form, u, lengths)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, bidirectional={self.bidirectional}"
