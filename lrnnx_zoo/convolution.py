"""FFT convolution, the evaluation of an LTI layer on a whole sequence (convolution mode).

A causal convolution y_t = sum_{j<=t} K_j u_{t-j} of a length-L signal with a length-Lk kernel
equals a circular convolution of length n >= L + Lk - 1, computed as irfft(rfft(u) * rfft(K))
(S4 paper, sec. 3.3). We pad to the smallest 5-smooth n above that bound, never further, and use
real transforms whenever the signal is real.

``fft_conv`` generalises this to an einsum written in the frequency domain
(Lee et al., "Optimised SSM convolutions", arXiv:2409.03377): the operands that carry the time
axis are transformed, the rest are contracted as they are, in an order chosen by opt_einsum.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import opt_einsum
import torch
from torch import Tensor

from .base import apply_function, func_transforms_active, jvp_variant
from .shapes import broadcast_shape

if TYPE_CHECKING:  # served by __getattr__ at run time (the plugin imports this module)
    from lrnnx_zoo.plugins.fftconv import FFTConvS4


def fast_fft_size(target: int) -> int:
    """Smallest n >= target whose only prime factors are 2, 3 and 5 (fast for pocketfft/MKL);
    under torch.compile, :func:`compiled_fft_size` instead."""
    if torch.compiler.is_compiling():
        return compiled_fft_size(target)
    return _smallest_5_smooth_cached(target)


def compiled_fft_size(target: int) -> int:
    """The transform size in a compiled graph: ``target`` rounded up to a multiple of 8.

    The 5-smooth search compares the length with constants, and dynamo pinned a dynamic length to
    its value at each comparison, so every new length compiled a new graph (training over lengths
    64..200: 5 graphs of 15-40 s each). This size is arithmetic in the length, so one graph with a
    symbolic length serves all of them. For lengths that are multiples of 4 a causal convolution's
    2L - 1 becomes 2L, 5-smooth when L is; for others the FFT library factors the size's odd part
    itself (a few times slower at worst). Sizes differ from eager's, results only by rounding.
    """
    return -(-target // 8) * 8


def _smallest_5_smooth(target: int) -> int:
    """Tries every 3^b 5^c below the next power of two with the smallest power of two that lifts it
    to ``target``: ~log3 * log5 candidates (a few microseconds; the eager path caches it anyway)."""
    n = max(1, int(target))
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            best = min(best, p35 << (-(-n // p35) - 1).bit_length())
            p35 *= 3
        p5 *= 5
    return best


_smallest_5_smooth_cached = functools.lru_cache(maxsize=4096)(_smallest_5_smooth)


def conv_size(L: int, Lk: int) -> int:
    """Transform size of a causal convolution of L steps with an Lk-tap kernel (no wrap-around)."""
    return fast_fft_size(L + Lk - 1)


def lower_toeplitz(taps: Tensor) -> Tensor:
    """A causal convolution with ``taps`` as a matrix: taps (..., T) -> (..., T, T) with [t, j] =
    taps[t - j] for t >= j and 0 above the diagonal (y = M @ u convolves u's T samples)."""
    T = taps.shape[-1]
    steps = torch.arange(T, device=taps.device)
    lag = steps.unsqueeze(1) - steps.unsqueeze(0)                            # t - j
    return torch.where(lag >= 0, taps[..., lag.clamp(min=0)], torch.zeros((), dtype=taps.dtype, device=taps.device))


def kernel_taps(L: int, l_max: Optional[int], rate: float = 1.0) -> int:
    """Taps of a layer's kernel on an L-step input sampled at ``rate``: all L for a global kernel
    (l_max None); else the taps that span l_max steps' duration at rate 1, round(l_max * rate)
    (the kernel runs at dt / rate, so at rate 0.5 each step covers twice the time), at least the
    lag-0 tap and at most L. S4 and FFTConvS4 share it, so one kernel means one window in both."""
    return L if l_max is None else min(L, max(1, round(l_max * rate)))


def causal_conv(u: Tensor, K: Tensor, dim: int = -1, length: Optional[int] = None) -> Tensor:
    """Causal convolution along ``dim``: y_t = sum_{j<=t} K_j u_{t-j}, truncated to the signal.

    Args:
        u: (..., L, ...) signal, real or complex, with time on ``dim``; it may already carry zero
            padding after its first ``length`` steps (up to the transform size, see
            :func:`conv_size`), which spares the FFT a padded copy.
        K: kernel with time on the same ``dim`` (length Lk <= L is typical), broadcastable to u.
        length: the signal's length L (default: u's length along ``dim``).
    Returns:
        y: u's shape with L steps along ``dim`` (broadcast with K's batch dims), contiguous.
    """
    L, Lk = (u.shape[dim] if length is None else length), K.shape[dim]
    n = conv_size(L, Lk)
    if u.shape[dim] > n:
        raise ValueError(f"u is padded to {u.shape[dim]} steps, beyond the transform size {n} for L={L}, Lk={Lk}")
    # The transform's output is a view (its first L of n steps; along dim=-2 in a transposed layout):
    # a plugin's (B, L, H) layer handed it on, and the next layers and their backward ran on a
    # row-strided tensor (the contract's contiguous check; 1.4x slower training for S4D blocks).
    return circular_conv(u, K, n, L, dim).contiguous()


def circular_conv(u: Tensor, K: Tensor, n: int, length: int, dim: int = -1) -> Tensor:
    """Circular convolution of size n along ``dim``, truncated to ``length`` steps: u (..., L, ...)
    with time on ``dim`` (L <= n) and K broadcastable to it (Lk <= n taps on ``dim``) -> y of u's
    broadcast shape with ``length`` steps on ``dim``.

    With n >= L + Lk - 1 it is the causal convolution (:func:`causal_conv`); callers that place
    an anti-causal kernel at the end of the circle (bidirectional layers) pick their own n.
    Real signals under autograd get a backward of real transforms only (``_RealCausalConv``).
    """
    if u.numel() == 0:   # an empty batch: FFT libraries refuse zero-sized transforms
        return _empty_conv(u, K, length, dim)
    # Both transforms in the wider precision: a float32 signal against a float64 kernel (a float32
    # input to a float64 layer, under autograd) was transformed in float32, 4e-8 off the float64
    # result that inference (blocked_channel_conv) gives.
    u, K = _in_precision(u, K), _in_precision(K, u)
    cplx = u.is_complex() or K.is_complex()
    graph = torch.is_grad_enabled() and (u.requires_grad or K.requires_grad)
    # torch.func transforms take the plain differentiable path below: _RealCausalConv's backward
    # refuses a graph of itself, which func.grad always asks for, and vmap cannot batch in place.
    transformed = func_transforms_active()
    if not cplx and graph and not transformed:
        return apply_function(_RealCausalConv, u, K, n, length, dim)
    fwd, inv = (torch.fft.fft, torch.fft.ifft) if cplx else (torch.fft.rfft, torch.fft.irfft)
    # The kernel's spectrum first: a caller that passes K without keeping a reference frees K here.
    Kf = fwd(K, n=n, dim=dim)
    del K
    U = fwd(u, n=n, dim=dim)
    if graph or transformed:      # complex signals under autograd, or a torch.func transform
        U = U * Kf
    else:  # inference: reuse the input's spectrum, one transform-sized buffer fewer at the peak
        U = U.mul_(Kf) if U.shape == broadcast_shape(U.shape, Kf.shape) else U * Kf
    del Kf
    return inv(U, n=n, dim=dim).narrow(dim, 0, length)


def _in_precision(t: Tensor, other: Tensor) -> Tensor:
    """t in the wider of t's and other's precisions, real or complex as t is (differentiable; t
    itself when it is already as wide). A real t is promoted with other's real dtype (``.real``,
    which traces in a compiled graph where dtype.to_real() stopped fullgraph tracing)."""
    wide = torch.promote_types(t.dtype, other.dtype if t.is_complex() else other.real.dtype)
    return t if t.dtype == wide else t.to(wide)


def _empty_conv(u: Tensor, K: Tensor, length: int, dim: int) -> Tensor:
    """The (empty) result of convolving an empty batch, still attached to K's graph (zero grads)."""
    u_shape, K_shape = list(u.shape), list(K.shape)
    u_shape[dim] = K_shape[dim] = 1                       # time lengths differ (padding, kernel length)
    shape = list(broadcast_shape(u_shape, K_shape))
    shape[dim] = length
    y = torch.zeros(shape, dtype=torch.promote_types(u.dtype, K.dtype), device=u.device)
    if torch.is_grad_enabled() and (u.requires_grad or K.requires_grad):
        y = y + 0 * (K.sum() + u.sum())
    return y


_NO_SECOND_DERIVATIVE = (
    "the FFT convolution of lrnnx-zoo's layers has no second derivative: backward(create_graph=True) / "
    "autograd.grad(..., create_graph=True) through it is not supported (first-order training is). For second "
    "derivatives (e.g. a gradient penalty) take the first one with torch.func.grad, e.g. "
    "torch.func.grad(lambda x: loss(model(x)))(x): its result can be differentiated again")


class _RealCausalConv(torch.autograd.Function):
    """Real circular convolution of size n with a backward made of real transforms only.

    The gradients are circular correlations on the same circle:
        dL/du_s = sum_t g_t K_{(t-s) mod n} = irfft(rfft(g) * conj(rfft(K)))[s],
        dL/dK_j = sum_t g_t u_{(t-j) mod n} = irfft(rfft(g) * conj(rfft(u)))[j],
    (for a causal size n >= L + Lk - 1 the wrapped terms fall on zero padding). Autograd's own
    backward of rfft goes through full complex transforms of a zero-filled spectrum, which made
    an S4D forward+backward 2x slower (benchmarks/bench_layers.py).
    """

    @staticmethod
    def forward(ctx, u: Tensor, K: Tensor, n: int, L: int, dim: int) -> Tensor:  # type: ignore[override]
        Uf, Kf = torch.fft.rfft(u, n=n, dim=dim), torch.fft.rfft(K, n=n, dim=dim)
        Y = Uf * Kf
        # The backward multiplies by conj(Uf) and conj(Kf): conjugated here in place, once the
        # product is made (a lazily conjugated operand made torch copy it at every use).
        ctx.save_for_backward(Uf.conj_physical_() if K.requires_grad else None,
                              Kf.conj_physical_() if u.requires_grad else None)
        ctx.meta = (n, dim, u.shape, K.shape)
        return torch.fft.irfft(Y, n=n, dim=dim).narrow(dim, 0, L)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            # The saved spectra are not connected to u and K, so a graph of this backward would
            # give wrong second derivatives; keeping u alive to connect them would double what a
            # training step holds per layer.
            raise RuntimeError(_NO_SECOND_DERIVATIVE)
        Ufc, Kfc = ctx.saved_tensors
        n, dim, u_shape, K_shape = ctx.meta
        G = torch.fft.rfft(g, n=n, dim=dim)
        grad_u = grad_K = None
        # Broadcast dims (the batch, for a shared kernel) are summed in the frequency domain,
        # before the inverse transform: B times fewer transforms for dL/dK (3.4 -> 1.8 ms at
        # (8, 128, 2048)).
        if Ufc is not None:
            grad_K = torch.fft.irfft(_sum_spectrum_to(G * Ufc, K_shape, dim), n=n, dim=dim)
            grad_K = grad_K.narrow(dim, 0, K_shape[dim])
        if Kfc is not None:        # G (the output's broadcast shape) is not needed after this: in place
            grad_u = torch.fft.irfft(_sum_spectrum_to(G.mul_(Kfc), u_shape, dim), n=n, dim=dim)
            grad_u = grad_u.narrow(dim, 0, u_shape[dim])
        return grad_u, grad_K, None, None, None


@jvp_variant
class _RealCausalConvJvp(_RealCausalConv):
    """:class:`_RealCausalConv` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def forward(ctx, u: Tensor, K: Tensor, n: int, L: int, dim: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_forward(u, K)      # the forward sees no tangents; its jvp needs the inputs
        ctx.length = L
        return _RealCausalConv.forward(ctx, u, K, n, L, dim)

    @staticmethod
    def jvp(ctx, u_t: Optional[Tensor], K_t: Optional[Tensor], *_: None) -> Tensor:  # type: ignore[override]
        """Forward-mode AD: the convolution is bilinear, d(u * K) = du * K + u * dK."""
        u, K = ctx.saved_tensors
        n, dim, _, _ = ctx.meta
        Y = sum(torch.fft.rfft(a, n=n, dim=dim) * torch.fft.rfft(b, n=n, dim=dim)
                for a, b in ((u_t, K), (u, K_t)) if a is not None and b is not None)
        return torch.fft.irfft(Y, n=n, dim=dim).narrow(dim, 0, ctx.length)


def _sum_spectrum_to(X: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Sum a spectrum over the dims that ``shape`` (a signal's shape) broadcasts, keeping the
    frequency axis ``dim`` (the spectrum's length there differs from the signal's)."""
    target = list(shape)
    target[dim] = X.shape[dim]
    return X.sum_to_size(target)


def reversed_spectrum(Kf: Tensor, n: int, delay: int = 0) -> Tensor:
    """Spectrum of the time-reversed kernel r_m = K_{(-m-delay) mod n} on a size-n circle, from
    Kf = rfft(K, n): e^{2 pi i f delay / n} conj(Kf_f). Convolving with r gives the anti-causal
    sum y_t = sum_j K_j u_{t+j+delay} (a bidirectional layer's reverse direction); n >= L + Lk - 1
    (+ delay) keeps its lags off the causal ones. Kf: (..., n // 2 + 1) complex."""
    if delay == 0:
        return Kf.conj()
    f = torch.arange(Kf.shape[-1], device=Kf.device, dtype=torch.float64)
    return torch.polar(torch.ones_like(f), 2 * math.pi * delay * f / n).to(Kf.dtype) * Kf.conj()


def two_sided_kernel(causal: Tensor, anticausal: Tensor, n: int, delay: int = 0) -> Tensor:
    """Both directions of a bidirectional layer as one kernel on a circle of n samples, so that
    one circular convolution (one transform pair) gives

        y_t = sum_j causal_j u_{t-j} + sum_j anticausal_j u_{t+j+delay}.

    The time-domain twin of :func:`reversed_spectrum`: rfft of the result is
    rfft(causal, n) + reversed_spectrum(rfft(anticausal, n), n, delay). The anti-causal taps go
    reversed at the circle's end, anticausal_j at (-j - delay) mod n; with delay 0 its lag 0 adds
    to the causal one. For L-step signals n >= L + Lk - 1 + delay keeps the two sides' lags apart.

    Args:
        causal, anticausal: (..., Lk) real, lag 0 first.  n: circle size, >= Lk + delay.
    Returns:
        (..., n).
    """
    Lk = causal.shape[-1]
    if anticausal.shape != causal.shape or delay < 0 or n < Lk + delay:
        raise ValueError(f"two_sided_kernel expects two kernels of one shape and n >= Lk + delay, delay >= 0; got "
                         f"{tuple(causal.shape)} and {tuple(anticausal.shape)}, n={n}, delay={delay}")
    pad = (0, n - Lk)
    # flip(anticausal)[i] = anticausal_{Lk-1-i}; rolled so that anticausal_j lands at n - j - delay
    back = torch.roll(torch.nn.functional.pad(anticausal.flip(-1), pad), n - delay - Lk + 1, dims=-1)
    return torch.nn.functional.pad(causal, pad) + back


def channel_block_size(rows: int, n: int, budget: int = 1 << 18) -> int:
    """Channels per block of :func:`blocked_channel_conv`, for ``rows`` signals of n samples per
    channel: a multiple of 16 (whole 64-byte cache lines when gathering from and scattering to a
    channels-last (B, L, H) tensor; 4 or 8 channels were up to 40% slower there), as many as keep
    a block's padded buffer near ``budget`` floats (1 MiB, within L2 with its spectrum)."""
    return 16 * max(1, budget // max(1, rows * n * 16))


#: The most floats a (B, C, H, n) transform buffer holds for :class:`_ChannelBlocks` to move it as
#: one block with one copy each way (B=1, H=128: up to L=256).
_ONE_BLOCK = 1 << 16


#: Channels per copy when scattering a block's transforms back to (B, L, C, H). The transform's
#: rows lie n floats apart, a multiple of 4 KiB, so they share one L1 set: 16 of them evict each
#: other in the 8-way L1 of this CPU, 8 stay. At B=4, L=4096, 16 channels: 346 -> 163 us a block
#: (min of 30, one thread); B=8, L=1024: 145 -> 88 us.
_SCATTER_GROUP = 8


def _copies_in_cache_sized_pieces(t: Tensor) -> bool:
    """Whether strided copies to or from t go in cache-sized pieces: in eager code on the CPU (an
    accelerator wants few launches, and a compiler lays out its own copy loops; compiling, a loop
    over a dynamic length pinned it, a graph per length)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _chunked_copy(dst: Tensor, src: Tensor, dim: int, chunk: int) -> None:
    """dst.copy_(src) in slices of ``chunk`` along ``dim`` on the CPU, where a strided copy's
    working set must stay in cache (see :data:`_SCATTER_GROUP`); one copy elsewhere
    (:func:`_copies_in_cache_sized_pieces`)."""
    if not _copies_in_cache_sized_pieces(dst) or chunk >= dst.shape[dim]:
        dst.copy_(src)
        return
    size = dst.shape[dim]
    for i in range(0, size, chunk):
        w = min(chunk, size - i)
        dst.narrow(dim, i, w).copy_(src.narrow(dim, i, w))


class _ChannelBlocks:
    """The blocks of channels of :class:`_BlockedConv`: iterates (h0, w, buffer) with a zero-padded
    (B, w, n) buffer ((B, C, w, n) if stacked) reused by every block, and moves a block between
    (B, [C,] H, L) views and that buffer. Views of channels-last tensors are strided: a block is
    gathered through a contiguous (B, [C,] L, w) stage and scattered :data:`_SCATTER_GROUP`
    channels at a time; contiguous ones move in one copy. :func:`blocked_channel_conv`
    (inference) iterates the same way.

    block: channels per block; default :func:`channel_block_size` for B * C rows, so that the C
    kernels' transforms of a block stay in cache."""

    def __init__(self, B: int, L: int, H: int, n: int, dtype: torch.dtype, device: torch.device,
                 C: int = 1, stacked: bool = False, channels_last: bool = True, block: Optional[int] = None) -> None:
        self.L, self.H = L, H
        self.hb = min(H, channel_block_size(B * C, n) if block is None else block)
        shape = (B, C, self.hb, n) if stacked else (B, self.hb, n)
        self.buf = torch.empty(shape, dtype=dtype, device=device)
        self.buf[..., L:].zero_()       # the padding: zeros that stay (gathers write [..., :L])
        self.channels_last = channels_last
        # A small input (at most _ONE_BLOCK floats padded) is one block, where the staged gather and
        # grouped scatter, which keep a large block's strided copies in cache, cost more eager ops
        # than they save.
        self.one_block = self.hb >= H and B * C * H * n <= _ONE_BLOCK
        self.scatter_chunk = _SCATTER_GROUP if channels_last and not self.one_block else H
        self._stages: Dict[Tuple[int, ...], Tensor] = {}

    def __iter__(self):
        for h0 in range(0, self.H, self.hb):
            w = min(self.hb, self.H - h0)
            yield h0, w, (self.buf if w == self.hb else self.buf.narrow(-2, 0, w))

    def gather(self, buf: Tensor, src: Tensor, h0: int, w: int) -> None:
        """buf[..., :L] = src's channels h0:h0 + w; buf: (B, [C,] w, n), src: (B, [C,] H, L).

        A channels-last src is a (B, [C,] L, H) tensor: its block's rows of w channels are first
        copied whole into a contiguous (B, [C,] L, w) stage, which is then transposed from cache.
        Read straight into the buffer, each channel walked src a row (H floats) at a time: 1.4-1.9x
        slower (60 -> 44 us a block at B=8, L=1024, 134 -> 70 at B=4, L=4096, 2 threads; 1052 ->
        570 at B=1, L=65536, H=64; tiling the stage in time was slower at every size)."""
        dst, part = buf.narrow(-1, 0, self.L), src.narrow(-2, h0, w)
        if not self.channels_last or self.one_block or not _copies_in_cache_sized_pieces(dst):
            dst.copy_(part)     # contiguous rows, or one copy (_copies_in_cache_sized_pieces)
            return
        lead = tuple(dst.shape[:-2])
        stage = self._stages.get(lead)
        if stage is None:
            stage = self._stages[lead] = dst.new_empty(lead + (self.L, self.hb))
        stage = stage.narrow(-1, 0, w)
        stage.copy_(part.transpose(-1, -2))
        dst.copy_(stage.transpose(-1, -2))

    def scatter(self, dst: Tensor, out: Tensor, h0: int, w: int) -> None:
        """dst's channels h0:h0 + w = out; dst: (B, C, H, L), out: (B, C, w, L)."""
        _chunked_copy(dst.narrow(2, h0, w), out, 2, self.scatter_chunk)


def blocked_channel_conv(u: Tensor, Kf: Tensor, n: int, time_dim: int = 1, skip: Optional[Tensor] = None,
                         block: Optional[int] = None) -> Tensor:
    """Inference convolution of each channel with its kernels, streamed through the cache in
    blocks of channels: y[c, h] = the first L samples of irfft(rfft(u[h], n) * Kf[c, h], n).

    A whole-tensor causal convolution makes ~6 passes over transform-sized buffers that at
    (8, 128, 2048) no longer fit in cache; one block's gather, padding, rfft, product, irfft and
    scatter run back to back while its ~1 MiB is still in L2, and the output is written in the
    caller's layout directly (no (B, H, L) -> (B, L, H) copy of the whole result). The peak holds
    the output and one block's buffers instead of three full transform-sized tensors.

    Args:
        u: (B, L, H) if time_dim == 1, (B, H, L) if time_dim == 2; real.
        Kf: (C, H, n // 2 + 1) complex kernel spectra at transform size n; n >= L + Lk - 1 gives
            the causal convolution (:func:`conv_size`).
        skip: (C, H) or None: adds skip[c, h] * u[h] (a cached Kf stays the kernel's own). With
            B > 1 it is added to the kernel's spectrum (D u is D delta * u, and delta's spectrum is
            1): a (C, H, F) copy, 1/B of the input's spectrum, instead of a pass over the output
            (3.98 -> 3.71x the FFT floor at B=4, L=4096). At B=1 the copy would be as large as
            that pass and raise the peak (33 MB at L=65536, H=64), so the skip is added in time.
        block: channels per block (default :func:`channel_block_size` on CPU, all H elsewhere).
    Returns:
        y: (B, L, C, H) if time_dim == 1, (B, C, H, L) if time_dim == 2.
    No autograd: training goes through :func:`causal_conv`.
    """
    if time_dim not in (1, 2) or u.dim() != 3 or u.is_complex():
        raise ValueError(f"blocked_channel_conv expects a real (B, L, H) or (B, H, L) input with time_dim 1 or 2, "
                         f"got {tuple(u.shape)} {u.dtype} with time_dim={time_dim}")
    if torch.is_grad_enabled() and (u.requires_grad or Kf.requires_grad):
        raise RuntimeError("blocked_channel_conv has no backward; use causal_conv under autograd")
    B = u.shape[0]
    L, H = (u.shape[1], u.shape[2]) if time_dim == 1 else (u.shape[2], u.shape[1])
    C, F = Kf.shape[0], n // 2 + 1
    if Kf.shape[1:] != (H, F) or n < L:
        raise ValueError(f"Kf must be (C, H={H}, n // 2 + 1={F}) for n={n} >= L={L}; got {tuple(Kf.shape)}")
    if skip is not None and skip.shape != (C, H):
        raise ValueError(f"skip must be (C={C}, H={H}), got {tuple(skip.shape)}")
    if block is None and u.device.type == "cpu":
        if torch.compiler.is_compiling():
            return _channel_conv_op(u, Kf, n, time_dim, skip)     # the eager blocks, as one operator
        block = channel_block_size(B * C, n)
    elif block is None:  # caches are the CPU's concern; an accelerator wants few, large launches
        block = H
    dtype = torch.promote_types(u.dtype, Kf.real.dtype)      # a float32 u with a float64 Kf: float64
    y = u.new_empty((B, L, C, H) if time_dim == 1 else (B, C, H, L), dtype=dtype)
    if y.numel() == 0:
        return y
    blocks = _ChannelBlocks(B, L, H, n, dtype, u.device, C, channels_last=time_dim == 1, block=block)
    # Both layouts as (B, H, L) input and (B, C, H, L) output views, made once, so that a block
    # costs as few eager ops as possible (~3 us each here, ~10 a block, 8-16 blocks a call).
    src = u.transpose(1, 2) if time_dim == 1 else u
    dst = y.permute(0, 2, 3, 1) if time_dim == 1 else y
    fold_skip = skip is not None and B > 1
    # D u is D delta * u, and delta's spectrum is 1: with B > 1 the skip joins the kernel's spectrum
    # once per call, a (C, H, F) buffer 1/B of the input's spectrum (per block it was two more ops,
    # a promotion to complex and an add). With the views above: S4D's forward 3.27 -> 3.16x the
    # floor at (8, 1024) and 3.30 -> 3.11x at (4, 4096), 2 threads, interleaved A/B.
    Ks = Kf + skip[:, :, None] if fold_skip else Kf
    # (Transforms into preallocated out= buffers, or a channel-leading block layout, measured
    # 10-25% slower at (8, 1024, 128).)
    K0 = Ks.select(0, 0) if C == 1 else None
    for h0, w, b in blocks:
        blocks.gather(b, src, h0, w)
        U = torch.fft.rfft(b, n=n)                                           # (B, hb, F)
        Y = U.mul_(K0.narrow(0, h0, w)).unsqueeze(1) if C == 1 else U.unsqueeze(1) * Ks.narrow(1, h0, w)
        out = torch.fft.irfft(Y, n=n).narrow(-1, 0, L)                       # (B, C, hb, L)
        if skip is not None and not fold_skip:      # + D u while the block's input is in cache
            out.addcmul_(b.narrow(-1, 0, L).unsqueeze(1), skip.narrow(1, h0, w).unsqueeze(-1))
        blocks.scatter(dst, out, h0, w)
    return y


@torch.library.custom_op("lrnnx_zoo::channel_conv", mutates_args=())
def _channel_conv_op(u: Tensor, Kf: Tensor, n: int, time_dim: int, skip: Optional[Tensor]) -> Tensor:
    """:func:`blocked_channel_conv` inside torch.compile graphs on the CPU: its blocks as in eager,
    one operator the compiler calls without tracing into it (traced, the convolution ran as one
    whole-tensor block: a compiled S4D layer's inference forward took 11.9 ms against eager's 6.3
    at (8, 1024, 128), one thread). No autograd: inference only, like the function. The block size is
    passed: torch.compiler.is_compiling() is one flag for the process, set while any thread traces, and
    this body, run by a graph in another thread meanwhile, called the operator again (a RecursionError)."""
    return blocked_channel_conv(u, Kf, n, time_dim, skip, block=channel_block_size(u.shape[0] * Kf.shape[0], n))


@_channel_conv_op.register_fake
def _channel_conv_fake(u: Tensor, Kf: Tensor, n: int, time_dim: int, skip: Optional[Tensor]) -> Tensor:
    B = u.shape[0]
    L, H = (u.shape[1], u.shape[2]) if time_dim == 1 else (u.shape[2], u.shape[1])
    C = Kf.shape[0]
    dtype = torch.promote_types(u.dtype, Kf.real.dtype)
    return u.new_empty((B, L, C, H) if time_dim == 1 else (B, C, H, L), dtype=dtype)


_TILE = 128


def _swap_last_two(x: Tensor, pad_to: int = 0) -> Tensor:
    """(B, M, N) -> (B, N, max(M, pad_to)) contiguous, zeros after M, copied in cache-sized pieces.

    A plain ``transpose(1, 2).contiguous()`` walks one side with a stride of a whole row and was
    3.0 ms for (4, 4096, 128) float32 on the 2-core CPU; 128 x 128 tiles that stay in cache take
    0.9 ms. Where x's rows lie a multiple of 4 KiB apart (a (B, H, L) signal with L a power of two
    >= 1024, or narrowed from a transform of such a size), the rows of a tile share L1 sets and
    evict each other (8 x 1024 x 128 from (B, H, 2048) rows: 1.86 ms in tiles): each (M, N) matrix
    then goes through torch's blocked 2-D transpose instead, staged in contiguous buffers (0.46
    ms). Writing straight into a zero-padded buffer also spares the FFT its own padded copy.
    """
    B, M, N = x.shape
    if torch.compiler.is_compiling():   # the tile loop pinned a dynamic length; the compiler tiles itself
        return torch.nn.functional.pad(x.transpose(1, 2), (0, max(M, pad_to) - M)).contiguous()
    out = x.new_empty(B, N, max(M, pad_to))
    out[..., M:].zero_()
    if x.device.type == "cpu" and x.stride(2) == 1 and (x.stride(1) * x.element_size()) % 4096 == 0:
        _swap_matrices(out[..., :M], x)
        return out
    for i in range(0, M, _TILE):
        i_end = min(i + _TILE, M)
        for j in range(0, N, _TILE):
            out[:, j:j + _TILE, i:i_end].copy_(x[:, i:i_end, j:j + _TILE].transpose(1, 2))
    return out


def _swap_matrices(dst: Tensor, src: Tensor) -> None:
    """dst[b] = src[b].T one matrix at a time, through torch's blocked 2-D transpose, which takes a
    contiguous destination and the transpose of a contiguous source: either side is staged in a
    contiguous buffer where it is not. dst: (B, N, M), src: (B, M, N)."""
    B, M, N = src.shape
    if src.numel() == 0:
        return
    src_stage = None if src[0].is_contiguous() else src.new_empty(M, N)
    dst_stage = None if dst[0].is_contiguous() else src.new_empty(N, M)
    for b in range(B):
        matrix = src[b] if src_stage is None else src_stage.copy_(src[b])
        if dst_stage is None:
            dst[b].copy_(matrix.T)
        else:
            dst[b].copy_(dst_stage.copy_(matrix.T))


class _SwapLastTwo(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, pad_to: int) -> Tensor:  # type: ignore[override]
        return _swap_last_two(x, pad_to)

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        # Separate from forward, so that torch.func transforms (grad, jacrev) can run it.
        ctx.length, ctx.pad_to = inputs[0].shape[1], inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # the narrowed gradient as it is: _swap_last_two stages rows 4 KiB apart itself, matrix by matrix
        return _swap_last_two(grad[..., :ctx.length]), None

    @staticmethod
    def vmap(info, in_dims, x: Tensor, pad_to: int):  # type: ignore[override]
        """torch.func.vmap: the vmapped dim joins the batch (x: (V, B, M, N) -> (V*B, M, N))."""
        x = x.movedim(in_dims[0], 0)
        out = apply_function(_SwapLastTwo, x.flatten(0, 1), pad_to)
        return out.unflatten(0, x.shape[:2]), 0


@jvp_variant
class _SwapLastTwoJvp(_SwapLastTwo):
    """:class:`_SwapLastTwo` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def jvp(ctx, x_t: Tensor, _: None) -> Tensor:  # type: ignore[override]
        """Forward-mode AD (torch.func.jvp, jacfwd, forward_ad): the swap is linear."""
        return _swap_last_two(x_t, ctx.pad_to)


def channels_last_conv(x: Tensor, K: Tensor, n: int, skip: Optional[Tensor] = None) -> Tensor:
    """Convolution of a channels-last signal with C kernels per channel on a circle of n, for
    training: y[:, :, c, h] = the first L samples of irfft(rfft(x[:, :, h], n) * rfft(K[c, h], n)),
    plus skip[c, h] * x[:, :, h] if given, returned channels-last and contiguous.

    Args:
        x: (B, L, H) real.  K: (C, H, Lk) or (H, Lk) real kernels (lag 0 first).  n: the circle;
            n >= L + Lk - 1 gives the causal convolution (:func:`conv_size`).
        skip: (C, H), (H,) with a 2-D K, or None.
    Returns:
        y: (B, L, C, H), or (B, L, H) for a 2-D K; contiguous.

    On the CPU it runs :class:`_BlockedConv` (in a compiled graph the same code as one operator,
    :func:`_blocked_conv_op`): forward and backward stream blocks of channels through the cache,
    like :func:`blocked_channel_conv`. Elsewhere (an accelerator, a torch.func transform, mixed
    dtypes) both layouts change
    through cache-friendly copies (:func:`swap_time_and_channels`) around whole-tensor transforms.
    Either way the output is contiguous: a transposed (B, L, H) view of a (B, H, L) result made
    the layer's neighbours, and the backward's transform of their gradient, copy with a row-sized
    stride (a training step of S4D, GELU and a Linear at (8, 1024, 128): 49 ms that way, 35 ms
    with the copies; one thread, interleaved).
    """
    y = _blocked_conv(x, K, n, skip, channels_last=True)
    if y is not None:
        return y
    L = x.shape[1]
    u = swap_time_and_channels(x, pad_to=n)                                  # (B, H, n), zeros after L
    if K.dim() == 2:
        y = circular_conv(u, K, n, L)
        return swap_time_and_channels(y if skip is None else y + skip.unsqueeze(-1) * u[..., :L])
    y = circular_conv(u.unsqueeze(1), K, n, L)                               # (B, C, H, L)
    if skip is not None:
        y = y + skip.unsqueeze(-1) * u[:, None, :, :L]
    return swap_time_and_channels(y.flatten(1, 2)).unflatten(2, K.shape[:2])


def channels_first_conv(u: Tensor, K: Tensor, n: int, skip: Optional[Tensor] = None) -> Tensor:
    """:func:`channels_last_conv` for a (B, H, L) signal: y[:, c, h] = the first L samples of
    irfft(rfft(u[:, h], n) * rfft(K[c, h], n)) (+ skip[c, h] u[:, h]).

    Args:
        u: (B, H, L) real.  K: (C, H, Lk) or (H, Lk).  n: the circle.  skip: (C, H), (H,), or None.
    Returns:
        y: (B, C, H, L), or (B, H, L) for a 2-D K.

    On the CPU under autograd (eager, or as one operator in a compiled graph) it streams blocks of
    channels through the cache (:class:`_BlockedConv`: fwd+bwd of the convolution at
    (8, 128, 1024) 10.8 -> 8.3 ms, the same bits); elsewhere it is :func:`circular_conv` on the
    whole tensor.
    """
    y = _blocked_conv(u, K, n, skip, channels_last=False)
    if y is not None:
        return y
    v = u if K.dim() == 2 else u.unsqueeze(1)
    y = circular_conv(v, K, n, u.shape[-1])
    return y if skip is None else y + skip.unsqueeze(-1) * v


def _blocked_conv(x: Tensor, K: Tensor, n: int, skip: Optional[Tensor], channels_last: bool) -> Optional[Tensor]:
    """:class:`_BlockedConv`'s result where it applies (:func:`blocked_training_applies`), with
    the kernel axis dropped for a 2-D K; else None."""
    single = K.dim() == 2
    K3 = K.unsqueeze(0) if single else K
    skip2 = None if skip is None else (skip.unsqueeze(0) if single else skip)
    L = x.shape[1 if channels_last else -1]
    if n < L:
        raise ValueError(f"a circle of n={n} samples is shorter than the signal's {L} steps: expected n >= L "
                         f"(n >= L + Lk - 1, conv_size(L, Lk), for a causal convolution)")
    if not blocked_training_applies(x, K3, skip2):
        return None
    if torch.compiler.is_compiling():   # the same computation as one operator (_blocked_conv_op)
        y = _blocked_conv_op(x, K3, n, skip2, channels_last)[0]
    else:
        y = apply_function(_BlockedConv, x, K3, n, skip2, channels_last)    # (B, L, C, H) or (B, C, H, L)
    return y.squeeze(2 if channels_last else 1) if single else y


def blocked_training_applies(x: Tensor, K: Tensor, skip: Optional[Tensor] = None) -> bool:
    """Whether :func:`channels_last_conv` and :func:`channels_first_conv` take the blocked path for
    x: (B, L, H) or (B, H, L), K: (C, H, Lk) or (H, Lk), skip: (C, H), (H,) or None:
    CPU autograd on real tensors of one dtype with a non-empty batch, eager or in a torch.compile
    graph (as one operator there). torch.func transforms and accelerators keep the whole-tensor
    path."""
    tensors = (x, K) if skip is None else (x, K, skip)
    return (all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors)
            and x.dtype in (torch.float32, torch.float64) and x.dim() == 3 and K.dim() in (2, 3)
            and x.numel() > 0 and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not func_transforms_active())


class _BlockedConv(torch.autograd.Function):
    """:func:`channels_last_conv` and :func:`channels_first_conv` under autograd, blocked over
    channels (the equations of :class:`_RealCausalConv`, with the same transforms, products and
    sums per channel as the whole-tensor path, so the same bits). x: (B, L, H) -> y: (B, L, C, H)
    if channels_last, else x: (B, H, L) -> y: (B, C, H, L); K: (C, H, Lk), skip: (C, H) or None.

    Forward, per block of channels: gather x's block into a zero-padded (B, hb, n) buffer,
    U = rfft, keep conj(U) for dL/dK, irfft(U * Kf[c]) (+ skip[c] * x) for each c, write the first
    L samples into y. Backward, per block: gather the output gradient g the same way, G = rfft,
    dL/dK's spectrum sum_b G conj(U) (one (C, hb, F) slice), dL/dx = irfft(sum_c G conj(Kf[c]))
    (+ sum_c skip[c] g[c]), dL/dskip = sum_{b,t} g x; then one inverse transform of dL/dK's
    spectrum. The whole-tensor path made each of these a pass over transform-sized tensors (about
    34 MB at (8, 1024, 128) in float32, beyond L3), with layout copies before and after.
    """

    @staticmethod
    def forward(ctx, x: Tensor, K: Tensor, n: int, skip: Optional[Tensor],  # type: ignore[override]
                channels_last: bool) -> Tensor:
        y, Uc, Kfc = _blocked_forward(x, K, n, skip, channels_last, K.requires_grad, x.requires_grad)
        ctx.save_for_backward(Uc, Kfc, x if skip is not None and skip.requires_grad else None,
                              skip if skip is not None and x.requires_grad else None)
        ctx.meta = (n, K.shape[-1], channels_last)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_SECOND_DERIVATIVE)
        n, Lk, channels_last = ctx.meta
        # a batched backward: torch.func's vmap, or autograd's own (is_grads_batched, vectorize=True)
        batched = func_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(g)
        backward = _whole_backward if batched else _blocked_backward
        grad_x, grad_K, grad_skip = backward(g, *ctx.saved_tensors, n, Lk, channels_last)
        return grad_x, grad_K, None, grad_skip, None


@jvp_variant
class _BlockedConvJvp(_BlockedConv):
    """:class:`_BlockedConv` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def forward(ctx, x: Tensor, K: Tensor, n: int, skip: Optional[Tensor],  # type: ignore[override]
                channels_last: bool) -> Tensor:
        # the inputs for the jvp, kept here only: else x would live until the backward, an
        # activation per layer of a training step
        ctx.save_for_forward(x, K, skip)
        return _BlockedConv.forward(ctx, x, K, n, skip, channels_last)

    @staticmethod
    def jvp(ctx, x_t: Optional[Tensor], K_t: Optional[Tensor], _n: None,  # type: ignore[override]
            skip_t: Optional[Tensor], _c: None) -> Tensor:
        """Forward-mode AD: y = x * K + skip x is bilinear in x and (K, skip), so dy = (dx * K + skip dx)
        + (x * dK + dskip x): the forward itself, twice (a missing tangent is zero)."""
        x, K, skip = ctx.saved_tensors
        n, _, channels_last = ctx.meta
        parts = []
        if x_t is not None:
            parts.append(_blocked_forward(x_t, K, n, skip, channels_last, False, False)[0])
        if K_t is not None or skip_t is not None:
            K_t = torch.zeros_like(K) if K_t is None else K_t
            parts.append(_blocked_forward(x, K_t, n, skip_t, channels_last, False, False)[0])
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _blocked_forward(x: Tensor, K: Tensor, n: int, skip: Optional[Tensor], channels_last: bool, keep_u: bool,
                     keep_kf: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:class:`_BlockedConv`'s forward: (y, conj(rfft(x)) (B, H, F) if keep_u, conj(rfft(K)) (C, H, F)
    if keep_kf), the two spectra the backward needs for dL/dK and dL/dx."""
    xv = x.transpose(1, 2) if channels_last else x                      # (B, H, L) views
    B, H, L = xv.shape
    C = K.shape[0]
    Kf = torch.fft.rfft(K, n=n)                                           # (C, H, F)
    Uc = x.new_empty(B, H, n // 2 + 1, dtype=Kf.dtype) if keep_u else None
    y = x.new_empty((B, L, C, H) if channels_last else (B, C, H, L))
    yv = y.permute(0, 2, 3, 1) if channels_last else y                  # (B, C, H, L) views
    blocks = _ChannelBlocks(B, L, H, n, x.dtype, x.device, C, channels_last=channels_last)
    for h0, w, buf in blocks:
        blocks.gather(buf, xv, h0, w)
        U = torch.fft.rfft(buf, n=n)                                     # (B, w, F)
        if keep_u:
            torch.conj_physical(U, out=Uc.narrow(1, h0, w))
        # One kernel: the product in place, in U's buffer (no new block-sized tensor)
        Y = U.mul_(Kf[0].narrow(0, h0, w)).unsqueeze(1) if C == 1 else U.unsqueeze(1) * Kf.narrow(1, h0, w)
        out = torch.fft.irfft(Y, n=n).narrow(-1, 0, L)                   # (B, C, w, L)
        if skip is not None:            # (not addcmul_: a fused multiply-add rounds otherwise)
            out = out.add_(skip.narrow(1, h0, w).unsqueeze(-1) * buf.narrow(-1, 0, L).unsqueeze(1))
        blocks.scatter(yv, out, h0, w)
    return y, Uc, (Kf.conj_physical_() if keep_kf else None)


def _blocked_backward(g: Tensor, Uc: Optional[Tensor], Kfc: Optional[Tensor], x: Optional[Tensor],
                      skip: Optional[Tensor], n: int, Lk: int, channels_last: bool
                      ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """:class:`_BlockedConv`'s backward for the output gradient g (y's shape): (dL/dx if Kfc is
    given, dL/dK if Uc is, dL/dskip if x is); skip, when given, adds skip * g to dL/dx."""
    gv = g.permute(0, 2, 3, 1) if channels_last else g                  # (B, C, H, L) views
    B, C, H, L = gv.shape
    grad_x = g.new_empty((B, L, H) if channels_last else (B, H, L)) if Kfc is not None else None
    spectrum_K = Uc.new_empty(C, H, n // 2 + 1) if Uc is not None else None
    grad_skip = g.new_empty(C, H) if x is not None else None
    blocks = _ChannelBlocks(B, L, H, n, g.dtype, g.device, C, stacked=True, channels_last=channels_last)
    x_block = g.new_empty(B, 1, blocks.hb, L) if x is not None else None
    xv = None if x is None else (x.transpose(1, 2) if channels_last else x).unsqueeze(1)   # (B, 1, H, L)
    gxv = None if grad_x is None else (grad_x.transpose(1, 2) if channels_last else grad_x).unsqueeze(1)
    for h0, w, buf in blocks:
        blocks.gather(buf, gv, h0, w)                                    # (B, C, w, n)
        g_block = buf.narrow(-1, 0, L)
        if grad_skip is not None:
            u = x_block if w == blocks.hb else x_block.narrow(2, 0, w)
            blocks.gather(u, xv, h0, w)
            torch.sum(g_block * u, dim=(0, 3), out=grad_skip.narrow(1, h0, w))
        G = torch.fft.rfft(buf, n=n)                                     # (B, C, w, F)
        if spectrum_K is not None:      # the batch summed before the inverse transform
            torch.sum(G * Uc.narrow(1, h0, w).unsqueeze(1), dim=0, out=spectrum_K.narrow(1, h0, w))
        if grad_x is not None:          # G is not needed after this: in place; C summed before it
            GK = G.mul_(Kfc.narrow(1, h0, w))
            out = torch.fft.irfft(GK.squeeze(1) if C == 1 else GK.sum(1), n=n).narrow(-1, 0, L)
            if skip is not None:
                gs = g_block * skip.narrow(1, h0, w).unsqueeze(-1)
                out = out.add_(gs.squeeze(1) if C == 1 else gs.sum(1))
            blocks.scatter(gxv, out.unsqueeze(1), h0, w)
    grad_K = torch.fft.irfft(spectrum_K, n=n).narrow(-1, 0, Lk) if spectrum_K is not None else None
    return grad_x, grad_K, grad_skip


def _whole_backward(g: Tensor, Uc: Optional[Tensor], Kfc: Optional[Tensor], x: Optional[Tensor],
                    skip: Optional[Tensor], n: int, Lk: int, channels_last: bool
                    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """:func:`_blocked_backward`'s equations as whole-tensor, out-of-place ops, for a backward run
    under a torch.func transform: a batched backward (``jacobian(..., vectorize=True)``,
    ``autograd.grad(..., is_grads_batched=True)``) vmaps it, and vmap cannot write into the blocks'
    buffers ("vmap: aten::copy_ ... not possible")."""
    gv = g.permute(0, 2, 3, 1) if channels_last else g                  # (B, C, H, L)
    L = gv.shape[-1]
    G = torch.fft.rfft(gv, n=n)                                          # (B, C, H, F)
    grad_K = None
    if Uc is not None:
        grad_K = torch.fft.irfft((G * Uc.unsqueeze(1)).sum(0), n=n)
        # a slice to the full length is an alias, which the batched backward has no rule for
        grad_K = grad_K[..., :Lk] if Lk < n else grad_K
    grad_x = None
    if Kfc is not None:
        gx = torch.fft.irfft((G * Kfc).sum(1), n=n)[..., :L]             # (B, H, L)
        if skip is not None:
            gx = gx + (gv * skip.unsqueeze(-1)).sum(1)
        grad_x = gx.transpose(1, 2) if channels_last else gx
    grad_skip = None
    if x is not None:
        xv = (x.transpose(1, 2) if channels_last else x).unsqueeze(1)    # (B, 1, H, L)
        grad_skip = (gv * xv).sum((0, 3))
    return grad_x, grad_K, grad_skip


@torch.library.custom_op("lrnnx_zoo::blocked_conv", mutates_args=())
def _blocked_conv_op(x: Tensor, K: Tensor, n: int, skip: Optional[Tensor], channels_last: bool
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """:class:`_BlockedConv` inside torch.compile graphs on the CPU: the blocked convolution (its
    loops over blocks and in-place buffers run as in eager) as one operator the compiler calls
    without tracing into it, so a compiled layer convolves as fast as an eager one. Traced, the
    convolution had to stay whole-tensor: S4D's layer fwd+bwd minus its kernel took 15.7 ms
    compiled against 8.6 ms eager at (8, 1024, 128), one thread. Returns (y, conj(rfft(x)),
    conj(rfft(K))), the spectra kept for the backward (:func:`_blocked_conv_backward_op`)."""
    return _blocked_forward(x, K, n, skip, channels_last, True, True)     # type: ignore[return-value]


@_blocked_conv_op.register_fake
def _blocked_conv_fake(x: Tensor, K: Tensor, n: int, skip: Optional[Tensor], channels_last: bool
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    B, L, H = (x.shape[0], x.shape[1], x.shape[2]) if channels_last else (x.shape[0], x.shape[2], x.shape[1])
    C, F = K.shape[0], n // 2 + 1
    y = x.new_empty((B, L, C, H) if channels_last else (B, C, H, L))
    cdt = torch.promote_types(x.dtype, torch.complex64)
    return y, x.new_empty(B, H, F, dtype=cdt), x.new_empty(C, H, F, dtype=cdt)


@torch.library.custom_op("lrnnx_zoo::blocked_conv_backward", mutates_args=())
def _blocked_conv_backward_op(g: Tensor, Uc: Optional[Tensor], Kfc: Optional[Tensor], x: Optional[Tensor],
                              skip: Optional[Tensor], n: int, Lk: int, channels_last: bool
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`_blocked_backward` as an operator: (dL/dx, dL/dK, dL/dskip), each an empty (0,)
    tensor where its input (Kfc, Uc, x in that order) was not given."""
    grads = _blocked_backward(g, Uc, Kfc, x, skip, n, Lk, channels_last)
    return tuple(g.new_empty(0) if t is None else t.contiguous() for t in grads)     # type: ignore[return-value]


@_blocked_conv_backward_op.register_fake
def _blocked_conv_backward_fake(g: Tensor, Uc: Optional[Tensor], Kfc: Optional[Tensor], x: Optional[Tensor],
                                skip: Optional[Tensor], n: int, Lk: int, channels_last: bool
                                ) -> Tuple[Tensor, Tensor, Tensor]:
    B, L, C, H = (g.shape[0], g.shape[1], g.shape[2], g.shape[3]) if channels_last else \
        (g.shape[0], g.shape[3], g.shape[1], g.shape[2])
    return (g.new_empty((B, L, H) if channels_last else (B, H, L)) if Kfc is not None else g.new_empty(0),
            g.new_empty(C, H, Lk) if Uc is not None else g.new_empty(0),
            g.new_empty(C, H) if x is not None else g.new_empty(0))


def _blocked_conv_op_setup(ctx, inputs, output) -> None:
    x, K, n, skip, channels_last = inputs
    _, Uc, Kfc = output
    ctx.save_for_backward(Uc, Kfc, x, skip)
    ctx.meta = (n, K.shape[-1], channels_last)


def _blocked_conv_op_grads(ctx, g: Tensor, _g_Uc: Optional[Tensor], _g_Kfc: Optional[Tensor]):
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_SECOND_DERIVATIVE)
    Uc, Kfc, x, skip = ctx.saved_tensors
    need_x, need_K, _, need_skip = ctx.needs_input_grad[:4]
    n, Lk, channels_last = ctx.meta
    gx, gK, gs = _blocked_conv_backward_op(g, Uc if need_K else None, Kfc if need_x else None,
                                           x if need_skip else None, skip if need_x else None, n, Lk, channels_last)
    return (gx if need_x else None), (gK if need_K else None), None, (gs if need_skip else None), None


