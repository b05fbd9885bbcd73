"""Cauchy sums whose poles are shared by several numerators (S4 Algorithm 1, step 2).

S4's kernel needs, per channel and node, four sums over the same poles w (the Woodbury terms
k00, k01, k10, k11), plus one per state vector in state passing. The generic backends in
:mod:`lrnnx_zoo.kernels.cauchy` broadcast w to every numerator and rebuild the pole factor
1 / ((z - w)(z - conj w)) for each of them; here it is built once per distinct pole row and all
numerators are contracted with it in one batched matmul:

    out[p, j, l] = sum_n (a[p, j, n] z_l - b[p, j, n]) q[p, n, l],
    q = 1 / ((z_l - w_pn)(z_l - conj w_pn)),   a = 2 Re v,   b = 2 Re(v conj w),

which is the conjugate-pair identity (*) of :mod:`lrnnx_zoo.kernels.cauchy`. Measured on the
2-core CPU at H=128, N/2=32, 4 numerators: 5x faster than the broadcasting torch backend.

The nodes are processed in blocks; under autograd each block's backward (``_SharedBlock``)
rebuilds its q from the poles, so memory stays O(block), as in the generic backend.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from ..base import apply_function, forward_ad_active, func_transforms_active, jvp_variant, without_autocast
from ..shapes import broadcast_shape
from .cauchy import _complex_dtype, cauchy_conj_keops, cauchy_conj_torch
from .keops_support import auto_may_use_keops

__all__ = ["cauchy_conj_shared", "cauchy_conj_auto", "KEOPS_MIN_TERMS"]

#: Bytes of one (rows, N, block) complex pole block; small enough to stay in cache-friendly sizes.
_BLOCK_BYTES = 8 * 2**20
#: "auto" picks keops when distinct-pole-rows * numerators * N * L reaches this on that device;
#: None: never. CPU: the shared torch path beat keops at every size in benchmarks/bench_s4.py.
KEOPS_MIN_TERMS: Dict[str, Optional[int]] = {"cpu": None, "cuda": 0}


def _pole_factor(c: Tensor, d: Tensor, z: Tensor, in_place: bool = True) -> Tensor:
    """q = 1 / ((z - w)(z - conj w)) = 1 / (z^2 - 2Re(w) z + |w|^2):  c = 2 Re w, d = |w|^2
    (P, N, 1) (real values), z (l,) complex -> (P, N, l), built in one buffer ``in_place``. Out of
    place for a double-backward graph, and under torch.func transforms (vmap has no batching rule
    for addcmul_ and fell back to a slow loop)."""
    if not in_place or func_transforms_active():
        return torch.addcmul(d + z * z, c, z, value=-1).reciprocal()
    return (d + z * z).addcmul_(c, z, value=-1).reciprocal_()


def _real_matmul(a: Tensor, q: Tensor) -> Tensor:
    """a @ q for a real a (..., M, N) and a complex q (..., N, l): one real matmul with q's
    (re, im) pairs as 2l columns, half the multiplications of a complex matmul by a complex-typed
    a, and the same sums (S4's kernel generation at H=128, N/2=32, L=1024: matmuls 1.5x faster;
    float32 kernels and gradients bit-identical on this CPU) -> (..., M, l) complex. Outside any
    torch.autocast region: autocast runs real matmuls in bfloat16 (S4's float32 output 1e-2 off),
    where the layers promise a float32 kernel; complex ones it left alone."""
    with without_autocast(q.device.type):
        # reshape, not flatten / unflatten: autograd's batched backward (is_grads_batched) has no rule for them
        s = a @ torch.view_as_real(q).reshape(*q.shape[:-1], 2 * q.shape[-1])
    return torch.view_as_complex(s.reshape(*s.shape[:-1], q.shape[-1], 2))


def _block(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """One node block.  ab: (P, 2J, N) real,  c, d: (P, N, 1) real values, complex-typed,
    z: (l,) complex -> (P, J, l), written into ``out`` if given."""
    s = _real_matmul(ab, _pole_factor(c, d, z))                # (P, 2J, l)
    J = ab.shape[1] // 2
    return torch.sub(z * s[:, :J], s[:, J:], out=out)


class _SharedBlock(torch.autograd.Function):
    """:func:`_block` with a hand-written backward that rebuilds q from the inputs (so nothing of
    the node block's size is saved) and differentiates it in three passes instead of autograd's
    chain of seven (addcmul, reciprocal, products, broadcast sums): S4's kernel backward was 4x
    its forward. With out = z (a q) - (b q) and D = z^2 - c z + d:

        ds  = [conj(z) g; -g],   d[a; b] = Re(ds q^H) (a, b are real),   dq = [a; b]^T ds,
        dD  = -dq conj(q)^2,     dc = -sum_z dD conj(z),   dd = sum_z dD,
    with conj(q) rebuilt from conj(z).
    The backward is made of differentiable ops, so double backward works.
    """

    generate_vmap_rule = True      # its ops batch under torch.func.vmap (in place only on fresh results)

    @staticmethod
    def forward(ab: Tensor, c: Tensor, d: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        return _block(ab, c, d, z)

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        # Separate from forward, so that torch.func transforms (grad, jacrev) can run it.
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        ab, c, d, z = ctx.saved_tensors
        if ctx.needs_input_grad[3]:
            raise RuntimeError("cauchy_conj_shared: gradients with respect to the nodes z are not implemented")
        return (*_block_grads(ab, c, d, z, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]),
                None)


@jvp_variant(keep=lambda inputs, out: inputs)
class _SharedBlockJvp(_SharedBlock):
    """:class:`_SharedBlock` with its jvp (:func:`~lrnnx_zoo.base.jvp_variant`)."""

    @staticmethod
    def jvp(ctx, ab_t: Optional[Tensor], c_t: Optional[Tensor], d_t: Optional[Tensor],  # type: ignore[override]
            z_t: Optional[Tensor]) -> Tensor:
        """Forward-mode AD: with D = z^2 - c z + d, q = 1 / D and s = ab q, ds = dab q - ab (q^2 dD),
        dD = dd - dc z + (2 z - c) dz, and d out = z ds_a - ds_b + dz s_a (torch.func.jvp hands the
        nodes a zero tangent even where they are constants)."""
        ab, c, d, z = ctx.saved_tensors
        J = ab.shape[1] // 2
        q = _pole_factor(c, d, z, in_place=False)                              # (P, N, l)
        ds = 0
        if ab_t is not None:
            ds = _real_matmul(ab_t, q)
        dD = 0
        if d_t is not None:
            dD = d_t
        if c_t is not None:
            dD = dD - c_t * z
        if z_t is not None:
            dD = dD + (2 * z - c) * z_t
        if c_t is not None or d_t is not None or z_t is not None:
            ds = ds - _real_matmul(ab, q * dD * q)      # q dD first: q^2 alone overflows float32 (_block_grads)
        out = z * ds[:, :J] - ds[:, J:]
        if z_t is not None:
            out = out + z_t * _real_matmul(ab[:, :J], q)
        return out


def _block_grads(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, g: Tensor, need_ab: bool, need_cd: bool
                 ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad ab, grad c, grad d) of one node block for the output gradient g (P, J, l)
    (:class:`_SharedBlock`'s equations); in place where no graph of it is being built."""
    fresh = not torch.is_grad_enabled()      # in place unless building a double-backward graph
    zc = z.conj()
    # conj(q) built directly from conj(z) (c, d have real values): no conjugate copies for the matmuls
    qc = _pole_factor(c, d, zc, in_place=fresh)                             # (P, N, l)
    ds = torch.cat([g * zc, -g], dim=1)                                      # (P, 2J, l)
    grad_ab = grad_c = grad_d = None
    if need_ab:     # ab is real: the real part. (A real matmul over (re, im) pairs summed in another
        # order, so float32 training lost its bits, and was not faster: 11.27 vs 10.84 ms fwd+bwd.)
        grad_ab = (ds @ qc.transpose(1, 2)).real                            # (P, 2J, N)
    if need_cd:
        # dq = ab^T ds per node before anything is summed over the nodes: its two halves
        # (z a and b) nearly cancel near the poles, and summing over l first made the float32
        # log_dt gradient 4x less accurate (2.2e-4 vs 5.5e-5 of float64 at H=128, L=4096).
        dq = _real_matmul(ab.transpose(1, 2), ds)                           # (P, N, l)
        # -dD = dq conj(q)^2, as (dq conj(q)) conj(q): conj(q)^2 alone overflows float32 where |D| < 5e-20
        # (a pole of S4's clamped Re w = -1e-4 at dt = 1e-6: |w dt / 2|^2 = 2.5e-21 at the node 0 made
        # the log_dt and w gradients NaN), while dq conj(q)^2 itself is of the gradient's size (1e11 there)
        E = dq.mul_(qc).mul_(qc) if fresh else dq * qc * qc
        # Two reductions, not one matmul by [conj(z), 1]: MKL's complex GEMM with two columns
        # took 3.4x as long (1.87 vs 0.55 ms for a (4096, 256) block, one thread).
        grad_d = -E.sum(-1, keepdim=True)                                   # complex-typed like c, d
        grad_c = (E.mul_(zc) if fresh else E * zc).sum(-1, keepdim=True)
    return grad_ab, grad_c, grad_d


class _SharedBlocks(torch.autograd.Function):
    """Every node block of :func:`_block` as one Function, for eager autograd: the forward writes
    the blocks into one output (:func:`_blocks`), and the backward is :class:`_SharedBlock`'s per
    block, summed as autograd summed one ``_SharedBlock`` per block (last block first: the same
    bits). One ``_SharedBlock`` per block left each block's (P, J, l) output between the freed
    pole blocks, and the heap grew by ~5 output blocks' worth per block: S4's training forward at
    H=64, N=64, L=65536 peaked 650 MB above its start for a 64 MB Cauchy output (200 MB without
    autograd). Its backward is made of differentiable ops, so double backward works; torch.func
    transforms and forward-mode AD take the per-block Function (vmap cannot batch ``out=``)."""

    @staticmethod
    def forward(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        return _blocks(ab, c, d, z, chunk_size)

    @staticmethod
    def setup_context(ctx, inputs, out: Tensor) -> None:  # type: ignore[override]
        ab, c, d, z, ctx.chunk_size = inputs
        ctx.save_for_backward(ab, c, d, z)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        ab, c, d, z = ctx.saved_tensors
        if ctx.needs_input_grad[3]:
            raise RuntimeError("cauchy_conj_shared: gradients with respect to the nodes z are not implemented")
        need_ab, need_cd = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        total: list = [None, None, None]
        L = z.shape[0]
        for s in reversed(range(0, L, ctx.chunk_size)):
            e = s + ctx.chunk_size
            # one block takes g whole: a slice of all of it is an alias, which a batched backward
            # (is_grads_batched) cannot take
            gs = g if s == 0 and e >= L else g[..., s:e]
            for i, part in enumerate(_block_grads(ab, c, d, z[s:e], gs, need_ab, need_cd)):
                if part is not None:
                    total[i] = part if total[i] is None else total[i] + part
        grad_ab, grad_c, grad_d = total
        return (grad_ab if need_ab else None, grad_c if ctx.needs_input_grad[1] else None,
                grad_d if ctx.needs_input_grad[2] else None, None, None)


@torch.library.custom_op("lrnnx_zoo::shared_cauchy", mutates_args=())
def _shared_cauchy_op(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, chunk_size: int) -> Tensor:
    """The node blocks of :func:`cauchy_conj_shared` inside torch.compile graphs: one operator the
    compiler calls without tracing into it, its blocks written in place as in eager (traced, the
    blocks' functionalised copies and the Python loop over the nodes made S4's compiled kernel
    fwd+bwd 1.6x slower than eager, and pinned the number of nodes). ab (P, 2J, N), c, d (P, N, 1),
    z (l,) -> (P, J, l)."""
    return _blocks(ab, c, d, z, chunk_size)


def _blocks(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, chunk_size: int) -> Tensor:
    """Every node block of :func:`_block` written into one (P, J, l) output (a list of parts
    fragments the heap); no autograd."""
    out = torch.empty(ab.shape[0], ab.shape[1] // 2, z.shape[0], dtype=c.dtype, device=ab.device)
    for s in range(0, z.shape[0], chunk_size):
        _block(ab, c, d, z[s:s + chunk_size], out=out[..., s:s + chunk_size])
    return out


@_shared_cauchy_op.register_fake
def _shared_cauchy_fake(ab: Tensor, c: Tensor, d: Tensor, z: Tensor, chunk_size: int) -> Tensor:
    return c.new_empty(ab.shape[0], ab.shape[1] // 2, z.shape[0])


@torch.library.custom_op("lrnnx_zoo::shared_cauchy_backward", mutates_args=())
def _shared_cauchy_backward_op(g: Tensor, ab: Tensor, c: Tensor, d: Tensor, z: Tensor, chunk_size: int,
                               need_ab: bool, need_cd: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad ab, grad c, grad d) of :func:`_shared_cauchy_op`, summed over its node blocks (zeros
    where not needed)."""
    grad_ab, grad_c, grad_d = torch.zeros_like(ab), torch.zeros_like(c), torch.zeros_like(d)
    for s in range(0, z.shape[0], chunk_size):
        e = s + chunk_size
        gab, gc, gd = _block_grads(ab, c, d, z[s:e], g[..., s:e], need_ab, need_cd)
        if need_ab:
            grad_ab.add_(gab)
        if need_cd:
            grad_c.add_(gc)
            grad_d.add_(gd)
    return grad_ab, grad_c, grad_d


@_shared_cauchy_backward_op.register_fake
def _shared_cauchy_backward_fake(g: Tensor, ab: Tensor, c: Tensor, d: Tensor, z: Tensor, chunk_size: int,
                                 need_ab: bool, need_cd: bool) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(ab), torch.empty_like(c), torch.empty_like(d)


def _shared_cauchy_setup(ctx, inputs, output: Tensor) -> None:
    ab, c, d, z, ctx.chunk_size = inputs
    ctx.save_for_backward(ab, c, d, z)


def _shared_cauchy_grads(ctx, g: Tensor):
    ab, c, d, z = ctx.saved_tensors
    need_ab, need_c, need_d, need_z = ctx.needs_input_grad[:4]
    if need_z:
        raise RuntimeError("cauchy_conj_shared: gradients with respect to the nodes z are not implemented")
    gab, gc, gd = _shared_cauchy_backward_op(g.contiguous(), ab, c, d, z, ctx.chunk_size, need_ab, need_c or need_d)
    return (gab if need_ab else None), (gc if need_c else None), (gd if need_d else None), None, None


_shared_cauchy_op.register_autograd(_shared_cauchy_grads, setup_context=_shared_cauchy_setup)


def _shared_axes(v_shape: torch.Size, w_shape: torch.Size) -> tuple[torch.Size, list[int]]:
    batch = broadcast_shape(v_shape[:-1], w_shape[:-1])
    w_b = (1,) * (len(batch) - (len(w_shape) - 1)) + tuple(w_shape[:-1])
    return batch, [i for i, (s, ws) in enumerate(zip(batch, w_b)) if ws == 1 and s > 1]


def cauchy_conj_shared(v: Tensor, z: Tensor, w: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Conjugate-pair Cauchy sum ``sum_n v_n/(z_l - w_n) + conj(v_n)/(z_l - conj(w_n))`` in torch.

    Same contract as :func:`lrnnx_zoo.kernels.cauchy.cauchy_conj_torch`: v, w (..., N) with
    broadcasting batch dims, z (L,) -> (..., L) complex. Batch axes along which w is broadcast
    (size 1 in w) share one pole block; without such axes this defers to the generic backend.

    Args:
        chunk_size: nodes per block; default keeps a (rows, N, block) complex block near 8 MB.
    """
    if z.dim() != 1:
        raise ValueError(f"cauchy_conj_shared: z must be 1-D (L,), got shape {tuple(z.shape)}")
    batch, shared = _shared_axes(v.shape, w.shape)
    if not shared:
        return cauchy_conj_torch(v, z, w, chunk_size=chunk_size)
    cdt = _complex_dtype(v, z, w)
    N, L = v.shape[-1], z.shape[0]
    own = [i for i in range(len(batch)) if i not in shared]
    perm = own + shared + [len(batch)]
    v = v.to(cdt).expand(*batch, N).permute(perm)
    w = w.to(cdt).expand(*batch, N).permute(perm)        # shared axes are stride-0 views: no copy
    own_shape, shared_shape = v.shape[:len(own)], v.shape[len(own):-1]
    P, J = math.prod(own_shape), math.prod(shared_shape)
    v = v.reshape(P, J, N)
    w = w.reshape(P, J, N)[:, :1] if J else w.reshape(P, 1, N)
    ab = torch.cat([2 * v.real, 2 * (v * w.conj()).real], dim=1)                # (P, 2J, N) real
    # c, d are real, carried complex-typed: a real + complex broadcast took 3x longer than
    # complex + complex to build the (P, N, l) pole block
    c = (2 * w.real).transpose(1, 2).to(cdt)                                    # (P, N, 1)
    d = (w.real.square() + w.imag.square()).transpose(1, 2).to(cdt)
    z = z.to(cdt)
    if chunk_size is None:
        chunk_size = max(1, _BLOCK_BYTES // max(1, P * N * z.element_size()))
    # Under a torch.func transform the blocks go through the Function too (vmap cannot batch out=).
    grad = (func_transforms_active() or forward_ad_active()
            or torch.is_grad_enabled() and any(t.requires_grad for t in (ab, c, d, z)))
    if torch.compiler.is_compiling() and not func_transforms_active():
        out = _shared_cauchy_op(ab, c, d, z, chunk_size)
    elif grad and L and not (func_transforms_active() or forward_ad_active()):
        out = _SharedBlocks.apply(ab, c, d, z, chunk_size)   # the backward rebuilds each block's poles
    elif grad:   # the backward rebuilds each block's poles, so memory stays O(block)
        parts = [apply_function(_SharedBlock, ab, c, d, z[s:s + chunk_size]) for s in range(0, L, chunk_size)]
        out = torch.cat(parts, dim=-1) if parts else ab.new_zeros(P, J, 0)
    else:
        out = _blocks(ab, c, d, z, chunk_size)
    out = out.reshape(*own_shape, *shared_shape, L)
    inverse = [perm.index(i) for i in range(len(perm))]
    return out.permute(inverse)


def cauchy_conj_auto(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """"auto": keops when usable and the problem reaches :data:`KEOPS_MIN_TERMS` for the device,
    else :func:`cauchy_conj_shared`. ``LRNNX_ZOO_DISABLE_KEOPS=1`` always gives the torch path."""
    threshold = KEOPS_MIN_TERMS.get(v.device.type)
    if threshold is not None:
        batch = broadcast_shape(v.shape[:-1], w.shape[:-1])
        if math.prod(batch) * v.shape[-1] * z.shape[-1] >= threshold and auto_may_use_keops(v.device):
            return cauchy_conj_keops(v, z, w)
    return cauchy_conj_shared(v, z, w)
