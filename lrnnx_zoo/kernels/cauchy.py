"""Cauchy kernels: ``out[..., l] = sum_n v[..., n] / (z[l] - w[..., n])``.

S4 evaluates the generating function of its convolution kernel ([S4] Gu, Goel, Ré 2022,
eq. (5)) through a Cauchy matrix-vector product at L nodes z ([S4] Sec. 3.3, Appendix C.3).
Since the diagonal part of a real state matrix comes in conjugate pairs, S4 keeps only one of
each pair and adds the conjugate term back analytically; :func:`cauchy_conj_torch` and
:func:`cauchy_conj_keops` do that with one complex division per (n, l) instead of two:

    v/(z-w) + conj(v)/(z-conj(w)) = (a z - b) / ((z - w)(z - conj(w))),
    a = 2 Re(v),  b = 2 Re(v conj(w)).                                              (*)

Backends:

* ``torch``: evaluated in blocks of the L axis so that each (batch, N, block) intermediate stays
  under ``DEFAULT_BLOCK_BYTES`` (4 MB: cache-sized blocks measured ~2x faster than 64 MB ones
  on CPU); custom autograd functions compute the gradients block by block as well (they are
  themselves Cauchy-type sums), so training memory is bounded too.
* ``keops``: a pykeops ``Genred`` sum over n that never materialises the (N, L) matrix;
  gradients come from keops' symbolic differentiation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import apply_function, jvp_variant
from .keops_support import quiet_keops, require_keops

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_BYTES",
    "cauchy_torch",
    "cauchy_conj_torch",
    "cauchy_conj_keops",
    "cauchy_conj",
]

BACKENDS = ("auto", "torch", "keops")
#: Budget for one materialised (batch, N, block) complex intermediate in the torch backends.
DEFAULT_BLOCK_BYTES = 4 * 2**20


def _complex_dtype(*ts: Tensor) -> torch.dtype:
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    if dt.is_complex:
        return dt
    return torch.complex128 if dt == torch.float64 else torch.complex64


def _prepare(v: Tensor, z: Tensor, w: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """Broadcast v, w to a common (..., N), flatten batch dims to (Bt, N); z to (L,)."""
    if not all(isinstance(t, Tensor) for t in (v, z, w)):
        raise TypeError(f"{name}: v, z and w must be torch tensors, got "
                        f"{', '.join(type(t).__name__ for t in (v, z, w))}")
    if z.dim() != 1:
        raise ValueError(f"{name}: z must be 1-D (L,), got shape {tuple(z.shape)}")
    if v.dim() < 1 or w.dim() < 1 or v.shape[-1] == 0:
        raise ValueError(f"{name}: v and w must have a trailing state dim N >= 1, got {tuple(v.shape)} and "
                         f"{tuple(w.shape)}")
    try:
        torch.broadcast_shapes(v.shape, w.shape)
    except RuntimeError as exc:       # (a reshape failed with no word of v or w)
        raise ValueError(f"{name}: v {tuple(v.shape)} and w {tuple(w.shape)} must broadcast to one (..., N)") from exc
    cdt = _complex_dtype(v, z, w)
    v, w = torch.broadcast_tensors(v.to(cdt), w.to(cdt))
    batch = tuple(v.shape[:-1])
    N = v.shape[-1]
    return v.reshape(-1, N), z.to(cdt), w.reshape(-1, N), batch


def _block_len(rows: int, N: int, L: int, itemsize: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return min(L, chunk_size)
    return max(1, min(L, DEFAULT_BLOCK_BYTES // max(1, rows * N * itemsize)))


def _spans(L: int, block: int):
    for s in range(0, L, block):
        yield s, min(L, s + block)


# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------


class _Cauchy(torch.autograd.Function):
    """out[b, l] = sum_n v[b, n] r[b, n, l],  r = 1 / (z[l] - w[b, n]).  Holomorphic in v, w, z.

    PyTorch's complex vjp for holomorphic f is ``grad_in = grad_out * conj(f')``, so
    grad_v = sum_l g conj(r), grad_w = conj(v) sum_l g conj(r)^2, grad_z = -g conj(sum_n v r^2).
    """

    @staticmethod
    def forward(v: Tensor, z: Tensor, w: Tensor, block: int) -> Tensor:  # type: ignore[override]
        out = v.new_empty(v.shape[0], z.shape[0])
        vrow, wcol = v[:, None, :], w[:, :, None]
        buf = None
        for s, e in _spans(z.shape[0], block):
            # Reusing one block buffer avoids a fresh multi-MB allocation (and page faults) per block.
            if buf is None or buf.shape[-1] != e - s:
                buf = v.new_empty(v.shape[0], v.shape[1], e - s)
            torch.sub(z[s:e], wcol, out=buf).reciprocal_()
            out[:, s:e] = torch.bmm(vrow, buf)[:, 0]
        return out

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        # Separate from forward, so that torch.func transforms (grad, jacrev) can run it.
        v, z, w, ctx.block = inputs
        ctx.save_for_backward(v, z, w)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, z, w = ctx.saved_tensors
        need_v, need_z, need_w, _ = ctx.needs_input_grad
        gv = torch.zeros_like(v) if need_v else None
        gw = torch.zeros_like(w) if need_w else None
        gz_parts = []
        for s, e in _spans(z.shape[0], ctx.block):
            rc = (z[s:e] - w[:, :, None]).reciprocal().conj()
            gs = g[:, s:e, None]
            if need_v:
                gv = gv + (rc @ gs)[..., 0]
            if need_w:
                gw = gw + ((rc * rc) @ gs)[..., 0]
            if need_z:
                gz_parts.append(-(g[:, s:e] * (v.conj()[:, None, :] @ (rc * rc))[:, 0]).sum(0))
        if need_w:
            gw = gw * v.conj()
        gz = torch.cat(gz_parts) if need_z else None
        return gv, gz, gw, None


@jvp_variant(keep=lambda inputs, out: inputs[:3])
class _CauchyJvp(_Cauchy):
    """:class:`_Cauchy` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def jvp(ctx, v_t: Optional[Tensor], z_t: Optional[Tensor], w_t: Optional[Tensor], _: None  # type: ignore[override]
            ) -> Tensor:
        """Forward-mode AD: d out_l = sum_n (dv_n r + v_n dw_n r^2) - dz_l sum_n v_n r^2, block by block."""
        v, z, w = ctx.saved_tensors
        out = v.new_zeros(v.shape[0], z.shape[0])
        for s, e in _spans(z.shape[0], ctx.block):
            r = (z[s:e] - w[:, :, None]).reciprocal()                          # (Bt, N, l)
            if v_t is not None:
                out[:, s:e] += (v_t[:, None, :] @ r)[:, 0]
            if w_t is not None:
                out[:, s:e] += ((v * w_t)[:, None, :] @ (r * r))[:, 0]
            if z_t is not None:
                out[:, s:e] -= z_t[s:e] * (v[:, None, :] @ (r * r))[:, 0]
        return out