_blocked_conv_op.register_autograd(_blocked_conv_op_grads, setup_context=_blocked_conv_op_setup)


def swap_time_and_channels(x: Tensor, pad_to: int = 0) -> Tensor:
    """(B, L, H) -> (B, H, max(L, pad_to)) contiguous, zero-padded, differentiable (and back, for
    (B, H, L) inputs): FFTs run fastest along a contiguous last axis, and the layers' interface
    is (B, L, H). Pass ``pad_to=fast_fft_size(...)`` and ``length=L`` to :func:`causal_conv`."""
    if x.dim() != 3:
        raise ValueError(f"expected a (B, L, H) or (B, H, L) tensor, got shape {tuple(x.shape)}")
    return apply_function(_SwapLastTwo, x, pad_to)


def fft_conv(equation: str, input: Tensor, *args: Tensor) -> Tensor:
    """Causal FFT convolution expressed as an einsum over the frequency domain.

    The time letter is the second subscript of ``input`` (input: (B, L, ...)). Each operand whose
    subscripts contain it is Fourier-transformed along that axis (kernels of length <= L);
    the others (projection matrices) are contracted untouched. The output is transformed back
    and truncated to L steps.

    Example:
        ``fft_conv("blh,lhk->blk", x, K)``  with a full kernel K: (L, H, H);
        ``fft_conv("blh,ln,nh,kn->blk", x, K, B, C)`` for a diagonal SSM (complex result).

    Args:
        equation: einsum equation with explicit output (``->``).
        input: (B, L, ...) signal.
        *args: kernels (with the time letter) and matrices.
    Returns:
        Tensor of the output's subscripts, time length L (complex if any operand is complex).
    """
    if "->" not in equation:
        raise ValueError(f"fft_conv needs an explicit output, e.g. 'blh,lhk->blk'; got {equation!r}")
    lhs, out = equation.replace(" ", "").split("->")
    subs = lhs.split(",")
    operands = (input,) + args
    if len(subs) != len(operands):
        raise ValueError(f"equation {equation!r} names {len(subs)} operands, got {len(operands)} tensors")
    for s, t in zip(subs, operands):
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"fft_conv: operand {s!r} of {equation!r} must be a real or complex tensor, got {got}")
        if len(s) != t.dim():
            raise ValueError(f"operand {s!r} in {equation!r} has {len(s)} axes, tensor has shape {tuple(t.shape)}")
    if len(subs[0]) < 2:
        raise ValueError("input must be (B, L, ...): its second subscript is the time axis")
    t = subs[0][1]
    if t not in out:
        raise ValueError(f"output {out!r} must keep the time axis {t!r}")
    sizes: Dict[str, Tuple[int, str]] = {}
    for s, op in zip(subs, operands):          # (opt_einsum's own error named no operand)
        for letter, size in zip(s, op.shape):
            seen, where = sizes.setdefault(letter, (size, s))
            if letter != t and seen != size:    # kernels may be shorter in time than the input
                raise ValueError(f"fft_conv: axis {letter!r} of {equation!r} is {seen} long in operand {where!r} and "
                                 f"{size} in operand {s!r}")
    L = input.shape[1]
    timed = [i for i, s in enumerate(subs) if t in s]
    Lk = max(operands[i].shape[subs[i].index(t)] for i in timed)
    n = fast_fft_size(L + Lk - 1)
    real = not any(operands[i].is_complex() for i in range(len(operands)))
    fwd = functools.partial(torch.fft.rfft if real else torch.fft.fft, n=n)
    spectra = [fwd(op, dim=s.index(t)) if t in s else op for s, op in zip(subs, operands)]
    # one complex dtype for all: real projection matrices next to the spectra, a float32 kernel with a
    # float64 input ("both inputs should have same dtype", "expected ComplexDouble")
    ctype = torch.promote_types(torch.complex64, functools.reduce(torch.promote_types, (op.dtype for op in operands)))
    spectra = [x if x.dtype == ctype else x.to(ctype) for x in spectra]
    y = opt_einsum.contract(equation, *spectra, backend="torch", optimize="optimal")
    inv = torch.fft.irfft if real else torch.fft.ifft
    return inv(y, n=n, dim=out.index(t)).narrow(out.index(t), 0, L)


