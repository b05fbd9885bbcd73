"""Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences", arXiv:2303.06349).

    x_k = diag(lam) x_{k-1} + (gamma * B) u_k,     y_k = Re(C x_k) + D * u_k        (eq. 6)

with the exponential parameterisation lam = exp(-exp(nu_log) + i exp(theta_log)) (sec. 3.2),
the ring initialisation |lam| ~ U[r_min, r_max] in area, arg(lam) ~ U[0, max_phase] (Lemma 3.2),
and the normalisation gamma = sqrt(1 - |lam|^2) (sec. 3.3). The parameters are already discrete,
so the discretization is ``no_discretization``.

Another sampling rate (``resample_``, ``LRUKernel.forward(L, rate)``): the poles are read as the
zero-order-hold sampling at a step dt of the continuous diagonal system with poles log(lam) / dt
(principal logarithm) and input matrix B_c, and sampled again at dt / rate
(:func:`~lrnnx_zoo.discretization.zoh_resample_diag`). A new phase below 0 cannot be stored as
exp(theta_log): as the input is real and the readout Re(C x), the mode (conj lam, conj B, conj C)
gives the same outputs, and is stored instead (:func:`resampled_modes`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from lrnnx_zoo import hookimpl
from lrnnx_zoo.base import (LTI_LRNN, check_reals, check_size_product, check_sizes, forward_ad_active,
                            func_transforms_active, mask_padding,
                            ordinary_tensor, parameter_dtype, right_aligned)
from lrnnx_zoo.discretization import principal_log, zoh_resample_diag
from lrnnx_zoo.modal import ChannelModalKernel, final_state, modal_auto, modal_fft, modal_scan, powers
from lrnnx_zoo.registry import get_backend, initial_values
from lrnnx_zoo.shapes import integer
from lrnnx_zoo.ssm_kernel import check_rate
from lrnnx_zoo.step_forms import DiagonalStepForm

# The layer, its kernel and initializers; not the hooks, which a star import would re-register
# under the importing plugin's name.
__all__ = ["LRU", "LRUKernel", "ring_init", "gamma_log_init", "resampled_modes"]


def ring_init(d_state: int, r_min: float = 0.0, r_max: float = 1.0, max_phase: float = 2 * math.pi,
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Eigenvalues uniform on the ring r_min <= |lam| <= r_max, phase in [0, max_phase] (Lemma 3.2).

    Returns (nu_log, theta_log): (N,) each (:func:`~lrnnx_zoo.base.parameter_dtype`), with
    lam = exp(-exp(nu_log) + i exp(theta_log)).
    """
    u1 = torch.rand(d_state, generator=generator, dtype=torch.float64)
    u2 = torch.rand(d_state, generator=generator, dtype=torch.float64)
    # |lam|^2 uniform in [r_min^2, r_max^2]; clamp keeps log finite when r_min = 0 or r_max = 1.
    r2 = (u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2).clamp(1e-12, 1 - 1e-7)
    nu = -0.5 * torch.log(r2)
    theta = (max_phase * u2).clamp_min(1e-12)
    return torch.log(nu).to(parameter_dtype()), torch.log(theta).to(parameter_dtype())


def gamma_log_init(nu_log: Tensor) -> Tensor:
    """log gamma for gamma = sqrt(1 - |lam|^2) (sec. 3.3), |lam| = exp(-exp(nu_log)): any shape, in
    nu_log's dtype. Formed as 0.5 log(-expm1(-2 exp(nu_log))) in float64: 1 - |lam|^2 in float32
    cancels (r = 0.99999 left gamma 1.5e-3 off, r = 1 - 1e-7 10%); this is exact to rounding.
    Clamped at gamma = 1e-6 (|lam| = 1 would give log 0)."""
    nu = torch.exp(nu_log.detach().to(torch.float64))
    return (0.5 * torch.log(-torch.expm1(-2 * nu))).clamp_min(math.log(1e-6)).to(nu_log.dtype)