class _CauchyConj(torch.autograd.Function):
    """out[b, l] = sum_n (a z_l - b) q,  q = 1 / ((z_l - w)(z_l - conj w))   -- identity (*).

    a, b are real (Bt, N); w complex (Bt, N); z complex (L,). With D = z^2 - c z + d,
    c = 2 Re w, d = |w|^2, the partials are ds/da = z q, ds/db = -q, ds/dc = (a z - b) z q^2,
    ds/dd = -(a z - b) q^2; for real inputs grad = Re(sum_l conj(g) ds/dx), and for w
    grad_w = 2 grad_c + 2 w grad_d (chain rule through c, d). z enters holomorphically:
    ds/dz = sum_n a q - (2 a z^2 - (a c + 2 b) z + b c) q^2.
    """

    @staticmethod
    def forward(a: Tensor, b: Tensor, w: Tensor, z: Tensor, block: int) -> Tensor:  # type: ignore[override]
        ab = torch.stack([a, b], dim=1).to(w.dtype)  # (Bt, 2, N): one batched matmul per block
        out = w.new_empty(w.shape[0], z.shape[0])
        wcol, wccol = w[:, :, None], w.conj()[:, :, None]
        q = tmp = None
        for s, e in _spans(z.shape[0], block):
            if q is None or q.shape[-1] != e - s:  # reuse block buffers, see _Cauchy.forward
                q = w.new_empty(w.shape[0], w.shape[1], e - s)
                tmp = torch.empty_like(q)
            zb = z[s:e]
            torch.sub(zb, wcol, out=q)
            torch.sub(zb, wccol, out=tmp)
            q.mul_(tmp).reciprocal_()
            sa, sb = torch.bmm(ab, q).unbind(1)
            out[:, s:e] = zb * sa - sb
        return out

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        a, b, w, z, ctx.block = inputs
        ctx.save_for_backward(a, b, w, z)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b, w, z = ctx.saved_tensors
        need_a, need_b, need_w, need_z, _ = ctx.needs_input_grad
        cdt = w.dtype
        wc = w.conj()
        c = 2 * w.real
        # Accumulate sum_l conj(g) z^k q (k = 0, 1) and sum_l conj(g) z^k (a z - b) q^2 (k = 1, 0) per
        # (b, n): the latter as ((a z - b) q) q, each factor of a term's size; q^2 alone overflowed
        # float32 where |D| < 5e-20 (poles within 7e-10 of a node: NaN w gradients where float64 gave 1e20)
        acc_q = torch.zeros(w.shape[0], w.shape[1], 2, dtype=cdt, device=w.device)
        acc_q2 = torch.zeros(w.shape[0], w.shape[1], 2, dtype=cdt, device=w.device)
        a_col, b_col = a.to(cdt)[:, :, None], b.to(cdt)[:, :, None]
        gz_parts = []
        if need_z:
            coef = torch.stack([2 * a, a * c + 2 * b, b * c], dim=1).to(cdt)  # (Bt, 3, N)
            a_c = a.to(cdt)[:, None, :]
        for s, e in _spans(z.shape[0], ctx.block):
            zb = z[s:e]
            q = ((zb - w[:, :, None]) * (zb - wc[:, :, None])).reciprocal()
            gc = g[:, s:e].conj()
            if need_a or need_b:
                acc_q = acc_q + q @ torch.stack([gc * zb, gc], dim=-1)
            if need_w:
                acc_q2 = acc_q2 + ((a_col * zb - b_col) * q * q) @ torch.stack([gc * zb, gc], dim=-1)
            if need_z:
                t0 = (a_c @ q)[:, 0]
                t2, t1, t00 = (coef @ (q * q)).unbind(1)
                dsdz = t0 - (t2 * zb * zb - t1 * zb + t00)
                gz_parts.append((g[:, s:e] * dsdz.conj()).sum(0))
        ga = acc_q[..., 0].real if need_a else None
        gb = -acc_q[..., 1].real if need_b else None
        gw = None
        if need_w:
            g_c, g_d = acc_q2.real.unbind(-1)
            g_d = -g_d
            gw = (2 * g_c + 2 * w * g_d).to(cdt)
        gz = torch.cat(gz_parts) if need_z else None
        return ga, gb, gw, gz, None