def _pair_rows(M: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, H) complex -> (2N, H) real with rows [Re m_0, Im m_0, Re m_1, ...] (complex-view order):
    a real matmul's output is then a complex (..., N) view, no copy."""
    return torch.stack([M.real, M.imag], 1).reshape(2 * M.shape[0], M.shape[1]).to(dtype)


def project_in(u: Tensor, B: Tensor) -> Tensor:
    """B u for real u: (Bsz, L, H) and complex B: (N, H) -> (Bsz, L, N) complex, one real matmul."""
    Bsz, L, _ = u.shape
    return torch.view_as_complex((u @ _pair_rows(B, u.dtype).T).view(Bsz, L, B.shape[0], 2))


def project_out(x: Tensor, C: Tensor) -> Tensor:
    """Re(C x) for complex x: (Bsz, L, N) and C: (H_out, N) -> (Bsz, L, H_out) real, one real matmul
    (Re(C x) = Re C Re x - Im C Im x)."""
    Bsz, L, N = x.shape
    xr = torch.view_as_real(x)
    # [Re c, -Im c] pairs as conj(C) seen as real: one op where stacking the two strided halves took
    # 25 of 57 us of a (1, 64, 128) projection (one thread)
    Cpair = torch.view_as_real(C.conj_physical()).reshape(C.shape[0], 2 * N).to(xr.dtype)
    return xr.reshape(Bsz, L, 2 * N) @ Cpair.T


