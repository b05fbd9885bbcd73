"""Vandermonde kernels for diagonal state-space models.

A diagonal SSM with discrete eigenvalues ``lam_n = exp(log_lam_n)`` has the convolution kernel
``K = (B_bar * C) @ V_L(lam)``, a Vandermonde matrix-vector product (Gu et al. 2022, "On the
Parameterization and Initialization of Diagonal State Space Models"; the same kernel unrolls the
LRU recurrence of Orvieto et al. 2023):

    K[l] = sum_n v_n * lam_n^l = sum_n v_n * exp(l * log_lam_n),      l = 0 .. L-1,

i.e. ``K = v @ V(lam)`` with ``V`` the (N, L) Vandermonde matrix, where ``v_n = C_n * B_bar_n``
folds the input/output projections into one vector. The state stores only one eigenvalue of each
complex-conjugate pair, so the real kernel is ``K = 2 * Re(sum_n ...)`` (``conj=True``).

Two backends:

- :func:`vandermonde_torch` never forms the (N, L) matrix. It writes ``l = j*T + t``
  (``0 <= t < T``, ``J = ceil(L / T)`` blocks), so that

      K[j*T + t] = sum_n (v_n lam_n^{jT}) * lam_n^t = (W @ P)[j, t],

  one batched real matmul of ``W: (J, 2N)`` by ``P: (2N, T)``. That is ``O(N (J + T))``
  transcendentals instead of ``O(N L)``, and the matmul runs at BLAS speed. The exponents of
  both factors are formed in float64 with the phase reduced mod 2*pi, so a float32 result is
  accurate to ~1e-7 relative even at L = 65536 with |lam| = 1 (a plain float32 ``exp(l*log_lam)``
  loses ~L * 6e-8 radians of phase: ~1e-4 relative at L = 65536).
- :func:`vandermonde_keops` evaluates the sum lazily with a pykeops ``Genred`` reduction.

:func:`vandermonde` dispatches between them.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..base import apply_function, forward_ad_active, func_transforms_active, jvp_variant, without_autocast
from ..shapes import broadcast_shape
from .keops_support import auto_may_use_keops, quiet_keops, require_keops

__all__ = ["vandermonde", "vandermonde_torch", "vandermonde_keops", "BACKENDS", "default_block_size"]

BACKENDS = ("auto", "torch", "keops")

# What the factors of one block of rows may hold at the peak of an inference call, in bytes (64 MB):
# :func:`_rows_per_block`.
_BLOCK_BYTES = 64 * 2**20
#: Peak bytes of an inference call per factor value (row, mode, one of the T + J columns), in units of
#: the result's real itemsize: measured 20.5-22.4 B in float32 and 41-44 B in float64 (rows 2048-4096,
#: N 64-128, L 256-4096), the factors, their float64 exponents and the matmul's stacked operands; 6 with a margin.
_PEAK_ITEMS_PER_VALUE = 6

# "auto" picks keops when batch * N * L is at least this many terms on that device type; None
# means never. Measured on a 2-core Xeon CPU (benchmarks/bench_kernels.py): the torch path is
# 40-60x faster than keops at every size tried, forward 1.3 vs 54 ms (H=128, N=32, L=1024),
# 4.8 vs 222 ms (L=4096), 30 vs 1697 ms (H=64, L=65536), and ~8x at tiny sizes (H=1, N=4, L=16),
# because the two-level factorisation turns the O(N L) exps into a matmul, while keops evaluates
# one exp/cos/sin per (n, l) term. GPU has not been measured, so it also defaults to torch.
_KEOPS_MIN_TERMS: dict[str, Optional[int]] = {"cpu": None, "cuda": None}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _re_im(x: Tensor) -> tuple[Tensor, Tensor]:
    """(real part, imaginary part) of a real or complex tensor."""
    if x.is_complex():
        return x.real, x.imag
    return x, torch.zeros_like(x)


def _check(v: Tensor, log_lam: Tensor, L: int, fn: str) -> torch.Size:
    """Validate inputs; return the broadcast batch shape of v and log_lam."""
    if not isinstance(v, Tensor) or not isinstance(log_lam, Tensor):
        raise TypeError(f"{fn}: v and log_lam must be tensors, got {type(v).__name__} and "
                        f"{type(log_lam).__name__}")
    if isinstance(L, bool) or not isinstance(L, (int, torch.SymInt)) or L < 0:   # symbolic under torch.export
        raise ValueError(f"{fn}: L must be a non-negative int, got {L!r}")
    if v.dim() == 0 or log_lam.dim() == 0:
        raise ValueError(f"{fn}: expected v and log_lam of shape (..., N), got {tuple(v.shape)} "
                         f"and {tuple(log_lam.shape)}")
    if v.shape[-1] != log_lam.shape[-1]:
        raise ValueError(f"{fn}: v and log_lam must share the last (state) dimension N; got "
                         f"v {tuple(v.shape)} and log_lam {tuple(log_lam.shape)}")
    try:
        return broadcast_shape(v.shape[:-1], log_lam.shape[:-1])
    except (ValueError, RuntimeError):      # broadcast_shape's, or torch's under torch.compile
        raise ValueError(f"{fn}: batch dims of v {tuple(v.shape)} and log_lam "
                         f"{tuple(log_lam.shape)} do not broadcast") from None


def _real_dtype(v: Tensor, log_lam: Tensor) -> torch.dtype:
    """Real dtype of the result: the coefficients' (float64 for complex128 / float64 v, else
    float32). The exponents are formed in float64 whatever their dtype, so a float64 ``log_lam``
    with float32 ``v`` buys exact phases at float32 cost: a float32 model's ``dt * A`` rounded to
    float32 moved its S4D kernel by 7e-6 relative at L=4096, against 3e-8 from float64 exponents."""
    dt = v.real.dtype if v.is_complex() else v.dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def default_block_size(L: int, rows: int = 1, N: int = 1, itemsize: int = 8) -> int:
    """Inner block length T of the two-level factorisation ``l = j*T + t``.

    T ~ sqrt(L) (power of two) balances the O(N (J + T)) transcendentals of the two factors; the
    matmul costs the same for any T. Measured best on CPU: T=32 at L=1024, 64 at 4096, 256 at
    L=65536. Under torch.compile a fixed T (:data:`_COMPILED_BLOCK`), which need not divide L.

    ``rows``, ``N`` and ``itemsize`` do not change T: the factors hold rows * N * (T + J) values, least
    at T ~ sqrt(L), so T was once clamped to keep the (rows, 2N, T) one under 64 MB, which only moved
    the values into the (rows, 2N, J) one: at rows=16384, N=128, L=256 T went from 16 to 4 and J from 16
    to 64, 3.7 GB and 11.4 s instead of 1.3 GB and 5.1 s. An inference call bounds its memory by rows
    instead (:func:`_rows_per_block`). Kept in the signature for callers that pass them.
    """
    if torch.compiler.is_compiling():
        # log2 of a dynamic L and its comparisons pinned L in the graph: a graph per length
        return _COMPILED_BLOCK
    T = 1 << max(4, math.ceil(math.log2(max(L, 1)) / 2))
    return max(1, min(T, max(L, 1)))


#: The block length T of compiled graphs: the best one at L = 1024, within 2x of the optimal count
#: of transcendentals, O(N (L / T + T)), from L = 256 to 4096. One graph then serves every L > T.
_COMPILED_BLOCK = 32


def _powers_re_im(re: Tensor, im: Tensor, steps: Tensor, out_dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor]:
    """Re and Im of exp(steps * (re + i im)), returned in out_dtype.

    re, im: (..., N) float64 and steps: (S,) float64 -> two (..., N, S) tensors. The exponent is
    formed in float64 and its phase reduced to [-pi, pi] before the cast: a float32 product
    ``steps * im`` of ~1e5 rad would already be off by ~1e-2 rad. The reduction subtracts the
    nearest multiple of 2 pi (exact to ~1e-11 rad at 1e5 rad; float64 ``remainder`` was the
    kernel's costliest op). exp/cos/sin then run in out_dtype (cheaper; the reduced arguments are
    small, so they lose nothing).
    """
    phase = im.unsqueeze(-1) * steps
    if out_dtype != torch.float64:
        # 2 pi as a literal: torch.compile(dynamic=True) read math.pi as a symbolic float, which
        # dynamo could not carry into this autograd.Function's graph (an internal AssertionError)
        two_pi = 6.283185307179586
        phase = phase - torch.round(phase * (1 / two_pi)) * two_pi
    phase = phase.to(out_dtype)
    mag = torch.exp((re.unsqueeze(-1) * steps).to(out_dtype))
    return mag * torch.cos(phase), mag * torch.sin(phase)


def _factors(log_lam: Tensor, T: int, J: int, rdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re/Im of P[..., n, t] = lam_n^t (t < T) and Q[..., n, j] = lam_n^{jT} (j < J), in rdt."""
    re, im = _re_im(log_lam)
    re, im = re.to(torch.float64), im.to(torch.float64)
    t = torch.arange(T, dtype=torch.float64, device=log_lam.device)
    Pr, Pi = _powers_re_im(re, im, t, rdt)
    Qr, Qi = _powers_re_im(re, im, torch.arange(J, dtype=torch.float64, device=log_lam.device) * T, rdt)
    return Pr, Pi, Qr, Qi