@jvp_variant(keep=lambda inputs, out: inputs[:4])
class _CauchyConjJvp(_CauchyConj):
    """:class:`_CauchyConj` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def jvp(ctx, a_t: Optional[Tensor], b_t: Optional[Tensor], w_t: Optional[Tensor],  # type: ignore[override]
            z_t: Optional[Tensor], _: None) -> Tensor:
        """Forward-mode AD of (*): d out_l = sum_n (da z - db + a dz) q - (a z - b) q^2 dD with
        dD = (2 z - c) dz - dc z + dd, dc = 2 Re dw, dd = 2 Re(conj(w) dw), block by block."""
        a, b, w, z = ctx.saved_tensors
        cdt = w.dtype
        ab = torch.stack([a, b], dim=1).to(cdt)
        ab_t = None
        if a_t is not None or b_t is not None:
            ab_t = torch.stack([torch.zeros_like(a) if a_t is None else a_t,
                                torch.zeros_like(b) if b_t is None else b_t], dim=1).to(cdt)
        c = (2 * w.real).to(cdt)[:, :, None]
        dc = dd = None
        if w_t is not None:
            dc = (2 * w_t.real).to(cdt)[:, :, None]
            dd = (2 * (w.conj() * w_t).real).to(cdt)[:, :, None]
        out = w.new_zeros(w.shape[0], z.shape[0])
        for s, e in _spans(z.shape[0], ctx.block):
            zb = z[s:e]
            q = ((zb - w[:, :, None]) * (zb - w.conj()[:, :, None])).reciprocal()   # (Bt, N, l)
            if ab_t is not None:
                sa, sb = torch.bmm(ab_t, q).unbind(1)
                out[:, s:e] += zb * sa - sb
            dD = 0
            if z_t is not None:
                dD = (2 * zb - c) * z_t[s:e]
                out[:, s:e] += z_t[s:e] * (a.to(cdt)[:, None, :] @ q)[:, 0]
            if dc is not None:
                dD = dD - dc * zb + dd
            if z_t is not None or dc is not None:
                sa, sb = torch.bmm(ab, q * dD * q).unbind(1)      # q dD first: q^2 alone overflows float32
                out[:, s:e] -= zb * sa - sb
        return out


def cauchy_torch(v: Tensor, z: Tensor, w: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Cauchy sum ``out[..., l] = sum_n v[..., n] / (z[l] - w[..., n])`` in PyTorch.

    Args:
        v: (..., N) complex (real is promoted).
        z: (L,) complex nodes, shared by all batch entries.
        w: (..., N) complex poles; batch dims broadcast with v's.
        chunk_size: number of z nodes per block; default keeps each (batch, N, block)
            intermediate under ``DEFAULT_BLOCK_BYTES`` (4 MB).

    Returns:
        (..., L) in the promoted complex dtype (complex64 for float32 inputs). Differentiable
        (also twice) w.r.t. v, z and w; the backward pass is blocked like the forward.
    """
    v2, z2, w2, batch = _prepare(v, z, w, "cauchy_torch")
    block = _block_len(v2.shape[0], v2.shape[1], z2.shape[0], v2.element_size(), chunk_size)
    out = apply_function(_Cauchy, v2, z2, w2, block)
    return out.reshape(*batch, z2.shape[0])