def _check_diagonal_ssm(x: Tensor, K: Tensor, B_: Tensor, C: Tensor) -> None:
    """Refuse operands of :func:`opt_ssm_forward`'s diagonal form that are not x (B, L, H), K (Lk, N),
    B_ (N, H), C (H_out, N). The seed's LTI_LRNN.compute_kernel documents K as (N, L): such a K failed
    in einsum ("Size of label 'n' for operand 1 (5) does not match previous terms (9)"), naming no argument."""
    ok = (all(isinstance(t, Tensor) for t in (x, K, B_, C)) and x.dim() == 3 and K.dim() == 2
          and B_.dim() == 2 and C.dim() == 2 and B_.shape == (K.shape[1], x.shape[2]) and C.shape[1] == K.shape[1])
    if ok:
        return
    shapes = {name: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
              for name, t in (("x", x), ("K", K), ("B_", B_), ("C", C))}
    hint = ""
    if isinstance(K, Tensor) and isinstance(B_, Tensor) and K.dim() == 2 and B_.dim() == 2 \
            and K.shape[0] == B_.shape[0] != K.shape[1]:
        hint = f"; K looks like (N, L) = {tuple(K.shape)}: pass K.T (time first)"
    raise ValueError(f"opt_ssm_forward expects x (B, L, H), K (L, N) (time first, as LRU.compute_kernel returns "
                     f"it) or a full kernel (L, H_out, H), B_ (N, H) and C (H_out, N); got "
                     f"{', '.join(f'{k} {v}' for k, v in shapes.items())}{hint}")