def _kernel_from_factors(v: Tensor, factors: tuple[Tensor, Tensor, Tensor, Tensor], L: int, conj: bool,
                         rdt: torch.dtype) -> Tensor:
    """K[..., jT + t] = sum_n (v_n Q_nj) P_nt (times 2, real part, if ``conj``): one real matmul."""
    Pr, Pi, Qr, Qi = factors
    T, J = Pr.shape[-1], Qr.shape[-1]
    vr, vi = _re_im(v)
    scale = 2.0 if conj else 1.0   # the conjugate pair's factor 2, on the smallest tensor
    vr, vi = (scale * vr.to(rdt)).unsqueeze(-1), (scale * vi.to(rdt)).unsqueeze(-1)
    # W = v * lam^{jT}: (..., N, J) complex product, kept as real/imag parts.
    Wr = vr * Qr - vi * Qi
    Wi = vr * Qi + vi * Qr
    # Re(W P) = Wr Pr - Wi Pi = [Wr, -Wi] @ [Pr; Pi]: one real matmul over the stacked 2N axis.
    A = torch.cat([Wr, -Wi], dim=-2).transpose(-1, -2)                # (..., J, 2N)
    B = torch.cat([Pr, Pi], dim=-2)                                   # (..., 2N, T)
    if conj:
        K = torch.matmul(A, B)                                        # (..., J, T)
    else:
        # Im(W P) = Wr Pi + Wi Pr = [Wr, -Wi] @ [Pi; -Pr]: both parts from one 2T-wide matmul.
        K = torch.matmul(A, torch.cat([B, torch.cat([Pi, -Pr], dim=-2)], dim=-1))
        K = torch.complex(K[..., :T], K[..., T:])                     # (..., J, T)
    return K.reshape(*K.shape[:-2], J * T)[..., :L]


