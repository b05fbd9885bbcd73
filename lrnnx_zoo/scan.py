"""Scans for diagonal linear recurrences.

The state recurrence of a diagonal SSM / LRU layer (Orvieto et al. 2023, "Resurrecting Recurrent
Neural Networks for Long Sequences": x_k = Lambda x_{k-1} + B u_k; Gu et al. 2022, S4D, after
discretization) is, per state channel n, with x_t the already projected input B_bar u_t:

    s_t = lam * s_{t-1} + x_t,      t = 0 .. L-1,      s_{-1} = initial_state (default 0),

whose solution is ``s_t = lam^{t+1} s_{-1} + sum_{k<=t} lam^{t-k} x_k``.

:func:`diagonal_scan` evaluates it with a two-level chunked scan. Time is cut into C chunks of T
steps; (1) the recurrence runs inside every chunk at once (T vectorised steps, each over all
B*C*N chunk states, in place); (2) the chunk end states are scanned with lam^T (recursively, so
the depth is O(T log_T L)); (3) every chunk adds ``lam^{t+1} * carry_{c-1}`` in one broadcast
multiply-add. Powers of lam are formed in float64 by cumulative product and cast once; they are
powers of lam as handed to the Function, so ``lam_dtype=torch.complex128`` keeps a complex128 lam
(with complex64 states) from being rounded first, which matters within ~1e-5 of the unit circle.

Why this and not Hillis-Steele doubling or an FFT convolution: measured on a 2-core CPU with
complex64 (benchmarks/bench_kernels.py), forward at (B=8, L=1024, N=64) / (B=4, L=4096, N=64):
chunked 1.1 / 2.1 ms, Hillis-Steele 5.2 / 22 ms, FFT convolution 4.9 / 23 ms, Python loop
4.8 / 21 ms; forward+backward 3.3 / 6.7 ms vs 27 / 86, 13 / 54 and 285 / 2195 ms. The chunked
scan makes ~3 memory passes; doubling makes log2(L) of them.

The backward pass is a custom autograd Function and is itself a reverse scan (no log L stack of
intermediates is kept, only the output):

    g'_t = sum_{k>=t} conj(lam)^{k-t} g_k        (= grad of x_t)
    grad lam = sum_t g'_t * conj(s_{t-1}),       grad s_{-1} = conj(lam) * g'_0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .base import apply_function, jvp_variant


__all__ = ["diagonal_scan", "sequential_scan", "default_chunk_size"]


def default_chunk_size(L: int) -> int:
    """Chunk length T for a sequence of length L: ~sqrt(L) as a power of two, in [16, 64].

    T balances the T in-chunk steps against the L/T carries (handled recursively); past 64 the
    per-step slices get too strided to gain. Measured best: T=32 at L=1024, T=64 at L>=4096.
    """
    return 1 << min(6, max(4, round(math.log2(max(L, 1)) / 2)))


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _prepare(lam: Tensor, x: Tensor, initial_state: Optional[Tensor], fn: str,
             lam_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Check shapes and dtypes; return lam as (1 or B, N), x as (B, L, N), initial_state as (B, N).

    Without ``lam_dtype`` all three are promoted to one dtype. With it, x and initial_state are
    promoted among themselves (made complex if lam is) and lam is cast to ``lam_dtype``'s precision
    (never below x's), so a complex128 lam no longer drags a complex64 x up with it."""
    for name, t in (("lam", lam), ("x", x), ("initial_state", initial_state)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: expected x of shape (B, L, N), got {tuple(x.shape)}")
    B, L, N = x.shape
    given = tuple(lam.shape)
    if lam.dim() == 1:
        lam = lam.unsqueeze(0)
    if lam.dim() != 2 or lam.shape[-1] != N or lam.shape[0] not in (1, B):
        raise ValueError(f"{fn}: expected lam of shape (N,) or (B, N) = ({N},) or ({B}, {N}) "
                         f"for x of shape {tuple(x.shape)}, got {given}")
    dtype = x.dtype if lam_dtype is not None else torch.promote_types(lam.dtype, x.dtype)
    if initial_state is not None:
        if initial_state.dim() > 2 or initial_state.shape[-1:] != (N,) or (
                initial_state.dim() == 2 and initial_state.shape[0] not in (1, B)):
            raise ValueError(f"{fn}: expected initial_state of shape (B, N) = ({B}, {N}), got "
                             f"{tuple(initial_state.shape)}")
        dtype = torch.promote_types(dtype, initial_state.dtype)
    lam_t = torch.promote_types(lam.dtype, dtype)
    if lam_dtype is not None:
        if not isinstance(lam_dtype, torch.dtype) or not (lam_dtype.is_floating_point or lam_dtype.is_complex):
            raise TypeError(f"{fn}: lam_dtype must be a floating or complex torch.dtype, got {lam_dtype!r}")
        lam_t = torch.promote_types(lam_dtype, dtype)
        if lam.dtype.is_complex:
            lam_t = torch.promote_types(lam_t, torch.complex64)   # lam_dtype's precision, lam's kind
        if lam_t.is_complex:
            dtype = torch.promote_types(dtype, torch.complex64)   # x's precision, lam's kind
    for t in (dtype, lam_t):
        if not (t.is_floating_point or t.is_complex):
            raise TypeError(f"{fn}: expected floating or complex tensors, got lam {lam.dtype}, "
                            f"x {x.dtype}")
    # Casts (and the broadcast of initial_state) happen outside the autograd Function, so autograd
    # itself maps gradients back to real inputs, lower precisions and smaller shapes.
    lam, x = lam.to(lam_t), x.to(dtype)
    if initial_state is not None:
        initial_state = initial_state.to(dtype).expand(B, N)
    return lam, x, initial_state


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

def sequential_scan(lam: Tensor, x: Tensor, initial_state: Optional[Tensor] = None) -> Tensor:
    """Plain loop over time: ``s_t = lam * s_{t-1} + x_t``, ``s_{-1} = initial_state`` (or 0).

    lam: (N,) or (B, N); x: (B, L, N); initial_state: (B, N) -> states (B, L, N). Reference
    implementation (O(L) Python steps, differentiable by plain autograd).
    """
    lam, x, s = _prepare(lam, x, initial_state, "sequential_scan")
    B, L, N = x.shape
    if s is None:
        s = x.new_zeros(B, N)
    states = []
    for t in range(L):
        s = lam * s + x[:, t]
        states.append(s)
    return torch.stack(states, 1) if states else x.new_zeros(B, 0, N)


# ----------------------------------------------------------------------------------------------
# chunked scan (in place, no autograd)
# ----------------------------------------------------------------------------------------------

def _hi(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _powers(lam_hi: Tensor, T: int) -> Tensor:
    """lam^k for k = 0..T by cumulative product in double precision: (Bl, N) -> (T+1, Bl, N)."""
    steps = torch.cat([torch.ones_like(lam_hi).unsqueeze(0), lam_hi.expand(T, *lam_hi.shape)])
    return torch.cumprod(steps, 0)


def _steps_(rows: tuple[Tensor, ...], lam: Tensor, reverse: bool) -> None:
    """The plain recurrence in place over views of successive steps: rows[t] += lam * rows[t-1]
    (rows[t+1] when ``reverse``). The views come from one unbind: indexing each step (s[:, t])
    cost two select calls a step, a third of a short scan's time (L=64: 139 -> 97 us)."""
    if reverse:
        for t in range(len(rows) - 2, -1, -1):
            rows[t].addcmul_(lam, rows[t + 1])
    else:
        for t in range(1, len(rows)):
            rows[t].addcmul_(lam, rows[t - 1])


def _scan_(s: Tensor, lam_hi: Tensor, reverse: bool, T: int) -> None:
    """Scan s in place along dim 1: s holds x on entry and the states on exit.

    s: (B, L, N) contiguous; lam_hi: (Bl, N) in double precision (only cast down for the steps,
    so the powers used by the carries are not built from a rounded lam).
    """
    B, L, N = s.shape
    lam = lam_hi.to(s.dtype)
    if L <= T:
        _steps_(s.unbind(1), lam, reverse)
        return
    C = -(-L // T)
    if L % T:
        # Only recursion levels get here (the entry point pads); zeros at the end change nothing.
        buf = s.new_zeros(B, C * T, N)
        buf[:, :L] = s
        _scan_(buf, lam_hi, reverse, T)
        s.copy_(buf[:, :L])
        return
    v = s.view(B, C, T, N)
    lam_c = lam.unsqueeze(1)                                   # (Bl, 1, N) against (B, C, N)
    # (1) every chunk at once, T steps.
    _steps_(v.unbind(2), lam_c, reverse)
    # (2) chunk carries: the end state of each chunk, scanned with lam^T.
    pw = _powers(lam_hi, T)                                    # (T+1, Bl, N) double
    carry = v[:, :, 0 if reverse else T - 1].contiguous()      # (B, C, N)
    _scan_(carry, pw[T], reverse, T)
    # (3) fix-up: add the carry entering each chunk, propagated t+1 (or T-t) steps in.
    # lam^1 .. lam^T (lam^T .. lam^1 reversed) as a slice: no index tensor to build and gather with
    prop = (pw[1:].flip(0) if reverse else pw[1:]).to(s.dtype).permute(1, 0, 2).unsqueeze(1)   # (Bl, 1, T, N)
    if reverse:
        v[:, :-1].addcmul_(prop, carry[:, 1:].unsqueeze(2))
    else:
        v[:, 1:].addcmul_(prop, carry[:, :-1].unsqueeze(2))


def _scan_impl(lam: Tensor, x: Tensor, s0: Optional[Tensor], reverse: bool, T: int) -> Tensor:
    """Out-of-place chunked scan; lam (Bl, N), x (B, L, N), s0 (B, N) or None -> (B, L, N) of x's
    dtype. x and s0 share one dtype; lam may be of higher precision (see ``lam_dtype``)."""
    B, L, N = x.shape
    if L == 0:
        return x.new_zeros(B, 0, N)
    Lp = L if L <= T else -(-L // T) * T
    buf = x.new_zeros(B, Lp, N) if Lp != L else x.clone(memory_format=torch.contiguous_format)
    if Lp != L:
        buf[:, :L] = x
    if s0 is not None:
        # s0 only enters through the first step: fold lam * s0 into x_0 (x_{L-1} when reversed).
        buf[:, L - 1 if reverse else 0].add_((lam * s0).to(buf.dtype))
    _scan_(buf, lam.to(_hi(lam.dtype)), reverse, T)
    return buf if Lp == L else buf[:, :L]


def _scan_parameter_grads(lam: Tensor, s0: Optional[Tensor], out: Tensor, gx: Tensor, rev: bool,
                          need_lam: bool, need_s0: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad lam, grad s0) of the scan from its states ``out`` and the gradient of each x_t, ``gx``
    (the adjoint recurrence): sum_t gx_t conj(s_{t-1}) and conj(lam) gx at the step s0 enters."""
    L = gx.shape[1]
    first = -1 if rev else 0                     # the step where s0 enters (-1: no symbolic index in a graph)
    grad_lam = grad_s0 = None
    if need_lam and L > 0:
        # sum_t g'_t conj(s_{t-1}); vecdot conjugates its first argument.
        if rev:
            grad_lam = torch.linalg.vecdot(out[:, 1:], gx[:, :-1], dim=1)
        else:
            grad_lam = torch.linalg.vecdot(out[:, :-1], gx[:, 1:], dim=1)
        if s0 is not None:
            grad_lam = grad_lam + s0.conj() * gx[:, first]
        if lam.shape[0] == 1:
            grad_lam = grad_lam.sum(0, keepdim=True)
        grad_lam = grad_lam.to(lam.dtype)        # lam may be held in higher precision than x
    elif need_lam:
        grad_lam = torch.zeros_like(lam)
    if need_s0 and s0 is not None:
        grad_s0 = (lam.conj() * gx[:, first]).to(s0.dtype) if L > 0 else torch.zeros_like(s0)
    return grad_lam, grad_s0


class _DiagonalScan(torch.autograd.Function):
    """Chunked scan whose backward is the reverse scan with conj(lam) (see module docstring)."""

    @staticmethod
    def forward(lam: Tensor, x: Tensor, s0: Optional[Tensor], reverse: bool, T: int) -> Tensor:  # type: ignore[override]
        return _scan_impl(lam, x, s0, reverse, T)

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        # Separate from forward, so that torch.func transforms (grad, jacrev) can run the scan.
        lam, _, s0, reverse, T = inputs
        ctx.save_for_backward(lam, s0, out)
        ctx.reverse, ctx.T = reverse, T

    @staticmethod
    def vmap(info, in_dims, lam: Tensor, x: Tensor, s0: Optional[Tensor], reverse: bool, T: int):  # type: ignore[override]
        """torch.func.vmap: the vmapped dim V joins the batch, x: (V, B, L, N) -> (V*B, L, N), with
        lam and s0 given per row ((V*B, N); a lam shared by all rows stays (1, N))."""
        V = info.batch_size
        x = x.movedim(in_dims[1], 0) if in_dims[1] is not None else x.expand(V, *x.shape)
        B = x.shape[1]

        def rows(t: Tensor, dim: Optional[int]) -> Tensor:       # (Bt, N) or (V, Bt, N) -> (V*B, N)
            t = t.movedim(dim, 0) if dim is not None else t.expand(V, *t.shape)
            return t.expand(V, B, t.shape[-1]).flatten(0, 1)

        lam = lam if in_dims[0] is None and lam.shape[0] == 1 else rows(lam, in_dims[0])
        s0 = None if s0 is None else rows(s0, in_dims[2])
        out = apply_function(_DiagonalScan, lam, x.flatten(0, 1), s0, reverse, T)
        return out.unflatten(0, (V, B)), 0

    @staticmethod
    def backward(ctx, g: Tensor):
        lam, s0, out = ctx.saved_tensors
        rev = ctx.reverse
        need_lam, need_x, need_s0 = ctx.needs_input_grad[:3]
        # Gradient w.r.t. each x_t: the adjoint recurrence runs the other way with conj(lam).
        # Applied through the Function again so that double backward works too, and through its jvp
        # variant under forward-mode AD (a Hessian-vector product, jvp of grad: "You must implement
        # the jvp function" from the plain Function).
        gx = apply_function(_DiagonalScan, lam.conj(), g, None, not rev, ctx.T)
        grad_lam, grad_s0 = _scan_parameter_grads(lam, s0, out, gx, rev, need_lam, need_s0)
        return grad_lam, (gx if need_x else None), grad_s0, None, None


@jvp_variant(keep=lambda inputs, out: (inputs[0], inputs[2], out))
class _DiagonalScanJvp(_DiagonalScan):
    """:class:`_DiagonalScan` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def jvp(ctx, lam_t: Optional[Tensor], x_t: Optional[Tensor], s0_t: Optional[Tensor],  # type: ignore[override]
            *_: None) -> Tensor:
        """Forward-mode AD: s_t = lam s_{t-1} + x_t differentiates to the same recurrence,
        ds_t = lam ds_{t-1} + (dlam s_{t-1} + dx_t), from ds0: one more scan."""
        lam, s0, out = ctx.saved_tensors
        drive = torch.zeros_like(out) if x_t is None else x_t
        if lam_t is not None:
            start = torch.zeros_like(out[:, :1]) if s0 is None else s0.unsqueeze(1).to(out.dtype)
            prev = torch.cat([out[:, 1:], start], 1) if ctx.reverse else torch.cat([start, out[:, :-1]], 1)
            drive = drive + (lam_t.unsqueeze(1) * prev).to(out.dtype)
        return apply_function(_DiagonalScan, lam, drive, s0_t, ctx.reverse, ctx.T)


# ----------------------------------------------------------------------------------------------
# compiled graphs: the same chunked scan, as an operator the compiler does not trace into
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("lrnnx_zoo::chunked_scan", mutates_args=())
def _chunked_scan_op(lam: Tensor, x: Tensor, s0: Optional[Tensor], reverse: bool, chunk_size: Optional[int]) -> Tensor:
    """:func:`diagonal_scan` inside torch.compile graphs: the eager chunked scan (its in-place
    steps and loops run as they do in eager) as one opaque operator with a shape-only fake, so
    one graph serves every length (L stays symbolic: T is picked from the real L at run time).

    Traced instead, the scan had to become differentiable out-of-place torch ops without a loop
    over time; the best such form (chunks of 32 steps as Toeplitz matrix products, 32x the
    multiply-adds) made a compiled LRU training step slower than eager. lam (Bl, N), x (B, L, N),
    s0 (B, N) or None (one dtype with x) -> (B, L, N) contiguous, x's dtype."""
    T = default_chunk_size(x.shape[1]) if chunk_size is None else chunk_size
    return _scan_impl(lam, x, s0, reverse, T).contiguous()      # a fresh tensor, as the fake says


@_chunked_scan_op.register_fake
def _chunked_scan_fake(lam: Tensor, x: Tensor, s0: Optional[Tensor], reverse: bool,
                       chunk_size: Optional[int]) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _chunked_scan_setup(ctx, inputs, output: Tensor) -> None:
    lam, _, s0, ctx.reverse, ctx.chunk_size = inputs
    ctx.save_for_backward(lam, s0, output)


def _chunked_scan_backward(ctx, g: Tensor):
    """:class:`_DiagonalScan`'s backward, through the operator again (double backward works)."""
    lam, s0, out = ctx.saved_tensors
    need_lam, need_x, need_s0 = ctx.needs_input_grad[:3]
    gx = _chunked_scan_op(lam.conj().resolve_conj(), g.contiguous(), None, not ctx.reverse, ctx.chunk_size)
    grad_lam, grad_s0 = _scan_parameter_grads(lam, s0, out, gx, ctx.reverse, need_lam, need_s0)
    return grad_lam, (gx if need_x else None), grad_s0, None, None


_chunked_scan_op.register_autograd(_chunked_scan_backward, setup_context=_chunked_scan_setup)


def diagonal_scan(lam: Tensor, x: Tensor, initial_state: Optional[Tensor] = None, *,
                  reverse: bool = False, chunk_size: Optional[int] = None,
                  lam_dtype: Optional[torch.dtype] = None) -> Tensor:
    """All states of ``s_t = lam * s_{t-1} + x_t`` (LRU recurrence), ``s_{-1} = initial_state``.

    Args:
        lam: (N,) or (B, N) diagonal transition (real or complex; |lam| <= 1 for stability).
        x: (B, L, N) inputs (already projected, e.g. ``B_bar u_t``), real or complex.
        initial_state: (B, N) state before t=0, default zeros.
        reverse: run backwards in time, ``s_t = lam * s_{t+1} + x_t`` with ``s_L = initial_state``.
        chunk_size: chunk length T of the two-level scan (default :func:`default_chunk_size`);
            results do not depend on it beyond rounding.
        lam_dtype: precision in which lam and its powers lam^k (the carries between chunks) are
            handled, e.g. ``torch.complex128`` (or ``torch.float64``: a complex lam stays complex);
            never below x's. Default None: lam is promoted with x to one dtype. When given, x,
            initial_state and the result keep their own precision (made complex if lam is), and
            only the in-chunk steps (at most T) use lam rounded to x's. Pass lam computed in that
            precision, not cast up from a rounded value: near |lam| = 1 the rounding of a
            complex64 lam (~6e-8) grows in its powers, lam'^k = lam^k (1 + k * 6e-8); see
            :func:`lrnnx_zoo.modal.modal_scan` for the measured effect.

    Returns:
        (B, L, N) states, dtype promoted from the inputs (from x and initial_state only, with
        lam's kind, when ``lam_dtype`` is given).

    Differentiable w.r.t. lam, x and initial_state by a custom backward (a reverse scan).
    """
    lam, x, s0 = _prepare(lam, x, initial_state, "diagonal_scan", lam_dtype)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 2):
        raise ValueError(f"diagonal_scan: chunk_size must be an int >= 2, got {chunk_size!r}")
    if torch.compiler.is_compiling():   # T from the real L inside the operator: L stays symbolic here
        return _chunked_scan_op(lam, x, s0, bool(reverse), chunk_size)
    T = default_chunk_size(x.shape[1]) if chunk_size is None else chunk_size
    return apply_function(_DiagonalScan, lam, x, s0, bool(reverse), T)