def cauchy_conj_torch(v: Tensor, z: Tensor, w: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Conjugate-pair Cauchy sum in PyTorch.

    ``out[..., l] = sum_n v_n/(z_l - w_n) + conj(v_n)/(z_l - conj(w_n))``, evaluated through the
    identity (*) in the module docstring (one complex division per term instead of two).
    Shapes and arguments as in :func:`cauchy_torch`: v, w (..., N), z (L,) -> (..., L).
    """
    v2, z2, w2, batch = _prepare(v, z, w, "cauchy_conj_torch")
    block = _block_len(v2.shape[0], v2.shape[1], z2.shape[0], v2.element_size(), chunk_size)
    a = 2 * v2.real
    b = 2 * (v2 * w2.conj()).real
    out = apply_function(_CauchyConj, a, b, w2, z2, block)
    return out.reshape(*batch, z2.shape[0])


# ---------------------------------------------------------------------------------------------
# keops backend
# ---------------------------------------------------------------------------------------------

#: The Genred objects, built once each: for a forward pass alone, and for one that autograd will
#: differentiate (pykeops caches the compiled binaries).
_KEOPS_CONJ: dict = {}


def _keops_conj_reduction(differentiable: bool = False):
    red = _KEOPS_CONJ.get(differentiable)
    if red is None:
        with quiet_keops():
            from pykeops.torch import Genred

            # Identity (*); complex numbers are (re, im) pairs of dim 2. a and b are real but are
            # passed as complex: keops 2.3 cannot differentiate ComplexRealScal/Real2Complex.
            # keops differentiates x / y through 1 / |y|^4: with y = D = (z - w)(z - conj w) that
            # underflowed in float32 once |z - w| < ~2e-5 (NaN gradients for S4's Fourier poles
            # at dt <= 0.1, and for every measure at dt = 1e-5). Under autograd we divide by the
            # two factors in turn instead (1 / |z - w|^4 stays normal down to |z - w| ~ 3e-10);
            # that costs 14% more forward time and 20% more forward+backward on CPU, so a
            # forward pass alone keeps the single division.
            formula = ("ComplexDivide(ComplexDivide(ComplexMult(a, z) - b, z - w), z - Conj(w))" if differentiable
                       else "ComplexDivide(ComplexMult(a, z) - b, ComplexMult(z - w, z - Conj(w)))")
            red = Genred(
                formula,
                ["a = Vj(2)", "b = Vj(2)", "w = Vj(2)", "z = Vi(2)"],
                reduction_op="Sum",
                axis=1,
            )
        _KEOPS_CONJ[differentiable] = red
    return red


def cauchy_conj_keops(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """Same as :func:`cauchy_conj_torch`, as a pykeops ``Genred`` sum over n (CPU or CUDA).

    v, w (..., N) are broadcast and their batch dims flattened into keops' batch axis; z (L,) is
    shared. Never materialises the (N, L) matrix. Differentiable w.r.t. v, w and z through keops'
    symbolic gradients. Raises RuntimeError (with a fix) if pykeops is not usable.
    """
    require_keops('cauchy_conj(backend="keops")', v.device)
    v2, z2, w2, batch = _prepare(v, z, w, "cauchy_conj_keops")
    L = z2.shape[0]
    zero = torch.zeros_like(v2.real)
    a = torch.stack([2 * v2.real, zero], dim=-1)  # (rows, N, 2) = 2 Re(v) + 0i
    b = torch.stack([2 * (v2 * w2.conj()).real, zero], dim=-1)
    wr = torch.view_as_real(w2.contiguous())
    zr = torch.view_as_real(z2.contiguous())[None]  # (1, L, 2): keops broadcasts batch dims
    red = _keops_conj_reduction(torch.is_grad_enabled() and (v.requires_grad or z.requires_grad or w.requires_grad))
    backend = "GPU" if v2.is_cuda else "CPU"
    with quiet_keops():
        out = red(a, b, wr, zr, backend=backend)  # (rows, L, 2)
    return torch.view_as_complex(out.contiguous()).reshape(*batch, L)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def cauchy_conj(v: Tensor, z: Tensor, w: Tensor, backend: str = "auto") -> Tensor:
    """Conjugate-pair Cauchy sum ``sum_n v/(z-w) + conj(v)/(z-conj(w))``: (..., N) x (L,) -> (..., L).

    Args:
        backend: ``"torch"``, ``"keops"`` (RuntimeError explaining the fix if pykeops is not
            usable) or ``"auto"``: the registered ``cauchy.auto`` rule
            (:func:`~lrnnx_zoo.kernels.cauchy_shared.cauchy_conj_auto`: keops where it pays off on
            the tensors' device and is usable, i.e. on CUDA; the shared-pole torch path otherwise).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown cauchy backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "keops":
        return cauchy_conj_keops(v, z, w)
    if backend == "auto":
        # One "auto" rule for the seed API and the registry: this one picked keops on the CPU from
        # 2**22 terms (19.5 s for its first call's compilation, 775 ms registry-auto's torch path)
        from .cauchy_shared import cauchy_conj_auto     # imports this module
        return cauchy_conj_auto(v, z, w)
    return cauchy_conj_torch(v, z, w)