def _blocks(L: int, T: int) -> int:
    """J, the blocks of T taps that cover L: ceil(L / T), and under torch.compile L // T + 2. In a
    graph with a dynamic L, a J T equal to L for some lengths and not for others made the slices to
    L (and the backward's padding) differ in layout, and the graph was pinned to L % T == 0 or not
    (a recompile when the other kind came); J T > L always is one kind. J = 1 (L < T) is a size-1
    axis, another layout again: graphs and torch.export programs were pinned to L >= T; J >= 2
    always is one kind (one block of T taps more, at L >= T, than needed)."""
    return L // T + 2 if torch.compiler.is_compiling() else -(-L // T)


class _Vandermonde(torch.autograd.Function):
    """The factorised Vandermonde product with a backward of the same shape (one matmul).

    With H_l = 2 dL/dK_l (``conj``, real K) or conj(dL/dK_l) (complex K), z_n = lam_n:
        S_n = sum_l H_l z_n^l,   S'_n = sum_l l H_l z_n^l,
        dL/dv_n = conj(S_n),     dL/dlog_lam_n = conj(v_n S'_n)      (torch's conjugate convention),
    and with l = jT + t both sums come from R = [H; t H] P^T (one matmul), then
    S = sum_j Q_j R_j and S' = sum_j Q_j (jT R_j + R'_j). Autograd through the factorisation made
    ~20 elementwise passes over the (..., N, T) and (..., N, J) factors, several in float64, and two
    matmuls. A backward that is itself differentiated (create_graph, torch.func.hessian) rebuilds
    the factors from log_lam instead of reading the saved ones, which are constants to autograd.
    """

    generate_vmap_rule = True      # forward and backward are out-of-place ops: torch.func.vmap batches them

    @staticmethod
    def forward(v: Tensor, log_lam: Tensor, L: int, conj: bool, T: int, rdt: torch.dtype  # type: ignore[override]
                ) -> Tuple[Tensor, ...]:
        """K and the factors (Pr, Pi, Qr, Qi) the backward reuses: returned rather than kept on
        ctx here, as torch.func transforms (grad, jacrev) need of a Function's saved intermediates."""
        factors = _factors(log_lam, T, _blocks(L, T), rdt)
        return (_kernel_from_factors(v, factors, L, conj, rdt), *factors)

    @staticmethod
    def setup_context(ctx, inputs, outputs: Tuple[Tensor, ...]) -> None:  # type: ignore[override]
        v, log_lam, L, conj, T, rdt = inputs
        factors = outputs[1:]
        ctx.mark_non_differentiable(*factors)
        ctx.save_for_backward(v, log_lam, *factors)
        ctx.meta = (L, conj, T, rdt)

    @staticmethod
    def backward(ctx, g: Tensor, *_: Optional[Tensor]):  # type: ignore[override]
        # Outside autocast, where a backward called inside the region would run its real matmuls in
        # bfloat16 (S4D's float32 log_dt gradient was 1e-2 off); the forward runs outside it too
        # (modal.channel_kernel).
        with without_autocast(g.device.type):
            return _Vandermonde._grads(ctx, g)

    @staticmethod
    def _grads(ctx, g: Tensor) -> Tuple[Optional[Tensor], ...]:
        v, log_lam, Pr, Pi, Qr, Qi = ctx.saved_tensors
        L, conj, T, rdt = ctx.meta
        needs = ctx.needs_input_grad[:2]
        N, J = Pr.shape[-2], Qr.shape[-1]
        if torch.is_grad_enabled() or forward_ad_active():
            # This backward is itself differentiated (create_graph, torch.func.hessian, jacrev(jacrev)):
            # the factors, saved as constants, are rebuilt from log_lam so that the formulas below depend
            # on it. (A call of autograd.grad on the recomputed kernel found no graph under torch.func,
            # whose tensors here do not require grad: "element 0 of tensors does not require grad".)
            Pr, Pi, Qr, Qi = _factors(log_lam, T, J, rdt)
        t = torch.arange(T, dtype=rdt, device=g.device)
        # H as (..., J, T) rows; the rows of [H; t H] give R and R' in one matmul against P^T.
        if conj:
            H = torch.nn.functional.pad(2.0 * g.to(rdt), (0, J * T - L))
            H = H.reshape(*H.shape[:-1], J, T)          # (not unflatten: autograd's batched backward has no rule)
            R = torch.matmul(torch.cat([H, H * t], dim=-2), torch.cat([Pr, Pi], dim=-2).transpose(-1, -2))
        else:                              # complex H: [Hr, Hi] against [[Pr, Pi], [-Pi, Pr]]^T
            H = torch.nn.functional.pad(g.conj().resolve_conj(), (0, J * T - L))
            H = H.reshape(*H.shape[:-1], J, T)
            H = torch.cat([H.real, H.imag], dim=-1)                                     # (..., J, 2T)
            t2 = torch.cat([t, t])
            P = torch.cat([torch.cat([Pr, -Pi], dim=-1), torch.cat([Pi, Pr], dim=-1)], dim=-2)  # (..., 2N, 2T)
            R = torch.matmul(torch.cat([H, H * t2], dim=-2), P.transpose(-1, -2))
        # R: (..., 2J, 2N) = [Re | Im] of (R_j; R'_j) per mode n
        Rr, Ri = R[..., :N].transpose(-1, -2), R[..., N:].transpose(-1, -2)             # (..., N, 2J)
        jT = torch.arange(J, dtype=rdt, device=g.device) * T
        Ar, Ai = Rr[..., :J], Ri[..., :J]                               # R_j
        Br, Bi = Rr[..., J:] + jT * Ar, Ri[..., J:] + jT * Ai           # R'_j + jT R_j
        grad_v = grad_log = None
        if needs[0]:
            Sr, Si = (Qr * Ar - Qi * Ai).sum(-1), (Qr * Ai + Qi * Ar).sum(-1)
            grad_v = torch.complex(Sr, -Si) if v.is_complex() else Sr
            grad_v = grad_v.sum_to_size(v.shape).to(v.dtype)
        if needs[1]:
            S2r, S2i = (Qr * Br - Qi * Bi).sum(-1), (Qr * Bi + Qi * Br).sum(-1)
            vr, vi = _re_im(v)
            vr, vi = vr.to(rdt), vi.to(rdt)
            gr, gi = vr * S2r - vi * S2i, -(vr * S2i + vi * S2r)      # conj(v S')
            grad_log = torch.complex(gr, gi) if log_lam.is_complex() else gr
            grad_log = grad_log.sum_to_size(log_lam.shape).to(log_lam.dtype)
        return grad_v, grad_log, None, None, None, None


