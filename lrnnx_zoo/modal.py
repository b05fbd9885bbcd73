"""Multi-input multi-output SSMs with a diagonal state matrix (modal form), on whole sequences.

    x_t = diag(lam) x_{t-1} + B u_t,     y_t = Re(C x_t)          (LRU paper, eq. 1 and 6)

with lam: (N,) complex, B: (N, H) complex, C: (H_out, N) complex. Two evaluations of the same
recurrence, registered as kernel backends of kind "modal":

- ``fft``: causal convolution of the projected input B u with the powers lam^l (FFT, O(L log L));
- ``scan``: the recurrence run by the chunked scan of :mod:`lrnnx_zoo.scan` (O(L) work, about
  three memory passes), exact for |lam| near 1 over any length, and the one to use when an
  initial state is given.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .base import forward_ad_active, func_transforms_active, without_autocast
from .convolution import opt_ssm_forward, project_in, project_out
from .scan import diagonal_scan
from .registry import get_backend
from .ssm_kernel import SSMKernel, check_batch_shape, check_rate, passed_state_dtype
from .step_forms import ChannelDiagonalStepForm


#: For complex64 results, _powers_by_doubling squares its factors lam^k below this k, and takes
#: exp(k log lam) from it on.
SQUARED_FACTORS_BELOW = 64


def powers(log_lam: Tensor, L: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """lam^l for l = 0..L-1, accurate to ``dtype``'s precision at every l.
    log_lam: (..., N) complex -> (L, ..., N) complex of ``dtype`` (default: log_lam's).

    Computed in complex128 and rounded once. Without autograd, by doubling (:func:`_powers_by_doubling`);
    under autograd or torch.compile as exp(l log lam) with the exponents formed in float64: in float32
    the phase l * Im(log lam) carries an absolute error of ~l * 6e-8 * |Im(log lam)| (1.5e-3 rad at
    l = 4096, |Im| = 6), which moved a float32 LRU's fft-mode output by 2.3e-5 and its final state by
    1.3e-4 relative at L = 4096. Pass log_lam in complex128 (formed from the parameters in float64)
    for the full benefit."""
    dtype = dtype or log_lam.dtype
    log_lam = log_lam.to(torch.complex128)
    if (torch.compiler.is_compiling() or func_transforms_active() or forward_ad_active()
            or (log_lam.requires_grad and torch.is_grad_enabled())):
        # differentiable (the doubling writes with out=, which autograd, forward-mode AD and vmap refuse,
        # also where log_lam is a torch.func wrapper that does not say it requires grad), and one graph
        # for every L (the doubling loop unrolls along L's bits)
        t = torch.arange(L, device=log_lam.device, dtype=torch.float64).reshape(L, *([1] * log_lam.dim()))
        return cexp(t * log_lam).to(dtype)
    # squared factors only where the result is rounded to complex64 (their <= 32 ulps of complex128
    # vanish there); a complex128 result takes every factor from its exponent (<= ~6 ulps)
    squared_below = SQUARED_FACTORS_BELOW if dtype == torch.complex64 else 0
    return _powers_by_doubling(log_lam, L, squared_below).to(dtype)


def _powers_by_doubling(log_lam: Tensor, L: int, squared_below: int = SQUARED_FACTORS_BELOW) -> Tensor:
    """lam^l, l < L, complex128, as lam^(k + j) = lam^k lam^j for k = 1, 2, 4, ... and j < k.

    The factors lam^k: below ``squared_below`` by squaring the one before (a square doubles the
    relative error: <= 32 ulps at k = 32, and a complex product costs a tenth of an exponential),
    the others as exp(k log lam), whose exponent k log lam is exact (k a power of two). Each power is
    a product of its binary digits' factors. Against long double at L = 1024, |Im log lam| <= 3:
    with every factor an exponential (squared_below=0), under 1e-15 (a few ulps); squared below 64,
    under 1e-14; exp(l log lam), whose exponent is rounded, 2.3e-13 (~l |log lam| ulps). Cost: one
    complex product per power and log2(L) exponentials of log_lam's size, or one when squared:
    (12, 32768) 2.1 ms with exponentials, 0.6 ms squared, against 3.2 ms for exp(l log lam)."""
    out = torch.empty(L, *log_lam.shape, dtype=torch.complex128, device=log_lam.device)
    if L:
        out[0] = 1
    k, factor = 1, cexp(log_lam)
    while k < L:
        n = min(k, L - k)
        torch.mul(out[:n], factor, out=out[k:k + n])
        k *= 2
        if k < L:
            factor = factor * factor if k < squared_below else cexp(k * log_lam)
    return out


def cexp(z: Tensor) -> Tensor:
    """exp(z) for complex z as exp(Re z) (cos Im z + i sin Im z): torch's complex exp is not
    vectorised on the CPU, and this is 1.5-2x (complex128) to 6x (complex64) faster, to rounding.
    Under autograd torch.exp: the backward of the five ops took longer than the saving (a (4097,
    64) complex128 exp with backward: 11.2 ms as one op, 16.8 ms as five)."""
    if z.requires_grad and torch.is_grad_enabled():
        return torch.exp(z)
    magnitude = torch.exp(z.real)
    return torch.complex(magnitude * torch.cos(z.imag), magnitude * torch.sin(z.imag))


def modal_fft(u: Tensor, log_lam: Tensor, B: Tensor, C: Tensor,
              initial_state: Optional[Tensor] = None) -> Tensor:
    """Convolution mode.  u: (Bsz, L, H), log_lam: (N,), B: (N, H), C: (H_out, N) -> (Bsz, L, H_out).
    log_lam may be of higher precision than u (see :func:`powers`); the result is u's precision.

    An initial state x_{-1} adds lam^{t+1} x_{-1} to every state, i.e. Re(C diag(lam^{t+1}) x_{-1}).
    """
    L = u.shape[1]
    cx = torch.promote_types(u.dtype, torch.complex64)
    B, C = B.to(cx), C.to(cx)
    initial_state = None if initial_state is None else initial_state.to(cx)
    K = powers(log_lam, L + (initial_state is not None), cx)
    y = opt_ssm_forward(u, K[:L], B, C)
    if initial_state is not None:
        y = y + project_out(K[1:] * initial_state.reshape(-1, 1, K.shape[-1]), C)   # (N,) or (Bsz, N)
    return y


def modal_scan(u: Tensor, log_lam: Tensor, B: Tensor, C: Tensor,
               initial_state: Optional[Tensor] = None) -> Tensor:
    """Scan mode, same signature as :func:`modal_fft`.

    lam = exp(log_lam) stays complex128 inside the scan (``lam_dtype``), which forms its powers
    (the carries between chunks) from it; the states stay in u's precision. Rounding lam to
    complex64 first made the powers those of a lam off by ~6e-8, i.e. lam^k off by ~k * 6e-8:
    float32 LRUs with r in [0.999, 0.99999] at L=65536 (H=N=16, 3 seeds) were 2.0e-5 - 2.6e-5 from
    their float64 outputs relative to max|y|, and are 4.7e-7 - 6.8e-7 with lam in complex128, at the
    same speed (benchmarks/precision_lru_scan.py).
    """
    cx = torch.promote_types(u.dtype, torch.complex64)
    if initial_state is not None:
        initial_state = initial_state.to(cx)
    x = diagonal_scan(torch.exp(log_lam.to(torch.complex128)), project_in(u, B).to(cx), initial_state,
                      lam_dtype=torch.complex128)
    return project_out(x, C)


def block_length(L: int, rows: int = 1) -> int:
    """The inner length c of a two-level sum over L steps (:func:`block_powers`) for ``rows`` rows of
    block sums: c = sqrt(rows L), at most L. It makes the rows' block sums S_k (rows x L / c numbers a
    mode) as many as the c + L / c powers (c ~ sqrt L for one row, the fewest powers). With c = sqrt L
    at every batch, the block sums of 128 rows were 11x the powers, and writing and weighting them
    took most of an S4D prefill's state at batch 128 (H=128, N=64, L=1024: 750 against 225 ms, one
    thread; benchmarks/NOTES.md, session 28)."""
    return max(1, min(L, math.isqrt(L * max(1, rows))))      # 1 for an empty sequence (L = 0)


def block_powers(log_lam: Tensor, L: int, dtype: torch.dtype, rows: int = 1) -> Tuple[int, Tensor, Tensor]:
    """The powers a decayed sum sum_j lam^{L-1-j} v_j needs, in two levels: with L <= n c,

        sum_j lam^{L-1-j} v_j = sum_k lam^{c (n-1-k)} S_k,   S_k = sum_{i<c} lam^{c-1-i} v_{kc+i}

    (v zero-padded in front to n c, which adds nothing), so c + n powers per mode (c from
    :func:`block_length`: ~ sqrt L for one row), not L: they are complex128 exponentials (as in
    :func:`powers`, for their accuracy), and all L of them took 1.4 s per S4D layer at H=128, N=64,
    L=4096 here, 30x its convolution forward.
    log_lam: (..., M) -> (c, inner (c, ..., M) = lam^{c-1-i}, outer (n, ..., M) = lam^{c(n-1-k)})."""
    c = block_length(L, rows)
    n = -(-L // c)
    flat = log_lam.to(torch.complex128).reshape(-1)
    inner = powers(flat, c, dtype).flip(0).reshape(c, *log_lam.shape)
    outer = powers(c * flat, n, dtype).flip(0).reshape(n, *log_lam.shape)
    return c, inner, outer


def final_state(u: Tensor, log_lam: Tensor, B: Tensor, initial_state: Optional[Tensor] = None) -> Tensor:
    """x_{L-1} = sum_j lam^{L-1-j} B u_j (+ lam^L x_{-1}) without materialising every state.
    u: (Bsz, L, H) -> (Bsz, N) complex (:func:`block_powers`) of u's precision, or given x_{-1}, of
    its dtype made complex (:func:`~lrnnx_zoo.ssm_kernel.passed_state_dtype`: a state comes back in
    the dtype it was passed in; a complex128 one came back complex64 from a float32 LRU)."""
    Bsz, L = u.shape[:2]
    cx = torch.promote_types(u.dtype, torch.complex64)
    c, inner, outer = block_powers(log_lam, L, cx)
    v = torch.nn.functional.pad(project_in(u, B), (0, 0, outer.shape[0] * c - L, 0))    # (Bsz, n c, N)
    x = (v.reshape(Bsz, -1, c, v.shape[-1]) * inner).sum(2)                            # S_k: (Bsz, n, N)
    x = (x * outer).sum(1)
    if initial_state is None:
        return x
    out = passed_state_dtype(initial_state)
    wide = torch.promote_types(cx, out)
    return (x.to(wide) + cexp(L * log_lam.to(torch.complex128)).to(wide) * initial_state.to(wide)).to(out)


def channel_final_state(u: Tensor, log_lam: Tensor, B: Tensor, state: Tensor,
                        precision: Optional[torch.dtype] = None) -> Tensor:
    """The same for H single-input systems, one per channel (S4D's and LRUKernel's state passing):
    x_{L-1}[h] = lam[h]^L x_{-1}[h] + sum_j lam[h]^{L-1-j} B[h] u_j[h].
    u: (Bsz, H, L) real, log_lam, B: (H, M) complex (log_lam best in complex128, see :func:`powers`),
    state: (Bsz, H, M) -> (Bsz, H, M) in :func:`~lrnnx_zoo.ssm_kernel.passed_state_dtype` (the state's
    dtype, made complex), computed in the wider of that and ``precision`` (the kernel's complex
    dtype). The block sums S_k (:func:`block_powers`) are one real batched matmul of u's blocks with
    the inner powers."""
    H, M = log_lam.shape
    Bsz, L = u.shape[0], u.shape[-1]
    out = passed_state_dtype(state)
    cx = out if precision is None else torch.promote_types(out, precision)
    state = state.to(cx)
    c, inner, outer = block_powers(log_lam, L, cx, rows=Bsz)
    n = outer.shape[0]
    blocks = torch.nn.functional.pad(u, (n * c - L, 0)).reshape(Bsz, H, n, c)
    # Both operands contiguous (H, rows, cols): with the channel axis strided (a (B, L, H) input's
    # transpose; the powers' (c, H, M) layout) bmm ran matrix by matrix with copies, 1.2 ms against
    # 0.26 ms here (S4D prefill, H=128, N=64, L=1024)
    real = torch.view_as_real(inner).permute(1, 0, 2, 3).reshape(H, c, 2 * M).contiguous()  # (H, c, 2M)
    blocks = blocks.to(real.dtype).permute(1, 0, 2, 3).reshape(H, Bsz * n, c).contiguous()  # (H, Bsz n, c)
    with without_autocast(u.device.type):       # autocast ran it in bfloat16 (state 1.7e-3 off)
        S = blocks @ real                                                              # (H, Bsz n, 2M)
    S = torch.view_as_complex(S.reshape(H, Bsz, n, M, 2).contiguous())               # (H, Bsz, n, M)
    x = (S * outer.permute(1, 0, 2).unsqueeze(1)).sum(2).transpose(0, 1)             # (Bsz, H, M)
    last = cexp(L * log_lam.to(torch.complex128)).to(cx)                             # lam^L
    return (x * B.to(cx) + last * state).to(out)


def channel_kernel(vdm: Callable[..., Tensor], v: Tensor, lam: Tensor, log_lam: Tensor, L: int,
                   real: torch.dtype, C: Optional[Tensor] = None, state: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """Kernel of H single-input diagonal systems through the Vandermonde backend ``vdm``
    (2 Re(sum_n v lam^l), conjugate-pair convention), and given ``state`` x_{-1}, its zero-input
    response 2 Re(sum_n C lam^{l+1} x_{-1}) (:func:`decayed_response`, one row per batch entry)
    (S4D's and LRUKernel's kernels).

    v, C: (Ch, H, M), lam, log_lam: (H, M), complex128 (exponents formed in float64, see
    :func:`powers`); state: (Bs, H, M). The Vandermonde products run in the complex dtype of
    ``real``'s precision, the results are ``real``: K (Ch, H, L) and K_state (Bs, Ch, H, L) or None.
    Under torch.autocast too: the products are real matmuls, which autocast ran in bfloat16 (a
    float32 S4D's outputs 2.5e-3 off), where the layers promise a float32 kernel."""
    dtype = torch.promote_types(real, torch.complex64)      # (dtype.to_complex() stops torch.compile)
    with without_autocast(v.device.type):
        K = vdm(v.to(dtype), log_lam.expand_as(v), L).to(real)
        if state is None:
            return K, None
        vs = (C.unsqueeze(0) * (lam * state).unsqueeze(1)).to(dtype)             # (Bs, Ch, H, M)
        return K, decayed_response(vs, log_lam, L).to(real)


def decayed_response(w: Tensor, log_lam: Tensor, L: int) -> Tensor:
    """2 Re(sum_m w[..., h, m] lam[h, m]^l) for l < L, the Vandermonde product of the kernels, for many
    rows of weights sharing one lam = exp(log_lam): w (..., H, M) complex, log_lam (H, M) -> (..., H, L)
    real of w's precision (a state's zero-input response: w = C lam x_{-1}, a row per batch entry).

    The transpose of :func:`channel_final_state`'s sum, in the same two levels, l = k c + i with c from
    :func:`block_length`: the rows w lam^{kc} times the inner powers lam^i, one real batched matmul
    per channel. A Vandermonde backend, handed the rows as a batch, formed every power lam^l again for
    each of them: an FFTConv S4D layer's forward from a state at B=32, H=128, N=64, L=1024 spent 247
    of its 337 ms there."""
    H, M = log_lam.shape
    lead, rows = w.shape[:-2], math.prod(w.shape[:-2])
    c = block_length(L, rows)
    n = -(-L // c)
    inner = powers(log_lam, c, w.dtype)                                          # lam^i: (c, H, M)
    outer = powers(c * log_lam.to(torch.complex128), n, w.dtype)                 # lam^(kc): (n, H, M)
    W = w.reshape(rows, 1, H, M) * outer                                         # (rows, n, H, M)
    left = torch.cat([W.real, -W.imag], -1).permute(2, 0, 1, 3).reshape(H, rows * n, 2 * M)
    right = torch.cat([inner.real, inner.imag], -1).permute(1, 2, 0)            # (H, 2M, c)
    out = torch.bmm(left, right).reshape(H, rows, n * c)[..., :L]                # Re(W lam^i), l = kc + i
    return 2 * out.permute(1, 0, 2).reshape(*lead, H, L)


class ChannelModalKernel(SSMKernel):
    """What S4D's and LRUKernel's kernels share: H single-input diagonal systems with C outputs each,

        x_l[h] = lam[h] x_{l-1}[h] + B[h] u_l[h],     y_l[c, h] = Re(sum_n C[c, h, n] x_l[h, n]),

    given by :meth:`modes` in complex128 at a sampling rate. From them: the kernel (through the
    Vandermonde backend named by ``self.backend``, cached per (L, rate)), state passing, the zero
    state and the step form. A subclass has parameters ``C`` of shape (C, H, M, 2) (real view),
    which also give the parameters' dtype and device, and implements :meth:`modes`.
    """

    backend: str

    @abstractmethod
    def modes(self, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lam, log lam, B): (H, M) and C: (C, H, M), complex128, y = Re(C x), at sampling rate ``rate``."""

    def forward(self, L: int, rate: float = 1.0, state: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """K: (C, H, L) and, given ``state`` x_{-1}: (B, H, M), its zero-input response (B, C, H, L)."""
        rate = check_rate(rate, type(self).__name__)
        vdm = get_backend("vandermonde", self.backend)
        if state is None:
            return self.cached_kernel((L, rate), lambda: self._kernel(vdm, L, rate)[0]), None
        return self._kernel(vdm, L, rate, state)

    def _kernel(self, vdm: Callable[..., Tensor], L: int, rate: float = 1.0,
                state: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """K[c, h, l] = Re(sum_n C B lam^l) and y_l = Re(sum_n C lam^{l+1} x_{-1}): the exponents are
        formed in float64 (rounded to float32 they moved a float32 kernel by 3e-6 - 9e-6 relative at
        L=4096, against 2e-7), the Vandermonde products run in the parameters' precision."""
        lam, log_lam, B, C = self.modes(rate)
        half = 0.5 * C         # the backend returns 2 Re(sum v lam^l), the conjugate-pair convention
        return channel_kernel(vdm, half * B, lam, log_lam, L, self.C.dtype, half, state)

    def default_state(self, *batch_shape: int) -> Tensor:
        """The zero state x_{-1}: (*batch_shape, H, M) complex."""
        batch_shape = check_batch_shape(type(self).__name__, batch_shape)
        return torch.zeros(*batch_shape, self.C.shape[1], self.C.shape[2], dtype=self.state_dtype,
                           device=self.C.device)

    def forward_state(self, u: Tensor, state: Tensor) -> Tensor:
        """x_{L-1} = lam^L x_{-1} + sum_j lam^{L-1-j} B u_j.   u: (B, H, L), state: (B, H, M) -> (B, H, M)
        in :func:`~lrnnx_zoo.ssm_kernel.passed_state_dtype` (computed in the wider of its precision and
        the kernel's)."""
        _, log_lam, B, _ = self.kept_modes()
        return channel_final_state(u, log_lam, B, state, self.state_dtype)

    def kept_modes(self, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`modes`, in eager inference cached like the kernel (for S4D's zoh at H=256, N=256 they
        are 3.8 ms of exponentials, a quarter of a prefill's state passing, and each prefill and step
        form asked again)."""
        return self.cached_kernel(("modes", rate), lambda: self.modes(rate))

    @torch.no_grad()
    def step_form(self, D: Optional[Tensor] = None) -> ChannelDiagonalStepForm:
        """The recurrence as a step form (D: (C, H) skip or None), built from the complex128 modes."""
        lam, _, B, C = self.kept_modes()
        return ChannelDiagonalStepForm(lam, B, C, None if D is None else D.double())


def modal_auto(u: Tensor, log_lam: Tensor, B: Tensor, C: Tensor,
               initial_state: Optional[Tensor] = None) -> Tensor:
    """The faster mode on CPU: the chunked scan. The LRU layer with each, benchmarks/bench_layers.py
    at H=128, N=64 (README's layer table): scan about 4x the rfft floor at (B=8, L=1024) and
    (B=4, L=4096), fft 7-9x, whose complex transforms of the N projected modes cost more."""
    return modal_scan(u, log_lam, B, C, initial_state)


__all__ = ["powers", "channel_kernel", "decayed_response", "project_in", "project_out", "modal_fft", "modal_scan",
           "final_state", "channel_final_state", "modal_auto", "ChannelModalKernel"]