def opt_ssm_forward(x: Tensor, K: Tensor, B_: Tensor, C: Tensor) -> Tensor:
    """Convolution mode of a multi-input multi-output SSM with diagonal state matrix.

    y_t = Re( C sum_{j<=t} diag(K_j) B_ x_{t-j} ),  the form of the LRU (Orvieto et al. 2023, eq. 6).

    Args:
        x: (B, L, H) real input.
        K: (L, N) powers Lambda^l of the diagonal (complex), or a full kernel (L, H_out, H) real.
        B_: (N, H) normalised input matrix (ignored for a full kernel).
        C: (H_out, N) output matrix (ignored for a full kernel).
    Returns:
        y: (B, L, H_out) real.

    The order is chosen by cost: projecting to the N modes first costs one (B L, H)x(H, 2N) real
    matmul plus N complex transforms, while expanding the full kernel C diag(K_l) B costs
    L H_out H N and H_out x H transforms; the cheaper one runs.
    """
    if K.dim() == 3:
        return fft_conv("blh,lkh->blk", x, K)
    _check_diagonal_ssm(x, K, B_, C)
    Bsz, L, H = x.shape
    N = K.shape[-1]
    H_out = C.shape[0]
    project_first = Bsz * L * (H + H_out) * N * 2 + Bsz * N * L <= L * H_out * H * N + Bsz * H_out * L
    if not project_first:
        full = torch.einsum("kn,ln,nh->lkh", C, K, B_)
        # in x's precision, as the projection below: a complex128 kernel against a float32 x failed in einsum
        full = full.to(x.dtype) if x.is_complex() else full.real.to(x.dtype)
        return fft_conv("blh,lkh->blk", x, full).real
    z = project_in(x, B_)
    return project_out(causal_conv(z, K.to(z.dtype), dim=-2), C)


def __getattr__(name: str) -> Any:
    # FFTConvS4 lives in the fftconv plugin; it is importable from here, as in the seed API.
    if name == "FFTConvS4":
        from lrnnx_zoo.plugins.fftconv import FFTConvS4
        return FFTConvS4
    raise AttributeError(name)