@jvp_variant(keep=lambda inputs, outputs: (inputs[0], inputs[1], *outputs[1:]))
class _VandermondeJvp(_Vandermonde):
    """:class:`_Vandermonde` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def forward(v: Tensor, log_lam: Tensor, L: int, conj: bool, T: int, rdt: torch.dtype  # type: ignore[override]
                ) -> Tuple[Tensor, ...]:
        # Outputs that are views of the Function's own intermediates failed an internal assert of
        # forward-mode AD on their view metadata: copies (K is (H, L), small next to the factors).
        return tuple(t.clone() if t._is_view() else t for t in _Vandermonde.forward(v, log_lam, L, conj, T, rdt))

    @staticmethod
    def jvp(ctx, v_t: Optional[Tensor], log_lam_t: Optional[Tensor], *_: None  # type: ignore[override]
            ) -> Tuple[Optional[Tensor], ...]:
        """Forward-mode AD: K_l = sum_n v_n lam_n^l gives dK_l = sum_n dv_n lam_n^l + l sum_n v_n
        dlog_lam_n lam_n^l, two products with the same factors (l does not depend on n)."""
        v, log_lam, *factors = ctx.saved_tensors
        L, conj, T, rdt = ctx.meta
        dK = None
        if v_t is not None:
            dK = _kernel_from_factors(v_t, tuple(factors), L, conj, rdt)
        if log_lam_t is not None:
            l = torch.arange(L, dtype=rdt, device=v.device)
            part = l * _kernel_from_factors(v * log_lam_t, tuple(factors), L, conj, rdt)
            dK = part if dK is None else dK + part
        return (dK, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------

def vandermonde_torch(v: Tensor, log_lam: Tensor, L: int, conj: bool = True,
                      chunk_size: Optional[int] = None) -> Tensor:
    """Vandermonde kernel ``K[..., l] = sum_n v[..., n] * exp(l * log_lam[..., n])`` in pure torch.

    Args:
        v: (..., N) complex (or real) coefficients, e.g. ``C * B_bar``.
        log_lam: (..., N) complex log of the discrete eigenvalues (``dt * A`` for ZOH); the batch
            dims of ``v`` and ``log_lam`` broadcast.
        L: kernel length.
        conj: if True return the real kernel ``2 * Re(K)`` (each stored mode stands for a
            conjugate pair); otherwise the complex ``K``.
        chunk_size: inner block length T of the factorisation ``l = j*T + t`` (see module doc);
            default ~sqrt(L), clamped so the (..., N, T) factor block stays under 64 MB.

    Returns:
        (broadcast batch..., L): real (float32/float64) if ``conj`` else complex.

    Differentiable w.r.t. ``v`` and ``log_lam`` through a hand-written backward
    (:class:`_Vandermonde`; double backward too); memory O(batch * (L + N sqrt(L))).
    """
    batch = _check(v, log_lam, L, "vandermonde_torch")
    N = v.shape[-1]
    rdt = _real_dtype(v, log_lam)
    device = v.device
    if L == 0 or N == 0:
        shape = (*batch, L)
        out = torch.zeros(shape, dtype=rdt, device=device)
        return out if conj else torch.complex(out, torch.zeros_like(out))
    rows = max(1, math.prod(log_lam.shape[:-1]))
    if chunk_size is None:
        T = default_block_size(L, rows, N, torch.finfo(rdt).bits // 8)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"vandermonde_torch: chunk_size must be a positive int, got {chunk_size!r}")
        T = min(chunk_size, L)
    block = _rows_per_block(v, log_lam, L, T, rdt)
    if block < rows:
        return _by_row_blocks(v, log_lam, L, conj, T, rdt, block)
    return apply_function(_Vandermonde, v, log_lam, L, conj, T, rdt)[0]


def _rows_per_block(v: Tensor, log_lam: Tensor, L: int, T: int, rdt: torch.dtype) -> int:
    """Rows (batch entries) of v and log_lam (..., N) an inference call takes at a time, so that a block's
    factors and temporaries stay under :data:`_BLOCK_BYTES`; every row where the call is differentiated
    (the factors are saved for the backward whole), runs under a torch.func transform or torch.compile,
    or v and log_lam have different batch shapes (one broadcast over the other)."""
    rows = max(1, math.prod(log_lam.shape[:-1]))
    if (torch.compiler.is_compiling() or func_transforms_active() or forward_ad_active()
            or (torch.is_grad_enabled() and (v.requires_grad or log_lam.requires_grad))
            or v.shape[:-1] != log_lam.shape[:-1]):
        return rows
    per_row = v.shape[-1] * (T + _blocks(L, T)) * _PEAK_ITEMS_PER_VALUE * (torch.finfo(rdt).bits // 8)
    return max(1, min(rows, _BLOCK_BYTES // per_row))


def _by_row_blocks(v: Tensor, log_lam: Tensor, L: int, conj: bool, T: int, rdt: torch.dtype,
                   block: int) -> Tensor:
    """:class:`_Vandermonde`'s forward ``block`` rows at a time (v and log_lam (..., N) of one batch shape
    -> (..., L)): each row's kernel is its own, so only the peak memory changes. Whole, the factors of
    FFTConv's 64 channels of d_model=256, N=256 (16384 rows) took 3.7 GB for a 16 MB kernel."""
    N = v.shape[-1]
    v2, a2 = v.reshape(-1, N), log_lam.reshape(-1, N)
    out: Optional[Tensor] = None
    for r0 in range(0, v2.shape[0], block):
        part = _Vandermonde.forward(v2[r0:r0 + block], a2[r0:r0 + block], L, conj, T, rdt)[0]
        if out is None:
            out = torch.empty((v2.shape[0], L), dtype=part.dtype, device=part.device)
        out[r0:r0 + block] = part
    assert out is not None
    return out.reshape(*v.shape[:-1], L)