def resampled_modes(nu_log: Tensor, theta_log: Tensor, gamma_log: Tensor, B: Tensor, rate: float
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The stored parameters of LRU modes sampled at ``rate`` (:func:`~lrnnx_zoo.discretization.zoh_resample_diag`
    of lam = exp(-exp(nu_log) + i exp(theta_log)) and gamma * B), in float64.

    The new phase is reduced to (-pi, pi] (the same pole). Where it is negative, the conjugate mode is returned (the caller conjugates that mode's C
    too: with a real input and the readout Re(C x), (conj lam, conj B, conj C) gives the same output), so
    that theta = exp(theta_log) stays > 0. A zero phase is clamped at 1e-12, as :func:`ring_init` does.
    gamma_log is kept: B absorbs the change (B' / gamma).

    Args:
        nu_log, theta_log, gamma_log: (*S) real, e.g. (N,) or (H, N).
        B: the un-normalised input matrix, complex, broadcastable against (*S) (e.g. (H, N) for (N,) modes).
        rate: a finite number > 0.
    Returns:
        (nu_log', theta_log') (*S) float64, B' complex128 of B's broadcast shape, and ``conjugated``:
        (*S) bool, the modes stored as their conjugate.
    """
    nu_log, theta_log, gamma_log = (t.detach().to(torch.float64) for t in (nu_log, theta_log, gamma_log))
    gamma = torch.exp(gamma_log)
    log_lam, B_norm = zoh_resample_diag(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)), B * gamma, rate)
    # The phase reduced to (-pi, pi]: the same pole, but stored as theta / rate (up to pi / rate, 52-290
    # rad at rate 0.01) its float32 rounding, ~theta * 6e-8 rad a step, built up over a slow mode's
    # memory (1.3e-4 off the resampled system at rate 0.01 with r = 0.999999; 8e-8 reduced).
    log_lam = principal_log(log_lam)
    conjugated = log_lam.imag < 0
    log_lam = torch.where(conjugated, log_lam.conj(), log_lam)
    B_norm = torch.where(conjugated, B_norm.conj(), B_norm)
    return (torch.log(-log_lam.real), torch.log(log_lam.imag.clamp_min(1e-12)), B_norm / gamma, conjugated)


def check_ring(who: str, r_min: float, r_max: float, max_phase: float) -> None:
    """Refuse a ring initialisation's arguments that draw no eigenvalues: 0 <= r_min < r_max <= 1
    and max_phase > 0, real numbers (the error names ``who`` and the values given)."""
    check_reals(who, r_min=r_min, r_max=r_max, max_phase=max_phase)
    if max_phase <= 0:
        raise ValueError(f"{who} needs max_phase > 0 (eigenvalue phases are drawn from [0, max_phase]), got {max_phase}")
    if not (0.0 <= r_min < r_max <= 1.0):
        raise ValueError(f"{who} needs 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")


#: The modal backends whose output is a new tensor of its own, which LRU.forward may add its skip into
#: in place. Not fft: its output is a slice of the inverse transform's buffer, and writing into it
#: reordered the sum behind D's gradient (7.6e-6 off its bits; a review).
_FRESH_OUTPUT_BACKENDS = (modal_auto, modal_scan)


class LRU(LTI_LRNN):
    """Linear Recurrent Unit on (B, L, H) sequences.

    Args:
        d_model: H, input and output width.
        d_state: N, number of complex modes.
        r_min, r_max: radius range of the eigenvalues at initialisation.
        max_phase: phase range of the eigenvalues at initialisation.
        init: registered LRU initializer (default "ring").
        backend: "fft", "scan" or "auto" (kernel backends of kind "modal").

    Example (a sequence, then one step of a stream; the step state is [Re x, Im x], 2 * d_state):

        >>> import torch
        >>> from lrnnx_zoo.plugins.lru import LRU
        >>> layer = LRU(d_model=8, d_state=16)
        >>> layer(torch.randn(2, 100, 8)).shape
        torch.Size([2, 100, 8])
        >>> cache = layer.allocate_inference_cache(batch_size=2)
        >>> y_t, cache = layer.step(torch.randn(2, 8), cache)
        >>> y_t.shape, cache["lrnn_state"].shape
        (torch.Size([2, 8]), torch.Size([2, 32]))
    """

    def __init__(self, d_model: int, d_state: int = 64, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 2 * math.pi, init: str = "ring", backend: str = "auto") -> None:
        super().__init__("no_discretization")
        d_model, d_state = check_sizes("LRU", d_model=d_model, d_state=d_state)
        check_size_product("LRU", d_model=d_model, d_state=d_state)
        check_ring("LRU", r_min, r_max, max_phase)
        self.d_model, self.d_state = d_model, d_state
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.backend = backend
        get_backend("modal", backend)  # fail now, with the list of names, not at the first forward
        nu_log, theta_log = initial_values("lru", init, "(nu_log, theta_log)", [(d_state,)] * 2, f"d_state={d_state}",
                                           d_state, r_min, r_max, max_phase)
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        # Glorot-like scale so that ||B u|| ~ ||u|| before the gamma normalisation.
        self.B_re = nn.Parameter(torch.randn(d_state, d_model, dtype=parameter_dtype()) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(d_state, d_model, dtype=parameter_dtype()) / math.sqrt(2 * d_model))
        self.C_re = nn.Parameter(torch.randn(d_model, d_state, dtype=parameter_dtype()) / math.sqrt(d_state))
        self.C_im = nn.Parameter(torch.randn(d_model, d_state, dtype=parameter_dtype()) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model, dtype=parameter_dtype()))
        self.gamma_log = nn.Parameter(gamma_log_init(nu_log))

    def log_lambda(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """log lam: (N,) complex = -exp(nu_log) + i exp(theta_log), in the parameters' precision or
        in ``dtype`` (torch.complex128: formed in float64, which the sequence modes use, since
        rounding the phase to float32 shifts lam^l by ~l * 6e-8 * |theta| radians)."""
        real = torch.float64 if dtype == torch.complex128 else self.nu_log.dtype
        return torch.complex(-torch.exp(self.nu_log.to(real)), torch.exp(self.theta_log.to(real)))

    def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(lam (N,), gamma * B (N, H), C (H, N)), all complex. The parameters are discrete already."""
        return (torch.exp(self.log_lambda()),) + self._input_output()

    def _input_output(self) -> Tuple[Tensor, Tensor]:
        """(gamma * B (N, H), C (H, N)) complex: :meth:`discretize` without lam, which the sequence
        modes take as log lam in complex128 (its five ops were 13 us of a (1, 64, 128) forward)."""
        B = torch.complex(self.B_re, self.B_im) * torch.exp(self.gamma_log).unsqueeze(-1)
        return B, torch.complex(self.C_re, self.C_im)

    def compute_kernel(self, L: int, Lambda: Optional[Tensor] = None,
                       B_complex: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Powers lam^l, l < L: (L, N), and the normalised input matrix gamma * B: (N, H)."""
        N, H = self.d_state, self.d_model
        steps = integer(L)          # True and 2.0 failed as "reshape() takes 1 positional argument but 2 were given"
        if steps is None or steps < 0:
            raise ValueError(f"LRU.compute_kernel needs L to be an integer >= 0 (the kernel length), got {L!r}")
        L = steps
        # The seed's discretize() documents A as the (N, N) diagonal matrix: passed here, its zeros gave
        # NaN powers (L, N, N), and a B of another shape came back as given, without a word.
        if Lambda is not None and (not isinstance(Lambda, Tensor) or Lambda.shape != (N,)):
            got = tuple(Lambda.shape) if isinstance(Lambda, Tensor) else type(Lambda).__name__
            square = isinstance(Lambda, Tensor) and Lambda.dim() == 2
            hint = " (for a diagonal matrix A pass torch.diagonal(A))" if square else ""
            raise ValueError(f"LRU.compute_kernel needs Lambda of shape (N,) = ({N},), the diagonal discretize() "
                             f"returns, got {got}{hint}")
        if B_complex is not None and (not isinstance(B_complex, Tensor) or B_complex.shape != (N, H)):
            got = tuple(B_complex.shape) if isinstance(B_complex, Tensor) else type(B_complex).__name__
            raise ValueError(f"LRU.compute_kernel needs B_complex of shape (N, H) = {(N, H)}, got {got}")
        B_norm, _ = self._input_output()
        B_out = B_norm if B_complex is None else B_complex
        if Lambda is None:
            return powers(self.log_lambda(torch.complex128), L, B_norm.dtype), B_out
        return powers(torch.log(Lambda), L), B_out

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None, initial_state: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H). ``initial_state``: (B, N) complex ((N,): one for the whole
        batch), or None for zeros."""
        x = self.prepare_input(x, lengths, integration_timesteps)
        self._check_initial_state(initial_state, x.shape[0])
        initial_state = ordinary_tensor(initial_state)
        # the scan / FFT run in u's precision: a float32 input to a float64 layer is promoted first
        x = x.to(torch.promote_types(x.dtype, self.nu_log.dtype))
        B, C = self._input_output()
        run = get_backend("modal", self.backend)
        y, skip = run(x, self.log_lambda(torch.complex128), B, C, initial_state), self.D * x
        # In place into the projection's fresh output: the same bits as y + D x, one (B, L, H) buffer
        # and pass fewer (an LRU forward at (8, 1024, 128) 0.2 ms faster of ~6.5). Only a built-in
        # backend's output is known to be fresh (a plugin's may be its cache, or x itself); and not
        # where y + D x would be another tensor: a bfloat16 y under autocast (the sum is float32), and
        # under torch.func, where D alone may be batched (vmap over an ensemble's D: "doesn't match
        # the broadcast shape")
        in_place = (run in _FRESH_OUTPUT_BACKENDS and y.dtype == skip.dtype and not func_transforms_active()
                    and not forward_ad_active())
        return mask_padding(y.add_(skip) if in_place else y + skip, lengths)

    def final_state(self, x: Tensor, initial_state: Optional[Tensor] = None) -> Tensor:
        """The state after the last step of x: (B, L, H) -> (B, N) complex."""
        self.check_input(x)
        self._check_initial_state(initial_state, x.shape[0])
        initial_state = ordinary_tensor(initial_state)
        B, _ = self._input_output()
        return final_state(x, self.log_lambda(torch.complex128), B, initial_state)

    @torch.no_grad()
    def resample_(self, rate: float) -> Dict[str, Any]:
        """Make this LRU, in place, the same continuous-time system sampled at ``rate`` (step dt / rate):
        its poles read as the ZOH sampling of a continuous system (principal logarithm; module docstring),
        B and, on modes stored conjugated, C transformed in float64 and rounded once to the parameters'
        dtype (:func:`resampled_modes`). At rate < 1 a mode above the new Nyquist frequency (phase per
        new sample beyond pi) folds back: resampling at 1 / rate afterwards gives its alias. Returns {}
        (no constructor argument changes); rate 1 changes nothing."""
        rate = check_rate(rate, "LRU.resample_")
        if rate == 1.0:
            return {}
        B = torch.complex(self.B_re.detach().double(), self.B_im.detach().double())       # (N, H)
        nu_log, theta_log, B, conjugated = resampled_modes(self.nu_log, self.theta_log, self.gamma_log, B.T, rate)
        self.nu_log.copy_(nu_log)
        self.theta_log.copy_(theta_log)
        self.B_re.copy_(B.real.T)
        self.B_im.copy_(B.imag.T)
        self.C_im.copy_(torch.where(conjugated, -self.C_im, self.C_im))
        return {}

    def _check_initial_state(self, initial_state: Optional[Tensor], batch: int) -> None:
        """Raise unless initial_state is None, (batch, N) or (N,): the fft backend failed in a
        broadcast on other shapes, and read an (N,) state as (N, 1) (wrong outputs when L == N)."""
        N = self.d_state
        if initial_state is not None and (not isinstance(initial_state, Tensor)
                                          or tuple(initial_state.shape) not in ((batch, N), (N,))):
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            raise ValueError(f"LRU expects initial_state of shape (batch={batch}, d_state={N}), or ({N},) for the whole "
                             f"batch, got {got}")

    def final_step_state(self, u: Tensor, lengths: Optional[Tensor], form: nn.Module) -> Tensor:
        """:meth:`final_state` at each sequence's last valid step, as the step form's [Re x, Im x]:
        u: (B, L, H), lengths: (B,) or None -> (B, 2N)."""
        x = self.final_state(right_aligned(u, lengths))
        return torch.cat([x.real, x.imag], -1)

    @torch.no_grad()
    def step_form(self) -> DiagonalStepForm:
        """One step x' = lam x + gamma B u, y = Re(C x') + D u (eq. 1 and 6) as a form: u (batch, H),
        state (batch, 2N) packed [Re x; Im x], from the float64 parameters."""
        lam = torch.exp(self.log_lambda(torch.complex128))
        B = torch.complex(self.B_re.double(), self.B_im.double()) * torch.exp(self.gamma_log.double()).unsqueeze(-1)
        C = torch.complex(self.C_re.double(), self.C_im.double())
        return DiagonalStepForm(lam, B, C, self.D.double())

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, backend={self.backend!r}"


class LRUKernel(ChannelModalKernel):
    """H single-input LRUs, one per channel, with ``channels`` outputs each, as an SSM kernel.

        x_k[h] = diag(lam[h]) x_{k-1}[h] + gamma[h] * B[h] u_k[h],     y_k[c, h] = Re(C[c, h] . x_k[h])

    with lam = exp(-exp(nu_log) + i exp(theta_log)), ring initialisation and gamma = sqrt(1 - |lam|^2)
    at init (learnable, as in :class:`LRU`). The kernel is the Vandermonde product
    K[c, h, l] = Re(sum_n C[c, h, n] gamma[h, n] B[h, n] lam[h, n]^l).

    Args:
        d_model: H.  d_state: N complex modes per channel (no conjugate halving: y = Re(C x)).
        channels: C outputs per channel.  r_min, r_max, max_phase, init: as for :class:`LRU`.
        backend: Vandermonde backend "torch", "keops" or "auto".
    The parameters are already discrete; ``rate`` reads them as the ZOH sampling of a continuous
    system and samples it at dt / rate, as :meth:`LRU.resample_` (module docstring).
    State for state passing: (B, H, N) complex, the previous step's x.
    """

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, r_min: float = 0.0,
                 r_max: float = 1.0, max_phase: float = 2 * math.pi, init: str = "ring",
                 backend: str = "auto") -> None:
        super().__init__()
        d_model, d_state, channels = check_sizes("LRUKernel", d_model=d_model, d_state=d_state, channels=channels)
        check_size_product("LRUKernel", d_model=d_model, d_state=d_state, channels=channels)
        check_ring("LRUKernel", r_min, r_max, max_phase)
        self.d_model, self.d_state, self.channels, self.backend = d_model, d_state, channels, backend
        get_backend("vandermonde", backend)  # unknown names fail here, listing the valid ones
        H, N = d_model, d_state
        # One ring draw of H*N eigenvalues: each channel gets its own N.
        nu_log, theta_log = initial_values("lru", init, "(nu_log, theta_log)", [(H * N,)] * 2,
                                           f"d_model * d_state={H * N}", H * N, r_min, r_max, max_phase)
        self.nu_log = nn.Parameter(nu_log.reshape(H, N))
        self.theta_log = nn.Parameter(theta_log.reshape(H, N))
        # Single input per system: B ~ CN(0, 1) keeps E|B u|^2 = |u|^2 before gamma.
        self.B = nn.Parameter(torch.randn(H, N, 2, dtype=parameter_dtype()) * math.sqrt(0.5))
        self.C = nn.Parameter(torch.randn(channels, H, N, 2, dtype=parameter_dtype()) * math.sqrt(0.5 / N))
        self.gamma_log = nn.Parameter(gamma_log_init(self.nu_log))

    def discretize(self, dtype: torch.dtype = torch.complex64, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
        """log lam: (H, N), gamma * B: (H, N), C: (C, H, N), all complex (of ``dtype``'s precision), at
        sampling rate ``rate`` (:func:`~lrnnx_zoo.discretization.zoh_resample_diag`, in float64; the
        new phase may be negative, which the complex arithmetic takes as it is)."""
        real = torch.float64 if dtype == torch.complex128 else self.nu_log.dtype
        log_lam = torch.complex(-torch.exp(self.nu_log.to(real)), torch.exp(self.theta_log.to(real)))
        B = torch.view_as_complex(self.B.to(real)) * torch.exp(self.gamma_log.to(real))
        if rate != 1.0:
            complex_dtype = log_lam.dtype
            log_lam, B = (t.to(complex_dtype) for t in zoh_resample_diag(log_lam, B, rate))
        return log_lam, B, torch.view_as_complex(self.C.to(real))

    def modes(self, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lam, log lam, gamma * B): (H, N) and C: (C, H, N), complex128, y = Re(C x), at sampling
        rate ``rate``."""
        log_lam, B, C = self.discretize(torch.complex128, rate)
        return torch.exp(log_lam), log_lam, B, C

    @torch.no_grad()
    def resample_(self, rate: float) -> None:
        """Make this kernel, in place, the same continuous-time system sampled at ``rate``: ``forward(L)``
        then equals the old ``forward(L, rate)`` (its state response: from the state conjugated on the
        modes stored conjugated), and the step form and state passing follow. As :meth:`LRU.resample_`:
        :func:`resampled_modes` in float64, rounded once to the parameters' dtype; rate 1 changes nothing."""
        rate = check_rate(rate, "LRUKernel.resample_")
        if rate == 1.0:
            return
        B = torch.view_as_complex(self.B.detach().double().contiguous())                  # (H, N)
        nu_log, theta_log, B, conjugated = resampled_modes(self.nu_log, self.theta_log, self.gamma_log, B, rate)
        self.nu_log.copy_(nu_log)
        self.theta_log.copy_(theta_log)
        self.B.copy_(torch.view_as_real(B))
        self.C[..., 1].copy_(torch.where(conjugated, -self.C[..., 1], self.C[..., 1]))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, channels={self.channels}, backend={self.backend!r}"


@hookimpl
def lrnnx_zoo_register_layers(registry) -> None:
    registry.add_layer("lru", LRU)


@hookimpl
def lrnnx_zoo_register_initializers(registry) -> None:
    registry.add_initializer("lru", "ring", ring_init)


@hookimpl
def lrnnx_zoo_register_kernel_backends(registry) -> None:
    registry.add_backend("modal", "fft", modal_fft)
    registry.add_backend("modal", "scan", modal_scan)
    registry.add_backend("modal", "auto", modal_auto)
    registry.add_backend("ssm_kernel", "lru", LRUKernel)
