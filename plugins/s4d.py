"""S4D: the diagonal state-space layer (Gu, Gupta, Goel, Ré 2022, "On the Parameterization and
Initialization of Diagonal State Space Models", arXiv:2206.11893).

Each of the H channels is a single-input system with N/2 complex modes standing for N real states
(conjugate-pair halving). After discretization (zoh, eq. 4; or bilinear) the convolution kernel is
the Vandermonde product  (eq. 5)

    K[h, l] = 2 Re( sum_n C[h, n] B_bar[h, n] A_bar[h, n]^l ),      y = K * u + D u.

Initialisations (sec. 4): lin (S4D-Lin), inv (S4D-Inv), legs (S4D-LegS, from the HiPPO-LegS
normal part), real (S4D-Real) and random.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from lrnnx_zoo import hookimpl
from lrnnx_zoo.base import (LTI_LRNN, check_reals, check_size_product, check_sizes, mask_padding, needs_autograd,
                            parameter_dtype)
from lrnnx_zoo.convolution import blocked_channel_conv, channels_last_conv, conv_size
from lrnnx_zoo.kernels.vandermonde import vandermonde, vandermonde_keops, vandermonde_torch
from lrnnx_zoo.modal import ChannelModalKernel
from lrnnx_zoo.discretization import get_discretization
from lrnnx_zoo.registry import get_backend, initial_values
from lrnnx_zoo.ssm_kernel import kernel_final_step_state
from lrnnx_zoo.step_forms import ChannelDiagonalStepForm

# The layer, its kernel and initializers; not the hooks, which a star import would re-register
# under the importing plugin's name.
__all__ = ["S4D", "S4DKernel", "init_lin", "init_inv", "init_legs", "init_real", "init_random"]


# -- initializers: fn(H, N_half) -> (A (H, N_half) complex128, B (H, N_half) complex128) ----------
def _n(H: int, M: int) -> Tensor:
    return torch.arange(M, dtype=torch.float64).expand(H, M)


def init_lin(H: int, M: int) -> Tuple[Tensor, Tensor]:
    """S4D-Lin: A_n = -1/2 + i pi n (eq. 8)."""
    return torch.complex(torch.full((H, M), -0.5, dtype=torch.float64), math.pi * _n(H, M)), \
        torch.ones(H, M, dtype=torch.complex128)


def init_inv(H: int, M: int) -> Tuple[Tensor, Tensor]:
    """S4D-Inv: A_n = -1/2 + i (N/pi) (N/(2n+1) - 1), N = 2M real states (eq. 7)."""
    N = 2 * M
    imag = N / math.pi * (N / (2 * _n(H, M) + 1) - 1)
    return torch.complex(torch.full((H, M), -0.5, dtype=torch.float64), imag), \
        torch.ones(H, M, dtype=torch.complex128)


def init_legs(H: int, M: int) -> Tuple[Tensor, Tensor]:
    """S4D-LegS: the eigenvalues of the normal part of HiPPO-LegS and B in its eigenbasis (sec. 4.1)."""
    from lrnnx_zoo.hippo import nplr
    w, _, B, _ = nplr("legs", 2 * M, dtype=torch.double)
    return w.to(torch.complex128).expand(H, M).clone(), B.to(torch.complex128).expand(H, M).clone()


def init_real(H: int, M: int) -> Tuple[Tensor, Tensor]:
    """S4D-Real: A_n = -(n + 1), real eigenvalues."""
    return torch.complex(-(_n(H, M) + 1), torch.zeros(H, M, dtype=torch.float64)), \
        torch.ones(H, M, dtype=torch.complex128)


def init_random(H: int, M: int) -> Tuple[Tensor, Tensor]:
    """Random: Re A = -exp(N(0, 1)) (stable), Im A = pi N(0, 1)."""
    return torch.complex(-torch.exp(torch.randn(H, M, dtype=torch.float64)),
                         math.pi * torch.randn(H, M, dtype=torch.float64)), \
        torch.ones(H, M, dtype=torch.complex128)


def init_modes(init: str, H: int, M: int) -> Tuple[Tensor, Tensor]:
    """(A, B) (H, M) complex128 from the initializer ("s4d", init), and a ValueError saying what was
    expected if it returns something else (:func:`~lrnnx_zoo.registry.initial_values`): real tensors
    failed as "imag is not implemented", and Re(A) >= 0 gave NaN outputs (log(-Re A) is a parameter)."""
    out = initial_values("s4d", init, "(A, B)", [(H, M), (H, M)], f"d_model={H}, d_state={2 * M}", H, M)
    A, B = (t.detach().to(torch.complex128) for t in out)     # real values are taken as complex ones
    # (not on the meta device, where a layer is built without data: nothing to check there)
    if A.device.type != "meta" and not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
                                        and bool((A.real < 0).all())):
        raise ValueError(f"the s4d initializer {init!r} must return finite A and B with Re(A) < 0 (a stable system: "
                         f"S4D keeps log(-Re A)); got Re(A) up to {A.real.max().item():.3g}")
    return A, B


class S4DKernel(ChannelModalKernel):
    """Parameters and kernel of H diagonal systems with ``channels`` outputs each (eq. 5).

    Args:
        d_model: H.  d_state: N real states (N/2 complex modes).  channels: C outputs per channel.
        init, discretization, dt_min, dt_max, backend: as for :class:`S4D`.
    State for state passing: (B, H, N/2) complex, the previous step's x.
    """

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, init: str = "legs",
                 discretization: str = "zoh", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 backend: str = "auto") -> None:
        super().__init__()
        d_model, d_state, channels = check_sizes("S4DKernel", d_model=d_model, d_state=d_state, channels=channels)
        check_size_product("S4DKernel", d_model=d_model, d_state=d_state, channels=channels)
        check_reals("S4DKernel", dt_min=dt_min, dt_max=dt_max)
        if discretization not in ("zoh", "bilinear"):
            raise ValueError(f"S4D supports discretization 'zoh' or 'bilinear', got {discretization!r}")
        if d_state < 2 or d_state % 2:
            raise ValueError(f"S4D d_state counts real states in conjugate pairs: an even number >= 2, got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"S4D needs 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.channels = d_model, d_state, channels
        self.init, self.backend, self.discretization = init, backend, discretization
        self.discretize_fn = get_discretization(discretization)
        get_backend("vandermonde", backend)  # unknown names fail here, listing the valid ones
        H, M = d_model, d_state // 2
        A, B = init_modes(init, H, M)
        log_dt = torch.rand(H, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        real = parameter_dtype()
        self.log_dt = nn.Parameter(log_dt.to(real))
        self.A_real_log = nn.Parameter(torch.log(-A.real).to(real))
        # a copy: in float64, A.imag.to(real) is a strided view holding A's whole complex storage (a
        # non-contiguous parameter of twice its size; at d_model=1, d_state=2 a (1, 1) of strides (2, 2))
        self.A_imag = nn.Parameter(A.imag.to(real, copy=True, memory_format=torch.contiguous_format))
        self.B = nn.Parameter(torch.view_as_real(B).to(real))
        # C ~ CN(0, 1): each part N(0, 1/2).
        self.C = nn.Parameter(torch.randn(channels, H, M, 2, dtype=real) * math.sqrt(0.5))

    def continuous(self, dtype: torch.dtype = torch.complex64) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """A, B: (H, N/2) complex;  C: (C, H, N/2) complex;  dt: (H, 1) real."""
        real = torch.float64 if dtype == torch.complex128 else self.A_real_log.dtype
        A = torch.complex(-torch.exp(self.A_real_log.to(real)), self.A_imag.to(real))
        B = torch.view_as_complex(self.B.to(real))
        C = torch.view_as_complex(self.C.to(real))
        return A, B, C, torch.exp(self.log_dt.to(real)).unsqueeze(-1)

    def discretize(self, rate: float = 1.0, dtype: torch.dtype = torch.complex64) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A_bar, B_bar): (H, N/2), C: (C, H, N/2), and log A_bar: (H, N/2), at sampling rate ``rate``."""
        A, B, C, dt = self.continuous(dtype)
        dt = dt / rate
        A_bar, B_bar = self.discretize_fn(A, B, dt)
        # zoh: log A_bar = dt A exactly, without the branch cut of log. Bilinear: a pole at exactly 0
        # (dt A = -2) has log -inf, and its 0-th power exp(0 * -inf) was NaN in every output: its log is
        # taken at the smallest normal number instead (powers 1, ~1e-308, 0, ...; the same in float32).
        if self.discretization == "zoh":
            log_A_bar = dt * A
        else:
            log_A_bar = torch.log(A_bar.masked_fill(A_bar == 0, torch.finfo(A_bar.real.dtype).tiny))
        return A_bar, B_bar, C, log_A_bar

    def modes(self, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A_bar, log A_bar, B_bar): (H, N/2), and 2 C: (C, H, N/2) (the factor 2 restores the
        conjugate halves: y = 2 Re(C x)), complex128, at sampling rate ``rate`` (eq. 5)."""
        A_bar, B_bar, C, log_A = self.discretize(rate, dtype=torch.complex128)
        return A_bar, log_A, B_bar, 2 * C

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, channels={self.channels}, init={self.init!r}, "
                f"discretization={self.discretization!r}, backend={self.backend!r}")


class S4D(LTI_LRNN):
    """Diagonal SSM layer on (B, L, H) sequences:  y = K * u + D u  (one output per channel).

    Args:
        d_model: H channels.
        d_state: N real states per channel (N/2 complex modes).
        init: registered S4D initializer: lin, inv, legs, real, random.
        discretization: "zoh" or "bilinear".
        dt_min, dt_max: range of the learnable step, log-uniform at initialisation.
        backend: Vandermonde backend "torch", "keops" or "auto".

    Example (a sequence, then one step of a stream; the step state holds the N/2 complex modes of
    each channel as real pairs, N * H numbers):

        >>> import torch
        >>> from lrnnx_zoo.plugins.s4d import S4D
        >>> layer = S4D(d_model=8, d_state=16)
        >>> layer(torch.randn(2, 100, 8)).shape
        torch.Size([2, 100, 8])
        >>> cache = layer.allocate_inference_cache(batch_size=2)
        >>> y_t, cache = layer.step(torch.randn(2, 8), cache)
        >>> y_t.shape, cache["lrnn_state"].shape
        (torch.Size([2, 8]), torch.Size([2, 128]))
    """

    def __init__(self, d_model: int, d_state: int = 64, init: str = "legs", discretization: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, backend: str = "auto") -> None:
        if discretization not in ("zoh", "bilinear"):
            raise ValueError(f"S4D supports discretization 'zoh' or 'bilinear', got {discretization!r}")
        super().__init__(discretization)
        d_model, d_state = check_sizes("S4D", d_model=d_model, d_state=d_state)   # name the layer, not its S4DKernel
        check_size_product("S4D", d_model=d_model, d_state=d_state)
        check_reals("S4D", dt_min=dt_min, dt_max=dt_max)
        self.d_model, self.d_state = d_model, d_state
        self.kernel = S4DKernel(d_model, d_state, 1, init, discretization, dt_min, dt_max, backend)
        self.D = nn.Parameter(torch.randn(d_model, dtype=parameter_dtype()))

    def discretize(self, dtype: torch.dtype = torch.complex64) -> Tuple[Tensor, Tensor, Tensor]:
        """(A_bar, B_bar): (H, N/2) complex, C: (H, N/2) complex."""
        A_bar, B_bar, C, _ = self.kernel.discretize(dtype=dtype)
        return A_bar, B_bar, C[0]

    def compute_kernel(self, L: int, rate: float = 1.0) -> Tensor:
        """The length-L kernel K: (H, L) real (eq. 5)."""
        return self.kernel(L, rate)[0][0]

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H)."""
        x = self.prepare_input(x, lengths, integration_timesteps)
        L = x.shape[1]
        n = conv_size(L, L)
        if not needs_autograd(self, x):
            y = blocked_channel_conv(x, self.kernel.spectrum(L, n), n, skip=self.D.unsqueeze(0))[:, :, 0]
            return mask_padding(y, lengths)
        return mask_padding(channels_last_conv(x, self.kernel_with_skip(L), n), lengths)

    def kernel_with_skip(self, L: int) -> Tensor:
        """K with D added to tap 0: (H, L). D u is the kernel's first tap, so folding it in saves
        a pass over the input and a buffer of its size."""
        K = self.compute_kernel(L)
        # D padded to K's length rather than cat(K[:, :1] + D, K[:, 1:]): the slice's L - 1 taps have a
        # layout of their own at L = 2, which bound torch.export programs of a dynamic length to L != 2.
        return K + nn.functional.pad(self.D.unsqueeze(-1), (0, K.shape[-1] - 1))

    def step_form(self) -> ChannelDiagonalStepForm:
        """One step x' = A_bar x + B_bar u, y = 2 Re(C x') + D u per channel as a form: u (batch, H),
        state (batch, 2 * N/2 * H) packed (:class:`~lrnnx_zoo.step_forms.ChannelDiagonalStepForm`)."""
        return self.kernel.step_form(self.D.unsqueeze(0))

    def final_step_state(self, u: Tensor, lengths: Optional[Tensor], form: nn.Module) -> Tensor:
        """The kernel's state passing (one pass over u), in the step form's layout: u: (B, L, H),
        lengths: (B,) or None -> (B, state_size)."""
        return kernel_final_step_state(self.kernel, form, u, lengths)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, discretization={self.discretization!r}"


@hookimpl
def lrnnx_zoo_register_layers(registry) -> None:
    registry.add_layer("s4d", S4D)


@hookimpl
def lrnnx_zoo_register_initializers(registry) -> None:
    for name, fn in (("lin", init_lin), ("inv", init_inv), ("legs", init_legs),
                     ("real", init_real), ("random", init_random)):
        registry.add_initializer("s4d", name, fn)


@hookimpl
def lrnnx_zoo_register_kernel_backends(registry) -> None:
    registry.add_backend("vandermonde", "torch", vandermonde_torch)
    registry.add_backend("vandermonde", "keops", vandermonde_keops)
    registry.add_backend("vandermonde", "auto", vandermonde)
    registry.add_backend("ssm_kernel", "s4d", S4DKernel)