# ----------------------------------------------------------------------------------------------
# keops backend
# ----------------------------------------------------------------------------------------------

_KEOPS_CACHE: dict[bool, object] = {}


def _keops_reduction(conj: bool):
    """The Genred object (built once per output kind; pykeops caches the compiled binary)."""
    red = _KEOPS_CACHE.get(conj)
    if red is None:
        from pykeops.torch import Genred

        # Real form of v * exp(l * (a + ib)): exp(l a) (vr cos(lb) - vi sin(lb)) [+ i (...)], with
        # p = (a, b, vr, vi) packed into one 4-vector so that the backward pass is a single extra
        # formula (gradient w.r.t. p) instead of four to compile.
        a, b, vr, vi = (f"Elem(p, {k})" for k in range(4))
        re_part = f"Exp(l * {a}) * ({vr} * Cos(l * {b}) - {vi} * Sin(l * {b}))"
        im_part = f"Exp(l * {a}) * ({vr} * Sin(l * {b}) + {vi} * Cos(l * {b}))"
        formula = re_part if conj else f"Concat({re_part}, {im_part})"
        with quiet_keops():
            red = Genred(formula, ["l = Vi(1)", "p = Vj(4)"], reduction_op="Sum", axis=1)
        _KEOPS_CACHE[conj] = red
    return red


def vandermonde_keops(v: Tensor, log_lam: Tensor, L: int, conj: bool = True) -> Tensor:
    """Same as :func:`vandermonde_torch`, evaluated lazily by a pykeops ``Genred`` reduction.

    The reduction runs over n with the output indexed by l, on the real form
    ``exp(l Re) (Re v cos(l Im) - Im v sin(l Im))``; batch dims are flattened into keops batch
    dims. It computes in float64 whatever the input precision: in float32 the phase ``l * Im``
    rounds to ~L * 6e-8 rad (1e-4 relative error at L = 65536), and on CPU float64 costs the same.
    Differentiable through pykeops' autograd. Raises RuntimeError if pykeops is unusable.

    Shapes: v, log_lam (..., N) -> (..., L), real if ``conj`` else complex.
    """
    batch = _check(v, log_lam, L, "vandermonde_keops")
    require_keops('vandermonde(backend="keops")', v.device)
    N = v.shape[-1]
    rdt = _real_dtype(v, log_lam)
    device = v.device
    if L == 0 or N == 0:
        out = torch.zeros((*batch, L), dtype=rdt, device=device)
        return out if conj else torch.complex(out, torch.zeros_like(out))
    f64 = torch.float64
    a, b = _re_im(log_lam)
    vr, vi = _re_im(v)
    # keops batch mode wants equal batch shapes: (B, N, 4) for p, (1, L, 1) for l.
    p = torch.stack([x.to(f64).expand(*batch, N) for x in (a, b, vr, vi)], dim=-1)
    p = p.reshape(-1, N, 4)
    ell = torch.arange(L, dtype=f64, device=device).view(1, L, 1)
    red = _keops_reduction(conj)
    with quiet_keops():
        out = red(ell, p, backend="GPU" if device.type == "cuda" else "CPU")
    if conj:
        return (2.0 * out.reshape(*batch, L)).to(rdt)
    out = out.reshape(*batch, L, 2)
    return torch.complex(out[..., 0].to(rdt), out[..., 1].to(rdt))


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------

def _auto_uses_keops(v: Tensor, log_lam: Tensor, L: int) -> bool:
    threshold = _KEOPS_MIN_TERMS.get(v.device.type)
    if threshold is None:
        return False
    batch = broadcast_shape(v.shape[:-1], log_lam.shape[:-1])
    return math.prod(batch) * v.shape[-1] * L >= threshold and auto_may_use_keops(v.device)


def vandermonde(v: Tensor, log_lam: Tensor, L: int, conj: bool = True, backend: str = "auto") -> Tensor:
    """Vandermonde kernel ``K[..., l] = sum_n v_n exp(l log_lam_n)`` (S4D Vandermonde kernel).

    Args:
        v, log_lam: (..., N) complex, broadcastable batch dims.
        L: kernel length.
        conj: return ``2 * Re(K)`` (real) instead of the complex ``K``.
        backend: ``"torch"``, ``"keops"`` (RuntimeError with a fix if pykeops is unusable) or
            ``"auto"``: keops only when it is usable and faster for this device and size (on CPU
            it never is: see ``_KEOPS_MIN_TERMS``), else torch.

    Returns:
        (..., L) real if ``conj`` else complex.
    """
    if backend == "torch":
        return vandermonde_torch(v, log_lam, L, conj)
    if backend == "keops":
        return vandermonde_keops(v, log_lam, L, conj)
    if backend == "auto":
        if _auto_uses_keops(v, log_lam, L):
            return vandermonde_keops(v, log_lam, L, conj)
        return vandermonde_torch(v, log_lam, L, conj)
    raise ValueError(f"vandermonde: unknown backend {backend!r}; valid backends are {BACKENDS}")
